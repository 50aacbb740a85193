"""The first divergence located: the step, the phase and the unit where it first went wrong.

The case is run again up to its first failing step d (steps < d exactly as `run_case` runs
them) and step d is run with probes, on every rank (`probe_case`) and on the reference
(`reference_probe`), which then are compared in the order the step computes them:

forward    the output of every wrap unit (`WrapPlan.units`), in execution order (a forward
           hook fires when a unit's output is ready, inner units first), for each forward pass
           of each rank: rank r's pass i is the reference's pass r (fast: rank r's k
           micro-batches concatenated) or r*k + i (deterministic: one micro-batch each). The
           first output that is not bitwise equal names the unit, unless the unit's inputs and
           the parameters it owns were bitwise equal to the reference's when its forward began:
           then the line says "same inputs, different outputs: a kernel difference, not the
           sharding" (a BLAS path chosen by memory alignment, a fused kernel) instead; where
           the unit's own parameters already differed as its forward began (as gathered), it
           says so, and where only its inputs did, it names the first unit whose own
           parameters did (an embedding in the root, whose output comes last).
backward   the reduced gradient of every parameter (the adapter's ``reduced_gradients``
           probe, reassembled from the ranks' pieces) against the reference's step gradient
           (an all-zero one the reference has none of is the same; n/a without the probe).
optimizer  the parameters after the step (``full_parameters``), given equal gradients.

The result is one line (`locate_divergence`), e.g. ``first divergence: step 1, blocks.0
backward: reduced gradient of blocks.0.fc.weight differs in 3 of 96 elements, worst 1 ulp at
[2, 5]``. A failure that is not numerical (padding, resharded, collectives, reassembly) is
located from its check record instead, without a re-run.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._pytree import tree_leaves

from verify.case.state_check import ZERO_EXTRA, all_zero, reassemble
from verify.case.train import Trainer
from verify.compare import int_view, ulp_distance
from verify.diagnosis.shrink import first_line
from verify.diagnosis.tiered import backward_order, from_tier, unit_of
from verify.ranks.poolset import as_pool_set
from verify.reference import RankBuffers, _bf16_copy, _deterministic_step, _fast_step
from verify.scenarios import Scenario, build_model, make_batch, make_optimizer, wrap_units
from verify.sharders import load
from verify.tools.plants import planted

__all__ = ["probe_case", "reference_probe", "locate_divergence", "first_step", "describe_diff"]

_NUMERIC = ("bitwise", "tolerance", "reported", "gradients", "optimizer_state")


def _leaves(out: Any) -> list[torch.Tensor]:
    try:
        leaves = tree_leaves(out)
    except Exception:
        leaves = [out]
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


class _Outputs:
    """Forward hooks on the wrap units: per forward pass (a pass begins with the root unit's
    forward), the (unit name, output tensors) in the order the outputs were ready, and beside
    them (``given``) what the unit computed them from: its input tensors and the parameters it
    owns (not those of a wrap unit inside it), as the forward pre-hook saw them (after the
    sharder's own pre-hooks: gathered); None where a parameter is a DTensor (still sharded)."""

    def __init__(self, units):
        self.passes: list[list[tuple[str, list[torch.Tensor]]]] = []
        self.given: list[list[Optional[tuple[list[torch.Tensor], Optional[dict]]]]] = []
        self.handles = []
        self._open: dict[str, list] = {}
        root = units[-1][1] if units else None
        for name, m in units:
            if m is root:
                self.handles.append(m.register_forward_pre_hook(lambda *_a: self._new_pass()))
            # what the unit owns is looked up as its forward begins: a sharder may register
            # other parameter objects then (fsdp_core swaps the gathered ones in)
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: self._enter(name, args, kwargs,
                                                                 _owned(name, mod, units)),
                with_kwargs=True))
            self.handles.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: self._record(name, out)))

    def _new_pass(self) -> None:
        self.passes.append([])
        self.given.append([])

    def _enter(self, name: str, args, kwargs, owned: list) -> None:
        params: Optional[dict] = {}
        for pname, p in owned:
            if type(p).__name__ == "DTensor" or hasattr(p, "full_tensor"):
                params = None   # still sharded here: the comparison cannot be made
                break
            params[pname] = p.detach().clone()
        self._open.setdefault(name, []).append((_leaves((args, kwargs)), params))

    def _record(self, name: str, out: Any) -> None:
        if not self.passes:
            self._new_pass()
        self.passes[-1].append((name, _leaves(out)))
        stack = self._open.get(name)
        self.given[-1].append(stack.pop() if stack else None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _owned(name: str, module, units) -> list:
    """The (name within the unit, parameter) pairs the unit owns: those of its subtree that are
    not inside another wrap unit nested in it."""
    nested = {id(m) for n, m in units if m is not module}
    out, stack = [], [("", module)]
    while stack:
        prefix, m = stack.pop()
        for pname, p in m.named_parameters(recurse=False):
            out.append((prefix + pname, p))
        for cname, child in m.named_children():
            if id(child) not in nested:
                stack.append((f"{prefix}{cname}.", child))
    return sorted(out, key=lambda np_: np_[0])


def probe_case(payload: dict, ctx) -> dict:
    """Rank side: payload {"scenario", "sharder", "plant", "step"}: train steps < step as
    `run_case` does, then step ``step`` with the unit-output hooks and the gradient probe."""
    with planted(payload.get("plant"), ctx):
        s = Scenario.from_json(payload["scenario"])
        d = payload["step"]
        trainer = Trainer(payload.get("sharder", "fsdp_core"), s, ctx)
        trainer.padding()
        for i in range(d):
            trainer.step(i)
        sh, model, opt = trainer.sharder, trainer.model, trainer.optimizer
        hooks = _Outputs(trainer.plan.units)
        try:
            losses = trainer.forward_backward(d)
        finally:
            hooks.remove()
        grads = sh.reduced_gradients(model)
        opt.step()
        trainer.zero_grad()
        trainer.step_loss(losses)
        full = sh.full_parameters(model, opt)
        return dict(rank=ctx.rank, outputs=hooks.passes, given=hooks.given, grads=grads,
                    params=full if ctx.rank == 0 else None)


def reference_probe(s: Scenario, d: int) -> dict:
    """The reference (verify/reference.py) to step ``d``, with the same hooks at step d:
    {"outputs": per pass, "grads": step d's gradient, "params": after step d}."""
    master = build_model(s)
    opt = make_optimizer(s, master.named_parameters())
    out: dict = {}
    buffers = RankBuffers()
    for step in range(d + 1):
        compute = master if s.dtype == "fp32" else _bf16_copy(s, master)
        batches = [make_batch(s, step, m) for m in range(s.micro_batches)]
        hooks = None
        if step == d:
            names = {id(m): n for n, m in compute.named_modules()}
            hooks = _Outputs([(names[id(m)], m) for m in wrap_units(s, compute)])
        try:
            _, grads = (_fast_step if s.mode == "fast" else _deterministic_step)(s, compute, batches,
                                                                                buffers)
        finally:
            if hooks is not None:
                hooks.remove()
        buffers.settle(compute)
        for name, p in master.named_parameters():
            p.grad = grads[name]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == d:
            out = dict(outputs=hooks.passes, given=hooks.given,
                       grads={n: g.detach().clone() for n, g in grads.items() if g is not None},
                       params={n: p.detach().clone()
                               for n, p in master.named_parameters(remove_duplicate=False)})
    return out


def describe_diff(actual: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """"differs in n of N elements, worst k ulp at [i, j]", or None when bitwise equal."""
    if actual.shape != expected.shape:
        return f"has shape {tuple(actual.shape)}, the reference's {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        actual = actual.to(expected.dtype)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    differs = int_view(a).ne(int_view(e))
    n = int(differs.sum())
    if n == 0:
        return None
    ulps = ulp_distance(a, e).reshape(-1)
    flat = int(torch.argmax(ulps))
    index = list(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else []
    at = "[" + ", ".join(str(int(i)) for i in index) + "]"
    worst = int(ulps[flat])
    size = f"{worst} ulp" if worst < 2**31 else f"|d| {float((a.double() - e.double()).abs().max()):.3g}"
    return f"differs in {n} of {a.numel()} elements, worst {size} at {at}"


def first_step(case) -> Optional[int]:
    """The first step any numerical check (or, failing that, any check) failed at."""
    fails = [c for c in case.checks or [] if c.get("status") == "fail"]
    numeric = [c["step"] for c in fails if c.get("check") in _NUMERIC and c.get("step") is not None]
    if numeric:
        return min(numeric)
    steps = [c["step"] for c in fails if c.get("step") is not None]
    return min(steps) if steps else None


def _from_check(case) -> Optional[str]:
    """A non-numerical failure, located from its check record."""
    fails = [c for c in case.checks or [] if c.get("status") == "fail"]
    if not fails or any(c.get("check") in _NUMERIC for c in fails):
        return None
    c = fails[0]
    step = "at init" if c.get("step") is None else f"step {c['step']}"
    detail = (c.get("detail") or "").splitlines()[0] if c.get("detail") else ""
    kind = c["check"]
    if kind == "padding":
        phase = ("init" if c.get("step") is None else
                 "backward (padding after the reduction)" if "(pad_reduce)" in detail else
                 "optimizer (padding after the step)")
    elif kind == "resharded":
        phase = "backward (a unit still unsharded after backward)"
    elif kind == "collectives":
        phase = "collectives (count or bytes vs the formula)"
    else:
        phase = kind
    return f"first divergence: {step}, {phase}: {detail}"


def locate_divergence(pool, s: Scenario, case, *, sharder: str, plant: Optional[str] = None,
                      timeout_s: Optional[float] = None) -> str:
    """One line naming where ``case`` (the failing run of ``s``) first went wrong."""
    line = _from_check(case)
    if line is not None:
        return line
    d = first_step(case)
    if d is None:
        return "first divergence: n/a (no failing step to re-run)"
    line = from_tier(s, case, d)
    if line is not None:
        return line
    payload = {"scenario": s.to_json(), "sharder": sharder, "step": d}
    if plant is not None:
        payload["plant"] = plant
    adapter = load(sharder)
    pools = as_pool_set(pool)
    ranks, why = pools.for_world(adapter.world, s.world_size)
    if ranks is None:
        return f"first divergence: n/a ({why})"
    if getattr(s, "mesh", None) is not None:
        pools.prepare_hsdp(ranks)
    pending = ranks.submit(s.world_size, probe_case, payload,
                           timeout_s=timeout_s or max(30.0, 3 * (case.wall_time_s or 1.0)))
    try:
        ref = reference_probe(s, d)
    finally:
        result = pending.result()
    if not result.ok:
        return f"first divergence: n/a (the probe run failed: {first_line(result.error or '?')})"
    return _compare(s, d, result.values, ref)


def _first_output_diff(passes, ref_passes, r: int, k: int, mode: str):
    """((pass, position, rank), unit, what, reference pass) of rank r's first unit output that
    differs."""
    for i, outputs in enumerate(passes):
        index = r * k + i if mode == "deterministic" else r
        if index >= len(ref_passes):
            return None
        for j, ((name, tensors), (_, ref_tensors)) in enumerate(zip(outputs, ref_passes[index])):
            for t, u in zip(tensors, ref_tensors):
                what = describe_diff(t, u)
                if what is not None:
                    return (i, j, r), name, what, index
    return None


def _bitwise_same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(int_view(x), int_view(y))
        for x, y in zip(a, b))


def _same_given(given, ref_given) -> bool:
    """True when a unit's inputs and own parameters are known and bitwise equal to the
    reference's (a kernel then computed different outputs from the same operands)."""
    if not given or not ref_given or given[1] is None or ref_given[1] is None:
        return False
    (inputs, params), (ref_inputs, ref_params) = given, ref_given
    if set(params) != set(ref_params):
        return False   # named otherwise by the sharder (a flat parameter): cannot tell
    names = sorted(params)
    return _bitwise_same(inputs, ref_inputs) and _bitwise_same(
        [params[n] for n in names], [ref_params[n] for n in names])


GATHERED = {True: "the initial parameters as the sharder gathered them: its initialisation or "
                  "its all-gather", False: "the parameters after the previous step were right: "
                  "its all-gather or what it did to them since"}


def _params_differing(given, ref_given) -> Optional[list[str]]:
    """The names of a unit's own parameters that were not bitwise the reference's when its
    forward began ([] none; None: cannot tell, e.g. named otherwise or still sharded)."""
    if not given or not ref_given or given[1] is None or ref_given[1] is None \
            or set(given[1]) != set(ref_given[1]) or any(
                given[1][n].shape != t.shape for n, t in ref_given[1].items()):
        return None   # named or shaped otherwise by the sharder (a flat parameter, a shard)
    return [n for n in sorted(given[1]) if not _bitwise_same([given[1][n]], [ref_given[1][n]])]


def _first_params_differing(outputs: list, mine: list, theirs: list, i: int, index: int):
    """(unit, names) of the first unit of pass ``i`` (in output order) whose own parameters
    differed when its forward began, or None."""
    for j in range(len(mine[i]) if i < len(mine) else 0):
        differ = _params_differing(_at(mine, i, j), _at(theirs, index, j))
        if differ and j < len(outputs[i]):
            return outputs[i][j][0], differ
    return None


def _at(given: list, i: int, j: int):
    return given[i][j] if i < len(given) and j < len(given[i]) else None


def _compare(s: Scenario, d: int, values: list[dict], ref: dict) -> str:
    where = f"first divergence: step {d}"
    # forward: the first unit output that differs, in execution order
    found = None
    k = s.k if s.mode == "deterministic" else 1
    for v in values:
        mine = _first_output_diff(v["outputs"], ref["outputs"], v["rank"], k, s.mode)
        if mine is not None and (found is None or mine[0] < found[0]):
            found = mine
    units = [n for n, _ in ref["outputs"][0]] if ref["outputs"] else []
    if found is not None:
        (i, j, r), name, what, index = found
        unit = name or "<root>"
        micro = f" (micro-batch {r * k + i})" if s.mode == "deterministic" else ""
        mine = next(v for v in values if v["rank"] == r).get("given")
        theirs = ref.get("given")
        if mine and theirs and _same_given(_at(mine, i, j), _at(theirs, index, j)):
            return (f"{where}, {unit} forward: same inputs, different outputs: a kernel "
                    f"difference, not the sharding (the inputs and parameters of {unit} on rank "
                    f"{r}{micro} equal the reference's bit for bit; its output {what})")
        # where the operands already differed, the output is not where it went wrong: say so
        own = _params_differing(_at(mine, i, j), _at(theirs, index, j)) if mine and theirs else None
        if own:
            return (f"{where}, {unit} forward: its parameters {own[:3]} on rank {r}{micro} "
                    f"differed from the reference's when its forward began ({GATHERED[d == 0]}); "
                    f"its output {what}")
        outputs = next(v for v in values if v["rank"] == r)["outputs"]
        owner = _first_params_differing(outputs, mine, theirs, i, index) if own == [] else None
        if owner is not None:
            return (f"{where}, {owner[0] or '<root>'} forward: its parameters {owner[1][:3]} on "
                    f"rank {r}{micro} differed from the reference's when its forward began "
                    f"({GATHERED[d == 0]}); the first unit output to differ is {unit}'s, whose "
                    f"own parameters were right (its inputs came from them): {what}")
        return f"{where}, {unit} forward: output of {unit} on rank {r}{micro} {what}"
    # backward: the reduced gradients
    recs = [v.get("grads") for v in values]
    grads_ok, zeros = None, set()
    if all(rec is not None for rec in recs):
        given = {n for rec in recs for n in rec}
        for name, want in backward_order(ref["grads"], units):
            if name not in given:
                return (f"{where}, {unit_of(name, units)} backward: reduced gradient of {name} "
                        f"is missing (no rank gave it)")
            flat, problem = reassemble(recs, name, want.numel(), want.dtype)
            what = problem or describe_diff(flat.reshape(want.shape), want)
            if what is not None:
                return (f"{where}, {unit_of(name, units)} backward: reduced gradient of {name} "
                        f"{what}")
        zeros = {n for n in given - set(ref["grads"]) if all_zero(recs, n)}
        if extra := sorted(given - set(ref["grads"]) - zeros):
            return (f"{where}, {unit_of(extra[0], units)} backward: a reduced gradient of "
                    f"{extra[0]}, which the reference has none of (frozen or unused there)")
        grads_ok = True
    # optimizer: the parameters after the step
    params = values[0].get("params") or {}
    for name, want in ref["params"].items():
        if name not in params:
            continue
        what = describe_diff(params[name].reshape(want.shape).to(want.dtype), want)
        if what is not None:
            unit = unit_of(name, units)
            why = "; " + ZERO_EXTRA.format(names=name, them="it", opt=s.optimizer) if name in zeros else ""
            if grads_ok:
                return (f"{where}, {unit} optimizer: the reduced gradients are equal, parameter "
                        f"{name} after the step {what}{why}")
            return (f"{where}, {unit} backward or optimizer (reduced gradients n/a: the adapter "
                    f"has no reduced_gradients probe): parameter {name} after the step {what}")
    return (f"{where}: n/a (re-run with probes: unit outputs, "
            f"{'reduced gradients, ' if grads_ok else ''}parameters after the step all equal "
            f"the reference's; the failure is in the loss or did not reproduce)")

"""The scale planner: fsdp_core's real shard layout, applied to a model built on the meta device,
turned into per-rank memory and per-step traffic at any world size (and 2-D meshes).

Two uses, one computation (`unit_shapes` -> `fsdp_core._layout.make_layout` per unit):
  - `plan_scenario(s)`: the exact figures the harness measures for one scenario (state bytes per
    rank per step, collectives per step), for the per-case check ``plan = measured``
    (`plan_problems`);
  - `plan_scale(...)`: the same layout math at 8..1024 ranks for 7B-70B models, with FSDP2's
    per-parameter layout and DeepSpeed's ZeRO-3 estimate beside it (`python -m verify plan`,
    rendered by verify/plan/cli.py).

[Note: what a unit owns]
`unit_shapes` mirrors `fsdp_core._api._collect`: wrap modules are taken inner first; a unit owns
the parameters registered under its module (``named_modules(remove_duplicate=False)`` order,
first registration wins, a tied parameter once) that no earlier unit owns. Its layout is
`make_layout([numel, ...], W)`: the same function, the same alignment, the same padding to a
multiple of W that `FlatUnit` uses.

[Note: the forward pattern]
Collectives and the unsharded peak depend on how often each unit runs. `plan_scenario` traces
one forward/backward of the scenario's model (on meta; on the CPU where a model cannot run on
meta, e.g. transformers' mask code calls ``.item()``): forward calls per unit, whether a unit's
output joins autograd (it re-gathers in backward), whether its inputs carry grad, and which
parameters receive a gradient. `plan_scale` assumes the default pattern: root first, then every
other unit once per micro-batch in wrap order, each fed activations that carry grad.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from fsdp_core import _layout
from fsdp_core._collectives import GATHER_KIND, REDUCE_SCATTER_KIND
from verify.scenarios import batch_to, build_model, loss_fn, make_batch, wrap_units

__all__ = ["UnitShape", "PlanFigures", "unit_shapes", "trace_units", "plan_scenario",
           "plan_problems", "unit_figures", "peak_unsharded", "OPT_STATES"]

# Optimizer-state tensors shaped like the parameter that exist once the optimizer has stepped
# (0-d ones, e.g. Adam's `step`, are not counted by the harness): SGD without momentum none,
# momentum one buffer, Adam/AdamW exp_avg and exp_avg_sq.
OPT_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


def _make_layout(numels: Sequence[int], world_size: int) -> _layout.FlatLayout:
    """fsdp_core's layout of one unit (module attribute lookup at call time: a planted layout
    bug in the planner only is a monkeypatch of this function)."""
    return _layout.make_layout(list(numels), world_size)


@dataclass(frozen=True)
class UnitShape:
    """One fully_shard unit as the planner sees it (no tensors, no memory)."""
    name: str                                  # module path, "" for the root
    numels: tuple[int, ...]                    # owned parameters, in ownership order
    shapes: tuple[tuple[int, ...], ...]
    requires_grad: tuple[bool, ...]
    has_grad: tuple[bool, ...]                 # receives a gradient in a step
    calls: int = 1                             # forward calls per micro-batch
    in_backward: bool = True                   # an output joins autograd: re-gathers in backward
    input_grad: bool = True                    # every call's inputs carry grad (else reduced at the end)

    def layout(self, world_size: int) -> _layout.FlatLayout:
        return _make_layout(self.numels, world_size)

    @property
    def trainable(self) -> bool:
        return any(self.requires_grad)


def unit_shapes(model: nn.Module, units: Sequence[nn.Module], trace: Optional[dict] = None) -> list[UnitShape]:
    """The units `fully_shard` would build for ``units`` (inner first, root last) on ``model``;
    units that own no parameter are dropped (fsdp_core builds no FlatUnit for them).
    ``trace``: from `trace_units` (else the default pattern)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owner: dict[int, nn.Module] = {}
    out = []
    for module in units:
        inside = {id(m) for m in module.modules()}
        params, seen = [], set()
        for mod_name, sub in module.named_modules(remove_duplicate=False):
            for attr, p in sub._parameters.items():
                if p is None or id(p) in seen:
                    continue
                prev = owner.get(id(p))
                if prev is not None:
                    if id(prev) not in inside:
                        raise ValueError(f"parameter {mod_name}.{attr} is tied across two units")
                    continue
                seen.add(id(p))
                params.append(p)
        for p in params:
            owner[id(p)] = module
        if not params:
            continue
        t = (trace or {}).get(id(module), {})
        has_grad = t.get("grads")
        out.append(UnitShape(
            name=names.get(id(module), type(module).__name__),
            numels=tuple(p.numel() for p in params), shapes=tuple(tuple(p.shape) for p in params),
            requires_grad=tuple(p.requires_grad for p in params),
            has_grad=tuple(id(p) in has_grad for p in params) if has_grad is not None
            else tuple(p.requires_grad for p in params),
            calls=t.get("calls", 1), in_backward=t.get("in_backward", True),
            input_grad=t.get("input_grad", True)))
    return out


# -- tracing a scenario ---------------------------------------------------------------------------

def _grad_tensors(x) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(x))


def trace_units(s, device: str = "meta"):
    """Build the scenario's model on ``device``, run one micro-batch forward and backward, and
    return (model, wrap units, trace, forward events). trace: id(unit module) -> calls,
    in_backward, input_grad, grads (ids of parameters that got a gradient); events: ("pre" |
    "post", id(unit module), inputs/outputs carry grad) in forward order."""
    model = build_model(s, device=device)
    units = wrap_units(s, model)
    trace: dict[int, dict] = {id(m): dict(calls=0, in_backward=False, input_grad=True) for m in units}
    events: list[tuple[str, int, bool]] = []
    handles = []
    for m in units:
        def pre(mod, args, kwargs, key=id(m)):
            g = _grad_tensors((args, kwargs))
            trace[key]["calls"] += 1
            trace[key]["input_grad"] &= g
            events.append(("pre", key, g))

        def post(mod, args, kwargs, out, key=id(m)):
            g = _grad_tensors(out)
            trace[key]["in_backward"] |= g
            events.append(("post", key, g))
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    batch = batch_to(make_batch(s, 0, 0), device)
    try:
        loss_fn(s, model, batch).backward()
    finally:
        for h in handles:
            h.remove()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    for t in trace.values():
        t["grads"] = with_grad
    return model, units, trace, events


# -- the figures the harness measures ------------------------------------------------------------

@dataclass(frozen=True)
class PlanFigures:
    """What `plan_scenario` predicts for one scenario with fsdp_core (see its docstring)."""
    world_size: int
    state_bytes: tuple[tuple[int, ...], ...]        # [step][rank]
    collectives: dict[str, list[int]]               # kind -> [calls, bytes], every step
    peak_unsharded: int                             # with prefetch (bench: fsdp_core)
    peak_unsharded_no_prefetch: int                 # bench: fsdp_core_noprefetch
    largest_unit_bytes: int                         # largest unit unsharded, param dtype
    units: tuple[UnitShape, ...] = field(repr=False, default=())


def _rank_bytes(u: UnitShape, lay, rank: int, which: Sequence[bool]) -> int:
    if all(which):
        return lay.shard_numel
    return sum(p.numel for p, w in zip(lay.local_pieces(rank), which) if w)


def unit_figures(units: Sequence[UnitShape], world_size: int, *, optimizer: str, steps: int,
                 param_item: int = 4, master_item: int = 4, reduce_item: int = 4, micro: int = 1,
                 reshard_after_forward: bool = True, deterministic: bool = False,
                 ranks: Optional[Sequence[int]] = None) -> tuple[list[list[int]], dict[str, list[int]]]:
    """State bytes [step][rank] (parameters + gradients + optimizer state, measured after
    backward, before the optimizer step) and collectives of one step, for these units."""
    n_state = OPT_STATES[optimizer]
    ranks = range(world_size) if ranks is None else ranks
    layouts = [u.layout(world_size) for u in units]
    params = sum(lay.shard_numel for lay in layouts) * master_item
    grads = [sum(_rank_bytes(u, lay, r, u.has_grad) for u, lay in zip(units, layouts)) * master_item
             for r in ranks]
    state = [[params + g + (n_state * g if step >= 1 else 0) for g in grads] for step in range(steps)]
    out: dict[str, list[int]] = {}
    if world_size > 1:
        gathers, reduce = [0, 0], [0, 0]
        for u, lay in zip(units, layouts):
            per_micro = (u.calls + (1 if u.in_backward else 0)) if reshard_after_forward else 1
            gathers[0] += per_micro * micro
            gathers[1] += per_micro * micro * lay.padded_numel * param_item
            if u.trainable:
                reduce[0] += 1
                reduce[1] += lay.padded_numel * reduce_item
        if gathers[0]:
            out[GATHER_KIND] = gathers
        if reduce[0]:
            out["all_to_all_single" if deterministic else REDUCE_SCATTER_KIND] = reduce
    return state, out


def peak_unsharded(units: Sequence[UnitShape], unit_bytes: Sequence[int], events, *,
                   prefetch: bool, reshard_after_forward: bool = True) -> int:
    """Peak bytes of unsharded unit buffers alive at once over one steady-state step (orders
    learned), simulating fsdp_core's unshard/reshard/prefetch rules ([Note: prefetch order] in
    fsdp_core/_hooks.py). ``events``: forward ("pre"|"post", unit index, carries grad); the
    backward is the forward reversed (a unit unshards when its output's gradient arrives and
    reshards when the last of its inputs' gradients is computed; a unit with an input that carries
    no grad is reduced, and resharded, by the end-of-backward callback)."""
    alive: dict[int, bool] = {}            # unit index -> prefetched and not yet used
    now = peak = 0

    def add(i: int, pre: bool) -> None:
        nonlocal now, peak
        if i not in alive:
            alive[i] = pre
            now += unit_bytes[i]
            peak = max(peak, now)
        elif not pre:
            alive[i] = False

    def drop(i: int) -> None:
        nonlocal now
        if i in alive:
            del alive[i]
            now -= unit_bytes[i]

    def run(seq) -> None:                  # seq: ("unshard"|"reshard", i)
        order = []
        for kind, i in seq:
            if kind == "unshard" and (not order or order[-1] != i):
                order.append(i)
        seen: list[int] = []
        for kind, i in seq:
            if kind == "reshard":
                drop(i)
                continue
            add(i, False)
            if seen and seen[-1] == i:
                continue
            seen.append(i)
            pos = len(seen) - 1
            if prefetch and pos + 1 < len(order):
                add(order[pos + 1], True)
        for i, pre in list(alive.items()):  # the end of the pass: unused prefetches reshard
            if pre:
                drop(i)

    fwd = []
    for kind, i, _g in events:
        fwd.append(("unshard", i) if kind == "pre" else ("reshard", i))
    if not reshard_after_forward:
        fwd = [e for e in fwd if e[0] == "unshard"]
    run(fwd)
    remaining = {i: units[i].calls for i in range(len(units))}
    bwd = []
    for kind, i, g in reversed(events):
        if kind == "post" and g:
            bwd.append(("unshard", i))
        elif kind == "pre":
            remaining[i] -= 1
            if remaining[i] == 0 and units[i].input_grad and units[i].in_backward:
                bwd.append(("reshard", i))
    run(bwd)
    return peak


def default_events(units: Sequence[UnitShape]) -> list[tuple[str, int, bool]]:
    """The default forward pattern: the root (last unit) around every other unit, in order."""
    root = len(units) - 1
    ev = [("pre", root, False)]
    for i in range(root):
        ev += [("pre", i, True), ("post", i, True)]
    return ev + [("post", root, True)]


def plan_scenario(s) -> PlanFigures:
    """fsdp_core's figures for scenario ``s`` at ``s.world_size``, computed without running it.

    Contract (exact, bytes not ratios), for the harness check ``plan = measured`` on a case of
    sharder fsdp_core (`verify.campaign.run.run_one(pool, s)` -> CaseResult):
      - ``state_bytes[i][r] == case.steps[i].state_bytes[r]`` for every step i < s.steps and
        rank r < W: rank r's parameter shards (every unit's ``shard_numel``, fp32 master dtype)
        + the sharded gradients of the parameters that received one (their local pieces, padding
        included) + the optimizer-state tensors with dim > 0 (none at step 0: measured before the
        first optimizer step; from step 1 one momentum buffer / Adam's two moments per parameter
        that had a gradient; none for plain SGD), as `verify.case.probes.state_bytes` measures them
        after backward and before ``opt.step()``;
      - ``collectives == case.steps[i].collectives`` for every step (rank 0's recording; the same
        as `verify.sharders.fsdp_core.FsdpCore.expected_collectives`): per unit and micro-batch, one all-gather per
        forward call plus one in backward when resharding after forward and the unit's output
        joins autograd (one in all without), ``padded_numel`` x param-dtype bytes each; one
        reduction per unit with a trainable parameter per step, ``padded_numel`` x reduce-dtype
        (fp32) bytes, ``REDUCE_SCATTER_KIND`` in fast mode, ``all_to_all_single`` in
        deterministic mode (which also gathers once per micro-batch, k = M/W of them); ``{}`` at
        W = 1.
    Also ``peak_unsharded`` / ``peak_unsharded_no_prefetch``: the peak of unsharded buffers alive
    at once in a steady-state step (fsdp_core._flat_param.UNSHARDED_BYTES, as verify/tools/bench.py
    measures it; 0 at W = 1 in fp32, where the shard is the buffer).
    Needs transformers for the hf_* families (their forward is traced on the CPU)."""
    try:
        model, wraps, trace, events = trace_units(s, "meta")
    except (RuntimeError, NotImplementedError):
        model, wraps, trace, events = trace_units(s, "cpu")
    units = unit_shapes(model, wraps, trace)
    index = {}
    by_name = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    for i, u in enumerate(units):
        index[u.name] = i
    ev = [(k, index[by_name[m]], g) for k, m, g in events if by_name[m] in index]
    W, bf16 = s.world_size, s.dtype == "bf16"
    det = s.mode == "deterministic"
    state, coll = unit_figures(units, W, optimizer=s.optimizer, steps=s.steps,
                               param_item=2 if bf16 else 4, micro=s.k if det else 1,
                               reshard_after_forward=s.reshard_after_forward, deterministic=det)
    aliased = W == 1 and not bf16
    ubytes = [0 if aliased else u.layout(W).padded_numel * (2 if bf16 else 4) for u in units]
    kw = dict(reshard_after_forward=s.reshard_after_forward)
    return PlanFigures(
        world_size=W, state_bytes=tuple(tuple(x) for x in state), collectives=coll,
        peak_unsharded=peak_unsharded(units, ubytes, ev, prefetch=True, **kw),
        peak_unsharded_no_prefetch=peak_unsharded(units, ubytes, ev, prefetch=False, **kw),
        largest_unit_bytes=max(u.layout(W).padded_numel for u in units) * (2 if bf16 else 4),
        units=tuple(units))


def plan_problems(s, case, figures: Optional[PlanFigures] = None) -> list[str]:
    """The check ``plan = measured`` for one fsdp_core case: [] when every step's measured state
    bytes (every rank) and collectives equal `plan_scenario`'s, else one line per difference.
    Cases that did not run (no steps recorded) give [] (nothing to compare)."""
    fig = plan_scenario(s) if figures is None else figures
    problems = []
    for i, st in enumerate(case.steps):
        want = list(fig.state_bytes[i]) if i < len(fig.state_bytes) else None
        if list(st.state_bytes) != want:
            problems.append(f"step {i}: state bytes per rank {list(st.state_bytes)} != plan {want}")
        got = {k: list(v) for k, v in st.collectives.items() if v[0]}
        if got != fig.collectives:
            problems.append(f"step {i}: collectives {got} != plan {fig.collectives}")
    return problems


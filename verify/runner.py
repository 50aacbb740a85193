"""The rank side of a case: rebuild the scenario, shard it, train it, record every step.

`run_case(payload, ctx)` runs on ranks 0..W-1 of a pool (or under torchrun). It returns, per
rank, plain data: the step losses, the full parameters after every step (rank 0 only, through
`full_state_dict`), this rank's local pieces of every parameter (so the parent can reassemble
the shards itself), the padding views that were not zero, the collectives of the step by kind,
this rank's state bytes and the step time. Comparing with the reference happens in the parent.

[Note: the training protocol]
fast: rank r concatenates its k = M/W micro-batches [r*k, (r+1)*k) into one local batch; one
forward/backward with gradient sync. deterministic: k forward/backwards, loss_m / k each,
``set_requires_gradient_sync(i == k - 1)`` before the i-th. Both are what the reference
(verify/reference.py) mirrors.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist

from verify.compare import is_bitwise_zero
from verify.scenarios import (Scenario, build_model, cat_batches, loss_fn, make_batch,
                              make_optimizer, step_loss, tree, wrap_units)

__all__ = ["run_case", "train_steps", "CollectiveRecorder", "RECORDED_COLLECTIVES"]

# torch.distributed functions a sharder's data path uses; the recorder wraps exactly these.
# (all_gather_single / reduce_scatter_single are the newer names FSDP2 calls.)
RECORDED_COLLECTIVES = tuple(name for name in (
    "all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
    "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all", "all_reduce",
    "broadcast") if hasattr(dist, name))


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveRecorder:
    """A thin wrapper around torch.distributed calls: counts calls and bytes by kind while
    active. Bytes are those of the larger of the first two tensor arguments: the unsharded
    side of a gather or a reduce-scatter, the buffer of an all-to-all or all-reduce."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._saved: dict[str, Callable] = {}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            entry = self.counts[name]
            entry[0] += 1
            tensors = list(args[:2]) + [kwargs[k] for k in ("output", "input", "tensor",
                                                              "output_tensor", "input_tensor") if k in kwargs]
            entry[1] += max((_nbytes(a) for a in tensors), default=0)
            return fn(*args, **kwargs)
        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    @contextlib.contextmanager
    def recording(self):
        for name in RECORDED_COLLECTIVES:
            fn = getattr(dist, name)
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in self._saved.items():
                setattr(dist, name, fn)
            self._saved.clear()

    def take(self) -> dict[str, list[int]]:
        out = {k: list(v) for k, v in self.counts.items()}
        self.counts.clear()
        return out


# -- sharders -------------------------------------------------------------------------------

def shard_fsdp_core(s: Scenario, model: torch.nn.Module, group) -> torch.nn.Module:
    import fsdp_core
    mp = None
    if s.dtype == "bf16":
        mp = fsdp_core.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in wrap_units(s, model):
        fsdp_core.fully_shard(unit, mesh=group, reshard_after_forward=s.reshard_after_forward,
                              mp_policy=mp, deterministic=(s.mode == "deterministic"))
    return model


def _peer(name: str) -> Callable[[Scenario, torch.nn.Module, Any], torch.nn.Module]:
    def shard(s: Scenario, model: torch.nn.Module, group) -> torch.nn.Module:
        from verify import peers
        return getattr(peers, f"shard_{name}")(s, model, group)
    shard.__name__ = f"shard_{name}"
    return shard


# Every sharder the harness runs; the peers (verify/peers.py) have their own case loop.
SHARDERS: dict[str, Callable[[Scenario, torch.nn.Module, Any], torch.nn.Module]] = {
    "fsdp_core": shard_fsdp_core,
    "torch_fsdp2": _peer("torch_fsdp2"),
    "ddp": _peer("ddp"),
}


def expected_collectives(s: Scenario, model: torch.nn.Module, calls: dict[int, int],
                         in_backward: set[int]) -> dict[str, list[int]]:
    """The per-step formula for fsdp_core (nothing at all on one rank): per unit and
    micro-batch, one all-gather per forward
    call plus one in backward when resharding after forward (one in all without; none in
    backward for a unit that autograd never reaches), and one reduction per unit with trainable
    parameters per step (reduce-scatter in fast mode, all-to-all in deterministic mode).
    ``calls``: forward calls per unit in the step; ``in_backward``: units reached by backward."""
    import fsdp_core
    micro = s.k if s.mode == "deterministic" else 1
    gathers = [0, 0]
    reduce = [0, 0]
    for unit in fsdp_core.units_of(model):
        if unit.world_size == 1:
            continue  # one rank: fsdp_core gathers and reduces nothing
        item = unit.param_dtype.itemsize
        n_calls = calls.get(id(unit), 0) // micro
        regather = 1 if id(unit) in in_backward else 0
        per_micro = (n_calls + regather) if unit.reshard_after_forward else 1
        gathers[0] += per_micro * micro
        gathers[1] += per_micro * micro * unit.layout.padded_numel * item
        if any(unit.requires_grad):
            reduce[0] += 1
            reduce[1] += unit.layout.padded_numel * unit.reduce_dtype.itemsize
    kind = "all_to_all_single" if s.mode == "deterministic" else "reduce_scatter_tensor"
    out = {"all_gather_into_tensor": gathers} if gathers[0] else {}
    if reduce[0]:
        out[kind] = reduce
    return out


# -- the case -------------------------------------------------------------------------------

def _still_unsharded(model) -> list[str]:
    """Units holding a gathered (or in-flight) copy once backward is done: none may, or the
    optimizer step would leave a stale unsharded copy behind for the next forward."""
    import fsdp_core
    return [f"{u.module_name}[{u.names[0]}...]" for u in fsdp_core.units_of(model)
            if u.state.value != "sharded" or u.prefetched]


def _padding_bad(model, opt) -> list[str]:
    import fsdp_core
    return [label for label, view in fsdp_core.padding_views(model, opt) if not is_bitwise_zero(view)]


def _state_bytes(model, opt) -> int:
    n = 0
    for p in model.parameters():
        n += p.numel() * p.element_size()
        if p.grad is not None:
            n += p.grad.numel() * p.grad.element_size()
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                n += v.numel() * v.element_size()
    return n


def _local_pieces(model) -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (start in the flattened parameter, this rank's real elements)."""
    out = {}
    for name, p in model.named_parameters():
        unit = getattr(p, "_fsdp_unit", None)
        if unit is None:
            out[name] = (0, p.detach().reshape(-1).clone())
            continue
        piece = unit.pieces[p._fsdp_index]
        out[name] = (piece.param_start, p.detach()[: piece.real_numel].float().clone())
    return out


def _local_grads(model) -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (start in the flattened parameter, this rank's real gradient elements) for every
    sharded parameter with a gradient: the step's reduced gradient, before the optimizer."""
    out = {}
    for name, p in model.named_parameters():
        unit = getattr(p, "_fsdp_unit", None)
        if unit is not None and p.grad is not None:
            piece = unit.pieces[p._fsdp_index]
            out[name] = (piece.param_start, p.grad.detach()[: piece.real_numel].clone())
    return out


def _any_requires_grad(output) -> bool:
    from torch.utils._pytree import tree_leaves
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(output))


def _watch_units(model) -> tuple[dict[int, int], set[int], list]:
    """Forward calls per unit, and the units whose outputs joined autograd (they re-gather in
    backward), for the collective formula."""
    import fsdp_core
    calls: dict[int, int] = defaultdict(int)
    in_backward: set[int] = set()
    handles = []
    for m in model.modules():
        if isinstance(m, fsdp_core.FSDPModule) and m._fsdp_unit is not None:
            key = id(m._fsdp_unit)
            handles.append(m.register_forward_pre_hook(
                lambda *_a, key=key: calls.__setitem__(key, calls[key] + 1)))
            handles.append(m.register_forward_hook(
                lambda _m, _i, out, key=key: in_backward.add(key) if _any_requires_grad(out) else None))
    return calls, in_backward, handles


def run_case(payload: dict, ctx) -> dict:
    from verify.plant import planted  # payload["plant"]: a planted bug (verify/plant.py), or none
    with planted(payload.get("plant"), ctx):
        # The backend itself first (verify/backend_check.py): each rank reports what it saw.
        from verify.backend_check import backend_problem
        # fp32 always (the master dtype and the reduce dtype); bf16 only where the case uses it.
        bf16 = Scenario.from_json(payload["scenario"]).dtype == "bf16"
        dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
        problem = (backend_problem(ctx.group, ctx.device, dtypes=dtypes)
                   if payload.get("backend_check", True) else None)
        out = _run_case(payload, ctx)
        return dict(out, backend_error=problem) if problem and isinstance(out, dict) else out


def _run_case(payload: dict, ctx) -> dict:
    s = Scenario.from_json(payload["scenario"])
    sharder = payload.get("sharder", "fsdp_core")
    if sharder != "fsdp_core":
        from verify.peers import run_peer_case
        return run_peer_case(payload, ctx)
    if s.world_size != ctx.world_size:
        raise ValueError(f"scenario world_size {s.world_size} sent to a group of {ctx.world_size} ranks")
    torch.set_num_threads(1)
    model = SHARDERS[sharder](s, build_model(s), ctx.group)
    opt = make_optimizer(s, model.named_parameters())
    pad_init = _padding_bad(model, opt)
    records = train_steps(s, ctx, model, opt, range(s.steps))
    return dict(rank=ctx.rank, pad_init=pad_init, records=records)


def train_steps(s: Scenario, ctx, model: torch.nn.Module, opt: torch.optim.Optimizer,
                steps) -> list[dict]:
    """Train the global steps ``steps`` (the protocol of [Note: the training protocol]) and
    return one record per step; shared by `run_case` and the checkpoint-resume cases
    (verify/resume.py), which train a range of steps, save, load elsewhere and go on."""
    W, r, k = ctx.world_size, ctx.rank, s.k
    recorder = CollectiveRecorder()
    import fsdp_core
    records = []
    for step in steps:
        mine = [make_batch(s, step, m) for m in range(r * k, (r + 1) * k)]
        calls, in_backward, handles = _watch_units(model)
        t0 = time.perf_counter()
        with recorder.recording():
            if s.mode == "deterministic":
                losses = []
                for i, batch in enumerate(mine):
                    model.set_requires_gradient_sync(i == k - 1)
                    loss = loss_fn(s, model, batch)
                    (loss / k).backward()
                    losses.append(loss.detach().float())
            else:
                loss = loss_fn(s, model, cat_batches(mine))
                loss.backward()
                losses = [loss.detach().float()]
            t_checks = time.perf_counter()
            pad_reduce = _padding_bad(model, None)
            unsharded = _still_unsharded(model)
            grads = _local_grads(model)
            state_bytes = _state_bytes(model, opt)
            t_checks = time.perf_counter() - t_checks  # not the sharder's time: left out
            opt.step()
        step_time = time.perf_counter() - t0 - t_checks
        for h in handles:
            h.remove()
        pad_step = _padding_bad(model, opt)
        opt.zero_grad(set_to_none=True)
        collectives = recorder.take()
        expected = expected_collectives(s, model, calls, in_backward)
        # The step loss, outside the recorder: deterministic = step_loss over all M micro-batch
        # losses in global order; fast = tree over the ranks' local mean losses / W.
        local = torch.stack(losses)
        gathered = torch.empty(W * local.numel(), dtype=local.dtype)
        dist.all_gather_into_tensor(gathered, local, group=ctx.group)
        if s.mode == "deterministic":
            step_l = step_loss(list(gathered))
        else:
            step_l = tree(list(gathered)) / W
        full = fsdp_core.full_state_dict(model)  # collective: every rank gathers
        full = full if r == 0 else None
        records.append(dict(
            step=step, loss=step_l, params=full, pieces=_local_pieces(model), grads=grads,
            pad_reduce=pad_reduce, pad_step=pad_step, unsharded=unsharded, collectives=collectives,
            expected_collectives=expected, state_bytes=state_bytes, step_time_s=step_time,
        ))
    return records

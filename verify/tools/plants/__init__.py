"""Planted bugs: named, documented mistakes a sharder (or the layer below it) can make, installed
inside a rank process so that the harness can prove it catches them.

A plant is a function ``install(ctx) -> undo``: it monkeypatches ``torch.distributed`` (below the
sharder, where an unseen bug would be injected) or fsdp_core internals (``_collectives``,
``_flat_param.FlatUnit``, ``_grad_reduce.GradReduction``, ``_hooks``), and returns a callable that restores every patched attribute.
``verify.case.train.run_case`` installs ``payload["plant"]`` before it builds the model and undoes
it when the case ends (ranks are reused across cases, so an undo must be exact).

`BUGS` are silent numerical or bookkeeping bugs: each names the fixed small scenarios it must
fail (``catch``) and, where the harness is blind to it by design, scenarios it passes
(``blind``, e.g. last-bit bugs under the tolerance tier). `FAULTS` are rank failures (raise,
exit, hang on rank 1) that must become one 'error' case. docs/planted_bugs.md is the table of
what each breaks and which check catches it; ``python -m verify mutants`` (verify/tools/mutants.py)
runs them all. The ``--plant NAME`` option of ``run``/``replay`` installs one for a demo.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from verify.scenarios import Scenario

__all__ = ["Plant", "BUGS", "FAULTS", "PLANTS", "install", "planted", "check_name",
           "mlp_scenario"]

Undo = Callable[[], None]


@dataclass(frozen=True)
class Plant:
    name: str
    install: Callable[..., Undo]         # install(ctx) -> undo, inside a rank
    breaks: str                          # one line: what goes wrong
    catch: tuple[Scenario, ...]          # scenarios whose planted run must not pass
    blind: tuple[Scenario, ...] = ()     # scenarios that, by design, cannot see it
    kind: str = "bug"                    # "bug" | "fault"

    @property
    def doc(self) -> str:
        return (self.install.__doc__ or "").strip()


# -- fixed small scenarios ----------------------------------------------------------------------
# A 2-block MLP (5 -> 7 -> 3; the 35-element weight and the 7-element bias are padded to 64 and
# 8 by alignment, so every shard holds padding), two steps, SGD unless said otherwise.

def mlp_scenario(world_size: int, mode: str = "fast", *, micro_batches: Optional[int] = None,
                 **kw) -> Scenario:
    """The fixed MLP case at ``world_size``; M = max(4, W) unless given; other fields by name."""
    kw.setdefault("steps", 2)
    s = Scenario(family="mlp", model=(("d_in", 5), ("width", 7)), world_size=world_size,
                 mode=mode, micro_batches=micro_batches or max(4, world_size), **kw)
    s.validate()
    return s


FAST2, FAST4 = mlp_scenario(2), mlp_scenario(4)
DET2, DET4 = mlp_scenario(2, "deterministic"), mlp_scenario(4, "deterministic")
FAST4_ADAM = mlp_scenario(4, optimizer="adam")
FAST2_BF16 = mlp_scenario(2, dtype="bf16")
DET2_BF16 = mlp_scenario(2, "deterministic", dtype="bf16")
DET4_BF16 = mlp_scenario(4, "deterministic", dtype="bf16")


# -- patching helpers ---------------------------------------------------------------------------

def _patch(owner, name: str, value) -> Undo:
    """Set ``owner.name = value``; the undo puts back exactly what was there (for a class, the
    raw descriptor from its ``__dict__``, so properties and functions round-trip)."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    return lambda: setattr(owner, name, original)


def _undo_all(undos: list[Undo]) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo


def _group_rank(kwargs: dict) -> int:
    return dist.get_rank(kwargs.get("group"))


def _completed(work):
    """An async collective's output is written only by its end: a plant that edits the output
    waits first (the caller's own later ``wait()`` then returns at once)."""
    if work is not None:
        work.wait()
    return work


def _wrap_dist(names: tuple[str, ...], make: Callable[[Callable], Callable]) -> Undo:
    """Replace each ``torch.distributed.<name>`` by ``make(original)``."""
    return _undo_all([_patch(dist, n, make(getattr(dist, n))) for n in names])


def _internals():
    import fsdp_core._collectives as C
    import fsdp_core._hooks as M
    from fsdp_core._flat_param import FlatUnit, ShardState
    return C, M, FlatUnit, ShardState


def _grad_side():
    """The class that defines a unit's gradient methods (``FlatUnit`` inherits them)."""
    from fsdp_core._grad_reduce import GradReduction
    return GradReduction


# Both names of each collective (the one fsdp_core calls, chosen by torch version, and the
# other), so a plant below the sharder is installed wherever the code calls it.
_GATHERS = tuple(n for n in ("all_gather_into_tensor", "all_gather_single") if hasattr(dist, n))
_REDUCTIONS = tuple(n for n in ("reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single")
                    if hasattr(dist, n))  # fast, deterministic


# -- bugs below the sharder (torch.distributed) -------------------------------------------------

def drop_rank_grad(ctx) -> Undo:
    """Rank 1's gradient contribution is dropped: it feeds zeros into the gradient reduction
    (``reduce_scatter_single``/``reduce_scatter_tensor`` in fast mode, ``all_to_all_single``
    in deterministic mode).
    Planted in torch.distributed."""
    def make(orig):
        def fn(output, input, *args, **kwargs):
            if _group_rank(kwargs) == 1:
                input = torch.zeros_like(input)
            return orig(output, input, *args, **kwargs)
        return fn
    return _wrap_dist(_REDUCTIONS, make)


def swap_shards_allgather(ctx) -> Undo:
    """Every ``all_gather_single``/``all_gather_into_tensor`` hands back ranks 0 and 1's shards swapped in its output
    (a rank-ordering bug in the collective). Planted in torch.distributed, so the harness's own
    gathers (``full_state_dict``) see it too."""
    def make(orig):
        def fn(output, input, *args, **kwargs):
            work = _completed(orig(output, input, *args, **kwargs))
            world = dist.get_world_size(kwargs.get("group"))
            if world >= 2 and output.numel() % world == 0:
                chunks = output.view(-1).view(world, -1)
                tmp = chunks[0].clone()
                chunks[0].copy_(chunks[1])
                chunks[1].copy_(tmp)
            return work
        return fn
    return _wrap_dist(_GATHERS, make)


def dist_reduce_one_ulp(ctx) -> Undo:
    """On rank 0, the first non-zero element that the gradient reduction hands back is one ulp
    off: in the output of ``reduce_scatter_single`` (fast), in the received buffer of
    ``all_to_all_single`` (deterministic). Planted in torch.distributed; a last-bit bug. (A
    zero element would often make it a no-op: a subnormal rounds away in the sum or the / W.)"""
    from verify.compare import int_view

    def make(orig):
        def fn(output, input, *args, **kwargs):
            work = _completed(orig(output, input, *args, **kwargs))
            nonzero = output.view(-1).nonzero()
            if _group_rank(kwargs) == 0 and len(nonzero):
                int_view(output.view(-1))[int(nonzero[0])] += 1
            return work
        return fn
    return _wrap_dist(_REDUCTIONS, make)


# -- bugs in the sharder's collectives ----------------------------------------------------------

def reduce_scale_2pow20(ctx) -> Undo:
    """Reduced gradients come back scaled by (1 + 2^-20), as from a mean computed with a
    slightly wrong divisor. A relative error of 1e-6: inside fp32 tolerances."""
    C, *_ = _internals()
    scale = 1.0 + 2.0**-20

    def make(orig):
        def fn(flat, group):
            return orig(flat, group).mul_(scale)
        return fn
    return _undo_all([_patch(C, "reduce_scatter_mean", make(C.reduce_scatter_mean)),
                      _patch(C, "tree_reduce_mean", make(C.tree_reduce_mean))])


def no_divide_by_world(ctx) -> Undo:
    """The gradient reduction sums over ranks but never divides by the world size W (the step
    uses W times the gradient). Invisible at W = 1, and to Adam (scale-invariant)."""
    C, *_ = _internals()

    @torch.no_grad()
    def reduce_scatter_sum(flat, group):
        world = dist.get_world_size(group)
        out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
        getattr(dist, C.REDUCE_SCATTER_KIND)(out, flat, op=dist.ReduceOp.SUM, group=group)
        return out

    @torch.no_grad()
    def tree_reduce_sum(flat, group):
        world = dist.get_world_size(group)
        recv = torch.empty_like(flat)
        dist.all_to_all_single(recv, flat, group=group)
        return C.tree_sum(list(recv.chunk(world)))

    return _undo_all([_patch(C, "reduce_scatter_mean", reduce_scatter_sum),
                      _patch(C, "tree_reduce_mean", tree_reduce_sum)])


def sequential_cross_rank_sum(ctx) -> Undo:
    """Deterministic mode sums the W received slices left to right, ((g0 + g1) + g2) + g3,
    instead of the balanced tree (g0 + g1) + (g2 + g3) the contract promises. The same at
    W <= 2; differs in the last bits from W = 4."""
    C, *_ = _internals()

    @torch.no_grad()
    def tree_reduce_mean(flat, group):
        world = dist.get_world_size(group)
        recv = torch.empty_like(flat)
        dist.all_to_all_single(recv, flat, group=group)
        slices = list(recv.chunk(world))
        total = slices[0].clone()
        for s in slices[1:]:
            total += s
        return total.div_(world)

    return _patch(C, "tree_reduce_mean", tree_reduce_mean)


# -- bugs in the unit (FlatUnit) ----------------------------------------------------------------

def allgather_one_ulp(ctx) -> Undo:
    """After the all-gather of an unshard, on rank 0, the first element of the unit's unsharded
    buffer is one ulp off (say, from a cast or a copy that rounds differently on one rank).
    Forward and backward then use it; the sharded master copy stays right. A last-bit bug."""
    from verify.compare import int_view
    _, _, FlatUnit, _ = _internals()
    orig = FlatUnit._finish_unshard  # every gather ends here, prefetched or not

    def _finish_unshard(self):
        orig(self)
        if ctx.rank == 0 and self.unsharded_flat is not None:
            flat = self.unsharded_flat
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(flat):
                int_view(flat)[self.layout.offsets[0]] += 1

    return _patch(FlatUnit, "_finish_unshard", _finish_unshard)


def view_offset_off_by_one(ctx) -> Undo:
    """Off-by-one in the flat layout: the last parameter of every unit is viewed one element
    late in the unsharded buffer (``flat[off + 1 : off + 1 + n]``), so forward reads its
    neighbour's element and one padding element. Gradients are flattened at the right offset."""
    _, _, FlatUnit, _ = _internals()
    orig = FlatUnit._alloc_unsharded

    def _alloc_unsharded(self):
        orig(self)
        flat, layout = self.unsharded_flat, self.layout
        i = layout.num_params - 1
        off, n = layout.offsets[i], layout.numels[i]
        if n and off + 1 + n <= flat.numel():
            p = self.unsharded_params[i]
            p.data = flat[off + 1: off + 1 + n].view(self.shapes[i])

    return _patch(FlatUnit, "_alloc_unsharded", _alloc_unsharded)


def stale_grad_accumulation(ctx) -> Undo:
    """Under gradient accumulation (``set_requires_gradient_sync(False)``, deterministic mode)
    the unsharded gradients are not cleared after a micro-batch is pushed, so the next
    micro-batch's gradient arrives with the previous one still in it (a stale gradient)."""
    grads = _grad_side()
    orig = grads._clear_unsharded_grads

    def _clear_unsharded_grads(self):
        if self.deterministic and not self.requires_gradient_sync:
            return
        orig(self)

    return _patch(grads, "_clear_unsharded_grads", _clear_unsharded_grads)


def sequential_local_accumulation(ctx) -> Undo:
    """Deterministic mode accumulates a rank's k micro-batch gradients into one running sum,
    ((g0 + g1) + g2) + g3, instead of the streaming pairwise tree. The same for k <= 2;
    differs in the last bits from k = 4."""

    def _push_microbatch(self, flat):
        if self._acc:
            n, acc = self._acc.pop()
            self._acc.append((n + 1, acc.add_(flat)))
        else:
            self._acc.append((1, flat))

    return _patch(_grad_side(), "_push_microbatch", _push_microbatch)


def grad_reduced_in_bf16(ctx) -> Undo:
    """Mixed precision ignores ``reduce_dtype``: gradients are reduced (and, in deterministic
    mode, accumulated) in the bf16 param dtype instead of fp32. A no-op for fp32 cases."""
    _, _, FlatUnit, _ = _internals()
    return _patch(FlatUnit, "reduce_dtype", property(lambda self: self.param_dtype))


def master_grad_rounded_to_bf16(ctx) -> Undo:
    """Wrong mixed-precision cast: the reduced fp32 gradient is cast through the param dtype
    (bf16) before it is handed to the fp32 master shard. A no-op for fp32 cases."""
    grads = _grad_side()
    orig = grads._assign_sharded_grads

    def _assign_sharded_grads(self, reduced, had_grad):
        return orig(self, reduced.to(self.param_dtype).to(reduced.dtype), had_grad)

    return _patch(grads, "_assign_sharded_grads", _assign_sharded_grads)


def padding_written_after_step(ctx) -> Undo:
    """After every optimizer step, the padding of every local shard holds non-zero values (as
    when a sharder writes the whole flat shard back from a buffer whose padding is garbage).
    Compute never reads padding, so losses and parameters stay right."""
    return _padding_hook(2.0**-10)


def padding_negative_zero(ctx) -> Undo:
    """After every optimizer step, the padding of every local shard holds -0.0: equal to zero
    for ``==``, not bitwise zero. Only an integer-view check sees it."""
    return _padding_hook(-0.0)


def update_one_ulp(ctx) -> Undo:
    """On rank 0, after every optimizer step, the first element of its first non-empty local
    shard is moved one ulp up (as when an optimizer kernel rounds one lane differently): the
    reduced gradients are right, the update is not."""
    if ctx.rank != 0:
        return lambda: None
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(optimizer, args, kwargs):
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    unit = getattr(p, "_fsdp_unit", None)
                    if unit is not None and unit.pieces[p._fsdp_index].real_numel > 0:
                        x = p.view(-1)[:1]
                        x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))
                        return

    return register_optimizer_step_post_hook(hook).remove


def _padding_hook(value: float) -> Undo:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(optimizer, args, kwargs):
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    unit = getattr(p, "_fsdp_unit", None)
                    if unit is not None:
                        p[unit.pieces[p._fsdp_index].real_numel:].fill_(value)

    return register_optimizer_step_post_hook(hook).remove


# -- bugs in the module hooks (_module) ---------------------------------------------------------

def no_reshard_after_forward(ctx) -> Undo:
    """``reshard_after_forward=True`` is ignored: units stay unsharded after forward, so
    backward skips its re-gather. Numerics are right; memory and the all-gather count are not."""
    _, M, _, _ = _internals()
    orig = M._post_forward

    def _post_forward(module, args, kwargs, output):
        unit = module._fsdp_unit
        if unit is None:
            return orig(module, args, kwargs, output)
        keep = unit.reshard_after_forward
        unit.reshard_after_forward = False
        try:
            return orig(module, args, kwargs, output)
        finally:
            unit.reshard_after_forward = keep

    return _patch(M, "_post_forward", _post_forward)


def callback_units_not_reduced(ctx) -> Undo:
    """The end-of-backward callback reshards, but does not reduce, the units that no input
    hook reduced (units whose inputs carry no grad, e.g. the first block fed raw data): their
    gradients are dropped and their parameters never train."""
    _, M, _, _ = _internals()
    orig = M._final_callback

    def _final_callback(task):
        for ref in M._task_units.get(task, []):
            unit = ref()
            if unit is not None and not unit.post_backward_done:
                unit.post_backward_done = True
                unit._acc.clear()
                if unit.unsharded_params is not None:
                    unit._clear_unsharded_grads()
                unit.reshard()
        return orig(task)

    return _patch(M, "_final_callback", _final_callback)


def prefetch_across_step(ctx) -> Undo:
    """Prefetch runs past the end of its iteration: when a backward ends, the first unit of the
    learned forward order starts its all-gather for the next forward, from the shards as they
    are *before* the optimizer step, and the next forward computes with the old parameters. The
    gather only moved, so each step's collective count is unchanged. No gathers at W = 1."""
    _, M, _, ShardState = _internals()
    roots: list = []
    orig_observe, orig_final = M._observe_backward, M._final_callback

    def _observe_backward(module, unit):
        root = M._root_of(module)
        if not any(r is root for r in roots):
            roots.append(root)
        return orig_observe(module, unit)

    def _final_callback(task):
        try:
            return orig_final(task)
        finally:
            for root in roots:
                learned = root.__dict__["_fsdp_fwd_order"].learned
                first = learned[0]() if learned else None
                if first is not None and first.state is ShardState.SHARDED:
                    first.unshard(async_op=True)

    return _undo_all([_patch(M, "_observe_backward", _observe_backward),
                      _patch(M, "_final_callback", _final_callback)])


# -- faults: rank 1 fails during its first gradient reduction ----------------------------------

def _fault_on_rank_1(ctx, act: Callable[[], None]) -> Undo:
    if ctx.rank != 1:
        return lambda: None

    def make(orig):
        def fn(*args, **kwargs):
            act()
            return orig(*args, **kwargs)
        return fn
    return _wrap_dist(_REDUCTIONS, make)


def rank_raises(ctx) -> Undo:
    """Rank 1 raises in its first gradient reduction; its peers wait in that collective."""
    def act():
        raise RuntimeError("planted fault rank_raises: rank 1 raises in its gradient reduction")
    return _fault_on_rank_1(ctx, act)


def rank_exits(ctx) -> Undo:
    """Rank 1 exits abruptly (``os._exit(17)``) in its first gradient reduction."""
    def act():
        os._exit(17)
    return _fault_on_rank_1(ctx, act)


def rank_hangs(ctx) -> Undo:
    """Rank 1 hangs (sleeps forever) instead of joining its first gradient reduction."""
    return _fault_on_rank_1(ctx, _hang_forever)


def _hang_forever() -> None:
    while True:
        time.sleep(1.0)


# -- the registry -------------------------------------------------------------------------------

def _bug(install, breaks, catch, blind=()) -> Plant:
    return Plant(install.__name__, install, breaks, tuple(catch), tuple(blind))


BUGS: dict[str, Plant] = {p.name: p for p in [
    _bug(drop_rank_grad, "gradient = sum over all ranks but one, / W",
         [FAST2, FAST4, DET4]),
    _bug(allgather_one_ulp, "one parameter element one ulp off in compute, on one rank",
         [DET2, DET4, FAST2], blind=[FAST4]),
    _bug(reduce_scale_2pow20, "every reduced gradient x (1 + 2^-20)",
         [DET2, DET4, FAST2], blind=[FAST4]),
    _bug(dist_reduce_one_ulp, "one reduced gradient element one ulp off",
         [DET4, FAST2], blind=[FAST4]),
    _bug(no_divide_by_world, "gradient W times too large",
         [FAST2, FAST4, DET4], blind=[FAST4_ADAM]),
    _bug(swap_shards_allgather, "ranks 0 and 1 see each other's shards in every all-gather",
         [FAST2, FAST4, DET4]),
    _bug(sequential_cross_rank_sum, "deterministic cross-rank sum in the wrong order",
         [DET4], blind=[DET2]),
    _bug(sequential_local_accumulation, "deterministic local sum over k micro-batches in the "
         "wrong order", [mlp_scenario(2, "deterministic", micro_batches=8)], blind=[DET2]),
    _bug(stale_grad_accumulation, "a micro-batch's gradient counted again in the next one",
         [DET2, mlp_scenario(4, "deterministic", micro_batches=8)], blind=[FAST2]),
    _bug(view_offset_off_by_one, "a parameter read one element late in forward",
         [FAST2, FAST4, DET2]),
    _bug(grad_reduced_in_bf16, "bf16 cases: gradients summed in bf16",
         [FAST2_BF16, DET4_BF16], blind=[FAST2]),
    _bug(master_grad_rounded_to_bf16, "bf16 cases: the master's gradient rounded to bf16",
         [FAST2_BF16, DET2_BF16], blind=[FAST2]),
    _bug(update_one_ulp, "one parameter element one ulp off after every optimizer step",
         [FAST2, DET2], blind=[FAST4]),
    _bug(padding_written_after_step, "non-zero padding after every step",
         [FAST2, FAST4, DET2]),
    _bug(padding_negative_zero, "-0.0 in the padding after every step",
         [FAST2, DET4]),
    _bug(no_reshard_after_forward, "units stay unsharded between forward and backward",
         [FAST2, DET4]),
    _bug(callback_units_not_reduced, "units reduced only by the end-of-backward callback get "
         "no gradient", [FAST2, FAST4, DET2]),
    _bug(prefetch_across_step, "the next forward's first unit gathered before the optimizer step",
         [FAST2, FAST4, DET2]),
]}

FAULTS: dict[str, Plant] = {p.name: dataclasses.replace(p, kind="fault") for p in [
    _bug(rank_raises, "rank 1 raises mid-case", [FAST2]),
    _bug(rank_exits, "rank 1 exits mid-case", [FAST2]),
    _bug(rank_hangs, "rank 1 hangs mid-case", [FAST2]),
]}

PLANTS: dict[str, Plant] = {**BUGS, **FAULTS}


def check_name(name: str) -> str:
    """``name`` if it is a plant, else ValueError listing the names."""
    if name not in PLANTS:
        raise ValueError(f"unknown planted bug {name!r}; known: {', '.join(PLANTS)}")
    return name


def install(name: str, ctx) -> Undo:
    """Install plant ``name`` in this (rank) process; returns the undo."""
    return PLANTS[check_name(name)].install(ctx)


@contextlib.contextmanager
def planted(name: Optional[str], ctx) -> Iterator[None]:
    """Plant ``name`` (nothing when None) for the duration of the block, undone on any exit."""
    if name is None:
        yield
        return
    undo = install(name, ctx)
    try:
        yield
    finally:
        undo()

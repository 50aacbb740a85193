"""Stateless collectives: every communication of the sharder is here, looked up on the
``dist`` module at call time (so a recording or fault-injecting wrapper installed on
``torch.distributed`` sees every call). Also the two helpers every collective caller needs:
``agree`` (share "ok or what went wrong" before anyone raises) and ``comm_device`` (the device
a group's collectives run on). Building process groups and meshes is ``_mesh``'s.

[Note: deterministic reduction]
Fast mode reduces with a reduce-scatter, whose summation order belongs to the backend.
Deterministic mode instead moves the same bytes with an all-to-all (rank j receives every
rank's slice j, in rank order) and sums the W slices itself with ``tree_sum``: a balanced
pairwise sum in rank order. With local subtrees over each rank's k micro-batches, this is
exactly ``tree`` over all M = k * W micro-batch gradients in global order.

[Note: HSDP reduction order]
On a 2-D mesh (R replicas x S shards, W = R * S) the data-parallel index of rank (r, s) is
``g = r * S + s`` and it holds micro-batches ``[g*k, (g+1)*k)``: the same assignment as the 1-D
run at W. Because W, R and S are powers of two, the balanced tree over the W rank subtrees in
global order splits at multiples of S until its pieces are S long, so it *is* a tree over the R
replica rows of trees over each row's S consecutive subtrees:

    tree(t_0, ..., t_{W-1}) = tree(tree(t_0..t_{S-1}), tree(t_S..t_{2S-1}), ..., tree(..t_{W-1}))

``hsdp_tree_reduce_mean`` computes exactly that, in two fixed-order steps: (1) inside the shard
group (one row, S consecutive indices), the all-to-all of shard slices and ``tree_sum`` in
shard order, as in 1-D: this rank's slice of its row's subtree; (2) across the replicate group
(the R ranks holding the same slice), an all-gather of that partial and ``tree_sum`` in replica
order; then / W. Every replica computes the same sum in the same order, so replicas stay
bitwise identical, and the result is bitwise the 1-D run's (the flat layouts differ only in
padding, and the sums are elementwise). Step (2) moves R slices per rank where an all-reduce
would move about 2: the price of an order no backend chooses.

Fast mode on a 2-D mesh: reduce-scatter (sum) in the shard group, all-reduce (sum) over the
replicate group, one division by W (``hsdp_reduce_scatter_mean``). At W = 2 ((2, 1) or (1, 2))
that is one two-term sum, bitwise the data-parallel reference.

[Note: in-flight reductions]
The fast-mode reductions take ``async_op=True``: the reduce-scatter is started and a ``Pending``
comes back; its ``wait()`` waits and finishes: it divides by W and returns the shard, or on a
2-D mesh starts the replicate-group all-reduce and returns the ``Pending`` of that. The same collectives with the same bytes, issued at the
same point of the program on every rank; only the wait moves later (``_grad_reduce`` waits at
the next unit's reduction or at the end of backward), so the result is bitwise unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["Pending", "then", "tree_sum", "all_gather_flat", "reduce_scatter_mean", "tree_reduce_mean", "all_reduce_sum",
           "all_reduce_max", "hsdp_reduce_scatter_mean", "hsdp_tree_reduce_mean", "all_gather_object",
           "scatter", "broadcast", "initialized", "world_size", "rank", "comm_device", "agree",
           "describe", "GATHER_KIND", "REDUCE_SCATTER_KIND"]

# [Note: collective names]
# The pinned torch deprecates ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (a
# FutureWarning per call) for ``all_gather_single`` / ``reduce_scatter_single``; older torch has
# only the old names. The names are chosen once, and the functions looked up on ``dist`` at call
# time. The chosen names are also the collective *kinds* a recorder of ``torch.distributed``
# sees for the sharder (verify's expected counts use these constants).
GATHER_KIND = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER_KIND = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def _gather_into(out: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    if async_op:
        return getattr(dist, GATHER_KIND)(out, shard, group=group, async_op=True)
    getattr(dist, GATHER_KIND)(out, shard, group=group)
    return None


def _reduce_scatter_sum(out: torch.Tensor, flat: torch.Tensor, group, async_op: bool = False):
    if async_op:
        return getattr(dist, REDUCE_SCATTER_KIND)(out, flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
    getattr(dist, REDUCE_SCATTER_KIND)(out, flat, op=dist.ReduceOp.SUM, group=group)
    return None


class Pending:
    """A reduction in flight (see [Note: in-flight reductions]): ``wait()`` waits for the
    collective, runs ``finish`` and returns its result: the result tensor, or the ``Pending``
    of the reduction's next collective, which ``finish`` started. The
    collective's input is not held: the backend's work object references what it reads until
    it completes (gloo copies a reduce-scatter's input when the call is made), so the caller's
    flat gradient is freed as soon as the caller drops it."""

    __slots__ = ("_work", "_finish")

    def __init__(self, work, finish: Callable[[], torch.Tensor]):
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish()

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Pending":
        """This reduction with ``fn`` applied to its result when waited on."""
        finish = self._finish
        self._finish = lambda: then(finish(), fn)
        return self


def then(result, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``fn(result)`` for a tensor; for a ``Pending``, the same applied when it is waited on."""
    return result.then(fn) if isinstance(result, Pending) else fn(result)


def tree_sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``xs[0]`` if one, else ``tree_sum(first half) + tree_sum(second half)`` (new tensor)."""
    if len(xs) == 0:
        raise ValueError("tree_sum of an empty sequence")
    if len(xs) == 1:
        return xs[0]
    mid = len(xs) // 2
    return tree_sum(xs[:mid]) + tree_sum(xs[mid:])


@torch.no_grad()
def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group, *, async_op: bool = False):
    """Gather every rank's 1-D ``shard`` into the 1-D ``out`` (rank order). With ``async_op``
    the gather is in flight on return: the caller waits on the returned work before reading
    ``out`` and keeps ``shard`` alive until then."""
    return _gather_into(out, shard, group, async_op)


@torch.no_grad()
def reduce_scatter_mean(flat: torch.Tensor, group, *, async_op: bool = False):
    """Fast mode: this rank's shard of the sum over ranks of ``flat``, divided by W (with
    ``async_op``, a ``Pending`` of it)."""
    world = dist.get_world_size(group)
    out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
    work = _reduce_scatter_sum(out, flat, group, async_op)
    if work is not None:
        return Pending(work, lambda: out.div_(world))  # the work holds ``flat`` while it needs it
    return out.div_(world)


@torch.no_grad()
def tree_reduce_mean(flat: torch.Tensor, group) -> torch.Tensor:
    """Deterministic mode: all-to-all of shard slices, then ``tree_sum`` in rank order, / W."""
    world = dist.get_world_size(group)
    recv = torch.empty_like(flat)
    dist.all_to_all_single(recv, flat, group=group)
    return tree_sum(list(recv.chunk(world))).div_(world)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


@torch.no_grad()
def hsdp_reduce_scatter_mean(flat: torch.Tensor, shard_group, replicate_group, world: int, *,
                             async_op: bool = False):
    """Fast mode on a 2-D mesh: reduce-scatter in the shard group, all-reduce over the replicate
    group, / W (see [Note: HSDP reduction order]). With ``async_op`` the first collective is
    started and a ``Pending`` returned; its ``wait()`` starts the all-reduce and returns the
    ``Pending`` of that (two stages in flight)."""
    S = dist.get_world_size(shard_group)

    def rest(out: torch.Tensor):
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=replicate_group, async_op=async_op)
        return Pending(work, lambda: out.div_(world)) if async_op else out.div_(world)

    if S > 1:
        out = torch.empty(flat.numel() // S, dtype=flat.dtype, device=flat.device)
        work = _reduce_scatter_sum(out, flat, shard_group, async_op)
        if work is not None:
            return Pending(work, lambda: rest(out))
        return rest(out)
    return rest(flat)


@torch.no_grad()
def hsdp_tree_reduce_mean(flat: torch.Tensor, shard_group, replicate_group, world: int) -> torch.Tensor:
    """Deterministic mode on a 2-D mesh: the row subtree (all-to-all + ``tree_sum`` in the shard
    group), then ``tree_sum`` of the R row subtrees in replica order (all-gather), / W. See
    [Note: HSDP reduction order]."""
    S = dist.get_world_size(shard_group)
    if S > 1:
        recv = torch.empty_like(flat)
        dist.all_to_all_single(recv, flat, group=shard_group)
        row = tree_sum(list(recv.chunk(S)))
    else:
        row = flat
    R = dist.get_world_size(replicate_group)
    rows = torch.empty(R * row.numel(), dtype=row.dtype, device=row.device)
    _gather_into(rows, row.contiguous(), replicate_group)
    return tree_sum(list(rows.chunk(R))).div_(world)


# ------------------------------------------------------------------ objects, scatter, broadcast
def all_gather_object(obj: Any, group) -> list:
    """Every rank's ``obj`` (picklable), in group-rank order."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@torch.no_grad()
def scatter(recv: torch.Tensor, chunks: Optional[list[torch.Tensor]], src_rank: int, group) -> None:
    """``recv`` = chunk ``r`` of the source's ``chunks`` on group rank ``r``; ``src_rank`` is the
    source's rank in ``group`` (the others pass ``chunks=None``)."""
    dist.scatter(recv, chunks, src=dist.get_global_rank(group, src_rank), group=group)


@torch.no_grad()
def broadcast(t: torch.Tensor, src_rank: int, group) -> None:
    """``t`` from group rank ``src_rank`` to every rank of ``group``, in place."""
    dist.broadcast(t, src=dist.get_global_rank(group, src_rank), group=group)


# ------------------------------------------------------------------ groups and devices
def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group) -> int:
    return dist.get_world_size(group)


def rank(group) -> int:
    return dist.get_rank(group)


def comm_device(group=None) -> torch.device:
    """The device collectives over ``group`` (None: the default group) run on: the current CUDA
    device under NCCL, else the CPU (also without an initialized torch.distributed)."""
    if initialized() and dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------ agreeing on failure
# [Note: agreeing on failure]
# A rank that raises alone would leave the others waiting in the next collective. Every step that
# can fail on some ranks only (checking a state dict on the source rank; building, writing,
# checking and reading a checkpoint) runs under ``agree``: one ``all_gather_object`` of "ok or what
# went wrong" over the mesh; if any rank failed, every rank raises, the failing ranks with their
# own exception and the others with ``error`` naming the first failing rank and its message.
def agree(mesh, what: str, fn: Callable[[], tuple[Any, Any]], *,
          on_failure: Optional[Callable[[], Any]] = None,
          error: type[Exception] = RuntimeError) -> tuple[Any, list]:
    """Run ``fn`` (returning (local value, shared value)) on every rank of ``mesh`` (a
    ``ShardMesh``, or None for one process); see [Note: agreeing on failure]. Returns the local
    value and every rank's shared value, in data-parallel order."""
    try:
        local, shared = fn()
        err: Optional[BaseException] = None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        local, shared, err = None, None, e
    mine = (None if err is None else describe(err), shared)
    statuses = [mine] if mesh is None else mesh.all_gather_object(mine)
    failed = [(r, msg) for r, (msg, _) in enumerate(statuses) if msg is not None]
    if failed:
        if on_failure is not None:
            on_failure()
        if err is not None:
            raise err
        r, msg = failed[0]
        raise error(f"{what} failed on rank {r}: {msg}")
    return local, [s for _, s in statuses]


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"

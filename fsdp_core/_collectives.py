"""Stateless collectives of the data path. Every torch.distributed call of the sharder is
here, looked up on the ``dist`` module at call time (so a recording or fault-injecting
wrapper installed on ``torch.distributed`` sees every call).

[Note: deterministic reduction]
Fast mode reduces with a reduce-scatter, whose summation order belongs to the backend.
Deterministic mode instead moves the same bytes with an all-to-all (rank j receives every
rank's slice j, in rank order) and sums the W slices itself with ``tree_sum``: a balanced
pairwise sum in rank order. With local subtrees over each rank's k micro-batches, this is
exactly ``tree`` over all M = k * W micro-batch gradients in global order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["tree_sum", "all_gather_flat", "reduce_scatter_mean", "tree_reduce_mean", "all_reduce_sum"]


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
    if async_op:
        return dist.all_gather_into_tensor(out, shard, group=group, async_op=True)
    dist.all_gather_into_tensor(out, shard, group=group)
    return None


@torch.no_grad()
def reduce_scatter_mean(flat: torch.Tensor, group) -> torch.Tensor:
    """Fast mode: this rank's shard of the sum over ranks of ``flat``, divided by W."""
    world = dist.get_world_size(group)
    out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
    dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, group=group)
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

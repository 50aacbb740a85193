"""Stateless collectives of the data path. Every torch.distributed call of the sharder is
here, looked up on the ``dist`` module at call time (so a recording or fault-injecting
wrapper installed on ``torch.distributed`` sees every call).

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
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["tree_sum", "all_gather_flat", "reduce_scatter_mean", "tree_reduce_mean", "all_reduce_sum",
           "hsdp_reduce_scatter_mean", "hsdp_tree_reduce_mean"]


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


@torch.no_grad()
def hsdp_reduce_scatter_mean(flat: torch.Tensor, shard_group, replicate_group, world: int) -> torch.Tensor:
    """Fast mode on a 2-D mesh: reduce-scatter in the shard group, all-reduce over the replicate
    group, / W (see [Note: HSDP reduction order])."""
    S = dist.get_world_size(shard_group)
    if S > 1:
        out = torch.empty(flat.numel() // S, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, group=shard_group)
    else:
        out = flat
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=replicate_group)
    return out.div_(world)


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
    dist.all_gather_into_tensor(rows, row.contiguous(), group=replicate_group)
    return tree_sum(list(rows.chunk(R))).div_(world)

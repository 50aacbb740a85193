"""Bugs in the sharder's collectives (fsdp_core._collectives): the gradient reduction's
scale, its divide by W, and deterministic mode's cross-rank summation order."""
from __future__ import annotations

import torch
import torch.distributed as dist

import fsdp_core._collectives as C
from verify.tools.plants.patching import Undo, patch, undo_all

__all__ = ["reduce_scale_2pow20", "no_divide_by_world", "sequential_cross_rank_sum"]


def reduce_scale_2pow20(ctx) -> Undo:
    """Reduced gradients come back scaled by (1 + 2^-20), as from a mean computed with a
    slightly wrong divisor. A relative error of 1e-6: inside fp32 tolerances."""
    scale = 1.0 + 2.0**-20

    def make(orig):
        def fn(flat, group, **kwargs):  # fast mode's is async (a Pending): scale when waited on
            return C.then(orig(flat, group, **kwargs), lambda t: t.mul_(scale))
        return fn
    return undo_all([patch(C, "reduce_scatter_mean", make(C.reduce_scatter_mean)),
                     patch(C, "tree_reduce_mean", make(C.tree_reduce_mean))])


def no_divide_by_world(ctx) -> Undo:
    """The gradient reduction sums over ranks but never divides by the world size W (the step
    uses W times the gradient). Invisible at W = 1; Adam's parameters barely move (it is
    scale-invariant), its moments are W and W^2 times the reference's."""

    @torch.no_grad()
    def reduce_scatter_sum(flat, group, *, async_op=False):
        world = dist.get_world_size(group)
        out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
        work = getattr(dist, C.REDUCE_SCATTER_KIND)(out, flat, op=dist.ReduceOp.SUM, group=group,
                                                    async_op=async_op)
        return C.Pending(work, lambda: out) if async_op else out

    @torch.no_grad()
    def tree_reduce_sum(flat, group):
        world = dist.get_world_size(group)
        recv = torch.empty_like(flat)
        dist.all_to_all_single(recv, flat, group=group)
        return C.tree_sum(list(recv.chunk(world)))

    return undo_all([patch(C, "reduce_scatter_mean", reduce_scatter_sum),
                     patch(C, "tree_reduce_mean", tree_reduce_sum)])


def sequential_cross_rank_sum(ctx) -> Undo:
    """Deterministic mode sums the W received slices left to right, ((g0 + g1) + g2) + g3,
    instead of the balanced tree (g0 + g1) + (g2 + g3) the contract promises. The same at
    W <= 2; differs in the last bits from W = 4."""

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

    return patch(C, "tree_reduce_mean", tree_reduce_mean)

"""Bugs below the sharder, planted in torch.distributed's collectives: the harness's own gathers
and checks go through them too."""
from __future__ import annotations

import torch
import torch.distributed as dist

from verify.compare import int_view
from verify.tools.plants.patching import GATHERS, REDUCTIONS, Undo, completed, group_rank, wrap_dist

__all__ = ["drop_rank_grad", "swap_shards_allgather", "dist_reduce_one_ulp"]


def drop_rank_grad(ctx) -> Undo:
    """Rank 1's gradient contribution is dropped: it feeds zeros into the gradient reduction
    (``reduce_scatter_single``/``reduce_scatter_tensor`` in fast mode, ``all_to_all_single``
    in deterministic mode).
    Planted in torch.distributed."""
    def make(orig):
        def fn(output, input, *args, **kwargs):
            if group_rank(kwargs) == 1:
                input = torch.zeros_like(input)
            return orig(output, input, *args, **kwargs)
        return fn
    return wrap_dist(REDUCTIONS, make)


def swap_shards_allgather(ctx) -> Undo:
    """Every ``all_gather_single``/``all_gather_into_tensor`` hands back ranks 0 and 1's shards swapped in its output
    (a rank-ordering bug in the collective). Planted in torch.distributed, so the harness's own
    gathers (``full_state_dict``) see it too."""
    def make(orig):
        def fn(output, input, *args, **kwargs):
            work = completed(orig(output, input, *args, **kwargs))
            world = dist.get_world_size(kwargs.get("group"))
            if world >= 2 and output.numel() % world == 0:
                chunks = output.view(-1).view(world, -1)
                tmp = chunks[0].clone()
                chunks[0].copy_(chunks[1])
                chunks[1].copy_(tmp)
            return work
        return fn
    return wrap_dist(GATHERS, make)


def dist_reduce_one_ulp(ctx) -> Undo:
    """On rank 0, the first non-zero element that the gradient reduction hands back is one ulp
    off: in the output of ``reduce_scatter_single`` (fast), in the received buffer of
    ``all_to_all_single`` (deterministic). Planted in torch.distributed; a last-bit bug. (A
    zero element would often make it a no-op: a subnormal rounds away in the sum or the / W.)"""
    def make(orig):
        def fn(output, input, *args, **kwargs):
            work = completed(orig(output, input, *args, **kwargs))
            nonzero = output.view(-1).nonzero()
            if group_rank(kwargs) == 0 and len(nonzero):
                int_view(output.view(-1))[int(nonzero[0])] += 1
            return work
        return fn
    return wrap_dist(REDUCTIONS, make)

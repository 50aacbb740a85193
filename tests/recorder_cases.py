"""Rank-side bodies for tests/test_industrial_peers.py: what the collective recorder
(verify/case/recorder.py) counts for calls made the ways libraries make them."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.nn.parallel import DistributedDataParallel

from verify.case.recorder import CollectiveRecorder

# bound at import, as DeepSpeed binds them: the recorder cannot replace these names
CAPTURED_GATHER = c10d.all_gather_into_tensor
CAPTURED_REDUCE_SCATTER = c10d.reduce_scatter_tensor


def wrapped_over(payload, ctx) -> dict:
    """A sharder wraps all_reduce over the recorder's while recording (and keeps its wrapper):
    the wrapper stays, the recorder's under it counts nothing outside recording, and a later
    recording counts each call once. Returns what the second recording counted, and more."""
    g, plain = ctx.group, dist.all_reduce
    rec = CollectiveRecorder()
    try:
        with rec.recording():
            inner = dist.all_reduce

            def sharders(*a, **kw):
                return inner(*a, **kw)
            dist.all_reduce = sharders
        kept = dist.all_reduce is sharders
        dist.all_reduce(torch.ones(1), group=g)          # outside recording
        outside = rec.take()
        with rec.recording():
            dist.all_reduce(torch.ones(1), group=g)
        return {"kept": kept, "outside": outside, "counted": rec.take()}
    finally:
        dist.all_reduce = plain


def record(payload, ctx) -> dict:
    """One way of issuing collectives (``payload``), recorded; returns what was counted."""
    g, W = ctx.group, ctx.world_size
    rec = CollectiveRecorder()
    model = DistributedDataParallel(torch.nn.Linear(3, 2), process_group=g) \
        if payload == "ddp_backward" else None
    with rec.recording():
        if payload == "captured":
            CAPTURED_GATHER(torch.empty(4 * W), torch.ones(4), group=g)
            CAPTURED_REDUCE_SCATTER(torch.empty(2), torch.ones(2 * W), group=g)
        elif payload == "nested":   # all_gather_into_tensor calls all_gather_single inside
            dist.all_gather_into_tensor(torch.empty(4 * W), torch.ones(4), group=g)
        elif payload == "paused":
            with rec.paused():
                dist.all_reduce(torch.ones(3), group=g)
        elif payload == "ddp_backward":   # DDP's reducer all-reduces from C++
            model(torch.ones(2, 3)).sum().backward()
    return rec.take()

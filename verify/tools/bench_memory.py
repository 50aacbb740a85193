"""What the bench measures of memory inside a rank: the peak of all tensor memory a step
allocates (the profiler's allocation events) and the peak of FSDP2's unsharded parameters
(fsdp_core counts its own, in fsdp_core._flat_param.UNSHARDED_BYTES)."""
from __future__ import annotations

import contextlib
import os
import sys

from torch.distributed.fsdp import FSDPModule
from torch.profiler import ProfilerActivity, profile

__all__ = ["FSDP2Unsharded", "uses_fsdp2", "peak_allocated"]


@contextlib.contextmanager
def _stderr_quiet():
    """The profiler's C++ side prints start/stop lines on fd 2 in every rank: drop them."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class FSDP2Unsharded:
    """Peak bytes of FSDP2's unsharded parameters alive at once: its param groups' transitions
    to and from the unsharded state, wrapped for one step (the all-gather output buffers FSDP2
    copies out of are not counted; the profiler's peak step memory sees those)."""

    def __init__(self) -> None:
        # lazy: FSDP2's private module, its path moves between torch releases (FSDP2 runs only)
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        self.cls, self.now, self.peak = FSDPParamGroup, 0, 0
        self.orig = {n: getattr(FSDPParamGroup, n) for n in ("_to_unsharded", "_to_sharded",
                                                              "_to_sharded_post_forward")}
        tracker = self

        def nbytes(group) -> int:
            return sum(t.numel() * t.element_size() for fp in group.fsdp_params
                       for t in fp.all_gather_outputs)

        def to_unsharded(group):
            was = group.is_unsharded
            tracker.orig["_to_unsharded"](group)
            if not was:
                tracker.now += nbytes(group)
                tracker.peak = max(tracker.peak, tracker.now)

        def leaving(name):
            def fn(group):
                if group.is_unsharded:
                    tracker.now -= nbytes(group)
                tracker.orig[name](group)
            return fn

        FSDPParamGroup._to_unsharded = to_unsharded
        FSDPParamGroup._to_sharded = leaving("_to_sharded")
        FSDPParamGroup._to_sharded_post_forward = leaving("_to_sharded_post_forward")

    def close(self) -> None:
        for name, fn in self.orig.items():
            setattr(self.cls, name, fn)


def uses_fsdp2(model) -> bool:
    """Whether PyTorch's FSDP2 shards ``model`` (its unsharded bytes are measured through its
    param groups; fsdp_core's are counted where it allocates them)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def peak_allocated(step) -> int:
    """Peak bytes of tensor memory allocated during ``step()`` above what was allocated before
    it, from the profiler's allocation events: the same yardstick for every sharder
    (unsharded parameters, activations, gradient buffers, communication buffers)."""
    with _stderr_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak


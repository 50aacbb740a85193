"""The collective recorder: what a sharder sends over the wire in a step, counted where no
sharder can hide from it, and said to be unseen where it could not be counted.

[Note: three layers of recording]
1. The torch.distributed functions (`RECORDED_COLLECTIVES`), wrapped in the module a sharder
   calls them from: a call is reported under the name it was called by (``all_gather_single``,
   ``reduce_scatter_tensor``, ...), which is what an adapter's collective formula names.
2. The methods of ``ProcessGroup`` that carry a collective's data (`PG_KINDS`), wrapped on the
   class: every Python call reaches one of them, whatever alias of a torch.distributed function
   a library bound at import (DeepSpeed binds ``all_gather_into_tensor`` and
   ``reduce_scatter_tensor`` when it loads) or whichever module it went through. A call that got
   here without passing layer 1 is reported under the torch.distributed name of the method.
   Calls inside a wrapped function are counted once, by the outermost.
3. The backend's own count: every process group's sequence number
   (``_get_sequence_number_for_group``, kept by gloo and NCCL) grows by one per collective the
   backend runs, including those issued from C++ (DDP's reducer) that no Python wrapper sees.
   Where the groups ran more collectives in the step than layers 1 and 2 saw, the difference is
   reported as the kind `UNSEEN` (calls, 0 bytes): the step's bytes are then not known, and the
   reports say "not seen" instead of a number that would be wrong. A backend without sequence
   numbers leaves layer 3 out.

Bytes of a call are those of the larger of its first two tensor arguments (lists summed): the
unsharded side of a gather or a reduce-scatter, the buffer of an all-reduce or all-to-all.
Calls made while `paused` (the harness's own probes) are not the step's and are not counted.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch._C._distributed_c10d import ProcessGroup

from verify.results import UNSEEN   # kind: collectives the backend ran that no call announced

__all__ = ["CollectiveRecorder", "RECORDED_COLLECTIVES", "PG_KINDS", "UNSEEN", "tensor_bytes"]

# torch.distributed functions a sharder's data path uses (layer 1).
# (all_gather_single / reduce_scatter_single are the newer names FSDP2 calls.)
RECORDED_COLLECTIVES = tuple(name for name in (
    "all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
    "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all", "all_reduce",
    "broadcast") if hasattr(dist, name))

# ProcessGroup method -> the torch.distributed name a call reaching it directly is reported as
# (layer 2).
PG_KINDS = {name: kind for name, kind in {
    "allreduce": "all_reduce", "allreduce_coalesced": "all_reduce_coalesced",
    "allgather": "all_gather", "all_gather_single": "all_gather_single",
    "_allgather_base": "all_gather_into_tensor", "allgather_coalesced": "all_gather_coalesced",
    "allgather_into_tensor_coalesced": "all_gather_into_tensor_coalesced",
    "all_gather_single_coalesced": "all_gather_single_coalesced",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_single": "reduce_scatter_single",
    "_reduce_scatter_base": "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor_coalesced",
    "reduce_scatter_single_coalesced": "reduce_scatter_single_coalesced",
    "alltoall_base": "all_to_all_single", "all_to_all_single": "all_to_all_single",
    "alltoall": "all_to_all", "broadcast": "broadcast", "reduce": "reduce", "gather": "gather",
    "scatter": "scatter", "barrier": "barrier",
}.items() if name in ProcessGroup.__dict__}



def tensor_bytes(x: Any) -> int:
    """Bytes of a tensor, or of the tensors of a (nested) list or tuple; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(t) for t in x)
    return 0


def _call_bytes(args: tuple, kwargs: dict) -> int:
    tensors = list(args[:2]) + [kwargs[k] for k in ("output", "input", "tensor", "output_tensor",
                                                    "input_tensor") if k in kwargs]
    return max((tensor_bytes(a) for a in tensors), default=0)


def _sequence_numbers() -> Optional[dict[int, int]]:
    """id(group) -> its backend's collective count, for every group this process belongs to;
    None where a backend keeps none."""
    out = {}
    for pg in list(c10d._world.pg_map):
        try:
            out[id(pg)] = int(pg._get_sequence_number_for_group())
        except Exception:   # a backend without sequence numbers (or a group being torn down)
            return None
    return out


class CollectiveRecorder:
    """Counts calls and bytes by kind while `recording`; see [Note: three layers of
    recording]."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._saved: dict[str, Callable] = {}
        self._saved_pg: dict[str, Callable] = {}
        self._paused = False
        self._active = False                # recording (a wrapper left in place outside counts nothing)
        self._local = threading.local()     # depth: inside a counted call on this thread
        self._pg_calls = 0                  # every ProcessGroup call while recording
        self._seq_start: Optional[dict[int, int]] = None
        self._unseen: Optional[int] = 0

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _counting(self, kind: str, fn: Callable, args: tuple, kwargs: dict):
        """Run ``fn``, counting it under ``kind`` unless paused or inside a counted call."""
        if self._active and not self._paused and self._depth() == 0:
            entry = self.counts[kind]
            entry[0] += 1
            entry[1] += _call_bytes(args, kwargs)
        self._local.depth = self._depth() + 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._local.depth -= 1

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            group = kwargs.get("group") or next(
                (a for a in args if isinstance(a, ProcessGroup)), None) or c10d.GroupMember.WORLD
            if group is not None and group in c10d._world.pg_coalesce_state:
                return fn(*args, **kwargs)   # coalesced: counted when the group issues it
            return self._counting(name, fn, args, kwargs)
        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    def _wrap_pg(self, method: str, fn: Callable) -> Callable:
        kind = PG_KINDS[method]

        def wrapped(pg, *args, **kwargs):
            if self._active:
                self._pg_calls += 1
            return self._counting(kind, functools.partial(fn, pg), args, kwargs)
        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    @contextlib.contextmanager
    def recording(self):
        mine: dict[str, Callable] = {}
        for name in RECORDED_COLLECTIVES:
            fn = getattr(dist, name)
            self._saved[name] = fn
            mine[name] = self._wrap(name, fn)
            setattr(dist, name, mine[name])
        mine_pg: dict[str, Callable] = {}
        for method in PG_KINDS:   # the class's own entry is saved: getattr's does not bind
            self._saved_pg[method] = ProcessGroup.__dict__[method]
            mine_pg[method] = self._wrap_pg(method, getattr(ProcessGroup, method))
            setattr(ProcessGroup, method, mine_pg[method])
        self._pg_calls = 0
        self._seq_start = _sequence_numbers()
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            end = _sequence_numbers() if self._seq_start is not None else None
            # only our own wrappers come off: one a sharder put over ours while recording stays
            # (ours under it counts nothing from now on)
            for name, fn in self._saved.items():
                if getattr(dist, name) is mine[name]:
                    setattr(dist, name, fn)
            for method, fn in self._saved_pg.items():
                if ProcessGroup.__dict__.get(method) is mine_pg[method]:
                    setattr(ProcessGroup, method, fn)
            self._saved.clear()
            self._saved_pg.clear()
            if end is None:
                self._unseen = None
            else:
                ran = sum(n - self._seq_start.get(g, 0) for g, n in end.items())
                self._unseen = max(0, ran - self._pg_calls)

    @contextlib.contextmanager
    def paused(self):
        """Calls made meanwhile (the harness's own probes) are not the step's."""
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

    def take(self) -> dict[str, list[int]]:
        """The counts since the last take; `UNSEEN` among them where the backend ran more."""
        out = {k: list(v) for k, v in self.counts.items()}
        if self._unseen:
            out[UNSEEN] = [self._unseen, 0]
        self.counts.clear()
        self._unseen = 0
        return out

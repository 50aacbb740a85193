"""What the harness measures of any sharder, without asking it: the collectives it issues, the
bytes of state it holds, and which wrap units ran forward and joined autograd.

Everything here works on whatever a sharder returns; a probe that cannot apply (an optimizer
without ``.state`` or ``param_groups``) answers None, reported as n/a, never an error.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from verify.compare import is_bitwise_zero

__all__ = ["CollectiveRecorder", "tensor_bytes", "RECORDED_COLLECTIVES", "state_bytes", "watch_units",
           "nonzero_padding", "local_tensor"]

# torch.distributed functions a sharder's data path uses; the recorder wraps exactly these.
# (all_gather_single / reduce_scatter_single are the newer names FSDP2 calls.)
RECORDED_COLLECTIVES = tuple(name for name in (
    "all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
    "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all", "all_reduce",
    "broadcast") if hasattr(dist, name))


def tensor_bytes(x: Any) -> int:
    """Bytes of a tensor, or of the tensors of a list or tuple; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(t) for t in x)
    return 0


class CollectiveRecorder:
    """A thin wrapper around torch.distributed calls: counts calls and bytes by kind while
    active. Bytes are those of the larger of the first two tensor arguments: the unsharded
    side of a gather or a reduce-scatter, the buffer of an all-to-all or all-reduce. A sharder
    that bound a collective at import time (``from torch.distributed import all_reduce``) is
    not seen."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._saved: dict[str, Callable] = {}
        self._paused = False

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self._paused:
                return fn(*args, **kwargs)
            entry = self.counts[name]
            entry[0] += 1
            tensors = list(args[:2]) + [kwargs[k] for k in ("output", "input", "tensor",
                                                              "output_tensor", "input_tensor") if k in kwargs]
            entry[1] += max((tensor_bytes(a) for a in tensors), default=0)
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

    @contextlib.contextmanager
    def paused(self):
        """Calls made meanwhile (the harness's own probes) are not the step's."""
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

    def take(self) -> dict[str, list[int]]:
        out = {k: list(v) for k, v in self.counts.items()}
        self.counts.clear()
        return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(optimizer: Any) -> Optional[int]:
    """This rank's bytes of the parameters the optimizer steps, their gradients and the
    optimizer state shaped like them (the local shard of a DTensor, a whole replica for DDP);
    None when the optimizer has no ``param_groups`` or no ``state`` mapping."""
    groups = getattr(optimizer, "param_groups", None)
    state = getattr(optimizer, "state", None)
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        return None
    n, seen = 0, set()
    for group in groups:
        params = group.get("params", ()) if isinstance(group, Mapping) else ()
        for p in params:
            if not isinstance(p, torch.Tensor) or id(p) in seen:
                continue
            seen.add(id(p))
            n += local_tensor(p).numel() * p.element_size()
            if p.grad is not None:
                n += local_tensor(p.grad).numel() * p.grad.element_size()
            for v in (state.get(p) or {}).values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    n += local_tensor(v).numel() * v.element_size()
    return n


def _any_requires_grad(output) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(output))


def watch_units(units) -> tuple[dict[str, int], set[str], list]:
    """Forward calls per wrap unit (by name), and the units whose outputs joined autograd (they
    are reached by backward), for a sharder's collective formula. Returns the hook handles."""
    calls: dict[str, int] = defaultdict(int)
    in_backward: set[str] = set()
    handles = []
    for name, m in units:
        handles.append(m.register_forward_pre_hook(
            lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1)))
        handles.append(m.register_forward_hook(
            lambda _m, _i, out, name=name: in_backward.add(name) if _any_requires_grad(out) else None))
    return calls, in_backward, handles


def nonzero_padding(views) -> Optional[list[str]]:
    """Labels of the padding views that are not bitwise zero; None when there are no views
    (the adapter has no padding probe)."""
    if views is None:
        return None
    return [label for label, view in views if not is_bitwise_zero(view)]

"""What the harness measures of any sharder, without asking it: the collectives it issues
(`CollectiveRecorder`, from verify/case/recorder.py), the bytes of state it holds, and which
wrap units ran forward and joined autograd.

Everything here works on whatever a sharder returns; a probe that cannot apply (an optimizer
without ``.state`` or ``param_groups``) answers None, reported as n/a, never an error.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_leaves

from verify.case.recorder import RECORDED_COLLECTIVES, UNSEEN, CollectiveRecorder, tensor_bytes
from verify.compare import is_bitwise_zero

__all__ = ["CollectiveRecorder", "tensor_bytes", "RECORDED_COLLECTIVES", "UNSEEN", "state_bytes",
           "watch_units", "nonzero_padding", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(optimizer: Any, model: Any = None) -> Optional[int]:
    """This rank's bytes of the parameters the optimizer steps, their gradients and the
    optimizer state shaped like them (the local shard of a DTensor, a whole replica for DDP),
    plus, with ``model``, the module's own parameters and gradients in memory the optimizer's
    tensors do not use (a ZeRO-1/2 engine's full replicas beside its flat fp32 shards); None
    when the optimizer has no ``param_groups`` or no ``state`` mapping."""
    groups = getattr(optimizer, "param_groups", None)
    state = getattr(optimizer, "state", None)
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        return None
    n, seen, storages = 0, set(), set()

    def count(t: torch.Tensor) -> int:
        t = local_tensor(t)
        storages.add(_storage(t))
        return t.numel() * t.element_size()

    for group in groups:
        params = group.get("params", ()) if isinstance(group, Mapping) else ()
        for p in params:
            if not isinstance(p, torch.Tensor) or id(p) in seen:
                continue
            seen.add(id(p))
            n += count(p)
            if p.grad is not None:
                n += count(p.grad)
            for v in (state.get(p) or {}).values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    n += count(v)
    for p in (dict.fromkeys(model.parameters()) if model is not None else ()):
        for t in (p, p.grad):
            if t is not None and id(t) not in seen and _storage(local_tensor(t)) not in storages:
                seen.add(id(t))
                n += local_tensor(t).numel() * local_tensor(t).element_size()
    return n


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() or id(t)   # an empty storage: the tensor itself
    except Exception:   # noqa: BLE001 - a tensor subclass without a storage
        return id(t)


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

"""The module side: the FSDPModule mixin (class swap), forward/backward hooks and the
end-of-backward callback.

[Note: when a unit's gradients are ready]
Pre-forward wraps the unit's input tensors that require grad in an identity autograd function
whose backward runs after the whole unit's backward (``_PostBackward``). A unit called c times
with hooked inputs reduces when the c-th of those backwards has run. Units whose inputs carry no
grad (the first unit, fed token ids) or that are only partly reached are reduced by the
end-of-backward callback, queued by the first pre-backward hook of each backward pass. Reduction
order is the same on every rank because every rank runs the same graph.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._unit import FlatUnit

__all__ = ["FSDPModule"]

# Units that ran a forward with grad enabled since the last end-of-backward, in forward order.
# Weak: a model dropped between forward and backward must not be kept alive (or processed).
_pending: dict[int, "weakref.ref[FlatUnit]"] = {}
# The autograd graph task the end-of-backward callback is queued for (a backward that raised
# never runs its callback; keying by task keeps the next backward from being skipped).
_queued_task: Optional[int] = None


class _PostBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: FlatUnit, *inputs: torch.Tensor):
        ctx.unit = unit
        return tuple(x.view_as(x) for x in inputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.backward_task = torch._C._current_graph_task_id()
        ctx.unit.input_hook_fired()
        return (None,) + grads


def _final_callback() -> None:
    global _queued_task
    _queued_task = None
    units = [u for u in (ref() for ref in _pending.values()) if u is not None]
    _pending.clear()
    error = None
    for unit in reversed(units):
        try:
            unit.post_backward()
        except Exception as e:  # finish every unit's bookkeeping, then report the first error
            error = error or e
    for unit in units:
        unit.reset_backward_state()
    if error is not None:
        raise error


def _queue_final_callback() -> None:
    global _queued_task
    task = torch._C._current_graph_task_id()
    if _queued_task != task:
        _queued_task = task
        torch.autograd.Variable._execution_engine.queue_callback(_final_callback)


def _floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    unit: Optional[FlatUnit] = module._fsdp_unit
    if unit is None:
        return args, kwargs
    unit.unshard()
    flat, spec = tree_flatten((args, kwargs))
    mp = unit.mp_policy
    if mp.param_dtype is not None and mp.cast_forward_inputs:
        flat = [x.to(mp.param_dtype) if _floating(x) else x for x in flat]
    if torch.is_grad_enabled():
        task = torch._C._current_graph_task_id()
        if unit.backward_task is not None and unit.backward_task != task:
            # The last backward through this unit raised before its end: drop its leftovers.
            unit.abandon_backward()
            _pending.pop(id(unit), None)
        if not unit.in_pending:
            _pending[id(unit)] = weakref.ref(unit)
            unit.in_pending = True
        idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
        if idx:
            unit.calls_with_hook += 1
            wrapped = _PostBackward.apply(unit, *[flat[i] for i in idx])
            for i, w in zip(idx, wrapped):
                flat[i] = w
        else:
            unit.calls_without_hook += 1
    args, kwargs = tree_unflatten(flat, spec)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    unit: Optional[FlatUnit] = module._fsdp_unit
    if unit is None:
        return output
    if unit.reshard_after_forward:
        unit.reshard()
    flat, spec = tree_flatten(output)
    out_dtype = unit.mp_policy.output_dtype
    if out_dtype is not None:
        flat = [x.to(out_dtype) if _floating(x) else x for x in flat]
    if torch.is_grad_enabled():
        for x in flat:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(_make_pre_backward(unit))
    return tree_unflatten(flat, spec)


def _make_pre_backward(unit: FlatUnit):
    def hook(grad: torch.Tensor):
        _queue_final_callback()
        unit.backward_task = torch._C._current_graph_task_id()
        unit.unshard()
        return grad

    return hook


class FSDPModule:
    """Mixin put in front of a sharded module's class by ``fully_shard`` (a class swap)."""

    _fsdp_unit: Optional[FlatUnit]

    def _fsdp_units(self, recurse: bool = True) -> list[FlatUnit]:
        mods = self.modules() if recurse else [self]
        return [m._fsdp_unit for m in mods if isinstance(m, FSDPModule) and m._fsdp_unit is not None]

    def unshard(self) -> None:
        """All-gather this unit's parameters and register them unsharded (original shapes)."""
        for unit in self._fsdp_units(recurse=False):
            unit.unshard()

    def reshard(self) -> None:
        """Free the unsharded parameters and register the local shards again."""
        for unit in self._fsdp_units(recurse=False):
            unit.reshard()

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """With ``False``, backward accumulates gradients locally without communication; the
        next backward with ``True`` reduces everything accumulated (gradient accumulation)."""
        if not isinstance(requires_gradient_sync, bool):
            raise TypeError(f"requires_gradient_sync must be a bool, got {type(requires_gradient_sync).__name__}")
        for unit in self._fsdp_units(recurse):
            unit.requires_gradient_sync = requires_gradient_sync

    def set_reshard_after_forward(self, reshard_after_forward: bool, *, recurse: bool = True) -> None:
        for unit in self._fsdp_units(recurse):
            unit.reshard_after_forward = bool(reshard_after_forward)

    def _apply(self, fn, recurse: bool = True):  # .to(), .to_empty(), .double(), ...
        unit = self._fsdp_unit
        if unit is not None:
            unit.reshard()
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        if unit is not None:
            unit.relink()
        return out


_class_cache: dict[type, type] = {}


def swap_class(module: nn.Module) -> None:
    cls = type(module)
    new_cls = _class_cache.get(cls)
    if new_cls is None:
        new_cls = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {"__module__": cls.__module__})
        _class_cache[cls] = new_cls
    module.__class__ = new_cls


def install_hooks(module: nn.Module) -> None:
    module.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    module.register_forward_hook(_post_forward, with_kwargs=True)

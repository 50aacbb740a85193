"""The module side: the FSDPModule mixin (class swap), forward/backward hooks and the
end-of-backward callback.

[Note: when a unit's gradients are ready]
Pre-forward registers a multi-grad hook on the unit's input tensors that require grad; it fires
once their gradients are computed, which is after the whole unit's backward. A unit called c
times with hooked inputs reduces when the c-th of those hooks has fired. The hook is a tensor
hook, not an autograd node: an extra node (an identity function on the inputs, as FSDP2 uses)
changes the order in which autograd sums the gradient of a tensor used by several units, and
with it the last bits of that gradient. Units whose inputs carry no
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

# [Note: backward bookkeeping]
# Units reached by a backward pass (a pre- or post-backward hook fired) are enlisted under that
# pass's autograd graph task; the pass's end-of-backward callback processes exactly those. A pass
# that raised never runs its callback: its units notice at their next forward (their
# ``backward_task`` is stale) and drop the partial state. ``_generation`` counts completed
# passes, so a unit can tell a new iteration (reset its counters) from a second forward before
# one backward (keep counting). Weak references: a model dropped midway is neither kept alive
# nor processed.
_generation = 0
_task_units: dict[int, list["weakref.ref[FlatUnit]"]] = {}
# Units forwarded with grad enabled in the current generation: the final callback reshards the
# ones backward never reached (a frozen unit kept unsharded by reshard_after_forward=False).
_forwarded: list["weakref.ref[FlatUnit]"] = []


def _enlist(unit: FlatUnit) -> None:
    """Called from backward hooks: make sure this pass's final callback processes ``unit``."""
    task = torch._C._current_graph_task_id()
    unit.backward_task = task
    units = _task_units.get(task)
    if units is None:
        units = _task_units[task] = []
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _final_callback(task))
    if unit.enlisted_task != task:
        unit.enlisted_task = task
        units.append(weakref.ref(unit))


def _final_callback(task: int) -> None:
    global _generation
    _generation += 1
    units = [u for u in (ref() for ref in _task_units.pop(task, [])) if u is not None]
    for stale in [t for t, refs in _task_units.items() if all(r() is None for r in refs)]:
        del _task_units[stale]
    error = None
    for unit in reversed(units):  # reverse of first-reached order; the same on every rank
        try:
            unit.post_backward()
        except Exception as e:  # finish every unit's bookkeeping, then report the first error
            error = error or e
    for unit in units:
        unit.reset_backward_state()
    others = [u for u in (ref() for ref in _forwarded) if u is not None and u not in units]
    _forwarded.clear()
    for unit in others:
        if unit.backward_task is None:  # not inside another, still running backward
            unit.reshard()
    if error is not None:
        raise error


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


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
    if torch.is_grad_enabled() and _in_backward():
        pass  # activation-checkpoint recompute inside backward: the bookkeeping is done already
    elif torch.is_grad_enabled():
        task = torch._C._current_graph_task_id()
        if unit.backward_task is not None and unit.backward_task != task:
            # The last backward through this unit raised before its end: drop its leftovers.
            unit.abandon_backward()
        elif unit.generation != _generation:  # a backward completed since its last forward
            unit.reset_backward_state()
        if unit.generation != _generation:
            _forwarded.append(weakref.ref(unit))
        unit.generation = _generation
        needs_grad = [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
        if needs_grad:
            unit.calls_with_hook += 1
            handle: list = []
            handle.append(torch.autograd.graph.register_multi_grad_hook(
                needs_grad, _make_post_backward(unit, handle), mode="all"))
        else:
            unit.calls_without_hook += 1
    args, kwargs = tree_unflatten(flat, spec)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    unit: Optional[FlatUnit] = module._fsdp_unit
    if unit is None:
        return output
    if _in_backward():
        return output  # a recompute (activation checkpointing): backward needs the parameters
    if unit.reshard_after_forward:
        unit.reshard()
    flat, spec = tree_flatten(output)
    out_dtype = unit.mp_policy.output_dtype
    if out_dtype is not None:
        flat = [x.to(out_dtype) if _floating(x) else x for x in flat]
    if torch.is_grad_enabled():
        for x in flat:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                # A prehook on the node that produced x runs after x's tensor hooks, among them
                # the next unit's post-backward (a multi-grad hook on the same tensor): so the
                # next unit reshards before this one unshards, and at most one block is
                # unsharded at a time in backward.
                hook = _make_pre_backward(unit)
                if x.grad_fn is not None:
                    x.grad_fn.register_prehook(lambda grad_outputs, hook=hook: hook(None))
                else:
                    x.register_hook(hook)
    return tree_unflatten(flat, spec)


def _make_post_backward(unit: FlatUnit, handle: list):
    def hook(grads) -> None:
        handle[0].remove()  # once: the input tensor may outlive this iteration
        _enlist(unit)
        unit.input_hook_fired()

    return hook


def _make_pre_backward(unit: FlatUnit):
    def hook(grad: torch.Tensor):
        _enlist(unit)
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

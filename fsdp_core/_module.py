"""The ``FSDPModule`` mixin that ``fully_shard`` puts in front of a module's class (a class
swap, as FSDP2 does): ``unshard``/``reshard``, gradient sync, prefetch and reshard switches,
and ``_apply`` (``.to()`` and friends) relinking the flat shard. The hooks it installs are in
``_hooks``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch.nn as nn

from . import _hooks as H
from ._flat_param import FlatUnit

__all__ = ["FSDPModule", "UnshardHandle", "swap_class", "install_hooks"]


class FSDPModule:
    """Mixin put in front of a sharded module's class by ``fully_shard`` (a class swap)."""

    _fsdp_unit: Optional[FlatUnit]

    def _fsdp_units(self, recurse: bool = True) -> list[FlatUnit]:
        mods = self.modules() if recurse else [self]
        return [m._fsdp_unit for m in mods if isinstance(m, FSDPModule) and m._fsdp_unit is not None]

    def unshard(self, async_op: bool = False) -> Optional["UnshardHandle"]:
        """All-gather this unit's parameters and register them unsharded (original shapes).
        With ``async_op=True`` only start the all-gather and return a handle: its ``wait()``
        (or the module's next forward) completes it, as FSDP2's ``unshard(async_op=True)``."""
        units = self._fsdp_units(recurse=False)
        for unit in units:
            unit.unshard(async_op=async_op)
        return UnshardHandle(units) if async_op else None

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

    def set_prefetch(self, enabled: bool) -> None:
        """Prefetching of the next unit's all-gather in forward and backward (on by default; see
        [Note: prefetch order]). Set on the root; off is for measuring what prefetch buys."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        for m in self.modules():
            if isinstance(m, FSDPModule):
                m.__dict__["_fsdp_prefetch"] = enabled

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


class UnshardHandle:
    """Returned by ``unshard(async_op=True)``: ``wait()`` completes the all-gather."""

    def __init__(self, units: list[FlatUnit]):
        self._units = units

    def wait(self) -> None:
        for unit in self._units:
            unit.unshard()
        self._units = []


_class_cache: dict[type, type] = {}


def swap_class(module: nn.Module) -> None:
    cls = type(module)
    new_cls = _class_cache.get(cls)
    if new_cls is None:
        new_cls = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {"__module__": cls.__module__})
        _class_cache[cls] = new_cls
    module.__class__ = new_cls


def install_hooks(module: nn.Module) -> None:
    module.__dict__.update(H.new_orders())
    for inner in module.modules():  # inner units (sharded before) now sit under this one
        if inner is not module and isinstance(inner, FSDPModule) and inner.__dict__.get("_fsdp_outer") is None:
            inner.__dict__["_fsdp_outer"] = weakref.ref(module)
    module.register_forward_pre_hook(H._pre_forward, with_kwargs=True)
    module.register_forward_hook(H._post_forward, with_kwargs=True)

"""Whole-model traversals every whole-model view builds on: the units under a model, its
``state_dict()`` entries, the one mesh it is sharded over, and the padding of its storages.

Nothing here communicates; ``_state_dict``, ``_clip``, ``_meta`` and ``checkpoint`` sit on top.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

from . import _collectives as C
from ._flat_param import FlatUnit
from ._mesh import ShardMesh, resolve_mesh
from ._module import FSDPModule

__all__ = ["units_of", "walk", "sharded_param_of", "model_mesh", "check_materialized", "padding_views"]


def units_of(model: nn.Module) -> list[FlatUnit]:
    """Every unit under ``model`` (deduplicated, in module order)."""
    seen: dict[int, FlatUnit] = {}
    for m in model.modules():
        if isinstance(m, FSDPModule) and m._fsdp_unit is not None:
            seen.setdefault(id(m._fsdp_unit), m._fsdp_unit)
    return list(seen.values())


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, str, nn.Module, str]]:
    """(key, kind, owner module, attribute) in ``state_dict()`` order, duplicates included."""
    for name, p in module._parameters.items():
        if p is not None:
            yield prefix + name, "param", module, name
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, "buffer", module, name
    for name, child in module._modules.items():
        if child is not None:
            yield from walk(child, prefix + name + ".")


def sharded_param_of(p: nn.Parameter) -> nn.Parameter:
    """The registered local shard view behind ``p`` (``p`` itself unless it is unsharded)."""
    return getattr(p, "_fsdp_unsharded_of", p)


def model_mesh(model: nn.Module) -> Optional[ShardMesh]:
    """The one mesh all of ``model``'s units shard over (the default group as a 1-D mesh for a
    model with no units, or None without torch.distributed)."""
    units = units_of(model)
    if not units:
        if C.initialized():
            return resolve_mesh(None)
        return None
    mesh = units[0].mesh
    for u in units[1:]:
        if u.mesh is not mesh and u.mesh.key != mesh.key:
            raise ValueError(
                f"fully_shard units {units[0].module_name!r} and {u.module_name!r} are sharded over "
                f"different meshes ({mesh.describe()} and {u.mesh.describe()}): a whole-model "
                "checkpoint or load needs one mesh")
    return mesh


def check_materialized(model: nn.Module, what: str) -> None:
    """Refuse a model whose shards (or buffers) are still on the meta device."""
    for unit in units_of(model):
        if unit.shard.device.type == "meta":
            raise RuntimeError(
                f"{what}: fully_shard unit {unit.module_name!r} (parameter {unit.names[0]!r}) is on "
                "the meta device: call model.to_empty(device=...) and initialise the non-persistent "
                "buffers first (or fsdp_core.materialize_meta)")
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"{what}: buffer {name!r} is on the meta device: call model.to_empty(device=...) first")


def padding_views(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """For this rank: views of exactly the padding elements of every local storage, labelled
    ``'<param fqn>:data'``, ``'<param fqn>:grad'`` and ``'<param fqn>:optim.<state key>'``.
    The invariant: each is bitwise zero after init, every reduction and every optimizer step."""
    names = {id(p): n for n, p in model.named_parameters()}
    for unit in units_of(model):
        for piece, p in zip(unit.pieces, unit.sharded_params):
            if piece.pad_numel == 0:
                continue
            name = names.get(id(p), unit.names[piece.index])
            lo = piece.real_numel
            yield f"{name}:data", p.detach()[lo:]
            if p.grad is not None:
                yield f"{name}:grad", p.grad[lo:]
            if optimizer is not None and p in optimizer.state:
                for k, v in optimizer.state[p].items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        yield f"{name}:optim.{k}", v[lo:]

"""``clip_grad_norm_``: the global gradient norm over every shard, and the clipping.

Collective: every rank of every unit's group must call it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import _collectives as C
from ._flat_param import FlatUnit
from ._traverse import units_of

__all__ = ["clip_grad_norm_"]


def _grad_shards(model: nn.Module) -> tuple[list[tuple[FlatUnit, list[torch.Tensor]]], list[torch.Tensor]]:
    per_unit, seen = [], set()
    for unit in units_of(model):
        gs = [p.grad for p in unit.sharded_params if p.grad is not None]
        per_unit.append((unit, gs))
        seen.update(id(p) for p in unit.sharded_params)
    replicated = [p.grad for p in model.parameters() if id(p) not in seen and p.grad is not None]
    return per_unit, replicated


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Collective. Clip the gradients of ``model`` by their global norm over all shards (the
    norm of the unsharded gradients) and return that norm.

    Fast units: local p-norm powers summed across ranks. Deterministic units: the gradients are
    all-gathered and the norm is computed exactly as ``torch.nn.utils.clip_grad_norm_(params,
    max_norm, foreach=False)`` would on the unsharded model, so it is bitwise the same at every
    world size."""
    norm_type = float(norm_type)
    per_unit, replicated = _grad_shards(model)
    if any(u.deterministic for u, _ in per_unit):
        total = _deterministic_norm(model, norm_type)
    else:
        total = _fast_norm(per_unit, replicated, norm_type)
    clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for _, gs in per_unit:
        for g in gs:
            g.mul_(clip_coef.to(g.device))
    for g in replicated:
        g.mul_(clip_coef.to(g.device))
    return total


def _fast_norm(per_unit, replicated, norm_type: float) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float64)
    groups: dict[int, tuple] = {}
    for unit, gs in per_unit:
        key = id(unit.group)
        groups.setdefault(key, (unit.group, []))[1].extend(gs)
    for group, gs in groups.values():
        part = torch.zeros((), dtype=torch.float64, device=gs[0].device if gs else "cpu")
        for g in gs:
            part = _combine(part, torch.linalg.vector_norm(g.double(), norm_type), norm_type)
        part = part.to(C.comm_device(group))
        if math.isinf(norm_type):
            C.all_reduce_max(part, group)
        else:
            C.all_reduce_sum(part, group)
        acc = _combine_powered(acc, part.cpu(), norm_type)
    for g in replicated:
        acc = _combine(acc, torch.linalg.vector_norm(g.double(), norm_type).cpu(), norm_type)
    total = acc if math.isinf(norm_type) else acc ** (1.0 / norm_type)
    return total.float()


def _combine(acc: torch.Tensor, norm: torch.Tensor, norm_type: float) -> torch.Tensor:
    """acc holds a max (inf-norm) or a sum of p-th powers."""
    if math.isinf(norm_type):
        return torch.maximum(acc, norm.to(acc.device))
    return acc + norm.to(acc.device) ** norm_type


def _combine_powered(acc: torch.Tensor, part: torch.Tensor, norm_type: float) -> torch.Tensor:
    return torch.maximum(acc, part) if math.isinf(norm_type) else acc + part


def _deterministic_norm(model: nn.Module, norm_type: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(foreach=False)'s norm, computed on gathered gradients."""
    gathered: dict[int, torch.Tensor] = {}
    for unit in units_of(model):
        grad_flat = torch.zeros(unit.layout.shard_numel, dtype=unit.master_dtype, device=unit.shard.device)
        for piece, p in zip(unit.pieces, unit.sharded_params):
            if p.grad is not None:
                grad_flat[piece.shard_start: piece.shard_end].copy_(p.grad)
        gathered[id(unit)] = unit.gather_full(grad_flat)
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        unit = getattr(p, "_fsdp_unit", None)
        g = p.grad if unit is None else unit.param_view(gathered[id(unit)], p._fsdp_index)
        norms.append(torch.linalg.vector_norm(g, norm_type))
    if not norms:
        return torch.tensor(0.0)
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)

"""Whole-model views of a sharded model: full state dicts, padding views, gradient clipping.

All functions that gather are collective: every rank of every unit's group must call them.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from . import _collectives as C
from ._module import FSDPModule
from ._unit import FlatUnit

__all__ = ["full_state_dict", "load_full_state_dict", "check_full_state_dict", "padding_views", "clip_grad_norm_", "units_of"]


def units_of(model: nn.Module) -> list[FlatUnit]:
    """Every unit under ``model`` (deduplicated, in module order)."""
    seen: dict[int, FlatUnit] = {}
    for m in model.modules():
        if isinstance(m, FSDPModule) and m._fsdp_unit is not None:
            seen.setdefault(id(m._fsdp_unit), m._fsdp_unit)
    return list(seen.values())


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, str, nn.Module, str]]:
    """(key, kind, owner module, attribute) in ``state_dict()`` order, duplicates included."""
    for name, p in module._parameters.items():
        if p is not None:
            yield prefix + name, "param", module, name
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, "buffer", module, name
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".")


@torch.no_grad()
def _gather_full(unit: FlatUnit) -> torch.Tensor:
    """The unit's padded flat parameters in the master dtype (collective)."""
    flat = torch.empty(unit.layout.padded_numel, dtype=unit.master_dtype, device=unit.compute_device)
    C.all_gather_flat(flat, unit.shard.to(unit.compute_device), unit.group)
    return flat


def _full_param(unit: FlatUnit, flat: torch.Tensor, index: int) -> torch.Tensor:
    off, n = unit.layout.offsets[index], unit.layout.numels[index]
    return flat[off: off + n].view(unit.shapes[index])


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The unsharded state dict: exactly the keys, shapes and dtypes of the
    unsharded model's ``state_dict()`` (master dtype), as fresh CPU tensors on every rank."""
    gathered: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, kind, mod, attr in _walk(model):
        if kind == "buffer":
            out[key] = mod._buffers[attr].detach().cpu().clone()
            continue
        p = mod._parameters[attr]
        unit: Optional[FlatUnit] = getattr(p, "_fsdp_unit", None)
        if unit is None:
            unit = getattr(getattr(p, "_fsdp_unsharded_of", None), "_fsdp_unit", None)
            p = getattr(p, "_fsdp_unsharded_of", p)
        if unit is None:  # a parameter no unit owns (the module was never sharded)
            out[key] = p.detach().cpu().clone()
            continue
        if id(unit) not in gathered:
            gathered[id(unit)] = _gather_full(unit)
        out[key] = _full_param(unit, gathered[id(unit)], p._fsdp_index).cpu().clone()
    return out


def _sharded_param_of(p: nn.Parameter) -> nn.Parameter:
    return getattr(p, "_fsdp_unsharded_of", p)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]], *, strict: bool = True,
                         src_rank: Optional[int] = None) -> None:
    """Load an unsharded state dict (every rank passes the full dict): each rank copies its own
    slices into its shards. Missing or unexpected keys and wrong shapes raise ``RuntimeError``
    naming them (``strict=False`` ignores missing and unexpected keys, never shapes).

    With ``src_rank``, only that rank (of the model's group) passes the dict, the others pass
    ``None``; the weights are scattered one unit at a time, so no rank ever holds two full
    copies (see [Note: one unit at a time] in ``_scatter_load``)."""
    if src_rank is not None:
        from ._scatter_load import load_from_rank  # builds on this module: imported on use
        return load_from_rank(model, state_dict, src_rank=src_rank, strict=strict)
    entries = list(_walk(model))
    present = check_full_state_dict(entries, state_dict, strict)
    for unit in units_of(model):
        unit.reshard()  # no unsharded copy (nor an in-flight gather) may outlive the new values
    for key, kind, mod, attr in entries:
        if key not in present:
            continue
        src = state_dict[key]
        if kind == "buffer":
            mod._buffers[attr].copy_(src)
            continue
        p = _sharded_param_of(mod._parameters[attr])
        unit: Optional[FlatUnit] = getattr(p, "_fsdp_unit", None)
        if unit is None:
            p.copy_(src)
            continue
        piece = unit.pieces[p._fsdp_index]
        flat_src = src.reshape(-1)[piece.param_start: piece.param_start + piece.real_numel]
        unit.shard[piece.shard_start: piece.shard_start + piece.real_numel].copy_(flat_src)
    for unit in units_of(model):
        unit.zero_padding()


def check_full_state_dict(entries, state_dict, strict: bool) -> set[str]:
    """The keys of ``state_dict`` to load into the model whose ``_walk`` gave ``entries``;
    raises, naming the keys, for a dict that does not fit it. Checks everything before anything
    is copied, so a bad dict leaves the model untouched."""
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"load_full_state_dict: the source rank must pass the full state dict, got "
            f"{type(state_dict).__name__}")
    expected = {key for key, *_ in entries}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if strict and (missing or unexpected):
        raise RuntimeError(
            "load_full_state_dict: the state dict does not match the model "
            f"(missing keys: {sorted(missing)[:10]}; unexpected keys: {unexpected[:10]}); "
            "pass a state dict of the same architecture, or strict=False to skip keys")
    for key, kind, mod, attr in entries:
        if key not in state_dict:
            continue
        src = state_dict[key]
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"load_full_state_dict: value for {key!r} is a {type(src).__name__}, not a Tensor")
        if kind == "buffer":
            shape = tuple(mod._buffers[attr].shape)
        else:
            p = _sharded_param_of(mod._parameters[attr])
            unit = getattr(p, "_fsdp_unit", None)
            shape = tuple(unit.shapes[p._fsdp_index]) if unit is not None else tuple(p.shape)
        if tuple(src.shape) != shape:
            raise RuntimeError(
                f"load_full_state_dict: {kind} {key!r} has shape {shape} in the model but "
                f"{tuple(src.shape)} in the state dict")
    return {k for k in expected if k in state_dict}



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
        part = part.to(_group_device(group))
        if math.isinf(norm_type):
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
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


def _group_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _deterministic_norm(model: nn.Module, norm_type: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(foreach=False)'s norm, computed on gathered gradients."""
    gathered: dict[int, torch.Tensor] = {}
    for unit in units_of(model):
        grad_flat = torch.zeros(unit.layout.shard_numel, dtype=unit.master_dtype, device=unit.shard.device)
        for piece, p in zip(unit.pieces, unit.sharded_params):
            if p.grad is not None:
                grad_flat[piece.shard_start: piece.shard_end].copy_(p.grad)
        full = torch.empty(unit.layout.padded_numel, dtype=unit.master_dtype, device=unit.compute_device)
        C.all_gather_flat(full, grad_flat.to(unit.compute_device), unit.group)
        gathered[id(unit)] = full
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        unit = getattr(p, "_fsdp_unit", None)
        g = p.grad if unit is None else _full_param(unit, gathered[id(unit)], p._fsdp_index)
        norms.append(torch.linalg.vector_norm(g, norm_type))
    if not norms:
        return torch.tensor(0.0)
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)

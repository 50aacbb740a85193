"""Meta-device initialisation: build on ``meta``, shard, then materialise every rank's shard
exactly as eager initialisation would have produced it.

[Note: replayed init]
Every rank allocates the unsharded parameters one model at a time, fills parameters and
floating buffers with NaN, runs the same init (``init_fn(model)``, or each module's
``reset_parameters()`` in module order) under the same RNG state, keeps its own slices and
frees the rest. NaN left behind means the init missed a tensor (a non-persistent buffer is the
classic case) and raises; a checksum all-gather catches ranks that initialised differently.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from . import _collectives as C
from ._traverse import units_of

__all__ = ["materialize_meta"]


def _default_init(model: nn.Module) -> None:
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


@torch.no_grad()
def materialize_meta(
    model: nn.Module,
    *,
    device: Union[str, torch.device, None] = None,
    init_fn: Optional[Callable[[nn.Module], None]] = None,
) -> nn.Module:
    """Collective. Materialise a model built on ``meta`` and sharded with ``fully_shard``.

    ``init_fn(model)`` sees the unsharded parameters (original shapes) and every buffer, and must
    initialise all of them, as eager construction would. Seed the RNG identically on every rank
    before calling (as you would before eager construction)."""
    if device is None:
        device = C.comm_device()
    model.to_empty(device=device)
    units = units_of(model)
    checksums: dict[int, torch.Tensor] = {}
    for unit in units:
        params = []
        for i, shape in enumerate(unit.shapes):
            t = torch.full(shape, float("nan"), dtype=unit.master_dtype, device=unit.shard.device)
            params.append(nn.Parameter(t, requires_grad=unit.requires_grad[i]))
        for reg in unit.registrations:
            reg.module._parameters[reg.attr] = params[reg.index]
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.fill_(float("nan"))
    try:
        (init_fn or _default_init)(model)
        _check_initialised(model, units)
    finally:
        for unit in units:
            current = [None] * len(unit.shapes)
            for reg in unit.registrations:
                if current[reg.index] is None:
                    current[reg.index] = reg.module._parameters[reg.attr]
            checksums[id(unit)] = torch.stack([p.detach().double().sum() for p in current]).sum().reshape(1)
            for piece, p in zip(unit.pieces, current):
                src = p.detach().reshape(-1)[piece.param_start: piece.param_start + piece.real_numel]
                unit.shard[piece.shard_start: piece.shard_start + piece.real_numel].copy_(src)
            unit.zero_padding()
            unit.register_sharded()
    _check_ranks_agree(units, checksums)
    return model


def _check_initialised(model: nn.Module, units) -> None:
    missed = []
    for unit in units:
        seen = set()
        for reg in unit.registrations:
            if reg.index in seen:
                continue
            seen.add(reg.index)
            p = reg.module._parameters[reg.attr]
            if torch.isnan(p).any():
                missed.append(f"parameter {unit.names[reg.index]!r}")
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and torch.isnan(buf).any():
            missed.append(f"buffer {name!r}")
    if missed:
        raise RuntimeError(
            "materialize_meta: the init left these tensors uninitialised (NaN): "
            + ", ".join(missed[:10])
            + ". init_fn must initialise every parameter and every buffer, non-persistent "
            "buffers included (they are not in the state dict and are easy to miss)"
        )


def _check_ranks_agree(units, checksums) -> None:
    for unit in units:
        # The shard group, then (HSDP) the replicate group: every rank of the mesh must agree.
        for group in (unit.group, unit.replicate_group):
            if group is None or C.world_size(group) == 1:
                continue
            s = checksums[id(unit)].to(unit.compute_device)
            out = torch.empty(C.world_size(group), dtype=s.dtype, device=s.device)
            C.all_gather_flat(out, s, group)
            if not torch.all(out == out[0]):
                raise RuntimeError(
                    f"materialize_meta: ranks initialised unit {unit.module_name!r} differently "
                    f"(checksums {out.tolist()}): seed the RNG identically on every rank before init"
                )

"""Full (unsharded) state dicts of a sharded model: ``full_state_dict``, and
``load_full_state_dict`` from every rank or from one (``src_rank``).

All of them are collective: every rank of every unit's group must call them.

[Note: one unit at a time]
The FSDP2 guide's flow for ``src_rank``: every rank builds the model on meta, shards it and calls
``model.to_empty(device=...)``; only ``src_rank`` holds the full state dict (e.g. read from a file).
For each unit, in the same order on every rank, the source lays the unit's parameters out in
one zero-padded flat buffer (the unit's own layout) and scatters it, so every rank receives
exactly its shard, padding included. Buffers and parameters no unit owns are broadcast one
tensor at a time. At any moment the source holds the state dict plus one unit's flat buffer,
every other rank its shards plus one shard-sized receive buffer: no rank ever holds two full
copies of the model. The source validates the state dict first and shares the verdict
(``agree``), so a bad dict raises on every rank instead of leaving the others waiting in a
scatter. On a 2-D mesh the source's replica row receives by a scatter in its shard group; every
shard is then broadcast from that row over its replicate group.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import _collectives as C
from ._flat_param import FlatUnit
from ._traverse import check_materialized, model_mesh, sharded_param_of, units_of, walk

__all__ = ["full_state_dict", "load_full_state_dict", "check_full_state_dict"]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The unsharded state dict: exactly the keys, shapes and dtypes of the
    unsharded model's ``state_dict()`` (master dtype), as fresh CPU tensors on every rank."""
    gathered: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, kind, mod, attr in walk(model):
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
            gathered[id(unit)] = unit.gather_full()
        out[key] = unit.param_view(gathered[id(unit)], p._fsdp_index).cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]], *, strict: bool = True,
                         src_rank: Optional[int] = None) -> None:
    """Load an unsharded state dict (every rank passes the full dict): each rank copies its own
    slices into its shards. Missing or unexpected keys and wrong shapes raise ``RuntimeError``
    naming them (``strict=False`` ignores missing and unexpected keys, never shapes).

    With ``src_rank``, only that rank (of the model's group) passes the dict, the others pass
    ``None``; the weights are scattered one unit at a time, so no rank ever holds two full
    copies (see [Note: one unit at a time])."""
    if src_rank is not None:
        return _load_from_rank(model, state_dict, src_rank=src_rank, strict=strict)
    entries = list(walk(model))
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
        p = sharded_param_of(mod._parameters[attr])
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
            p = sharded_param_of(mod._parameters[attr])
            unit = getattr(p, "_fsdp_unit", None)
            shape = tuple(unit.shapes[p._fsdp_index]) if unit is not None else tuple(p.shape)
        if tuple(src.shape) != shape:
            raise RuntimeError(
                f"load_full_state_dict: {kind} {key!r} has shape {shape} in the model but "
                f"{tuple(src.shape)} in the state dict")
    return {k for k in expected if k in state_dict}


@torch.no_grad()
def _load_from_rank(model: nn.Module, state_dict: Optional[dict], *, src_rank: int, strict: bool = True) -> None:
    mesh = model_mesh(model)
    world = 1 if mesh is None else mesh.world
    rank = 0 if mesh is None else mesh.rank
    if not isinstance(src_rank, int) or not 0 <= src_rank < world:
        raise ValueError(f"load_full_state_dict: src_rank must be a rank of the model's mesh (0..{world - 1}), got {src_rank!r}")
    entries = list(walk(model))

    def check():
        check_materialized(model, "load_full_state_dict")
        return None, check_full_state_dict(entries, state_dict, strict) if rank == src_rank else None

    _, verdicts = C.agree(mesh, "load_full_state_dict", check)
    present = verdicts[src_rank]
    S = 1 if mesh is None else mesh.S
    src_r, src_s = divmod(src_rank, S)
    shard_group = None if mesh is None or S == 1 else mesh.shard_group
    rep_group = None if mesh is None else mesh.replicate_group
    in_src_row = mesh is None or mesh.r == src_r
    device = C.comm_device(None if mesh is None else mesh.shard_group)
    is_src = rank == src_rank

    keys_of: dict[tuple[int, int], list[str]] = {}   # (unit, index) -> every key naming that parameter
    for key, kind, mod, attr in entries:
        if kind == "param":
            p = sharded_param_of(mod._parameters[attr])
            unit = getattr(p, "_fsdp_unit", None)
            if unit is not None:
                keys_of.setdefault((id(unit), p._fsdp_index), []).append(key)

    for unit in units_of(model):
        unit.reshard()
        sources = [next((k for k in keys_of.get((id(unit), i), []) if k in present), None)
                   for i in range(unit.layout.num_params)]
        recv = torch.empty(unit.layout.shard_numel, dtype=unit.master_dtype, device=device)  # 1-D shard
        scatter_list = None
        if is_src:
            flat = torch.zeros(unit.layout.padded_numel, dtype=unit.master_dtype, device=device)  # 1-D padded
            for off, n, key in zip(unit.layout.offsets, unit.layout.numels, sources):
                if key is not None:
                    flat[off: off + n].copy_(state_dict[key].reshape(-1))
            scatter_list = list(flat.chunk(S))
        if in_src_row:
            if shard_group is None:
                recv.copy_(scatter_list[0])
            else:
                C.scatter(recv, scatter_list, src_s, shard_group)
        if rep_group is not None:
            C.broadcast(recv, src_r, rep_group)
        scatter_list = flat = None
        for piece, key in zip(unit.pieces, sources):
            if key is not None:  # absent (strict=False): keep the current values
                lo, hi = piece.shard_start, piece.shard_start + piece.real_numel
                unit.shard[lo:hi].copy_(recv[lo:hi])
        unit.zero_padding()

    for key, kind, mod, attr in entries:
        if key not in present:
            continue
        if kind == "buffer":
            target = mod._buffers[attr]
        else:
            target = sharded_param_of(mod._parameters[attr])
            if getattr(target, "_fsdp_unit", None) is not None:
                continue  # scattered above
        buf = (state_dict[key].to(device=device, dtype=target.dtype) if is_src
               else torch.empty(target.shape, dtype=target.dtype, device=device))
        if shard_group is not None and in_src_row:
            C.broadcast(buf, src_s, shard_group)
        if rep_group is not None:
            C.broadcast(buf, src_r, rep_group)
        target.copy_(buf)

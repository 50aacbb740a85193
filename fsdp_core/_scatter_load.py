"""Pretrained weights from one rank into a sharded model:
``fsdp_core.load_full_state_dict(model, state_dict_or_None, src_rank=0)``.

[Note: one unit at a time]
The FSDP2 guide's flow: every rank builds the model on meta, shards it and calls
``model.to_empty(device=...)``; only ``src_rank`` holds the full state dict (e.g. read from a file).
For each unit, in the same order on every rank, the source lays the unit's parameters out in
one zero-padded flat buffer (the unit's own layout) and scatters it, so every rank receives
exactly its shard, padding included. Buffers and parameters no unit owns are broadcast one
tensor at a time. At any moment the source holds the state dict plus one unit's flat buffer,
every other rank its shards plus one shard-sized receive buffer: no rank ever holds two full
copies of the model. The source validates the state dict first and shares the verdict, so a bad
dict raises on every rank instead of leaving the others waiting in a scatter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ._ckpt_state import check_materialized, model_mesh
from ._state import _sharded_param_of, _walk, check_full_state_dict, units_of

__all__ = ["load_from_rank"]


@torch.no_grad()
def load_from_rank(model: nn.Module, state_dict: Optional[dict], *, src_rank: int, strict: bool = True) -> None:
    mesh = model_mesh(model)
    world = 1 if mesh is None else mesh.world
    rank = 0 if mesh is None else mesh.rank
    if not isinstance(src_rank, int) or not 0 <= src_rank < world:
        raise ValueError(f"load_full_state_dict: src_rank must be a rank of the model's mesh (0..{world - 1}), got {src_rank!r}")
    entries = list(_walk(model))
    err, present = None, None
    try:
        check_materialized(model, "load_full_state_dict")
        if rank == src_rank:
            present = check_full_state_dict(entries, state_dict, strict)
    except Exception as e:  # noqa: BLE001 - shared with every rank below
        err = e
    mine = (None if err is None else f"{type(err).__name__}: {err}", present)
    verdicts = [mine] if mesh is None else mesh.all_gather_object(mine)
    failed = [(r, msg) for r, (msg, _) in enumerate(verdicts) if msg is not None]
    if failed:
        if err is not None:
            raise err
        raise RuntimeError(f"load_full_state_dict failed on rank {failed[0][0]}: {failed[0][1]}")
    present = verdicts[src_rank][1]
    # [Note: one unit at a time] on a 2-D mesh: the source's replica row receives by a scatter
    # in its shard group; every shard is then broadcast from that row over its replicate group.
    S = 1 if mesh is None else mesh.S
    src_r, src_s = divmod(src_rank, S)
    shard_group = None if mesh is None or S == 1 else mesh.shard_group
    rep_group = None if mesh is None else mesh.replicate_group
    in_src_row = mesh is None or mesh.r == src_r
    src = None if shard_group is None else dist.get_global_rank(shard_group, src_s)
    rep_src = None if rep_group is None else dist.get_global_rank(rep_group, src_r)
    device = _comm_device(None if mesh is None else mesh.shard_group)
    is_src = rank == src_rank

    keys_of: dict[tuple[int, int], list[str]] = {}   # (unit, index) -> every key naming that parameter
    for key, kind, mod, attr in entries:
        if kind == "param":
            p = _sharded_param_of(mod._parameters[attr])
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
                dist.scatter(recv, scatter_list, src=src, group=shard_group)
        if rep_group is not None:
            dist.broadcast(recv, src=rep_src, group=rep_group)
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
            target = _sharded_param_of(mod._parameters[attr])
            if getattr(target, "_fsdp_unit", None) is not None:
                continue  # scattered above
        buf = (state_dict[key].to(device=device, dtype=target.dtype) if is_src
               else torch.empty(target.shape, dtype=target.dtype, device=device))
        if shard_group is not None and in_src_row:
            dist.broadcast(buf, src=src, group=shard_group)
        if rep_group is not None:
            dist.broadcast(buf, src=rep_src, group=rep_group)
        target.copy_(buf)


def _comm_device(group) -> torch.device:
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

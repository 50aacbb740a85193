"""What a checkpoint holds: a sharded model's and optimizer's state as a DCP state dict keyed by
original names (FQNs) with full shapes, and the way back into the local shards.

[Note: checkpoint keys]
The nested layout is the one ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives for
an FSDP2 model, so standard tools read our checkpoints (and an unsharded model can load them):

    model.<fqn>                      every entry of the unsharded ``model.state_dict()``
    optim.state.<fqn>.<key>          per-parameter optimizer state, under the parameter's first FQN
    optim.param_groups.<i>.<name>    hyperparameters; ``params`` is the group's list of FQNs

Sharded parameters, and optimizer state shaped like a parameter's local view, are ``FlatSlices``
of the parameter's full shape: each rank writes only its real elements (never the padding).
Everything else (buffers, parameters no unit owns, scalar state such as Adam's ``step``,
hyperparameters) is replicated; DCP writes each replicated key once.

Optimizer state for a 0-d parameter is ambiguous from shapes alone (``exp_avg`` and ``step``
are both 0-d in full shape), so the manifest lists which optimizer-state keys were sharded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from .._flat_param import FlatUnit
from .._traverse import sharded_param_of, walk
from ._dcp import FlatSlices

__all__ = ["ParamInfo", "param_infos", "model_leaves", "optim_save_state", "CheckpointView",
           "optim_dest_state", "optim_native_state"]

# Scalar optimizer-state keys of the built-in optimizers, for checkpoints without a manifest.
_SCALAR_STATE_KEYS = frozenset({"step", "mu_product"})


@dataclass(frozen=True)
class ParamInfo:
    fqn: str                        # first name the parameter is registered under
    param: nn.Parameter             # the registered local view (1-D) or the plain parameter
    unit: Optional[FlatUnit]
    index: int
    shape: tuple[int, ...]          # full (unsharded) shape

    def local_real(self, t: torch.Tensor) -> torch.Tensor:
        """The real (non-padding) elements of a tensor shaped like the local view."""
        return t.detach()[: self.unit.pieces[self.index].real_numel]

    def slices(self, t: torch.Tensor) -> FlatSlices:
        piece = self.unit.pieces[self.index]
        return FlatSlices(self.local_real(t), self.shape, piece.param_start, owns_empty=self.unit.rank == 0)


def param_infos(model: nn.Module) -> dict[int, ParamInfo]:
    """id(registered local parameter) -> ParamInfo, in ``state_dict`` order, first FQN wins."""
    out: dict[int, ParamInfo] = {}
    for key, kind, mod, attr in walk(model):
        if kind != "param":
            continue
        p = sharded_param_of(mod._parameters[attr])
        if id(p) in out:
            continue
        unit = getattr(p, "_fsdp_unit", None)
        if unit is None:
            out[id(p)] = ParamInfo(key, p, None, -1, tuple(p.shape))
        else:
            out[id(p)] = ParamInfo(key, p, unit, p._fsdp_index, tuple(unit.shapes[p._fsdp_index]))
    return out


def model_leaves(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()``'s keys -> DCP leaves that alias this rank's storage (so one dict
    serves as the source on save and as the destination on load)."""
    infos = param_infos(model)
    out: dict[str, Any] = {}
    for key, kind, mod, attr in walk(model):
        if kind == "buffer":
            out[key] = mod._buffers[attr].detach()
            continue
        info = infos[id(sharded_param_of(mod._parameters[attr]))]
        out[key] = info.param.detach() if info.unit is None else info.slices(info.param)
    return out


def optim_save_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list[list[str]]]:
    """The optimizer's state keyed by FQN, and the [fqn, key] pairs saved sharded."""
    infos = param_infos(model)
    state: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    sharded: list[list[str]] = []
    for gi, group in enumerate(optimizer.param_groups):
        fqns = []
        for p in group["params"]:
            info = infos.get(id(p))
            if info is None:
                raise ValueError(
                    f"optimizer param group {gi} holds a parameter of shape {tuple(p.shape)} that is "
                    "not a parameter of the model: build the optimizer from model.parameters() "
                    "after fully_shard"
                )
            fqns.append(info.fqn)
            for key, value in optimizer.state.get(p, {}).items():
                leaf, is_sharded = _state_leaf(info, key, value)
                state.setdefault(info.fqn, {})[key] = leaf
                if is_sharded:
                    sharded.append([info.fqn, key])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": fqns})
    return {"state": state, "param_groups": groups}, sharded


def _state_leaf(info: ParamInfo, key: str, value: Any) -> tuple[Any, bool]:
    if not isinstance(value, torch.Tensor):
        return value, False
    if info.unit is not None and value.dim() == 1 and value.shape == info.param.shape:
        return info.slices(value), True
    if value.dim() == 0 or (info.unit is None and value.shape == info.param.shape):
        return value.detach(), False
    raise ValueError(
        f"optimizer state {key!r} of parameter {info.fqn!r} has shape {tuple(value.shape)}, which is "
        f"neither the shape of the parameter's local shard {tuple(info.param.shape)} nor a scalar: "
        "fsdp_core.checkpoint cannot reshard it (use an optimizer whose state is elementwise)"
    )


class CheckpointView:
    """The checkpoint's DCP metadata, by nested path: what keys exist, with which shapes."""

    def __init__(self, metadata: Metadata, where: str):
        paths = metadata.planner_data
        if not isinstance(paths, dict):
            raise RuntimeError(
                f"checkpoint {where} has no key paths in its metadata: it was not written with "
                "DCP's default (flattening) planner, so its keys cannot be matched to the model"
            )
        self.md = metadata.state_dict_metadata
        self.paths: dict[tuple, str] = {tuple(path): flat for flat, path in paths.items() if flat in self.md}
        self.model = {p[1]: self.md[f] for p, f in self.paths.items() if len(p) == 2 and p[0] == "model"}
        self.optim_state: dict[str, dict[str, Any]] = {}
        self.group_keys: dict[int, dict[str, Any]] = {}
        for p, f in self.paths.items():
            if len(p) == 4 and p[:2] == ("optim", "state"):
                self.optim_state.setdefault(p[2], {})[p[3]] = self.md[f]
            elif len(p) == 4 and p[:2] == ("optim", "param_groups"):
                self.group_keys.setdefault(int(p[2]), {})[p[3]] = self.md[f]

    @property
    def has_optimizer(self) -> bool:
        return bool(self.group_keys)

    def param_groups_dest(self) -> dict:
        """A destination for reading only the hyperparameters (small: no tensors of the model)."""
        groups = [{k: _placeholder(md) for k, md in self.group_keys[i].items()} for i in range(len(self.group_keys))]
        return {"optim": {"param_groups": groups}}


def _placeholder(md) -> Any:
    if isinstance(md, BytesStorageMetadata):
        return None
    return torch.empty(tuple(md.size), dtype=md.properties.dtype)


def optim_dest_state(model: nn.Module, optimizer: torch.optim.Optimizer, view: CheckpointView,
                     sharded: Optional[set[tuple[str, str]]]) -> tuple[dict, dict]:
    """Destinations for the optimizer state of the checkpoint, and the local tensors behind the
    sharded ones: {fqn: {key: full-view-shaped tensor (padding zero)}}."""
    infos = {info.fqn: info for info in param_infos(model).values()}
    dest: dict[str, dict[str, Any]] = {}
    local: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, entries in view.optim_state.items():
        info = infos[fqn]
        for key, md in entries.items():
            if isinstance(md, BytesStorageMetadata):
                dest.setdefault(fqn, {})[key] = None
                continue
            is_sharded = info.unit is not None and (
                (fqn, key) in sharded if sharded is not None
                else tuple(md.size) == info.shape and not (info.shape == () and key in _SCALAR_STATE_KEYS))
            if is_sharded:
                if tuple(md.size) != info.shape:
                    raise RuntimeError(
                        f"optimizer state {key!r} of parameter {fqn!r} has shape {tuple(md.size)} in "
                        f"the checkpoint but the parameter has shape {info.shape}"
                    )
                buf = torch.zeros(info.param.shape, dtype=md.properties.dtype, device=info.param.device)
                local.setdefault(fqn, {})[key] = buf
                dest.setdefault(fqn, {})[key] = info.slices(buf)
            else:
                dest.setdefault(fqn, {})[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return {"optim": {"state": dest}}, local


def optim_native_state(optimizer: torch.optim.Optimizer, model: nn.Module, loaded_state: dict,
                       local: dict, loaded_groups: list[dict]) -> dict:
    """The loaded state in ``optimizer.load_state_dict``'s format (parameters by position)."""
    infos = param_infos(model)
    state: dict[int, dict[str, Any]] = {}
    groups = []
    pos = 0
    for group, saved in zip(optimizer.param_groups, loaded_groups):
        ids = []
        for p in group["params"]:
            fqn = infos[id(p)].fqn
            if fqn in loaded_state:
                state[pos] = {k: local.get(fqn, {}).get(k, v) for k, v in loaded_state[fqn].items()}
            ids.append(pos)
            pos += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}

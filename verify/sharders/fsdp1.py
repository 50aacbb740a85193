"""PyTorch's FSDP1 (`torch.distributed.fsdp.FullyShardedDataParallel`) through the adapter
protocol, on the case's group: one FSDP1 instance per wrap unit (an auto-wrap policy that
wraps exactly the plan's units, the root by the outer call), ``use_orig_params=True`` (the
optimizer steps the original parameters, as views into each unit's flat shard),
``FULL_SHARD`` or ``SHARD_GRAD_OP`` from ``reshard_after_forward``,
``MixedPrecision(param_dtype=bf16, reduce_dtype=fp32)`` for bf16. On gloo it runs with
``device_id=torch.device("cpu")`` (with None FSDP1 raises "FSDP needs a non-CPU accelerator
device"). Fast mode only (its gradient reduction is a reduce-scatter in the backend's order);
its switch for accumulation without communication is the ``no_sync()`` context, which
`gradient_sync` returns. It refuses 0-d parameters ("FSDP doesn't support scalar parameters"):
such cases are skipped with that reason (`unsupported`).

Probes: the padding at the tail of each unit's local flat shard (FSDP1 pads the flat parameter
with zeros to a multiple of W: checked bitwise zero after the reduction and after the step),
the local pieces and reduced gradients of every original parameter (its slice of the
flattened parameter, from the handle's ``_shard_param_infos``: the reassembly and bitwise
gradient checks). No collective formula.

Checkpoints: DCP with sharded state dicts, as for FSDP2 (`get_state_dict` / `set_state_dict`,
`dcp.save` / `dcp.load`), so a checkpoint saved at one world size loads at another.

[Note: FSDP1 DCP resume and ranks that hold nothing of a parameter]
FSDP1's sharded state dicts hold ``ShardedTensor``s. A rank whose flat shard holds no element
of some parameter (small parameters at W = 4) gets ShardedTensors with no local shard, and
``DefaultLoadPlanner``'s ``_flatten_sharded_tensors`` drops those keys from that rank's plan
(torch 2.13, checkpoint/_sharded_tensor_utils.py: ``if len(shards) == 0: return``). The planner
then sees checkpoint keys the rank lacks, takes it for a checkpoint older than torch 2.4 and
re-flattens the state dict the old way (default_planner.py, ``_derived_version = "2_3"``),
where the list ``optim.param_groups`` is one leaf, and fails with "Missing key in checkpoint
state_dict: optim.param_groups." on those ranks only: a torch defect, not a use error (the
recipe is the documented one; the rank really has nothing to read for those keys, and the
message names a key that is in the checkpoint). `load` passes
``DefaultLoadPlanner(flatten_sharded_tensors=False)`` (FSDP1 alone never nests
ShardedTensors, so flattening them does nothing else here). docs/peers.md has the replay.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import (CPUOffload, FullyShardedDataParallel, MixedPrecision,
                                    ShardingStrategy)

from verify.scenarios import build_model, split_ties
from verify.sharders.base import Sharder, WrapPlan

__all__ = ["FSDP1"]


class FSDP1(Sharder):
    name = "fsdp1"
    world = "group"
    modes = ("fast",)
    dtypes = ("fp32", "bf16")
    offload = False

    def unsupported(self, scenario) -> Optional[str]:
        zero_d = [n for n, p in build_model(scenario, device="meta").named_parameters()
                  if p.dim() == 0]
        if zero_d:   # _init_utils.py: "FSDP doesn't support scalar parameters"
            return (f"FSDP1 flattens every unit's parameters and refuses 0-d parameters "
                    f"({', '.join(zero_d[:3])})")
        split = split_ties(scenario)
        if split:   # FSDP1 needs a shared parameter in its users' lowest common FSDP unit
            return (f"FSDP1 cannot shard a parameter tied across two FSDP units "
                    f"({', '.join(split[:2])}): each unit flattens its own copy")
        return None

    def shard(self, model, plan: WrapPlan, group):
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        inner = {id(m) for name, m in plan.units if name}

        def policy(module, recurse, nonwrapped_numel):
            return True if recurse else id(module) in inner

        mp = None
        if plan.param_dtype is not None:
            mp = MixedPrecision(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
        strategy = (ShardingStrategy.FULL_SHARD if plan.reshard_after_forward
                    else ShardingStrategy.SHARD_GRAD_OP)
        if dist.get_world_size(group) == 1:   # what FSDP1 switches to itself, with a warning
            strategy = ShardingStrategy.NO_SHARD
        self._group = group
        return FullyShardedDataParallel(
            model, process_group=group, auto_wrap_policy=policy, sharding_strategy=strategy,
            mixed_precision=mp, device_id=device, use_orig_params=True,
            cpu_offload=CPUOffload(offload_params=plan.offload))

    def set_gradient_sync(self, model, flag: bool) -> None:
        raise RuntimeError("FSDP1's switch is the no_sync() context: use gradient_sync")

    def gradient_sync(self, model, flag: bool):
        return contextlib.nullcontext() if flag else model.no_sync()

    def full_parameters(self, model, optimizer):
        with warnings.catch_warnings():   # NO_SHARD (W = 1): "full_state_dict will be returned"
            warnings.simplefilter("ignore", UserWarning)
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        names = {n for n, _ in _named_params(model)}
        return {k: v.detach().cpu().clone() for k, v in sd.items() if k in names}

    # -- probes -----------------------------------------------------------------------------------
    def padding_views(self, model, optimizer):
        out = []
        for unit in FullyShardedDataParallel.fsdp_modules(model):
            handle = unit._handle
            if handle is None:
                continue
            flat = handle.flat_param
            pad = flat._shard_numel_padded
            if pad:
                out.append((f"{_label(flat)} shard tail", flat._local_shard[-pad:]))
        return out

    def local_pieces(self, model):
        return {name: piece for name, piece, _ in _pieces(model)}

    def reduced_gradients(self, model):
        return {name: (piece[0], grad) for name, piece, grad in _pieces(model) if grad is not None}

    # -- checkpoints ------------------------------------------------------------------------------
    def _state(self, model, optimizer) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions())
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path, model, optimizer):
        dcp.save(self._state(model, optimizer), checkpoint_id=path, process_group=self._group)

    def load(self, path, model, optimizer):
        state = self._state(model, optimizer)
        dcp.load(state, checkpoint_id=path, process_group=self._group,   # see the [Note] above
                 planner=DefaultLoadPlanner(flatten_sharded_tensors=False))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=StateDictOptions())


def _label(flat) -> str:
    return ",".join(flat._fqns[:2]) + ("..." if len(flat._fqns) > 2 else "")


def _named_params(model):
    """(name without FSDP1's wrapper prefixes, original parameter)."""
    prefix = "_fsdp_wrapped_module."
    for name, p in model.named_parameters():
        yield name.replace(prefix, ""), p


def _pieces(model):
    """(name, (flat offset, this rank's elements), this rank's gradient elements or None) of
    every original parameter: its slice of the flattened parameter, from the unit's handle."""
    info = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        handle = unit._handle
        if handle is None:
            continue
        flat = handle.flat_param
        for p, si in zip(flat._params, flat._shard_param_infos):
            info[id(p)] = si
    for name, p in _named_params(model):
        si = info.get(id(p))
        if si is None:
            continue
        start = si.intra_param_start_idx if si.in_shard else 0
        local = p.detach().reshape(-1).cpu().clone()
        grad = None if p.grad is None else p.grad.detach().reshape(-1).cpu().clone()
        yield name, (int(start or 0), local), grad

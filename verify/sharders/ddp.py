"""`DistributedDataParallel` through the adapter protocol, on the case's group: the whole model
replicated (the wrap plan does not apply), fp32, fast mode. Probes: the reduced gradient and the
optimizer state (every rank holds all of both). DDP's all-reduces are issued by its C++ reducer,
which no Python wrapper sees: the recorder counts them from the process group's sequence number
as unseen (verify/case/recorder.py), so the reports say "not seen" for DDP's bytes; no
collective formula.

Checkpoints: a full state dict. Every rank holds the whole model and optimizer, so rank 0 alone
writes ``{"model": module.state_dict(), "optim": optimizer.state_dict()}`` with `torch.save`;
every rank loads it with ``torch.load(weights_only=True)`` (data, never code) at any world size.
The optimizer state maps by parameter order (`Optimizer.load_state_dict`): the scenario's
parameter groups are built from ``model.module.named_parameters()``, in the same order at
every W."""
from __future__ import annotations

from typing import Optional

import inspect
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from verify.reference import param_state
from verify.sharders.base import Sharder, WrapPlan

__all__ = ["DDP"]

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


class DDP(Sharder):
    name = "ddp"
    world = "group"
    modes = ("fast",)
    dtypes = ("fp32",)   # DDP has no public mixed-precision policy that casts as ours does
    offload = False
    regroups_shared_inputs = False   # the model's own autograd graph, no per-unit functions

    def shard(self, model, plan: WrapPlan, group):
        device_ids = None
        if dist.get_backend(group) == "nccl":
            device_ids = [torch.cuda.current_device()]
            model = model.cuda()
        # parameters some batches leave unused (a branch) are a model's business, not an error:
        # DDP then all-reduces which parameters each rank used, and a parameter no rank used
        # keeps no gradient, as in the reference; its warning where none is unused says nothing
        warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified")
        # buffers stay each rank's own, as a sharder keeps them and the reference simulates them
        # (verify/reference.py, `RankBuffers`): DDP's default copies rank 0's at every forward
        # (its copy at construction is harmless: every rank builds the same model)
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                else {"broadcast_buffers": False})   # the older name, deprecated in torch 2.13
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group,
                                       find_unused_parameters=True, **sync)

    def optimizer(self, model, plan: WrapPlan):
        return plan.make_optimizer(model.module.named_parameters())

    def set_gradient_sync(self, model, flag: bool) -> None:
        model.require_backward_grad_sync = flag

    def full_parameters(self, model, optimizer):
        return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}

    def reduced_gradients(self, model):
        return {n: (0, p.grad.detach().reshape(-1).cpu().clone())
                for n, p in model.module.named_parameters() if p.grad is not None}

    def optimizer_state(self, model, optimizer):
        return param_state(optimizer, model.module.named_parameters(),
                           lambda _p, t: (0, t.detach().reshape(-1).cpu().clone()))

    def unsupported(self, scenario) -> Optional[str]:
        return None

    def save(self, path, model, optimizer):
        """Collective: rank 0 writes the file, every rank waits for it."""
        group = model.process_group
        if dist.get_rank(group) == 0:
            os.makedirs(path, exist_ok=True)
            tmp = os.path.join(path, "state.pt.tmp")
            torch.save({"model": model.module.state_dict(), "optim": optimizer.state_dict()}, tmp)
            os.replace(tmp, os.path.join(path, "state.pt"))
        dist.barrier(group=group)

    def load(self, path, model, optimizer):
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

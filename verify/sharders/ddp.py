"""`DistributedDataParallel` through the adapter protocol, on the case's group: the whole model
replicated (the wrap plan does not apply), fp32, fast mode. Probes: the reduced gradient (every
rank holds all of it). DDP's all-reduces are issued by its C++ reducer, which the collective
recorder does not see, so there is no collective formula."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from verify.sharders.base import Sharder, WrapPlan

__all__ = ["DDP"]


class DDP(Sharder):
    name = "ddp"
    world = "group"
    modes = ("fast",)
    dtypes = ("fp32",)   # DDP has no public mixed-precision policy that casts as ours does
    offload = False

    def shard(self, model, plan: WrapPlan, group):
        from torch.nn.parallel import DistributedDataParallel
        device_ids = None
        if dist.get_backend(group) == "nccl":
            device_ids = [torch.cuda.current_device()]
            model = model.cuda()
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group)

    def optimizer(self, model, plan: WrapPlan):
        return plan.make_optimizer(model.module.named_parameters())

    def set_gradient_sync(self, model, flag: bool) -> None:
        model.require_backward_grad_sync = flag

    def full_parameters(self, model, optimizer):
        return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}

    def reduced_gradients(self, model):
        return {n: (0, p.grad.detach().reshape(-1).cpu().clone())
                for n, p in model.module.named_parameters() if p.grad is not None}

    def unsupported(self, scenario) -> Optional[str]:
        return None

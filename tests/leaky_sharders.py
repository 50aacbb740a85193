"""Correct sharders (fsdp_core underneath) that leave process-global state behind, as foreign
code does (tests/test_global_state.py): what they change must not reach the next case."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from verify.sharders.fsdp_core import FsdpCore


class MkldnnOff(FsdpCore):
    """Switches oneDNN off (other convolution kernels: other last bits) and never back."""
    name = "leaks_mkldnn_off"

    def shard(self, model, plan, group):
        torch.backends.mkldnn.enabled = False
        return super().shard(model, plan, group)


class AllReducingOptimizerHook(FsdpCore):
    """A global optimizer hook that all-reduces on the case's group after every step of *any*
    optimizer, never removed (a gradient-norm logger): the next sharder's steps would carry it."""
    name = "leaks_optimizer_hook"

    def shard(self, model, plan, group):
        def log_norm(_optimizer, _args, _kwargs):
            dist.all_reduce(torch.zeros(1), group=group)
        register_optimizer_step_post_hook(log_norm)
        return super().shard(model, plan, group)

    def planned(self, scenario):
        return None   # its extra all-reduce per step is not the planner's

    def expected_collectives(self, model, trace):
        return None


class MetaDefaultDevice(FsdpCore):
    """Makes "meta" the default device after sharding and never undoes it."""
    name = "leaks_meta_device"

    def shard(self, model, plan, group):
        out = super().shard(model, plan, group)
        torch.set_default_device("meta")
        return out


class DestroysTheProcessGroup(FsdpCore):
    """Tears the default process group down in shard(): nothing can bring it back."""
    name = "destroys_the_process_group"

    def shard(self, model, plan, group):
        dist.destroy_process_group()
        return super().shard(model, plan, group)


_GROUP = None
_HOOK = None


class HookRegisteredOnce(FsdpCore):
    """Monitoring code that registers one global optimizer step hook per process (a flag in a
    module global) and all-reduces on the current case's group; its formula counts it. Its own
    later cases need the hook back; no other sharder's case may see it."""
    name = "hook_registered_once"

    def shard(self, model, plan, group):
        global _GROUP, _HOOK
        _GROUP = group
        if _HOOK is None:
            def log(_optimizer, _args, _kwargs):
                dist.all_reduce(torch.zeros(1), group=_GROUP)
            _HOOK = register_optimizer_step_post_hook(log)
        return super().shard(model, plan, group)

    def planned(self, scenario):
        return None

    def expected_collectives(self, model, trace):
        out = dict(super().expected_collectives(model, trace) or {})
        calls, nbytes = out.get("all_reduce", (0, 0))
        out["all_reduce"] = [calls + 1, nbytes + 4]
        return out

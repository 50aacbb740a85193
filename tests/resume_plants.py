"""Adapters with a planted bug in their resume path, named by import path like any user's adapter
(``--sharder tests.resume_plants:CoreSkipOptimState``): the harness must fail the resume cases
they run, with a replay line, for fsdp_core and for FSDP2 alike. Save is untouched; only load
is broken, in the two ways integrations most often get it wrong:

- the optimizer state is not restored (the model loads, Adam's moments and step start over);
- one rank's shard is another rank's (ranks 0 and 1 swap what they loaded of one tensor);
- (double resumes) the app state handed to DCP is left as a plain copy of what was loaded, so the
  next save writes the state as loaded, not as trained: what `dcp.load` did to Stateful entries
  in torch 2.4 and 2.5 (pytorch#138575), planted on the pinned torch;
- (an engine that steps its own copies) the masters the optimizer steps are not refreshed by the
  load, while the module it reports is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from verify.reference import param_state
from verify.sharders.ddp import DDP
from verify.sharders.fsdp_core import FsdpCore
from verify.sharders.torch_fsdp2 import TorchFSDP2, TorchFSDP2Stateful

__all__ = ["CoreSkipOptimState", "CoreSwapShards", "FSDP2SkipOptimState", "FSDP2SwapShards",
           "FSDP2StaleAppState", "DDPMasters", "DDPStaleMasters"]


@torch.no_grad()
def _swap_ranks_0_1(local: torch.Tensor, group) -> None:
    """Ranks 0 and 1 of ``group`` exchange ``local`` (equal shapes on every rank), in place."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2:
        return
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if rank in (0, 1):
        local.copy_(parts[1 - rank])


class CoreSkipOptimState(FsdpCore):
    name = "fsdp_core[load skips optimizer]"

    def load(self, path, model, optimizer):
        import fsdp_core.checkpoint
        fsdp_core.checkpoint.load(path, model, None)


class CoreSwapShards(FsdpCore):
    """Rank 0 ends up with rank 1's piece of the first unit's flat shard and vice versa."""
    name = "fsdp_core[load swaps shards]"

    def load(self, path, model, optimizer):
        super().load(path, model, optimizer)
        import fsdp_core
        unit = next(u for u in fsdp_core.units_of(model))
        _swap_ranks_0_1(unit.shard, unit.group)


class FSDP2SkipOptimState(TorchFSDP2):
    name = "torch_fsdp2[load skips optimizer]"

    def load(self, path, model, optimizer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path, process_group=self._group_of(model))
        set_model_state_dict(model, state["model"])


class FSDP2SwapShards(TorchFSDP2):
    """After a correct load, ranks 0 and 1 swap their local shard of the first parameter whose
    shards have the same shape on every rank (as if each had read the other's chunk)."""
    name = "torch_fsdp2[load swaps shards]"

    def load(self, path, model, optimizer):
        super().load(path, model, optimizer)
        for _, p in model.named_parameters():
            if not hasattr(p, "to_local"):
                continue
            group = p.device_mesh.get_group(p.device_mesh.ndim - 1)   # the shard dim
            world = dist.get_world_size(group)
            if p.dim() and p.shape[0] % world == 0:
                _swap_ranks_0_1(p.to_local(), group)
                return


class FSDP2StaleAppState(TorchFSDP2Stateful):
    """After a correct load, the {"app": AppState} dict kept for the run holds a plain copy of
    the state dict as loaded instead of the Stateful (as `dcp.load` left it in torch 2.4-2.5):
    every later save writes those values. A single resume cannot see it; a double one can."""
    name = "torch_fsdp2_stateful[load leaves a plain dict]"

    def load(self, path, model, optimizer):
        super().load(path, model, optimizer)
        app = self._app(model, optimizer)
        app["app"] = _cloned(app["app"].state_dict())


def _cloned(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _cloned(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_cloned(v) for v in x]
    return x


class _Masters:
    """An optimizer over copies of a DDP module's parameters (the masters a ZeRO-1 engine steps,
    not a torch.optim.Optimizer): step() hands them the gradients and copies them back."""

    def __init__(self, module, plan):
        self.module = module
        self.masters = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
        self.inner = plan.make_optimizer(list(self.masters.items()))
        self.param_groups, self.state = self.inner.param_groups, self.inner.state

    @torch.no_grad()
    def step(self):
        for n, p in self.module.named_parameters():
            self.masters[n].grad = None if p.grad is None else p.grad.detach().clone()
        self.inner.step()
        for n, p in self.module.named_parameters():
            p.copy_(self.masters[n])

    def zero_grad(self, set_to_none: bool = True):
        self.module.zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    @torch.no_grad()
    def refresh(self):
        for n, p in self.module.named_parameters():
            self.masters[n].copy_(p)


class DDPMasters(DDP):
    """Correct: DDP whose optimizer steps master copies (`_Masters`), which ``local_pieces``
    reports (every rank holds all of them) and ``load`` refreshes from the loaded module."""
    name = "ddp_masters"

    def optimizer(self, model, plan):
        model._verify_masters = _Masters(model.module, plan)
        return model._verify_masters

    def local_pieces(self, model):
        return {n: (0, m.detach().reshape(-1).clone())
                for n, m in model._verify_masters.masters.items()}

    def optimizer_state(self, model, optimizer):
        return param_state(optimizer.inner, list(optimizer.masters.items()),
                           lambda _p, t: (0, t.detach().reshape(-1).cpu().clone()))

    def load(self, path, model, optimizer):
        super().load(path, model, optimizer)
        optimizer.refresh()


class DDPStaleMasters(DDPMasters):
    """The load restores the module and the optimizer state but not the masters the optimizer
    steps: what full_parameters reads is right after the load, the next step is not."""
    name = "ddp_stale_masters"

    def load(self, path, model, optimizer):
        DDP.load(self, path, model, optimizer)

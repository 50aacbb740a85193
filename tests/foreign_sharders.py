"""Adapters that behave like foreign code does (tests/test_adapters.py): they raise, hand the
harness an optimizer that is not a torch.optim.Optimizer, refuse a case without declaring it,
or are not adapters at all."""
from __future__ import annotations

from verify import Sharder
from verify.sharders.fsdp_core import FsdpCore
from verify.sharders.torch_fsdp2 import TorchFSDP2


class RaisesInShard(Sharder):
    name = "raises_in_shard"

    def shard(self, model, plan, group):
        raise RuntimeError("boom: this sharder cannot shard")


class RaisesInUnsupported(FsdpCore):
    name = "raises_in_unsupported"

    def unsupported(self, scenario):
        raise KeyError("boom: unsupported() looked for something")


class _BareOptimizer:
    """step() and zero_grad() only: no .state, no .param_groups."""

    def __init__(self, inner):
        self._inner = inner

    def step(self):
        self._inner.step()

    def zero_grad(self):          # no set_to_none argument either
        self._inner.zero_grad(set_to_none=True)


class BareOptimizer(FsdpCore):
    name = "bare_optimizer"

    def optimizer(self, model, plan):
        return _BareOptimizer(plan.make_optimizer(model.named_parameters()))

    def padding_views(self, model, optimizer):
        import fsdp_core
        return list(fsdp_core.padding_views(model, optimizer._inner))


class NotASharder:
    def shard(self, model, plan, group):
        return model


not_even_a_class = 42


class RaisesOnRank1(FsdpCore):
    """Rank 1 raises in shard(); rank 0 goes on into the case's collectives and waits there."""
    name = "raises_on_rank1"

    def shard(self, model, plan, group):
        import torch.distributed as dist
        if dist.get_rank(group) == 1:
            raise RuntimeError("boom on rank 1 only")
        return super().shard(model, plan, group)


class ChattyProbes(FsdpCore):
    """Its reduced_gradients probe communicates (as a probe that gathers a DTensor would): the
    harness must not count that as the step's traffic."""
    name = "chatty_probes"

    def shard(self, model, plan, group):
        self.group = group
        return super().shard(model, plan, group)

    def reduced_gradients(self, model):
        import torch
        import torch.distributed as dist
        dist.all_reduce(torch.ones(4), group=self.group)
        return super().reduced_gradients(model)


class DropsAName(FsdpCore):
    """full_parameters loses one parameter and invents another: the structure check fails."""
    name = "drops_a_name"

    def full_parameters(self, model, optimizer):
        full = super().full_parameters(model, optimizer)
        full.pop(next(iter(full)))
        full["not.in.the.model"] = full[next(iter(full))].clone()
        return full


class FSDP2Undeclared(TorchFSDP2):
    """FSDP2 without its declaration that it refuses a tie split across two units: on torch >=
    2.12 fully_shard raises at the first forward, which must become an 'error' case naming it."""
    name = "fsdp2_undeclared"

    def unsupported(self, scenario):
        return None

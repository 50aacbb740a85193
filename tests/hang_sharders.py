"""Test-only sharders that hang on purpose (tests/test_diagnose.py): a toy replicated data-parallel
sharder whose gradient all-reduces one rank skips (`SkipOnRank1`) or replaces by another
collective (`Mismatch`), so that the hang diagnosis (verify/diagnosis/hangs.py) has something to find."""
from __future__ import annotations

import torch
import torch.distributed as dist

from verify import Sharder


class Replicated(Sharder):
    """The model replicated on every rank; before the optimizer step each gradient is
    all-reduced and divided by W, parameter by parameter, in ``named_parameters`` order."""
    name = "toy_replicated"
    modes = ("fast",)

    def shard(self, model, plan, group):
        self.group = group
        self.steps = 0
        return model

    def set_gradient_sync(self, model, flag):
        pass

    def optimizer(self, model, plan):
        opt = plan.make_optimizer(model.named_parameters())
        step = opt.step

        def synced_step(*a, **kw):
            self.sync(model)
            self.steps += 1
            return step(*a, **kw)

        opt.step = synced_step
        return opt

    def sync(self, model):
        world = dist.get_world_size(self.group)
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.grad is not None:
                self.reduce(i, p.grad, world)

    def reduce(self, i, grad, world):
        dist.all_reduce(grad, group=self.group)
        grad /= world


class SkipOnRank1(Replicated):
    """Rank 1 skips its second gradient all-reduce of the first step."""
    name = "skip_on_rank_1"

    def reduce(self, i, grad, world):
        if self.steps == 0 and i == 1 and dist.get_rank(self.group) == 1:
            return
        super().reduce(i, grad, world)


class Mismatch(Replicated):
    """In the first step, rank 1 all-gathers its second gradient where rank 0 all-reduces it."""
    name = "mismatch"

    def reduce(self, i, grad, world):
        if self.steps == 0 and i == 1 and dist.get_rank(self.group) == 1:
            out = torch.empty(world * grad.numel(), dtype=grad.dtype)
            dist.all_gather_into_tensor(out, grad.reshape(-1).contiguous(), group=self.group)
            return
        super().reduce(i, grad, world)


_FAILED_ONCE: set = set()   # per rank process: the first FlakyOnce case fails, the next pass


class FlakyOnce(Replicated):
    """Its first case in a rank process doubles rank 0's gradients; every later case is right
    (a failure that does not reproduce on replay)."""
    name = "flaky_once"

    def reduce(self, i, grad, world):
        super().reduce(i, grad, world)
        if dist.get_rank(self.group) == 0 and "first" not in _FAILED_ONCE:
            grad *= 2

    def optimizer(self, model, plan):
        opt = super().optimizer(model, plan)
        step = opt.step

        def once(*a, **kw):
            out = step(*a, **kw)
            _FAILED_ONCE.add("first")
            return out

        opt.step = once
        return opt


class UsesDefaultGroup(Replicated):
    """Declares world = "group" but all-reduces on the default process group: at W below the
    pool's size that group has ranks that do not run the case, so its first all-reduce hangs."""
    name = "uses_default_group"

    def reduce(self, i, grad, world):
        dist.all_reduce(grad)
        grad /= world


class SaveHangsOnRank1(Replicated):
    """Trains right; in its checkpoint's save, rank 1 skips the all-reduce every other rank
    makes (a resume case's save phase hangs there)."""
    name = "save_hangs_on_rank_1"

    def save(self, path, model, optimizer):
        if dist.get_rank(self.group) != 1:
            dist.all_reduce(torch.zeros(1), group=self.group)
        if dist.get_rank(self.group) == 0:
            torch.save(model.state_dict(), f"{path}/model.pt")

    def load(self, path, model, optimizer):
        model.load_state_dict(torch.load(f"{path}/model.pt", weights_only=True))


class NewGroupOnRank0(Replicated):
    """Trains right; in shard(), rank 0 alone creates a process group of itself (a counter-named
    one): its group counter runs ahead of the other ranks'."""
    name = "new_group_on_rank_0"

    def shard(self, model, plan, group):
        if dist.get_rank(group) == 0:
            dist.new_group([dist.get_rank()])
        return super().shard(model, plan, group)


class NewGroupEveryRank(Replicated):
    """Trains right; in shard(), every rank of the case creates the case's group anew (legal
    where the case's ranks are the whole default group) and all-reduces the gradients in it."""
    name = "new_group_every_rank"

    def shard(self, model, plan, group):
        model = super().shard(model, plan, group)
        self.group = dist.new_group(dist.get_process_group_ranks(group))
        return model


class SlowShard(Replicated):
    """Correct, but shard() takes 6 s: a case under an explicit shorter timeout times out, and
    passes under the automatic one."""
    name = "slow_shard"

    def shard(self, model, plan, group):
        import time   # lazy: only this test sharder sleeps
        time.sleep(6.0)
        return super().shard(model, plan, group)

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


class FSDP2AsWritten(TorchFSDP2):
    """FSDP2 (``fully_shard`` per unit) as an adapter written against DESIGN section 6 alone
    would have it: no `tier()` (the built-in's says where FSDP2 regroups a gradient sum)."""
    name = "fsdp2_as_written"

    def tier(self, scenario):
        return None


class FSDP2SaysExact(FSDP2AsWritten):
    """The same, claiming it never regroups: held to the bitwise tier everywhere."""
    name = "fsdp2_says_exact"
    regroups_shared_inputs = False


# -- the optional hooks for engines (verify/sharders/base.py) -------------------------------------

from verify.sharders.ddp import DDP  # noqa: E402  (the hooks below are DDP's, changed one at a time)


class HalfBackward(DDP):
    """`backward` halves the loss: the harness must run it, so the case fails."""
    name = "half_backward"

    def backward(self, model, loss):
        (loss * 0.5).backward()


class NoSyncOnly(DDP):
    """Deterministic mode through `gradient_sync` alone (DDP's ``no_sync()``): the flag
    setter raises, so a pass proves the harness used the context."""
    name = "no_sync_only"
    modes = ("fast", "deterministic")

    def set_gradient_sync(self, model, flag):
        raise RuntimeError("the harness must use gradient_sync, not set_gradient_sync")

    def gradient_sync(self, model, flag):
        import contextlib  # reason: only this test adapter needs it
        return contextlib.nullcontext() if flag else model.no_sync()


class EngineBuilt(DDP):
    """No `shard`: the model and its optimizer come from `shard_with_optimizer` together, and
    `state_bytes` is the adapter's own figure (the parameters' bytes, counted here)."""
    name = "engine_built"
    shard = Sharder.shard   # not overridden: shard_with_optimizer alone must do

    def shard_with_optimizer(self, model, plan, group):
        engine = DDP.shard(self, model, plan, group)
        return engine, plan.make_optimizer(engine.module.named_parameters())

    def state_bytes(self, model, optimizer):
        return 7 * sum(p.numel() for p in model.module.parameters())


class LauncherEnv(DDP):
    """A default-group sharder that reads the launcher's variables as DeepSpeed does."""
    name = "launcher_env"
    world = "default"

    def shard(self, model, plan, group):
        import os  # reason: only this test adapter reads the environment
        import torch.distributed as dist  # reason: likewise
        env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                              "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        want = {"RANK": str(dist.get_rank()), "LOCAL_RANK": str(dist.get_rank()),
                "WORLD_SIZE": str(dist.get_world_size()),
                "LOCAL_WORLD_SIZE": str(dist.get_world_size()), "MASTER_ADDR": "127.0.0.1"}
        if any(env[k] != v for k, v in want.items()) or not (env["MASTER_PORT"] or "").isdigit():
            raise RuntimeError(f"launcher variables {env}, wanted {want}")
        return DDP.shard(self, model, plan, group)


class FullDiffersOnRank1(DDP):
    """Trains correctly; its `full_parameters` on ranks other than 0 is off by one (a probe that
    gathers differently there): rank 0's, which the judge compares, is right."""
    name = "full_differs_on_rank1"

    def full_parameters(self, model, optimizer):
        import torch.distributed as dist  # reason: only this test adapter asks for its rank
        full = super().full_parameters(model, optimizer)
        return full if dist.get_rank() == 0 else {n: t + 1 for n, t in full.items()}


class FullOnRank0Only(DDP):
    """Correct; like a rank-0-only state dict, ranks other than 0 return no full parameters."""
    name = "full_on_rank0_only"

    def full_parameters(self, model, optimizer):
        import torch.distributed as dist  # reason: likewise
        full = super().full_parameters(model, optimizer)
        return full if dist.get_rank() == 0 else {}


class RaisesOnLastRank(DDP):
    """shard() raises on the last rank only: its peers wait in DDP's first collective."""
    name = "raises_on_last_rank"

    def shard(self, model, plan, group):
        import torch.distributed as dist  # reason: likewise
        if dist.get_rank(group) == dist.get_world_size(group) - 1:
            raise RuntimeError("boom: the last rank cannot shard")
        return DDP.shard(self, model, plan, group)


class TakesEmbeddingWeight(DDP):
    """Takes the embedding's weight out of its module after wrapping (as a flat-parameter sharder
    does) and declines nothing: a case that re-ties after shard() ("split_retie") cannot, and
    its error says what the harness was doing."""
    name = "takes_embedding_weight"

    def shard(self, model, plan, group):
        ddp = DDP.shard(self, model, plan, group)
        del ddp.module.wte._parameters["weight"]
        return ddp


class BuffersPerRank(DDP):
    """Correct; its `full_parameters` is a state dict whose buffers are each rank's own (as
    BatchNorm's running statistics are in data-parallel training): only parameters are held
    equal across ranks."""
    name = "buffers_per_rank"

    def full_parameters(self, model, optimizer):
        import torch.distributed as dist  # reason: only this test adapter asks for its rank
        full = super().full_parameters(model, optimizer)
        buffers = {n for n, _ in model.module.named_buffers()}
        assert buffers, "the case's model must have a buffer in its state dict"
        return {n: t + dist.get_rank() if n in buffers else t for n, t in full.items()}


class LiveFullParameters(DDP):
    """Correct; its `full_parameters` and `local_pieces` hand back the live parameters (as
    ``DTensor.full_tensor()`` does at W = 1), which the next step overwrites in place."""
    name = "live_full_parameters"

    def full_parameters(self, model, optimizer):
        return dict(model.module.named_parameters())

    def local_pieces(self, model):
        return {n: (0, p.detach().view(-1)) for n, p in model.module.named_parameters()}


class RootEmbeddingOff(FsdpCore):
    """The first element of each rank's shard of the root unit's own ``wpe.weight`` (where the
    rank holds any of it) is off by one after sharding (an init the sharder got wrong): the blocks' outputs are the first to
    differ, from inputs the root's own parameters computed."""
    name = "root_embedding_off"

    def shard(self, model, plan, group):
        import torch
        out = super().shard(model, plan, group)
        with torch.no_grad():
            mine = dict(out.named_parameters())["wpe.weight"].view(-1)
            if mine.numel():
                mine[0] += 1.0
        return out

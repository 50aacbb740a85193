"""The adapter that runs the textbook FSDP (fsdp.py) through `verify`:

    python -m verify run --sharder examples.textbook_fsdp.adapter:Textbook --world-sizes 1,2,4,8

One subclass per classic mistake (NoDivide, StalePadding, FrozenHookCount, StaleGather) names
the same sharder with that mistake switched on.
"""
import torch

from . import fsdp   # relative: the package works under any name (a copy in your project)
from verify import Sharder
from verify.scenarios import split_ties


class Textbook(Sharder):
    name = "textbook_fsdp"
    world = "default"          # it calls dist.get_rank() / dist.get_world_size()
    modes = ("fast",)
    dtypes = ("fp32",)
    mistakes = ()

    def unsupported(self, scenario):
        split = split_ties(scenario) if scenario.ties != "kept" else []
        if split:   # each unit flattens its own parameters: a tie across two would be two copies
            return (f"textbook_fsdp flattens each unit on its own and cannot keep a parameter "
                    f"tied across two units ({', '.join(split[:2])})")
        return None

    def shard(self, model, plan, group):
        fsdp.reset_globals()   # process-wide state: rank processes are reused across cases
        self.fsdp = fsdp.TextbookFSDP(model, plan.units, mistakes=self.mistakes)
        return model

    def optimizer(self, model, plan):
        from verify.scenarios import no_decay
        return fsdp.FlatOptimizer(self.fsdp, plan.optimizer_cls, plan.optimizer_kwargs,
                                  decays=lambda fqn: not no_decay(fqn),
                                  decoupled=issubclass(plan.optimizer_cls, torch.optim.AdamW))

    def full_parameters(self, model, optimizer):
        full = {}
        for unit in self.fsdp.units:
            full.update(unit.gather_full())
        return full

    def padding_views(self, model, optimizer):
        views = []
        for u in self.fsdp.units:
            views.append((f"{u.name or '<root>'}:data", u.padding(u.shard.detach())))
            if u.shard.grad is not None:
                views.append((f"{u.name or '<root>'}:grad", u.padding(u.shard.grad)))
            for key, t in optimizer.inner.state.get(u.shard, {}).items():
                if torch.is_tensor(t) and t.shape == u.shard.shape:
                    views.append((f"{u.name or '<root>'}:optim.{key}", u.padding(t)))
        return views

    def local_pieces(self, model):
        return self._pieces(lambda u: u.shard.detach())

    def reduced_gradients(self, model):   # trainable parameters, each under its first name
        return self._pieces(lambda u: u.shard.grad, grads=True)

    def _pieces(self, flat_of, grads=False):
        """{fqn: (offset in the parameter, this rank's real elements of it)}."""
        out = {}
        for u in self.fsdp.units:
            flat, lo, seen = flat_of(u), u.rank * u.shard_numel, set()
            if flat is None:
                continue
            for fqn, _, _, i in u.refs:
                if grads and (i in seen or not u.trainable[i]):
                    continue
                seen.add(i)
                a = max(lo, u.offsets[i])
                b = max(a, min(lo + u.shard_numel, u.offsets[i] + u.numels[i]))
                out[fqn] = (a - u.offsets[i], flat[a - lo: b - lo].clone())
        return out


class NoDivide(Textbook):
    name = "textbook_fsdp[no_divide]"
    mistakes = ("no_divide",)


class StalePadding(Textbook):
    name = "textbook_fsdp[stale_padding]"
    mistakes = ("stale_padding",)


class FrozenHookCount(Textbook):
    name = "textbook_fsdp[frozen_hook_count]"
    mistakes = ("frozen_hook_count",)


class StaleGather(Textbook):
    name = "textbook_fsdp[stale_gather]"
    mistakes = ("stale_gather",)

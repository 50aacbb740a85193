"""A textbook flat-parameter FSDP (ZeRO-3), written the way course assignments write one.

Deliberately simple: the default process group (``dist.get_rank()``/``get_world_size()``), one
flat fp32 shard per wrapped unit (``shard = ceil(numel / W)``, the tail padded with zeros), an
all-gather before a unit's forward, a reduce-scatter once every trainable parameter of the unit
has its gradient, and an optimizer wrapper that steps the shards. Fast mode only, fp32 only.

Four classic mistakes can be switched on (``mistakes=``), so that `verify` can show what each
looks like (examples/textbook_fsdp/README.md):
  no_divide          the reduce-scatter sum is not divided by W
  stale_padding      the padding is never re-zeroed (not after the reduction, not after the
                     step): the process-wide gradient bucket's tail holds an earlier unit's
                     gradients, which the step then writes into the padding of the shards
  frozen_hook_count  a unit reduces once *every* parameter has fired its hook, frozen ones
                     included: a unit holding a frozen parameter never reduces
  stale_gather       the gathered parameters are kept after the step, so the next forward
                     computes with the pre-step copy
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

MISTAKES = ("no_divide", "stale_padding", "frozen_hook_count", "stale_gather")

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning per call)
# for the *_single names, which older torch lacks. Looked up at each call, not bound here, so
# whatever wraps torch.distributed's functions (the harness's probes) sees the calls.
_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER = ("reduce_scatter_single" if hasattr(dist, "reduce_scatter_single")
                   else "reduce_scatter_tensor")

# One gradient bucket for the whole process, reused by every unit (it saves an allocation per
# reduction); reset_globals() clears it between runs.
_BUCKET: list = [None]


def reset_globals() -> None:
    _BUCKET[0] = None


def _bucket(n: int) -> torch.Tensor:
    if _BUCKET[0] is None or _BUCKET[0].numel() < n:
        _BUCKET[0] = torch.zeros(n)
    return _BUCKET[0][:n]


class FlatUnit:
    """The parameters one wrapped module owns, as one padded flat shard on this rank."""

    def __init__(self, name: str, module: nn.Module, owned: set, mistakes: frozenset):
        self.name, self.module, self.mistakes = name, module, mistakes
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params: list[nn.Parameter] = []   # unique tensors, in first-seen order
        self.refs: list[tuple[str, nn.Module, str, int]] = []  # (fqn, owner, attr, index)
        index: dict[int, int] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for attr, p in list(mod._parameters.items()):
                if p is None or (id(p) in owned and id(p) not in index):
                    continue  # owned by an inner unit
                if id(p) not in index:
                    owned.add(id(p))
                    index[id(p)] = len(self.params)
                    self.params.append(p)
                fqn = ".".join(x for x in (name, mod_name, attr) if x)
                self.refs.append((fqn, mod, attr, index[id(p)]))
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.params))]
        self.trainable = [p.requires_grad for p in self.params]
        self.numel = sum(self.numels)
        self.shard_numel = max(1, math.ceil(self.numel / self.world))
        flat = torch.zeros(self.shard_numel * self.world)
        if self.params:
            flat[: self.numel] = torch.cat([p.detach().reshape(-1) for p in self.params])
        lo = self.rank * self.shard_numel
        self.shard = nn.Parameter(flat[lo: lo + self.shard_numel].clone())
        # this rank's padding: the positions of its shard past the end of the real elements
        self.pad_from = min(self.shard_numel, max(0, self.numel - lo))
        for _, mod, attr, _ in self.refs:
            del mod._parameters[attr]
        self.leaves = None
        self.pending = 0
        if self.params:
            module.register_forward_pre_hook(lambda *_: self.before_forward())

    # -- forward: gather ----------------------------------------------------------------------
    def before_forward(self) -> None:
        if self.leaves is None:
            full = torch.empty(self.shard_numel * self.world)
            getattr(dist, _GATHER)(full, self.shard.detach())
            self.leaves = []
            for off, n, shape, grad in zip(self.offsets, self.numels, self.shapes, self.trainable):
                leaf = full[off: off + n].view(shape).requires_grad_(grad)
                if grad:
                    leaf.register_post_accumulate_grad_hook(lambda _: self.after_grad())
                self.leaves.append(leaf)
            for _, mod, attr, i in self.refs:
                setattr(mod, attr, self.leaves[i])
        counted = self.trainable if "frozen_hook_count" not in self.mistakes else [True] * len(self.params)
        self.pending = sum(counted)

    # -- backward: reduce ---------------------------------------------------------------------
    def after_grad(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.reduce()

    def reduce(self) -> None:
        flat = _bucket(self.shard_numel * self.world)
        for leaf, off, n in zip(self.leaves, self.offsets, self.numels):
            flat[off: off + n] = 0 if leaf.grad is None else leaf.grad.reshape(-1)
            leaf.grad = None
        out = torch.empty(self.shard_numel)
        getattr(dist, _REDUCE_SCATTER)(out, flat)
        if "no_divide" not in self.mistakes:
            out /= self.world
        if "stale_padding" not in self.mistakes:
            out[self.pad_from:] = 0
        self.shard.grad = out

    def reshard(self) -> None:
        if "stale_gather" not in self.mistakes:
            self.leaves = None

    def zero_padding(self) -> None:
        if "stale_padding" not in self.mistakes:
            with torch.no_grad():
                self.shard[self.pad_from:] = 0

    def padding(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.pad_from:]

    def gather_full(self) -> dict[str, torch.Tensor]:
        full = torch.empty(self.shard_numel * self.world)
        getattr(dist, _GATHER)(full, self.shard.detach())
        return {fqn: full[self.offsets[i]: self.offsets[i] + self.numels[i]].view(self.shapes[i]).clone()
                for fqn, _, _, i in self.refs}


class TextbookFSDP:
    """``TextbookFSDP(model, unit_modules)``: shard ``model`` with one FlatUnit per module in
    ``unit_modules`` [(name, module)], inner units first, the root last."""

    def __init__(self, model: nn.Module, unit_modules, mistakes=()):
        bad = set(mistakes) - set(MISTAKES)
        if bad:
            raise ValueError(f"unknown mistakes {sorted(bad)}; choose from {MISTAKES}")
        self.model = model
        owned: set = set()
        self.units = [FlatUnit(name, m, owned, frozenset(mistakes)) for name, m in unit_modules]
        self.units = [u for u in self.units if u.params]

    def shards(self) -> list[nn.Parameter]:
        return [u.shard for u in self.units]


class FlatOptimizer:
    """Steps the flat shards with ``optimizer_cls``; weight decay per element through a mask
    (flat shards mix weights, biases and frozen parameters, which torch's optimizers leave
    alone: no gradient), L2 for SGD/Adam, decoupled for AdamW."""

    def __init__(self, fsdp: TextbookFSDP, optimizer_cls, kwargs: dict, decays, decoupled: bool):
        self.fsdp = fsdp
        self.wd, self.lr, self.decoupled = kwargs.get("weight_decay", 0.0), kwargs["lr"], decoupled
        self.inner = optimizer_cls(fsdp.shards(), **dict(kwargs, weight_decay=0.0))
        self.masks = []
        for u in fsdp.units:
            mask = torch.zeros(u.shard_numel * u.world, dtype=torch.bool)
            for fqn, _, _, i in u.refs:   # frozen parameters are never decayed (no gradient)
                mask[u.offsets[i]: u.offsets[i] + u.numels[i]] = decays(fqn) and u.trainable[i]
            lo = u.rank * u.shard_numel
            self.masks.append(mask[lo: lo + u.shard_numel])

    @torch.no_grad()
    def step(self) -> None:
        for u, mask in zip(self.fsdp.units, self.masks):
            p = u.shard
            if self.wd and p.grad is not None:
                if self.decoupled:
                    p.mul_(torch.where(mask, 1 - self.lr * self.wd, 1.0))
                else:
                    p.grad.add_(p * mask, alpha=self.wd)
        self.inner.step()
        for u in self.fsdp.units:
            u.zero_padding()
            u.reshard()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for u in self.fsdp.units:
            u.shard.grad = None

"""A user's model family with what real models have and the plain reference used to get wrong
(`--families tests.stateful_family`): ``variant`` "counter" (a buffer that counts the rank's
forwards and scales the output, so each rank's own count matters), "running" (a running mean
updated in forward, as BatchNorm's), "branch" (a layer only batches with a positive sum take,
so a parameter has a gradient in some micro-batches or ranks only), "unused" (a parameter no
forward uses) and "parent_only" (forward raises outside a process group: a model the reference
cannot train)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from tests.user_family import Net as UserNet, blocks, loss, make_batch  # noqa: F401 (the family interface)

VARIANTS = ("counter", "running", "branch", "unused", "parent_only")
DEFAULTS = dict(variant="counter", width=4, n_blocks=2)


def check(kw: dict) -> None:
    if kw["variant"] not in VARIANTS:
        raise ValueError(f"model.variant={kw['variant']!r}: allowed {VARIANTS}")
    if kw["width"] < 1 or kw["n_blocks"] < 1:
        raise ValueError(f"width and n_blocks must be >= 1, got {kw}")


class Block(nn.Module):
    def __init__(self, d: int, variant: str):
        super().__init__()
        self.variant = variant
        self.fc = nn.Linear(d, d)
        self.alt = nn.Linear(d, d) if variant == "branch" else None
        self.never = nn.Parameter(torch.ones(d)) if variant == "unused" else None
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        if self.variant == "parent_only" and not dist.is_initialized():
            raise RuntimeError("this model runs inside a process group only")
        h = torch.tanh(self.fc(x))
        if self.variant == "branch" and float(x.detach().sum()) > 0:
            h = h + torch.tanh(self.alt(x))
        if self.variant == "counter":
            self.count += 1
            h = h * (1.0 + 0.1 * self.count.to(h.dtype))
        if self.variant == "running":
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.detach().mean(0).float())
            h = h + self.mean.to(h.dtype)
        return h


class Net(UserNet):
    """The user family's network (`tests.user_family`) with these blocks."""

    def __init__(self, variant: str, width: int, n_blocks: int):
        super().__init__(width, 1)
        self.blocks = nn.ModuleList(Block(width, variant) for _ in range(n_blocks))


def build(**kw) -> Net:
    return Net(**kw)

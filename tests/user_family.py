"""A model family of the kind a user brings by import path (`--families tests.user_family`):
the family interface (DEFAULTS, check, build, blocks, make_batch, loss) and a strategy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

DEFAULTS = dict(width=6, n_blocks=2)


def check(kw: dict) -> None:
    if kw["width"] < 1 or kw["n_blocks"] < 1:
        raise ValueError(f"width and n_blocks must be >= 1, got {kw}")


class Residual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self, width: int, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Residual(width) for _ in range(n_blocks))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def build(**kw) -> Net:
    return Net(**kw)


def blocks(model: Net):
    return list(model.blocks)


def make_batch(kw: dict, n: int, gen: torch.Generator):
    return torch.randn(n, kw["width"], generator=gen), torch.randn(n, 1, generator=gen)


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x).float(), y)


def strategy():
    return st.fixed_dictionaries({"width": st.integers(1, 9), "n_blocks": st.integers(1, 3)})

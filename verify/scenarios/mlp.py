"""MLP family: a stack of Linear layers (tanh between them), flat or nested.

Flat:   root.blocks[i].fc                      -> per_block units are siblings.
Nested: root.body.inner.inner...fc             -> each block holds the next one, so per_block
                                                  units are nested `depth` deep.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(d_in=4, width=8, depth=2, d_out=3, bias=True, nested=False)


def check(kw: dict) -> None:
    for key in ("d_in", "width", "depth", "d_out"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, act: bool, inner: Block | None = None):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)
        self.act = act
        self.inner = inner  # nested only: the next block lives inside this one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)  # (B, d_in) -> (B, d_out)
        if self.act:
            x = torch.tanh(x)
        return x if self.inner is None else self.inner(x)


class MLP(nn.Module):
    def __init__(self, *, d_in: int, width: int, depth: int, d_out: int, bias: bool, nested: bool):
        super().__init__()
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        self.nested = nested
        if nested:
            inner = None  # build the innermost block first, then wrap it
            for i in reversed(range(depth)):
                inner = Block(dims[i], dims[i + 1], bias=bias, act=i < depth - 1, inner=inner)
            self.body = inner
        else:
            self.blocks = nn.ModuleList(
                Block(dims[i], dims[i + 1], bias=bias, act=i < depth - 1) for i in range(depth)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, d_out)
        if self.nested:
            return self.body(x)
        for block in self.blocks:
            x = block(x)
        return x


def build(**kw) -> MLP:
    return MLP(**kw)


def blocks(model: MLP) -> list[nn.Module]:
    if not model.nested:
        return list(model.blocks)
    out, block = [], model.body
    while block is not None:
        out.append(block)
        block = block.inner
    return out


def make_batch(kw: dict, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, kw["d_in"], generator=gen)   # (n, d_in)
    y = torch.randn(n, kw["d_out"], generator=gen)  # (n, d_out) regression targets
    return x, y


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).float(), y)

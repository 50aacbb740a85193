"""Conv net family: stages of Conv2d(3x3) -> GroupNorm -> SiLU, global mean pool, Linear head.

GroupNorm, not BatchNorm: BatchNorm normalises over the batch, so a rank that sees k of the M
micro-batches would compute different statistics (and running buffers) than the full-batch
reference. GroupNorm is per sample, so the sharded and reference runs compute the same function.
Blocks: root.stages[i].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(in_channels=3, channels=4, n_stages=2, image_size=5, n_classes=3, norm_groups=2)


def check(kw: dict) -> None:
    for key in DEFAULTS:
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if kw["channels"] % kw["norm_groups"]:
        raise ValueError(f"model.norm_groups={kw['norm_groups']} must divide model.channels={kw['channels']}")
    if kw["channels"] // kw["norm_groups"] * kw["image_size"] ** 2 < 2:
        raise ValueError("model.channels / model.norm_groups * model.image_size**2 must be >= 2: "
                         "GroupNorm cannot normalise a group of one value")


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))  # (B, c_in, H, W) -> (B, c_out, H, W)


class ConvNet(nn.Module):
    def __init__(self, *, in_channels, channels, n_stages, image_size, n_classes, norm_groups):
        super().__init__()
        self.stages = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else channels, channels, norm_groups) for i in range(n_stages)
        )
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)               # (B, C, H, W)
        return self.head(x.mean(dim=(2, 3)))  # (B, C) -> (B, n_classes)


def build(**kw) -> ConvNet:
    return ConvNet(**kw)


def blocks(model: ConvNet) -> list[nn.Module]:
    return list(model.stages)


def make_batch(kw: dict, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    size = kw["image_size"]
    x = torch.randn(n, kw["in_channels"], size, size, generator=gen)  # (n, C_in, H, W)
    y = torch.randint(kw["n_classes"], (n,), generator=gen)           # (n,)
    return x, y


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)

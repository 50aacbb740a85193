"""Special family: the parameter kinds a sharder gets wrong, in one small classifier.

Each block holds, side by side:
  - `frozen`: a Linear with requires_grad=False next to trainable layers;
  - `shared`: a Linear called twice in one forward;
  - `tie_a`, `tie_b`: two Linears sharing one weight Parameter (tied inside the block);
  - `gate`: a 2-element Parameter (fewer elements than ranks);
  - `scale` (persistent) and `ramp` (non-persistent) buffers, read but never written.
With ``scalar`` (the default) the root owns a 0-d Parameter `logit_scale` (a learned
temperature); without it the head's output is not scaled, so that sharders that refuse 0-d
parameters (FSDP2, FSDP1, DeepSpeed) still run the frozen, shared and tied checks (the strategy
draws both). Blocks: root.blocks[i].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(width=4, n_blocks=2, n_out=3, scalar=True)


def check(kw: dict) -> None:
    for key in ("width", "n_blocks", "n_out"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if not isinstance(kw["scalar"], bool):
        raise ValueError(f"model.scalar={kw['scalar']!r}: must be a bool")


class SpecialBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.frozen = nn.Linear(d, d).requires_grad_(False)
        self.shared = nn.Linear(d, d)
        self.tie_a = nn.Linear(d, d, bias=False)
        self.tie_b = nn.Linear(d, d, bias=False)
        self.tie_weights()
        self.gate = nn.Parameter(torch.ones(2))
        self.register_buffer("scale", torch.ones(d))                   # in state_dict
        self.register_buffer("ramp", torch.ones(d), persistent=False)  # not in state_dict

    def tie_weights(self) -> None:
        """Called again by init_weights: Module.to_empty() unties."""
        self.tie_b.weight = self.tie_a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x: (B, d)
        f = self.frozen(x)                                        # (B, d), no grad to frozen
        h = torch.tanh(self.shared(x))                            # first call of `shared`
        h = torch.tanh(self.shared(h + f))                        # second call, same weights
        t = self.tie_b(torch.tanh(self.tie_a(h)))                 # one weight used twice
        s = self.scale.to(x.dtype) * self.ramp.to(x.dtype)        # (d,)
        return x + self.gate[0] * h + self.gate[1] * t * s


class Special(nn.Module):
    def __init__(self, *, width: int, n_blocks: int, n_out: int, scalar: bool = True):
        super().__init__()
        if scalar:
            self.logit_scale = nn.Parameter(torch.tensor(1.0))  # 0-d
        self.blocks = nn.ModuleList(SpecialBlock(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)                           # (B, d)
        out = self.head(x)                         # (B, n_out)
        return out * self.logit_scale if hasattr(self, "logit_scale") else out


def build(**kw) -> Special:
    return Special(**kw)


def blocks(model: Special) -> list[nn.Module]:
    return list(model.blocks)


def make_batch(kw: dict, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, kw["width"], generator=gen)     # (n, d)
    y = torch.randint(kw["n_out"], (n,), generator=gen)  # (n,)
    return x, y


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)

"""A small model with every parameter kind the sharder must handle, for the sharder's own tests.

- 0-d parameter (``gate``), a parameter with fewer elements than ranks (``tiny``);
- tied weights inside one unit (embedding and head, both in the root unit);
- a submodule called twice per forward (``shared``) and a whole block called twice (``reuse``);
- frozen parameters next to trainable ones in the same block (``frozen``);
- persistent and non-persistent buffers (``scale`` and ``phase``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

VOCAB, WIDTH, SEQ = 23, 6, 5


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.shared = nn.Linear(d, d, bias=False)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.gate = nn.Parameter(torch.tensor(0.7))         # 0-d
        self.tiny = nn.Parameter(torch.zeros(3))            # fewer elements than 8 ranks
        self.register_buffer("scale", torch.ones(d))        # persistent
        self.register_buffer("phase", torch.zeros(d), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (B, T, d)
        h = self.shared(F.gelu(self.fc(self.norm(x))))
        h = self.shared(h) * self.gate                      # shared called a second time
        h = h + self.frozen(x) + self.tiny.sum()
        return x + h * self.scale.to(h.dtype) + self.phase.to(h.dtype)  # buffers stay fp32 under bf16


class Zoo(nn.Module):
    def __init__(self, n_blocks: int = 2, reuse: bool = True, checkpoint: bool = False):
        super().__init__()
        self.reuse = reuse
        self.checkpoint = checkpoint                         # activation checkpointing per block
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight                  # tied inside the root unit

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) -> logits (B, T, V)
        x = self.emb(idx)
        for b in self.blocks:
            if self.checkpoint == "full_recompute":  # the recompute runs the whole unit forward
                with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                    x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
            elif self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
            else:
                x = b(x)
        if self.reuse:
            x = self.blocks[0](x)                           # a whole unit called twice
        return self.head(self.norm(x))


@torch.no_grad()
def init_zoo(model: Zoo, seed: int) -> None:
    """Initialise every parameter and every buffer (non-persistent too) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters(remove_duplicate=True):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for i, b in enumerate(model.blocks):
        b.scale.copy_(1.0 + 0.1 * torch.arange(b.scale.numel(), dtype=torch.float32))
        b.phase.copy_(torch.sin(torch.arange(b.phase.numel()) * (i + 1) / math.pi))


def build_zoo(seed: int = 0, device=None, **kw) -> Zoo:
    with torch.device(device or "cpu"):
        model = Zoo(**kw)
    if (device or "cpu") != "meta":
        init_zoo(model, seed)
    return model


def batch(step: int, micro: int, size: int = 2):
    """Deterministic (inputs, targets) for one micro-batch, independent of world size."""
    g = torch.Generator().manual_seed(10_000 * step + micro)
    idx = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return idx, torch.roll(idx, shifts=1, dims=1)


def loss_of(model: nn.Module, b) -> torch.Tensor:
    idx, tgt = b
    return F.cross_entropy(model(idx).float().flatten(0, 1), tgt.flatten())


def units(model: Zoo, wrap: str) -> list[nn.Module]:
    """Modules to shard, inner first, root last."""
    if wrap == "root_only":
        return [model]
    if wrap == "per_block":
        return [*model.blocks, model]
    if wrap == "every_leaf":  # deep nesting: leaves, then blocks, then the root
        leaves = [m for b in model.blocks for m in b.children() if any(True for _ in m.parameters())]
        return [*leaves, *model.blocks, model]
    raise ValueError(f"unknown wrap {wrap!r}")

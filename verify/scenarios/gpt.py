"""GPT family: a nanoGPT-style decoder (learned positions, LayerNorm, GELU MLP), tied or untied head.

Blocks: root.blocks[i]. The embeddings, final LayerNorm and head belong to the root unit, so a
tied head (lm_head.weight is wte.weight) always stays inside one unit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from verify.scenarios._lm import lm_family, loss

# The family interface (verify.scenarios.families.FAMILY_INTERFACE); `loss`, `build`, `blocks`
# and `make_batch` come from _lm.
__all__ = ["DEFAULTS", "check", "build", "blocks", "make_batch", "loss"]

DEFAULTS = dict(vocab_size=17, n_embd=8, n_head=2, n_layer=2, block_size=4, tied=True, bias=True)


def check(kw: dict) -> None:
    for key in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"model.n_embd={kw['n_embd']} must be divisible by model.n_head={kw['n_head']}")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                   # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)           # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, *, vocab_size: int, n_embd: int, n_head: int, n_layer: int,
                 block_size: int, tied: bool, bias: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.tied = tied
        self.tie_weights()

    def tie_weights(self) -> None:
        """One Parameter, two modules. Called again by init_weights: Module.to_empty() unties."""
        if self.tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)      # (T,)
        x = self.wte(idx) + self.wpe(pos)             # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))             # (B, T, vocab)


build, blocks, make_batch = lm_family(GPT, layers="blocks", context="block_size")

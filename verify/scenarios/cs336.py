"""CS336 family: a pre-norm decoder LM with RMSNorm, RoPE and a SwiGLU feed-forward, no biases.

Blocks: root.layers[i]. Each attention owns a RotaryEmbedding whose cos/sin tables are
NON-persistent buffers (not in state_dict), rebuilt from the config by `reset_buffers()`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from verify.scenarios._lm import lm_family, loss

# The family interface (verify.scenarios.families.FAMILY_INTERFACE); `loss`, `build`, `blocks`
# and `make_batch` come from _lm.
__all__ = ["DEFAULTS", "check", "build", "blocks", "make_batch", "loss"]

DEFAULTS = dict(vocab_size=19, context_length=4, d_model=8, num_heads=2, num_layers=2, d_ff=12,
                rope_theta=10000.0)


def check(kw: dict) -> None:
    for key in ("vocab_size", "context_length", "d_model", "num_heads", "num_layers", "d_ff"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if kw["d_model"] % kw["num_heads"] or (kw["d_model"] // kw["num_heads"]) % 2:
        raise ValueError(f"model.d_model={kw['d_model']} / model.num_heads={kw['num_heads']} "
                         "must be an even head size (RoPE rotates pairs)")
    if not kw["rope_theta"] > 1.0:
        raise ValueError(f"model.rope_theta={kw['rope_theta']!r}: must be > 1")


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.float()  # normalise in fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight).to(in_dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, context_length: int, theta: float):
        super().__init__()
        self.head_dim, self.context_length, self.theta = head_dim, context_length, theta
        self.register_buffer("cos", torch.empty(context_length, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(context_length, head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fill cos/sin from the config (computed on CPU in fp64, so every device gets the same bits)."""
        if self.cos.is_meta:
            return
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)                     # (hd/2,)
        positions = torch.arange(self.context_length, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)                      # (T, hd/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(-2)                                   # x: (B, nh, T, hd)
        cos = self.cos[:T].to(x.dtype)                   # (T, hd/2)
        sin = self.sin[:T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]              # (B, nh, T, hd/2) each
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., hd/2, 2)
        return rotated.flatten(-2)                       # (B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, context_length: int, theta: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.output_proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(d_model // num_heads, context_length, theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        q = self.rope(heads(self.q_proj(x)))                  # (B, nh, T, hd)
        k = self.rope(heads(self.k_proj(x)))
        v = heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.output_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, d_ff) gated -> (B, T, C)


class Block(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, context_length, theta):
        super().__init__()
        self.ln1 = RMSNorm(d_model)
        self.attn = Attention(d_model, num_heads, context_length, theta)
        self.ln2 = RMSNorm(d_model)
        self.ffn = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))   # pre-norm residual blocks
        return x + self.ffn(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, *, vocab_size, context_length, d_model, num_heads, num_layers, d_ff, rope_theta):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, num_heads, d_ff, context_length, rope_theta) for _ in range(num_layers)
        )
        self.ln_final = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(idx)          # (B, T) -> (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_final(x))   # (B, T, vocab)


build, blocks, make_batch = lm_family(TransformerLM, layers="layers", context="context_length")

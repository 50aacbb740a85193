"""What the language-model families (gpt, cs336 and the HuggingFace ones) share: random
next-token batches and the causal-LM cross-entropy, always in fp32."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["next_token_batch", "next_token_loss", "loss", "lm_family"]


def next_token_batch(vocab_size: int, seq_len: int, n: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random token sequences of ``seq_len`` and their next-token targets, (n, T) each."""
    seq = torch.randint(vocab_size, (n, seq_len + 1), generator=gen)  # (n, T+1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of (B, T, vocab) logits, upcast to fp32 first, against (B, T)
    targets."""
    logits = logits.float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def loss(model: nn.Module, batch) -> torch.Tensor:
    """The family interface's loss for a model called on token ids that returns the logits."""
    idx, targets = batch
    return next_token_loss(model(idx), targets)  # (B, T, vocab) logits


def lm_family(model_cls: Callable[..., nn.Module], *, layers: str, context: str):
    """The family interface's ``build``, ``blocks`` and ``make_batch`` for a model built as
    ``model_cls(**kw)`` whose blocks are the ModuleList ``model.<layers>`` and whose sequence
    length is ``kw[<context>]``."""
    def build(**kw) -> nn.Module:
        return model_cls(**kw)

    def blocks(model: nn.Module) -> list[nn.Module]:
        return list(getattr(model, layers))

    def make_batch(kw: dict, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_batch(kw["vocab_size"], kw[context], n, gen)

    return build, blocks, make_batch

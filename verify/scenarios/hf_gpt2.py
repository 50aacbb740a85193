"""HuggingFace GPT-2 family: `GPT2LMHeadModel` from a tiny `GPT2Config` (no download).

Dropout off (the sharded run and the reference draw no random numbers), eager attention, no KV
cache. Blocks: the decoder layers named by `model._no_split_modules` (`GPT2Block`), as the FSDP2
guide wraps them. The LM head is tied to the token embedding unless `tied=False`.
Needs transformers (`pip install -e '.[hf]'`).
"""
from __future__ import annotations

import torch.nn as nn

from verify.scenarios import _hf
from verify.scenarios._hf import decoder_layers as blocks, loss, make_batch

# The family interface (verify.scenarios.families.FAMILY_INTERFACE); three of its names are _hf's.
__all__ = ["DEFAULTS", "check", "build", "blocks", "make_batch", "loss"]

DEFAULTS = dict(vocab_size=64, n_embd=16, n_head=2, n_layer=2, seq_len=8, tied=True)


def check(kw: dict) -> None:
    for key in ("vocab_size", "n_embd", "n_head", "n_layer", "seq_len"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"model.n_embd={kw['n_embd']} must be a multiple of "
                         f"model.n_head={kw['n_head']}")


def build(*, vocab_size: int, n_embd: int, n_head: int, n_layer: int, seq_len: int,
          tied: bool) -> nn.Module:
    transformers = _hf.require("hf_gpt2")
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_head=n_head,
        n_layer=n_layer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tied, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")

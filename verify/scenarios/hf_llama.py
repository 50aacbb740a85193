"""HuggingFace Llama family: `LlamaForCausalLM` from a tiny `LlamaConfig` (no download).

RMSNorm, RoPE (non-persistent `inv_freq` tables, rebuilt from the config by `init_weights`),
SwiGLU, grouped-query attention when n_kv_head < n_head, eager attention, no KV cache. Blocks:
the decoder layers named by `model._no_split_modules` (`LlamaDecoderLayer`).
Needs transformers (`pip install -e '.[hf]'`).
"""
from __future__ import annotations

import torch.nn as nn

from verify.scenarios import _hf
from verify.scenarios._hf import decoder_layers as blocks, loss, make_batch

# The family interface (verify.scenarios.families.FAMILY_INTERFACE); three of its names are _hf's.
__all__ = ["DEFAULTS", "check", "build", "blocks", "make_batch", "loss"]

DEFAULTS = dict(vocab_size=64, hidden_size=16, intermediate_size=24, n_head=2, n_kv_head=1,
                n_layer=2, seq_len=8, tied=False)


def check(kw: dict) -> None:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "n_head", "n_kv_head",
                "n_layer", "seq_len"):
        if kw[key] < 1:
            raise ValueError(f"model.{key}={kw[key]!r}: must be >= 1")
    if kw["hidden_size"] % kw["n_head"] or (kw["hidden_size"] // kw["n_head"]) % 2:
        raise ValueError(f"model.hidden_size={kw['hidden_size']} / model.n_head={kw['n_head']} "
                         "must be an even head size (RoPE rotates pairs)")
    if kw["n_head"] % kw["n_kv_head"]:
        raise ValueError(f"model.n_head={kw['n_head']} must be a multiple of "
                         f"model.n_kv_head={kw['n_kv_head']}")


def build(*, vocab_size: int, hidden_size: int, intermediate_size: int, n_head: int,
          n_kv_head: int, n_layer: int, seq_len: int, tied: bool) -> nn.Module:
    transformers = _hf.require("hf_llama")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        max_position_embeddings=seq_len, attention_dropout=0.0, tie_word_embeddings=tied,
        use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _hf.restore_rope(model)
    return model

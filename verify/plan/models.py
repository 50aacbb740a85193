"""Models for the scale planner (verify/plan/units.py), built on the meta device: no parameter memory.

Three sources, one result (a meta-device module tree and its wrap units, inner first, root last):
  - built-in names (gpt2, gpt2-xl, llama-7b, llama-13b, llama-70b): configs written here from
    their published dimensions, built as light module trees with exactly the parameter names,
    shapes and registration order of transformers' GPT2LMHeadModel / LlamaForCausalLM (a test
    checks that against transformers), so the planner needs no transformers and no download;
  - a HuggingFace ``config.json``: model_type gpt2 / llama (and Llama-shaped ones: mistral)
    use the same trees; any other type is built through transformers on meta when installed;
  - a scenario family with keyword arguments, ``FAMILY[:key=value,...]`` (e.g.
    ``gpt:n_embd=768,n_layer=12``), built by ``verify.scenarios.build_model(s, device="meta")``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from verify.scenarios import FAMILIES, Scenario, build_model
from verify.scenarios._hf import decoder_layers

__all__ = ["BUILTIN", "PlanModel", "load_model", "LlamaTree", "GPT2Tree"]

# Published dimensions. GPT-2: Radford et al. 2019 / the openai-community configs (n_positions
# 1024, vocab 50257). Llama 2: Touvron et al. 2023 / the meta-llama configs (vocab 32000; 70B
# uses grouped-query attention with 8 key/value heads).
BUILTIN: dict[str, dict[str, Any]] = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=1600,
                    n_layer=48, n_head=25),
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                     intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, tie_word_embeddings=False),
    "llama-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                      intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, tie_word_embeddings=False),
    "llama-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192,
                      intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, tie_word_embeddings=False),
}


@dataclass
class PlanModel:
    name: str                      # what the user asked for, for the report
    model: nn.Module               # on the meta device
    blocks: Callable[[nn.Module], list[nn.Module]]  # the per_block units (inner first)
    family: str | None = None      # a scenario family, where the model is one


# -- light trees: parameters only (forward is never run) ----------------------------------------

def _w(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"))


class _Lin(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = _w(d_out, d_in)            # nn.Linear: (out, in)
        if bias:
            self.bias = _w(d_out)


class _Conv1D(nn.Module):                          # transformers' GPT-2 Conv1D: (in, out)
    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.weight = _w(d_in, d_out)
        self.bias = _w(d_out)


class _Norm(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = _w(d)
        if bias:
            self.bias = _w(d)


class _Emb(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = _w(n, d)


class _Bag(nn.Module):
    """A named container (attributes registered in the order given)."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or heads
        hd = c.get("head_dim") or h // heads
        bias = bool(c.get("attention_bias", False))
        self.self_attn = _Bag(q_proj=_Lin(h, heads * hd, bias), k_proj=_Lin(h, kv * hd, bias),
                              v_proj=_Lin(h, kv * hd, bias), o_proj=_Lin(heads * hd, h, bias))
        mbias = bool(c.get("mlp_bias", False))
        self.mlp = _Bag(gate_proj=_Lin(h, i, mbias), up_proj=_Lin(h, i, mbias),
                        down_proj=_Lin(i, h, mbias))
        self.input_layernorm = _Norm(h, False)
        self.post_attention_layernorm = _Norm(h, False)


class LlamaTree(nn.Module):
    """LlamaForCausalLM's parameters: model.embed_tokens, model.layers[i], model.norm, lm_head."""

    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.model = _Bag(embed_tokens=_Emb(c["vocab_size"], h),
                          layers=nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c["num_hidden_layers"])),
                          norm=_Norm(h, False))
        self.lm_head = _Lin(h, c["vocab_size"])
        if c.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight   # counted once


class GPT2Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d = c["n_embd"]
        inner = c.get("n_inner") or 4 * d
        self.ln_1 = _Norm(d, True)
        self.attn = _Bag(c_attn=_Conv1D(3 * d, d), c_proj=_Conv1D(d, d))
        self.ln_2 = _Norm(d, True)
        self.mlp = _Bag(c_fc=_Conv1D(inner, d), c_proj=_Conv1D(d, inner))


class GPT2Tree(nn.Module):
    """GPT2LMHeadModel's parameters: transformer.wte/wpe/h[i]/ln_f, lm_head tied to wte."""

    def __init__(self, c: dict):
        super().__init__()
        d = c["n_embd"]
        self.transformer = _Bag(wte=_Emb(c["vocab_size"], d), wpe=_Emb(c["n_positions"], d),
                                h=nn.ModuleList(GPT2Block(c) for _ in range(c["n_layer"])),
                                ln_f=_Norm(d, True))
        self.lm_head = _Lin(d, c["vocab_size"])
        if c.get("tie_word_embeddings", True):
            self.lm_head.weight = self.transformer.wte.weight      # counted once


_TREES = {"llama": (LlamaTree, lambda m: list(m.model.layers)),
          "mistral": (LlamaTree, lambda m: list(m.model.layers)),
          "gpt2": (GPT2Tree, lambda m: list(m.transformer.h))}


def _from_config(name: str, c: dict) -> PlanModel:
    kind = c.get("model_type")
    if kind in _TREES:
        cls, blocks = _TREES[kind]
        return PlanModel(name, cls(c), blocks)
    try:
        import transformers  # lazy: optional (pip install -e '.[hf]')
    except ImportError as exc:
        raise ValueError(f"model_type {kind!r} of {name}: the planner builds gpt2 and llama "
                         "configs itself; other types need transformers installed") from exc
    config = transformers.AutoConfig.for_model(**c)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return PlanModel(name, model, decoder_layers)


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def load_model(spec: str) -> PlanModel:
    """A built-in name, a path to a HuggingFace config.json, or FAMILY[:key=value,...]."""
    if spec in BUILTIN:
        return _from_config(spec, BUILTIN[spec])
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        try:
            c = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--model {spec}: not a readable config.json ({exc})") from exc
        return _from_config(path.name, c)
    family, _, rest = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"--model {spec!r}: not a built-in ({', '.join(BUILTIN)}), a config.json "
                         f"or a scenario family ({', '.join(sorted(FAMILIES))}) with key=value,...")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--model {spec!r}: {item!r} is not key=value")
        kw[key.strip()] = _scalar(value.strip())
    s = Scenario(family=family, model=tuple(sorted(kw.items())), world_size=1)
    s.validate()
    fam = FAMILIES[family]
    return PlanModel(spec, build_model(s, device="meta"), fam.blocks, family=family)

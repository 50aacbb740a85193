"""Hypothesis strategies that draw scenarios, aimed at the edges a sharder gets wrong.

Edges: parameters with fewer elements than ranks (widths 1..7, a 2-element gate), sizes not
divisible by W (primes), 0-d parameters (the special family), one-unit models (root_only, depth
1), deep nesting (nested MLPs, every_leaf wrapping), M > W micro-batches. Small sizes come first so
that shrinking ends at the simplest failing case. Every strategy takes keyword-only bounds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from hypothesis import strategies as st

from verify.scenarios import (ALL_WORLD_SIZES, CORE_FAMILIES, DTYPES, FAMILIES, MODES, OPTIMIZERS, TIES,
                              WORLD_SIZES, WRAPS, Scenario, build_model, family_module,
                              is_family_path, tied_owners)

__all__ = [
    "EDGE_SIZES", "sizes", "mlp_models", "gpt_models", "cs336_models", "convnet_models",
    "special_models", "hf_gpt2_models", "hf_llama_models", "model_shapes", "micro_batches", "scenarios",
]

# Sizes a sharder splits badly over 1, 2, 4, 8 ranks: 1, smaller than 8, primes, 8 and 8 +/- 1.
EDGE_SIZES = (1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 32)

Model = tuple[tuple[str, Any], ...]


def _pairs(kw: dict) -> Model:
    return tuple(sorted(kw.items()))


def sizes(*, min_value: int = 1, max_value: int = 32) -> st.SearchStrategy[int]:
    """An int in [min_value, max_value], the edge sizes in range drawn often."""
    edges = [n for n in EDGE_SIZES if min_value <= n <= max_value]
    plain = st.integers(min_value, max_value)
    return st.one_of(st.sampled_from(edges), plain) if edges else plain


def mlp_models(*, max_width: int = 32, max_depth: int = 4, max_nested_depth: int = 6) -> st.SearchStrategy[Model]:
    """Flat MLPs up to max_depth layers, or nested ones (each block inside the previous) up to
    max_nested_depth."""
    flat = st.fixed_dictionaries({
        "d_in": sizes(max_value=max_width), "width": sizes(max_value=max_width),
        "depth": st.integers(1, max_depth), "d_out": sizes(max_value=min(max_width, 9)),
        "bias": st.booleans(), "nested": st.just(False),
    })
    small = min(max_width, 8)  # nested models are deep, so keep them narrow
    nested = st.fixed_dictionaries({
        "d_in": sizes(max_value=small), "width": sizes(max_value=small),
        "depth": st.integers(2, max(2, max_nested_depth)), "d_out": sizes(max_value=small),
        "bias": st.booleans(), "nested": st.just(True),
    })
    return st.one_of(flat, nested).map(_pairs)


def _with_width(kw: dict, *, unit: str, count: str, width: str, factor: int = 1) -> Model:
    """Replace the drawn per-head size `unit` by the model width count * factor * unit."""
    kw = dict(kw)
    kw[width] = kw[count] * factor * kw.pop(unit)
    return _pairs(kw)


def gpt_models(*, max_vocab: int = 64, max_layers: int = 3, max_seq: int = 8) -> st.SearchStrategy[Model]:
    """nanoGPT shapes: n_embd = n_head * head_dim in 2..32, odd vocabularies, tied or untied
    head. Never n_embd = 1: a LayerNorm over one element outputs its bias whatever its input, so
    the loss is constant and every gradient zero (a case that checks nothing); the one head of
    size 1 is drawn as size 2 instead (a map, not a filter: the other draws stay as they were)."""
    return st.fixed_dictionaries({
        "vocab_size": sizes(min_value=2, max_value=max_vocab),
        "n_head": st.integers(1, 4), "head_dim": st.integers(1, 8),
        "n_layer": st.integers(1, max_layers), "block_size": st.integers(1, max_seq),
        "tied": st.booleans(), "bias": st.booleans(),
    }).map(lambda kw: _with_width({**kw, "head_dim": max(kw["head_dim"], 2 // kw["n_head"])},
                                  unit="head_dim", count="n_head", width="n_embd"))


def cs336_models(*, max_vocab: int = 64, max_layers: int = 3, max_seq: int = 8) -> st.SearchStrategy[Model]:
    """CS336 LM shapes: even head sizes (RoPE), d_ff any size (primes and 1 included)."""
    return st.fixed_dictionaries({
        "vocab_size": sizes(min_value=2, max_value=max_vocab),
        "num_heads": st.integers(1, 4), "half_head": st.integers(1, 4),
        "num_layers": st.integers(1, max_layers), "context_length": st.integers(1, max_seq),
        "d_ff": sizes(max_value=32), "rope_theta": st.sampled_from((10000.0, 10.0)),
    }).map(lambda kw: _with_width(kw, unit="half_head", count="num_heads", width="d_model", factor=2))


@st.composite
def convnet_models(draw, *, max_channels: int = 8, max_stages: int = 3, max_image: int = 6) -> Model:
    """Conv nets; norm_groups is drawn from the divisors of channels that leave each group at
    least two values (1x1 images included)."""
    channels = draw(sizes(max_value=max_channels))
    image_size = draw(st.integers(2, max(max_image, 2)))  # 1x1 images make GroupNorm ill-conditioned
    groups = draw(st.sampled_from(
        [g for g in range(1, channels + 1) if channels % g == 0 and channels // g * image_size**2 >= 2]))
    return _pairs({
        "in_channels": draw(st.integers(1, 3)), "channels": channels,
        "n_stages": draw(st.integers(1, max_stages)), "image_size": image_size,
        "n_classes": draw(st.integers(2, 10)), "norm_groups": groups,
    })


def special_models(*, max_width: int = 8, max_blocks: int = 3) -> st.SearchStrategy[Model]:
    """The special family: a 2-element parameter, frozen, shared and tied modules, persistent
    and non-persistent buffers, and a 0-d parameter or not (``scalar`` drawn, so that sharders
    that refuse 0-d parameters still run the rest)."""
    return st.fixed_dictionaries({
        "width": sizes(max_value=max_width), "n_blocks": st.integers(1, max_blocks),
        "n_out": st.integers(2, 5), "scalar": st.booleans(),
    }).map(_pairs)


@st.composite
def _hf_shapes(draw, *, width: str, own, max_vocab: int, max_layers: int, max_seq: int) -> Model:
    """What the HuggingFace families draw alike: n_head, a head size putting the width (named
    `width`) in 16..32, the vocabulary, then the family's own keys (``own(draw, n_head)``, a
    dict), then the depth, the sequence length and whether the head is tied, in that order."""
    n_head = draw(st.sampled_from((1, 2, 4)))
    head_dim = draw(st.sampled_from([d for d in (4, 8, 16, 32) if 16 <= n_head * d <= 32]))
    kw = {"vocab_size": draw(sizes(min_value=2, max_value=max_vocab)),
          width: n_head * head_dim, "n_head": n_head}
    kw.update(own(draw, n_head))
    kw.update(n_layer=draw(st.integers(1, max_layers)), seq_len=draw(st.integers(1, max_seq)),
              tied=draw(st.booleans()))
    return _pairs(kw)


def hf_gpt2_models(*, max_vocab: int = 96, max_layers: int = 2, max_seq: int = 8) -> st.SearchStrategy[Model]:
    """HuggingFace GPT-2 shapes (family hf_gpt2, needs transformers): width n_head * head_dim
    in 16..32, tied or untied head."""
    return _hf_shapes(width="n_embd", own=lambda draw, n_head: {}, max_vocab=max_vocab,
                      max_layers=max_layers, max_seq=max_seq)


def hf_llama_models(*, max_vocab: int = 96, max_layers: int = 2, max_seq: int = 8) -> st.SearchStrategy[Model]:
    """HuggingFace Llama shapes (family hf_llama, needs transformers): width 16..32, even head
    sizes (RoPE), grouped-query attention (n_kv_head divides n_head), any intermediate size."""
    def own(draw, n_head: int) -> dict:
        return {"n_kv_head": draw(st.sampled_from([k for k in (1, 2, 4) if n_head % k == 0])),
                "intermediate_size": draw(sizes(max_value=48))}
    return _hf_shapes(width="hidden_size", own=own, max_vocab=max_vocab, max_layers=max_layers,
                      max_seq=max_seq)


_MODEL_STRATEGIES = {
    "mlp": mlp_models, "gpt": gpt_models, "cs336": cs336_models,
    "convnet": convnet_models, "special": special_models,
    "hf_gpt2": hf_gpt2_models, "hf_llama": hf_llama_models,
}


def model_shapes(family: str) -> st.SearchStrategy[Model]:
    """The default shape strategy of one family. A family named by import path supplies its
    own as ``strategy()`` (a strategy of keyword-argument dicts, drawn values overriding
    DEFAULTS); without one it is drawn at its DEFAULTS."""
    if is_family_path(family):
        fam = family_module(family)
        make = getattr(fam, "strategy", None)
        if make is None:
            return st.just(())
        drawn = make() if callable(make) and not isinstance(make, st.SearchStrategy) else make
        return drawn.map(lambda kw: _pairs(dict(kw)))
    if family not in _MODEL_STRATEGIES:
        raise ValueError(f"family={family!r}: allowed values are {sorted(_MODEL_STRATEGIES)}")
    return _MODEL_STRATEGIES[family]()


def micro_batches(*, world_size: int, max_factor: int = 4, max_value: int = 16) -> st.SearchStrategy[int]:
    """M: a power of two, M >= world_size, M <= max(world_size, max_value), M / W <= max_factor."""
    options = [world_size * f for f in (1, 2, 4, 8, 16)
               if f <= max_factor and world_size * f <= max(world_size, max_value)]
    return st.sampled_from(options)


def _subset(name: str, given: Optional[Sequence], allowed: Sequence) -> tuple:
    values = tuple(allowed) if given is None else tuple(given)
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"{name}={given!r}: must be a non-empty subset of {list(allowed)}")
    return values


def scenarios(*, world_sizes: Sequence[int] = WORLD_SIZES, modes: Sequence[str] = MODES,
              families: Optional[Sequence[str]] = None, optimizers: Optional[Sequence[str]] = None,
              dtypes: Sequence[str] = DTYPES, wraps: Sequence[str] = WRAPS,
              max_steps: int = 3, meshes: str = "1d",
              offloads: Sequence[bool] = (False,),
              ties: Sequence[str] = TIES) -> st.SearchStrategy[Scenario]:
    """Valid scenarios. Arguments are checked here, eagerly, not at draw time. ``families``
    defaults to the core families (`CORE_FAMILIES`): the HuggingFace ones are drawn only when
    named, so a seed draws the same cases with or without transformers installed.
    ``offloads``: the CPU-offload values to draw; with one value nothing is drawn for it (the
    default (False,) draws exactly the cases drawn before the field existed, seed for seed).
    ``ties``: how a model with a tied parameter is wrapped (`TIES`), drawn last and only for
    such models (half of them keep the tie in one unit); ("kept",) draws none."""
    world_sizes = _subset("world_sizes", world_sizes, ALL_WORLD_SIZES)
    modes = _subset("modes", modes, MODES)
    families = tuple(CORE_FAMILIES) if families is None else tuple(families)
    for name in families:
        if is_family_path(name):
            family_module(name)  # ValueError now, not at draw time
    families = _subset("families", families,
                       tuple(FAMILIES) + tuple(f for f in families if is_family_path(f)))
    optimizers = _subset("optimizers", optimizers, OPTIMIZERS)
    dtypes = _subset("dtypes", dtypes, DTYPES)
    wraps = _subset("wraps", wraps, WRAPS)
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps={max_steps!r}: must be an int >= 1")
    if meshes not in MESHES:
        raise ValueError(f"meshes={meshes!r}: allowed values are {list(MESHES)}")
    offloads = tuple(dict.fromkeys(offloads))
    if not offloads or not all(isinstance(o, bool) for o in offloads):
        raise ValueError(f"offloads={offloads!r}: must be a non-empty subset of [False, True]")
    ties = _subset("ties", ties, TIES)
    return _scenarios(world_sizes, modes, families, optimizers, dtypes, wraps, max_steps, meshes,
                      offloads, ties)


MESHES = ("1d", "2d", "both")


def mesh_shapes(world_size: int, meshes: str) -> list:
    """The mesh shapes drawn at ``world_size``: None (1-D) for "1d"; every (R, S) with R, S
    powers of two and R * S = W for "2d" ((1, 1) at W = 1); both for "both"."""
    two_d = [(r, world_size // r) for r in (1, 2, 4, 8, 16) if r <= world_size]
    return {"1d": [None], "2d": two_d, "both": [None] + two_d}[meshes]


@st.composite
def _scenarios(draw, world_sizes, modes, families, optimizers, dtypes, wraps, max_steps,
               meshes="1d", offloads=(False,), ties=("kept",)) -> Scenario:
    family = draw(st.sampled_from(families))
    world_size = draw(st.sampled_from(world_sizes))
    s = Scenario(
        family=family,
        model=draw(model_shapes(family)),
        world_size=world_size,
        mode=draw(st.sampled_from(modes)),
        optimizer=draw(st.sampled_from(optimizers)),
        lr=draw(st.sampled_from((1e-2, 1e-3, 5e-2))),
        weight_decay=draw(st.sampled_from((0.0, 0.1))),
        steps=draw(st.integers(1, max_steps)),
        micro_batches=draw(micro_batches(world_size=world_size)),
        micro_batch_size=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(dtypes)),
        wrap=draw(st.sampled_from(wraps)),
        reshard_after_forward=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        # drawn after the fields above and only when there is a choice: their draws stay as they were
        offload=draw(st.sampled_from(offloads)) if len(offloads) > 1 else offloads[0],
    )
    if meshes != "1d":   # drawn last, so a 1-D campaign draws exactly what it drew before
        s = dataclasses.replace(s, mesh=draw(st.sampled_from(mesh_shapes(world_size, meshes))))
    if len(ties) > 1 and tied_owners(build_model(s, device="meta")):
        kept_twice = [t for t in ties if t == "kept"] * 2 + [t for t in ties if t != "kept"]
        s = dataclasses.replace(s, ties=draw(st.sampled_from(kept_twice)))
    s.validate()
    return s

"""What the HuggingFace families share: whether transformers is importable, the per-decoder-layer
plan, the causal-LM batch and loss, and rotary tables that `init_weights` rebuilds.

transformers is imported lazily (inside `build`), so that processes that never build an HF model
do not pay for the import, and this package imports without it.
"""
from __future__ import annotations

import importlib.util
import types

import torch
import torch.nn as nn

from verify.scenarios._lm import next_token_batch, next_token_loss

__all__ = ["AVAILABLE", "require", "decoder_layers", "make_batch", "loss", "restore_rope"]



def _available() -> bool:
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):   # blocked, or a broken entry in sys.modules
        return False


AVAILABLE = _available()


def require(family: str):
    """The transformers module, or an ImportError that says how to get it."""
    try:
        import transformers  # lazy: optional (the [hf] extra) and heavy
    except ImportError as exc:
        raise ImportError(f"scenario family {family!r} needs transformers: "
                          "pip install -e '.[hf]'") from exc
    import transformers.utils.logging as hf_logging  # lazy: as transformers above
    hf_logging.set_verbosity_error()   # config notes (e.g. special token ids) are noise here
    return transformers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The units of the FSDP2 guide: every module whose class is in `model._no_split_modules`
    (the decoder layers), in `modules()` order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules to wrap")
    return [m for m in model.modules() if type(m).__name__ in names]


def make_batch(kw: dict, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return next_token_batch(kw["vocab_size"], kw["seq_len"], n, gen)


def loss(model: nn.Module, batch) -> torch.Tensor:
    idx, targets = batch
    return next_token_loss(model(input_ids=idx).logits, targets)  # (B, T, vocab) logits


def restore_rope(model: nn.Module) -> None:
    """Give every rotary-embedding module a `reset_buffers()`, which `init_weights` calls instead
    of filling its buffers with noise: `inv_freq` (and `original_inv_freq`) are non-persistent
    buffers computed from the config, so no state dict carries them and a meta-built model must
    recompute them."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "compute_default_rope_parameters"):
            module.reset_buffers = types.MethodType(_reset_rope, module)


@torch.no_grad()
def _reset_rope(module: nn.Module) -> None:
    if module.inv_freq.is_meta:
        return
    if getattr(module, "rope_type", "default") != "default":
        raise ValueError(f"{type(module).__name__}: rope_type {module.rope_type!r} is not "
                         "supported by the harness (only the default RoPE)")
    inv_freq, _ = module.compute_default_rope_parameters(module.config)
    for name in ("inv_freq", "original_inv_freq"):
        if hasattr(module, name):
            getattr(module, name).copy_(inv_freq)

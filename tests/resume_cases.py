"""Rank-side stand-ins for `verify.campaign.resume.load_phase` that break the resume on purpose, so the
tests can show the harness notices (module-level: the rank pool pickles them by reference)."""
from __future__ import annotations

import fsdp_core.checkpoint as ckpt
from verify.campaign.resume import load_phase


def _patched_load(payload: dict, ctx, replacement) -> dict:
    original = ckpt.load
    ckpt.load = replacement(original)
    try:
        return load_phase(payload, ctx)
    finally:
        ckpt.load = original


def load_phase_without_load(payload: dict, ctx) -> dict:
    """The checkpoint is never read: the decoy initialisation trains on."""
    return _patched_load(payload, ctx, lambda original: lambda path, model, optimizer=None, **kw: None)


def load_phase_model_only(payload: dict, ctx) -> dict:
    """Only the model is loaded: the optimizer starts from scratch (Adam's moments and step)."""
    return _patched_load(payload, ctx, lambda original: (
        lambda path, model, optimizer=None, **kw: original(path, model, None, **kw)))

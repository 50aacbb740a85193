"""The exceptions of ``fsdp_core.checkpoint`` (a leaf: every checkpoint module may raise them)."""
from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read: the message names the file or the parameter."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given path."""

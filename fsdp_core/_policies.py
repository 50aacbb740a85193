"""Frozen policy dataclasses (the user-facing knobs of ``fully_shard``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["MixedPrecisionPolicy", "CPUOffloadPolicy", "OffloadPolicy"]


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """Dtypes for compute and communication; the sharded master copy keeps its own dtype.

    - ``param_dtype``: dtype of the unsharded parameters used in forward/backward (the
      all-gather runs in this dtype). ``None``: the master dtype.
    - ``reduce_dtype``: dtype of the gradient reduction. ``None``: ``param_dtype``.
    - ``output_dtype``: floating outputs of the unit are cast to it. ``None``: no cast.
    - ``cast_forward_inputs``: floating tensor inputs of the unit are cast to ``param_dtype``.
    """

    param_dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = None
    output_dtype: Optional[torch.dtype] = None
    cast_forward_inputs: bool = True


@dataclass(frozen=True)
class OffloadPolicy:
    """No offloading (the default)."""


@dataclass(frozen=True)
class CPUOffloadPolicy(OffloadPolicy):
    """Sharded parameters, their gradients and the optimizer state live on the CPU; each
    unshard copies the local shard to the compute device first. ``pin_memory`` is used only
    when CUDA is available."""

    pin_memory: bool = True

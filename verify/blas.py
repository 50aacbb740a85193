"""BLAS reproducibility: bitwise means the sharding, not the memory layout.

MKL (the BLAS of the x86 CPU builds of torch) picks its code path per call, and with the default
setting that path depends on the operands' memory alignment: ``F.linear`` in fp32 with a weight
that is a view into a flat buffer at an odd storage offset can round differently from the same
weight stored contiguously (measured on the pinned torch: 36 of 600 (shape, offset 1..15) pairs
differ; none with ``MKL_CBWR=AUTO,STRICT``). A correct sharder whose parameters are views into a
flat buffer would then fail the bitwise tier for a reason that has nothing to do with sharding.

`apply` sets ``MKL_CBWR=AUTO,STRICT`` (MKL's strict conditional numerical reproducibility) unless
the variable is already in the environment (a user's explicit value wins, an empty one
included: ``MKL_CBWR=`` turns the strict mode off). MKL reads the variable at its first call,
not when torch is imported, and every process the harness starts inherits it, so `apply` runs
when `verify` is imported (verify/__init__.py): before any of its modules imports torch, in the
CLI, the pytest plugin's process, the pool's spawned ranks and every torchrun rank, and in the
parent where the references run. `describe` is what the report header says. Imports no torch.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["VARIABLE", "STRICT", "apply", "describe", "state"]

VARIABLE = "MKL_CBWR"
STRICT = "AUTO,STRICT"

_state: dict[str, Optional[object]] = {"set_by_verify": None, "torch_was_loaded": None}


def apply() -> None:
    """Set ``MKL_CBWR=AUTO,STRICT`` where it is not set; idempotent (only the first call in a
    process records whether it set the variable)."""
    if _state["set_by_verify"] is not None:
        return
    _state["torch_was_loaded"] = "torch" in sys.modules
    if VARIABLE in os.environ:
        _state["set_by_verify"] = False
    else:
        os.environ[VARIABLE] = STRICT
        _state["set_by_verify"] = True


def state() -> dict:
    """{"variable", "value" (None: unset), "set_by_verify", "torch_was_loaded"} of this process."""
    return {"variable": VARIABLE, "value": os.environ.get(VARIABLE), **_state}


def describe(mkl: Optional[bool] = None) -> str:
    """One line for the report header: what was set, by whom, and whether it applies.
    ``mkl``: whether the torch build has MKL (None: ask torch, which must then be importable)."""
    if mkl is None:
        import torch  # lazy: this module is imported by `import verify`, which loads no torch
        mkl = bool(torch.backends.mkl.is_available())
    value = os.environ.get(VARIABLE)
    if not mkl:
        return (f"BLAS: this torch build has no MKL, so no BLAS reproducibility setting applies "
                f"({VARIABLE} {'unset' if value is None else repr(value)})")
    if value is None:
        return (f"BLAS: MKL with {VARIABLE} unset: results may depend on memory alignment, and a "
                "bitwise failure may be the BLAS's, not the sharding's")
    who = "set by verify" if _state["set_by_verify"] else "the user's explicit value, left as set"
    strict = "STRICT" in value.upper().split(",")
    line = f"BLAS: MKL with {VARIABLE}={value!r} ({who}) in every rank and reference"
    if not strict:
        line += ("; not strict: results may depend on memory alignment, and a bitwise failure "
                 "may be the BLAS's, not the sharding's")
    elif _state["set_by_verify"] and _state["torch_was_loaded"]:
        line += ("; torch was imported before verify in this process: a matrix product run "
                 "before that keeps MKL's earlier setting in this process")
    else:
        line += ": strict conditional numerical reproducibility, results independent of alignment"
    return line

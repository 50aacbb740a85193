"""`Scenario`: a case as frozen data (small, hashable, picklable, JSON-able), its JSON form and
its validation, with the choices each field allows; and `_derive_seed`, the stable seeds
every process derives from a scenario's seed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from verify.scenarios.families import family_module

__all__ = ["Scenario", "MODES", "OPTIMIZERS", "DTYPES", "WRAPS", "TIES", "WORLD_SIZES",
           "ALL_WORLD_SIZES"]

MODES = ("fast", "deterministic")
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw")
DTYPES = ("fp32", "bf16")
WRAPS = ("per_block", "root_only", "every_leaf")
# How the wrap plan treats a parameter tied across modules (verify/scenarios/model.py wrap_units):
# kept inside one unit; split across two units the way accelerate's FSDP2 preparation did (the
# input embedding in a unit of its own, the tied head left to the enclosing one); or split and
# then re-tied after sharding (`tie_weights()`, as transformers does after wrapping).
TIES = ("kept", "split", "split_retie")
WORLD_SIZES = (1, 2, 4, 8)            # what campaigns draw by default
ALL_WORLD_SIZES = tuple(2**i for i in range(11))   # what a scenario may have (1 .. 1024)


@dataclass(frozen=True)
class Scenario:
    family: str                 # a key of FAMILIES
    model: tuple[tuple[str, Any], ...]  # family hyperparameters, sorted (key, value) JSON scalars
    world_size: int             # 1, 2, 4 or 8
    mode: str = "fast"          # "fast" | "deterministic"
    optimizer: str = "sgd"      # "sgd" | "sgd_momentum" | "adam" | "adamw"
    lr: float = 1e-2
    weight_decay: float = 0.0
    steps: int = 2
    micro_batches: int = 2      # M: global micro-batches per step, a power of two, M >= world_size
    micro_batch_size: int = 2
    dtype: str = "fp32"         # "fp32" | "bf16" (bf16 params/compute, fp32 reduce, fp32 master)
    wrap: str = "per_block"     # "per_block" | "root_only" | "every_leaf"
    reshard_after_forward: bool = True
    seed: int = 0
    mesh: tuple[int, int] | None = None  # HSDP: (R, S), replicate x shard, R * S = world_size;
                                          # None: the 1-D group (the JSON leaves it out)
    offload: bool = False       # CPU offload (CPUOffloadPolicy): drawn only for adapters that
                                #   declare `offload = True`; numerics are unchanged by it
    ties: str = "kept"          # "kept" | "split" | "split_retie" (TIES); a model without a
                                #   tied parameter is the same at every value

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> str:
        """Compact JSON. ``offload`` appears only when True (``ties`` only when not "kept"), so a case without it prints the
        same replay line as before the field existed (and old lines load: it defaults False)."""
        d = dataclasses.asdict(self)
        d["model"] = dict(self.model)
        if d["mesh"] is None:   # 1-D cases print and replay exactly as before HSDP existed
            del d["mesh"]
        else:
            d["mesh"] = list(d["mesh"])
        if not d["offload"]:
            del d["offload"]
        if d["ties"] == "kept":   # likewise: a case with its ties kept prints as before
            del d["ties"]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"scenario JSON must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown scenario field(s) {unknown}")
        if isinstance(d.get("model"), dict):
            d["model"] = tuple(sorted(d["model"].items()))
        if isinstance(d.get("mesh"), list):
            d["mesh"] = tuple(d["mesh"])
        s = cls(**d)
        s.validate()
        return s

    # -- derived views ------------------------------------------------------------------------
    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The family's defaults overridden by `model`."""
        return {**family_module(self.family).DEFAULTS, **dict(self.model)}

    @property
    def k(self) -> int:
        """Micro-batches per rank, M / W."""
        return self.micro_batches // self.world_size

    def with_world_size(self, world_size: int) -> Scenario:
        """The same case at another world size. M is raised to `world_size` only where it would
        be smaller; otherwise M is kept, so deterministic results stay comparable across W."""
        s = dataclasses.replace(self, world_size=world_size,
                                micro_batches=max(self.micro_batches, world_size),
                                mesh=None if self.mesh is None else _mesh_at(self.mesh, world_size))
        s.validate()
        return s

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what is allowed."""
        fam = family_module(self.family)
        if not isinstance(self.model, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.model
        ):
            raise ValueError(f"model={self.model!r}: must be a tuple of (str, value) pairs")
        keys = [k for k, _ in self.model]
        if keys != sorted(set(keys)):
            raise ValueError(f"model keys {keys}: must be sorted and unique")
        for key, value in self.model:
            if key not in fam.DEFAULTS:
                raise ValueError(f"model.{key}: unknown for family {self.family!r}; "
                                 f"allowed: {sorted(fam.DEFAULTS)}")
            want = type(fam.DEFAULTS[key])
            if type(value) is not want:
                raise ValueError(f"model.{key}={value!r}: must be a {want.__name__}")
        fam.check(self.model_kwargs)
        if self.world_size not in ALL_WORLD_SIZES or isinstance(self.world_size, bool):
            raise ValueError(f"world_size={self.world_size!r}: must be a power of two from 1 to "
                             f"{ALL_WORLD_SIZES[-1]}")
        _one_of("mode", self.mode, MODES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("wrap", self.wrap, WRAPS)
        _one_of("ties", self.ties, TIES)
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: must be a finite float > 0")
        if not (isinstance(self.weight_decay, float) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay={self.weight_decay!r}: must be a finite float >= 0")
        for name in ("steps", "micro_batches", "micro_batch_size"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        m = self.micro_batches
        if m & (m - 1) or m < self.world_size:
            raise ValueError(f"micro_batches={m}: must be a power of two >= world_size={self.world_size}")
        if not isinstance(self.reshard_after_forward, bool):
            raise ValueError(f"reshard_after_forward={self.reshard_after_forward!r}: must be a bool")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload={self.offload!r}: must be a bool")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r}: must be an int in [0, 2**63)")
        if self.mesh is not None:
            if not (isinstance(self.mesh, tuple) and len(self.mesh) == 2
                    and all(_is_int(x) and x >= 1 for x in self.mesh)
                    and self.mesh[0] * self.mesh[1] == self.world_size):
                raise ValueError(f"mesh={self.mesh!r}: must be (R, S), two ints >= 1 with "
                                 f"R * S = world_size={self.world_size}, or null for 1-D")


def _mesh_at(mesh: tuple[int, int], world_size: int) -> tuple[int, int]:
    """The mesh shape at another world size: the same replicate dim where it divides, else 1-row."""
    R = mesh[0] if world_size % mesh[0] == 0 else 1
    return (R, world_size // R)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: allowed values are {list(allowed)}")


# -- seeds --------------------------------------------------------------------------------------

def _derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and platforms."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


"""A case as frozen data, and everything a rank (or the reference) rebuilds from it.

A `Scenario` is small, hashable, picklable and JSON-able; `build_model`, `make_batch`,
`loss_fn`, `wrap_units` and `make_optimizer` turn it into the same model, data, sharding plan and
optimizer in every process. One short module per model family lives next to this file; each
exposes DEFAULTS, check(kw), build(**kw), blocks(model), make_batch(kw, n, gen), loss(model, batch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from verify.scenarios import _hf, cs336, convnet, gpt, hf_gpt2, hf_llama, mlp, special

__all__ = [
    "Scenario", "FAMILIES", "CORE_FAMILIES", "HF_FAMILIES", "MODES", "OPTIMIZERS", "DTYPES", "WRAPS", "WORLD_SIZES", "ALL_WORLD_SIZES",
    "build_model", "init_weights", "make_batch", "cat_batches", "loss_fn", "wrap_units",
    "make_optimizer", "optimizer_spec", "grouped_optimizer", "no_decay", "param_names", "tree",
    "step_loss", "family_module", "is_family_path",
]

# The families every install has; the default Hypothesis draws take only these, so a seed draws
# the same cases with or without the optional extras.
CORE_FAMILIES = {"mlp": mlp, "gpt": gpt, "cs336": cs336, "convnet": convnet, "special": special}
# HuggingFace transformers models from tiny configs: present only where transformers is
# importable (`pip install -e '.[hf]'`); drawn only when asked for by name.
HF_FAMILIES = {"hf_gpt2": hf_gpt2, "hf_llama": hf_llama} if _hf.AVAILABLE else {}
FAMILIES = {**CORE_FAMILIES, **HF_FAMILIES}
MODES = ("fast", "deterministic")
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw")
DTYPES = ("fp32", "bf16")
WRAPS = ("per_block", "root_only", "every_leaf")
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

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> str:
        """Compact JSON. ``offload`` appears only when True, so a case without it prints the
        same replay line as before the field existed (and old lines load: it defaults False)."""
        d = dataclasses.asdict(self)
        d["model"] = dict(self.model)
        if d["mesh"] is None:   # 1-D cases print and replay exactly as before HSDP existed
            del d["mesh"]
        else:
            d["mesh"] = list(d["mesh"])
        if not d["offload"]:
            del d["offload"]
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
        return {**_family(self.family).DEFAULTS, **dict(self.model)}

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
        fam = _family(self.family)
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


FAMILY_INTERFACE = ("DEFAULTS", "check", "build", "blocks", "make_batch", "loss")
_PATH_FAMILIES: dict[str, Any] = {}


def is_family_path(name: str) -> bool:
    """A user's family named by import path (``pkg.module`` or ``pkg.module:obj``)."""
    return "." in name or ":" in name


def family_module(name: str):
    """The module (or object) of a family: a built-in name, or an import path whose object has
    the family interface (`FAMILY_INTERFACE`; optionally ``strategy()``, a Hypothesis strategy
    of keyword-argument dicts). ValueError naming what is wrong."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in ("hf_gpt2", "hf_llama"):
        raise ValueError(f"family={name!r} needs transformers, which is not installed: "
                         "pip install -e '.[hf]'")
    if not is_family_path(name):
        _one_of("family", name, tuple(FAMILIES))
    if name not in _PATH_FAMILIES:
        import importlib
        module_name, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
        except Exception as exc:
            raise ValueError(f"family {name!r}: cannot import it ({type(exc).__name__}: {exc})")
        missing = [a for a in FAMILY_INTERFACE if not hasattr(obj, a)]
        if missing:
            raise ValueError(f"family {name!r} lacks {', '.join(missing)} of the family interface "
                             f"({', '.join(FAMILY_INTERFACE)}; see the README)")
        if not isinstance(obj.DEFAULTS, dict):
            raise ValueError(f"family {name!r}: DEFAULTS must be a dict of keyword arguments")
        _PATH_FAMILIES[name] = obj
    return _PATH_FAMILIES[name]


_family = family_module


def _derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and platforms."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# -- model --------------------------------------------------------------------------------------

def build_model(s: Scenario, device: torch.device | str | None = None) -> nn.Module:
    """Construct the fp32 model on `device` and initialise it with `init_weights`.

    On the meta device nothing is initialised: materialise with `model.to_empty(device=...)`
    and then `init_weights(model, s)`, which gives the same bits as the eager build. The caller's
    global RNG state is left untouched.
    """
    fam = _family(s.family)
    with torch.random.fork_rng(devices=[]):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = fam.build(**s.model_kwargs)
        if not any(t.is_meta for t in _tensors(model)):
            torch.manual_seed(s.seed)
            init_weights(model, s)
    return model


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


@torch.no_grad()
def init_weights(model: nn.Module, s: Scenario) -> None:
    """Re-initialise every parameter and every buffer (non-persistent ones too), module by module
    in `named_modules()` order.

    Each tensor's value is a function of (seed, its name, its shape) alone, drawn on the CPU from
    its own generator, so it does not depend on what was initialised before it, on the device,
    or on whether the model was built on the meta device. Values are random everywhere (biases
    and gains too) so that a swapped or misplaced shard is visible from step 0:
      weights (>= 2-d): N(0, 1/fan_in); biases: N(0, 0.1^2); other 0-d/1-d params: 1 + N(0, 0.1^2);
      floating buffers: 1 + N(0, 0.1^2), unless the module defines `reset_buffers()`;
      integer buffers: zeros. A tied parameter is initialised once, under its first name.
    Ties are first restored by calling `tie_weights()` on every module that defines it, since
    Module.to_empty() (materialising a meta model) gives each alias its own tensor.
    """
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                _fill(p, _init_value(s, "param", dot + name, p))
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
            continue
        for name, b in module.named_buffers(recurse=False):
            _fill(b, _init_value(s, "buffer", dot + name, b))


def _init_value(s: Scenario, kind: str, name: str, t: torch.Tensor) -> torch.Tensor:
    shape = tuple(t.shape)
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros(shape, dtype=t.dtype)
    gen = torch.Generator().manual_seed(_derive_seed(s.seed, kind, name))
    noise = torch.randn(shape, generator=gen)
    if kind == "param" and len(shape) >= 2:
        return noise * (math.prod(shape[1:]) ** -0.5)
    if kind == "param" and name.endswith("bias"):
        return noise * 0.1
    return 1.0 + noise * 0.1


def _fill(t: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(value.shape):
        raise ValueError(f"init_weights: tensor of shape {tuple(t.shape)} where the unsharded "
                         f"model has {tuple(value.shape)}; initialise before sharding or while "
                         "unsharded")
    t.copy_(value)


def param_names(model: nn.Module) -> list[str]:
    """Parameter names as model.state_dict() has them: tied parameters under every name."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


# -- data and loss ------------------------------------------------------------------------------

def make_batch(s: Scenario, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global micro-batch `micro` of step `step`, on the CPU: a function of (seed, step, micro)
    only, independent of world size and rank."""
    gen = torch.Generator().manual_seed(_derive_seed(s.seed, "batch", step, micro))
    return _family(s.family).make_batch(s.model_kwargs, s.micro_batch_size, gen)


def cat_batches(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate micro-batches, in order, into one batch (fast mode's local or global batch)."""
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def loss_fn(s: Scenario, model: nn.Module, batch) -> torch.Tensor:
    """The scalar mean loss of `batch`, always fp32 (outputs are upcast before the loss)."""
    return _family(s.family).loss(model, batch)


def tree(xs: Sequence):
    """Balanced pairwise sum in order: the one summation order deterministic mode promises."""
    if not xs:
        raise ValueError("tree() of an empty sequence")
    if len(xs) == 1:
        return xs[0]
    half = len(xs) // 2
    return tree(xs[:half]) + tree(xs[half:])


def step_loss(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """A deterministic-mode step's loss: tree(per-micro-batch losses) / M."""
    return tree(list(losses)) / len(losses)


# -- sharding plan ------------------------------------------------------------------------------

def wrap_units(s: Scenario, model: nn.Module) -> list[nn.Module]:
    """The modules to shard, inner units first, the root last (and always).

    per_block: each block of the family. root_only: [model]. every_leaf: every module that
    directly owns parameters, except modules sharing a parameter with another module (a tied
    pair must stay inside one unit, so it falls to the nearest enclosing unit), then the root.
    Order is post-order (children before parents), so no unit precedes a unit inside it.
    """
    post = list(_post_order(model))
    if s.wrap == "root_only":
        units = []
    elif s.wrap == "per_block":
        units = _family(s.family).blocks(model)
    elif s.wrap == "every_leaf":
        owners: dict[int, int] = {}  # parameter id -> how many modules own it directly
        for m in post:
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        units = [m for m in post
                 if any(True for _ in m.parameters(recurse=False))
                 and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))]
    else:
        raise ValueError(f"wrap={s.wrap!r}: allowed values are {list(WRAPS)}")
    position = {id(m): i for i, m in enumerate(post)}
    units = sorted((m for m in units if m is not model), key=lambda m: position[id(m)])
    return units + [model]


def _post_order(module: nn.Module, seen: set[int] | None = None):
    """Every distinct module once, children before parents."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


# -- optimizer ----------------------------------------------------------------------------------

def no_decay(name: str) -> bool:
    """Parameters that get no weight decay, chosen by name: biases and norms."""
    parts = name.split(".")
    return name.endswith("bias") or any("norm" in p or p.startswith("ln") for p in parts)


def optimizer_spec(s: Scenario) -> tuple[type, dict]:
    """The scenario's optimizer class and keyword arguments (``weight_decay`` is the decay
    group's; `grouped_optimizer` gives biases and norms none).

    foreach=False and fused=False: the for-loop implementation does the same elementwise math on a
    shard as on the full tensor, on every device. The foreach/fused defaults depend on the device
    and may order or fuse the arithmetic differently, which would break bitwise equality.
    """
    common = dict(lr=s.lr, weight_decay=s.weight_decay, foreach=False, fused=False)
    if s.optimizer == "sgd":
        return torch.optim.SGD, dict(common, momentum=0.0)
    if s.optimizer == "sgd_momentum":
        return torch.optim.SGD, dict(common, momentum=0.9)
    if s.optimizer == "adam":
        return torch.optim.Adam, common
    if s.optimizer == "adamw":
        return torch.optim.AdamW, common
    raise ValueError(f"optimizer={s.optimizer!r}: allowed values are {list(OPTIMIZERS)}")


def grouped_optimizer(cls: type, kwargs: dict, named_params: Iterable[tuple[str, nn.Parameter]]):
    """``cls`` over ``named_params`` with parameter groups chosen BY NAME (a sharded parameter
    is a flat shard, so its shape cannot tell a norm from a weight): `no_decay` names get no
    weight decay, the others ``kwargs["weight_decay"]``; empty groups omitted."""
    decay, nodecay = [], []
    for name, p in named_params:
        (nodecay if no_decay(name) else decay).append(p)
    wd = kwargs.get("weight_decay", 0.0)
    groups = [{"params": ps, "weight_decay": w} for ps, w in ((decay, wd), (nodecay, 0.0)) if ps]
    return cls(groups, **kwargs)


def make_optimizer(s: Scenario, named_params: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """The scenario's optimizer (`optimizer_spec`) with its parameter groups (`grouped_optimizer`)."""
    cls, kwargs = optimizer_spec(s)
    return grouped_optimizer(cls, kwargs, named_params)

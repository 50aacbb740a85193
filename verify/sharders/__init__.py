"""The sharders the harness runs, each an adapter of the protocol in `verify.sharders.base`.

Built-ins (`fsdp_core`, `torch_fsdp2` alias `fsdp2`, `ddp`, `fsdp1`, `deepspeed_zero1`,
`deepspeed_zero2`, `deepspeed_zero3`) are short modules here and are
loaded through the same import path a user's adapter is (``pkg.module:Name``): nothing else in
the harness knows their names. `load(spec)` returns a fresh adapter instance; `resolve(spec)`
the canonical spelling of a spec (a built-in name or a path), as replay lines print it.
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable

from verify.ranks.global_state import adopt_imports
from verify.sharders.base import Sharder, StepTrace, WrapPlan, has_checkpointing

__all__ = ["Sharder", "WrapPlan", "StepTrace", "BUILTINS", "ALIASES", "DEFAULT_SHARDER",
           "SharderSpecError", "load_class", "display_name",
           "resolve", "load", "expand", "expand_checked", "has_checkpointing", "plan_for",
           "replay_env"]

BUILTINS = {
    "fsdp_core": "verify.sharders.fsdp_core:FsdpCore",
    "torch_fsdp2": "verify.sharders.torch_fsdp2:TorchFSDP2",
    "ddp": "verify.sharders.ddp:DDP",
    "fsdp1": "verify.sharders.fsdp1:FSDP1",
    "deepspeed_zero1": "verify.sharders.deepspeed_zero:DeepSpeedZero1",
    "deepspeed_zero2": "verify.sharders.deepspeed_zero:DeepSpeedZero2",
    "deepspeed_zero3": "verify.sharders.deepspeed_zero:DeepSpeedZero3",
}
ALIASES = {"fsdp2": "torch_fsdp2"}
DEFAULT_SHARDER = "fsdp_core"   # what --sharder defaults to (replay lines leave it out)


class SharderSpecError(ValueError):
    """A --sharder value that names no adapter (the CLI exits 2 on it)."""


def resolve(spec: str) -> str:
    """A built-in name (aliases folded) or ``pkg.module:Name`` as given; SharderSpecError for
    anything else. Importing is `load`'s job."""
    spec = spec.strip()
    spec = ALIASES.get(spec, spec)
    if spec in BUILTINS:
        return spec
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in module.split(".")) \
            or not all(p.isidentifier() for p in attr.split(".")):
        raise SharderSpecError(
            f"unknown sharder {spec!r}: give a built-in name ({', '.join(BUILTINS)}, alias "
            f"{', '.join(ALIASES)}) or an import path pkg.module:Name of a verify.Sharder subclass")
    return spec


_CLASSES: dict[str, type] = {}


def load_class(spec: str) -> type:
    """The adapter class a spec names (imported once per process)."""
    spec = resolve(spec)
    if spec in _CLASSES:
        return _CLASSES[spec]
    path = BUILTINS.get(spec, spec)
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise SharderSpecError(f"--sharder {spec}: cannot import {module_name!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
    obj = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise SharderSpecError(f"--sharder {spec}: module {module_name!r} has no attribute "
                               f"{attr!r}") from None
    if isinstance(obj, Sharder):
        obj = type(obj)
    if not (isinstance(obj, type) and issubclass(obj, Sharder)):
        raise SharderSpecError(f"--sharder {spec}: {attr!r} is a {type(obj).__name__}, not a "
                               "subclass of verify.Sharder (class MyFSDP(verify.Sharder): ...)")
    _check_declarations(spec, obj)
    _CLASSES[spec] = obj
    adopt_imports()  # in a pool rank: the module's import-time hooks are the adapter's own
    return obj


def _check_declarations(spec: str, cls: type) -> None:
    problems = []
    if cls.world not in ("group", "default"):
        problems.append(f"world = {cls.world!r} (allowed: 'group', 'default')")
    if not set(cls.modes) <= {"fast", "deterministic"} or not cls.modes:
        problems.append(f"modes = {cls.modes!r} (a non-empty subset of ('fast', 'deterministic'))")
    if not set(cls.dtypes) <= {"fp32", "bf16"} or not cls.dtypes:
        problems.append(f"dtypes = {cls.dtypes!r} (a non-empty subset of ('fp32', 'bf16'))")
    if cls.shard is Sharder.shard and cls.shard_with_optimizer is Sharder.shard_with_optimizer:
        problems.append("no shard() method")
    if problems:
        raise SharderSpecError(f"--sharder {spec}: {cls.__name__} declares " + "; ".join(problems))


def load(spec: str) -> Sharder:
    """A fresh adapter instance (one per case: adapters may keep per-case state)."""
    cls = load_class(spec)
    try:
        return cls()
    except Exception as exc:
        raise SharderSpecError(f"--sharder {spec}: {cls.__name__}() raised "
                               f"{type(exc).__name__}: {exc}") from exc


def replay_env(spec: str, family: str = "") -> str:
    """What a replay line must set before ``python -m verify replay`` for this adapter (and the
    scenario's ``family``, where it is a user's, named by import path) to import in a new shell:
    ``PYTHONPATH=... `` when one of their modules was imported from a directory on this
    process's PYTHONPATH (even the working directory: the line then works from any directory),
    else "" (an installed package, a built-in, or a module in the working directory alone, which
    ``python -m`` finds when the line is run from there)."""
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    paths = [p for p in (None if spec in BUILTINS else spec,
                         family if ("." in family or ":" in family) else None) if p]
    if not entries or not paths:
        return ""
    resolved = [str(Path(e).resolve()) for e in entries]   # absolute: "." means here only
    for path in paths:
        name = path.partition(":")[0]
        try:   # not imported yet (a line made before the case ran): import it to see where from
            where = getattr(sys.modules.get(name) or importlib.import_module(name), "__file__", None)
        except Exception:   # noqa: BLE001 - a module that does not import: its case says so
            where = None
        if where is None:
            continue
        root = Path(where).resolve().parents[name.count(".") + (Path(where).stem == "__init__")]
        if str(root) in resolved:
            return f"PYTHONPATH={shlex.quote(os.pathsep.join(resolved))} "
    return ""


def display_name(spec: str) -> str:
    """What reports show: the adapter's ``name``."""
    return str(getattr(load_class(spec), "name", spec))


def expand(specs: Iterable[str]) -> list[str]:
    """Canonical specs, in order, once each; "all" is every built-in (fsdp_core first)."""
    out: list[str] = []
    for spec in specs:
        for one in (BUILTINS if spec == "all" else (resolve(spec),)):
            if one not in out:
                out.append(one)
    return out


def expand_checked(specs: Iterable[str]) -> list[str]:
    """`expand`, then every adapter imported now, in this process: a path that does not import
    or an object that is not a `verify.Sharder` raises `SharderSpecError` before any rank starts
    (the CLI makes it exit 2, the pytest plugin a usage error)."""
    out = expand(specs)
    for spec in out:
        load_class(spec)
    return out


def plan_for(s, model) -> WrapPlan:
    """The scenario's `WrapPlan` for ``model`` (built from the scenario, unsharded)."""
    # lazy: `from verify import Sharder` runs this package, which must import without torch
    import torch
    from verify.scenarios import optimizer_spec, wrap_units  # lazy: imports torch (as above)
    names = {id(m): n for n, m in model.named_modules()}
    units = tuple((names[id(m)], m) for m in wrap_units(s, model))
    cls, kwargs = optimizer_spec(s)
    bf16 = s.dtype == "bf16"
    return WrapPlan(units=units, reshard_after_forward=s.reshard_after_forward,
                    param_dtype=torch.bfloat16 if bf16 else None,
                    reduce_dtype=torch.float32 if bf16 else None,
                    deterministic=s.mode == "deterministic", offload=bool(getattr(s, "offload", False)),
                    optimizer_cls=cls, optimizer_kwargs=kwargs, mesh=s.mesh)

"""What one case may leave behind in a rank process, and undoing it before the next.

[Note: global state between cases]
Pool ranks run case after case (verify/ranks/pool.py), and foreign sharders change process-global
state: a default dtype or device, torch.backends flags, deterministic-algorithm and denormal
modes, global module and optimizer hooks. Left alone, that changes the verdicts
of every later case, of any sharder: oneDNN switched off changes convolution kernels (a bitwise
failure for a correct sharder at W = 1), a global optimizer hook that all-reduces is counted as
the next sharder's collective, a meta default device makes every later tensor meta. (Warning
filters are left alone: torch's own modules add theirs when a case first imports them.)

`GlobalState` snapshots that state when the rank is up (the harness's own settings) and, after
every case, restores the settings and removes the hooks the case added, and says what it undid
(the rank writes it to stderr, which the parent forwards: the sharder's author learns that their
code leaks). What a sharder left is kept for it and given back before its next case: code that
registers a process-wide hook once (a flag in a module global) or sets a flag once keeps working
in its own cases, and no other sharder's case sees it. Hooks and ``torch.distributed`` wrappers
that an adapter's module installs when it is *imported* are the adapter's own and stay
(`adopt_imports`, called once the adapter class is loaded); the imports happen before a case
installs the harness's own wrappers (verify/case/train.py), so restoring those never removes the
adapter's.

A destroyed default process group (``dist.destroy_process_group()`` in ``shard()``) cannot be
undone: `group_problem` says so and the rank restarts (rank.py), and the case is an error.

[Note: group names inside a case]
``dist.new_group`` names a group by a per-process counter (``_world.group_count``) that every
caller advances, and ranks that disagree on a group's name wait for each other forever. A case
that creates a group on some ranks only (or on the ranks of a case smaller than the pool, while
the others idle) leaves the counters out of step, and the next case, of any sharder, that creates
a group hangs and takes the blame. `align_group_names` sets the counter, before every task, to a
value that the task alone decides (its number, the same on every rank of it): a case starts with
the counters in step whatever an earlier one did, and its names are new.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["GlobalState", "adopt_imports", "align_group_names"]

_GROUP_NAMES_PER_TASK = 1 << 12
_GROUP_NAMES_BASE = 1 << 24   # above any count the pool's own start-up reaches


def align_group_names(task: int) -> None:
    """See [Note: group names inside a case]; another torch without the counter: nothing to do."""
    from torch.distributed import distributed_c10d as c10d  # lazy: no torch at import (rank.py's rule)
    world = getattr(c10d, "_world", None)
    if world is not None and hasattr(world, "group_count"):
        world.group_count = _GROUP_NAMES_BASE + task * _GROUP_NAMES_PER_TASK

_CURRENT: Optional["GlobalState"] = None   # this rank process's guard (None outside a pool rank)
_TABLES: dict[str, Any] = {}   # the hook tables, found once (module globals: their identity stays)


def adopt_imports() -> None:
    """Keep the hooks present now (an adapter module's import-time ones) in every later case."""
    if _CURRENT is not None:
        _CURRENT.hooks = _hook_keys()


def _flags(torch: Any) -> list[tuple[str, Callable[[], Any], Callable[[Any], None]]]:
    """(label, get, set) of every setting restored after a case; those this build lacks are left out."""
    b = torch.backends
    out: list[tuple[str, Callable[[], Any], Callable[[Any], None]]] = [
        ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
        ("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
        ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
        ("torch.are_deterministic_algorithms_enabled()",
         lambda: (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        ("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
         torch.set_float32_matmul_precision),
    ]
    if hasattr(torch, "get_default_device"):
        out.append(("torch.get_default_device()", lambda: str(torch.get_default_device()),
                    lambda v: torch.set_default_device(None if v == "cpu" else v)))
    for mod, attrs in ((getattr(b, "mkldnn", None), ("enabled", "deterministic")),
                       (getattr(b, "cudnn", None), ("enabled", "benchmark", "deterministic",
                                                     "allow_tf32")),
                       (getattr(b, "nnpack", None), ("enabled",)),
                       (getattr(b, "opt_einsum", None), ("enabled",))):
        for attr in attrs:
            if mod is not None and _readable(mod, attr):
                out.append((f"{mod.__name__}.{attr}", _getter(mod, attr), _setter(mod, attr)))
    matmul = getattr(getattr(b, "cuda", None), "matmul", None)
    for attr in ("allow_tf32", "allow_fp16_reduced_precision_reduction",
                 "allow_bf16_reduced_precision_reduction"):
        if matmul is not None and _readable(matmul, attr):
            out.append((f"torch.backends.cuda.matmul.{attr}", _getter(matmul, attr),
                        _setter(matmul, attr)))
    return out


def _readable(obj: Any, attr: str) -> bool:
    try:
        getattr(obj, attr)
        return True
    except Exception:
        return False


def _getter(obj: Any, attr: str) -> Callable[[], Any]:
    return lambda: getattr(obj, attr)


def _setter(obj: Any, attr: str) -> Callable[[Any], None]:
    return lambda v: setattr(obj, attr, v)


def _hook_tables() -> dict[str, Any]:
    """Every process-global hook table of nn.Module and torch.optim, by a readable name."""
    if _TABLES:
        return _TABLES
    from torch.nn.modules import module as nn_module  # lazy: no torch at import (rank.py's rule)
    from torch.optim import optimizer as optim_module  # lazy: likewise
    tables = _TABLES
    for mod, label in ((nn_module, "torch.nn.modules.module"),
                       (optim_module, "torch.optim.optimizer")):
        for name in dir(mod):
            table = getattr(mod, name)
            if name.startswith("_global_") and name.endswith("hooks") and hasattr(table, "keys"):
                tables[f"{label}.{name}"] = table
    return tables


def _hook_keys() -> dict[str, set]:
    return {name: set(table.keys()) for name, table in _hook_tables().items()}


class GlobalState:
    """The rank's settings and hooks as the harness set them, and what each sharder left
    changed; `enter` before a case, `restore` after it (see [Note: global state between cases])."""

    def __init__(self, torch: Any):
        global _CURRENT
        self.torch = torch
        self.flags = _flags(torch)
        self.settings = {label: get() for label, get, _ in self.flags}
        self.hooks = _hook_keys()
        self.full_backward_flag = self._full_backward_flag()
        # per sharder: the settings it changed and the hooks it added ({label: value},
        # {table: {key: hook}}), given back before its next case
        self.left: dict[str, tuple[dict, dict]] = {}
        _CURRENT = self

    @staticmethod
    def _full_backward_flag() -> Any:
        from torch.nn.modules import module as nn_module  # lazy: no torch at import (rank.py's rule)
        return nn_module._global_is_full_backward_hook

    def enter(self, owner: Optional[str]) -> None:
        """Before a case of ``owner``: the process as that sharder's earlier cases left it (a
        hook it registers once per process, a flag it sets once, stay its own)."""
        settings, hooks = self.left.get(owner, ({}, {})) if owner else ({}, {})
        for label, _, put in self.flags:
            if label in settings:
                try:
                    put(settings[label])
                except Exception:
                    pass
        tables = _hook_tables()
        for name, kept in hooks.items():
            if name in tables:
                tables[name].update(kept)

    def given_back(self, owner: Optional[str]) -> str:
        """What `enter` gave ``owner`` back (for an error of its case), or ""."""
        settings, hooks = self.left.get(owner, ({}, {})) if owner else ({}, {})
        parts = [f"{label} = {value!r}" for label, value in settings.items()]
        parts += [f"{len(kept)} hook(s) in {name}" for name, kept in hooks.items() if kept]
        return ("before this case, the process was given back what this sharder's earlier cases "
                "left in it: " + "; ".join(parts)) if parts else ""

    def in_effect(self, owner: Optional[str]) -> list[str]:
        """After `restore`: the settings and hooks ``owner``'s case ran with that the harness's
        own process (and so the reference) does not have, one line each ("" if none)."""
        settings, hooks = self.left.get(owner, ({}, {})) if owner else ({}, {})
        out = [f"{label} = {value!r} (the harness's: {self.settings[label]!r})"
               for label, value in settings.items()]
        return out + [f"{len(kept)} hook(s) in {name}" for name, kept in hooks.items() if kept]

    def restore(self, owner: Optional[str] = None) -> list[str]:
        """After a case of ``owner``: undo what it changed (kept for its next case); one line
        per thing undone that was not already undone after one of its earlier cases."""
        settings, hooks = self.left.setdefault(owner, ({}, {})) if owner else ({}, {})
        undone = []
        for label, get, put in self.flags:
            try:
                now = get()
                if now != self.settings[label]:
                    put(self.settings[label])
                    if settings.get(label, self.settings[label]) != now:
                        undone.append(f"{label} was {now!r}, set back to {self.settings[label]!r}")
                    settings[label] = now
                else:
                    settings.pop(label, None)
            except Exception as exc:  # a flag this build cannot set back: say so, go on
                undone.append(f"{label} could not be set back: {type(exc).__name__}: {exc}")
        # no getter exists for flush-denormal mode; the harness never sets it
        self.torch.set_flush_denormal(False)
        for name, table in _hook_tables().items():
            kept = hooks.setdefault(name, {})
            added = {k: table[k] for k in list(table.keys()) if k not in self.hooks.get(name, set())}
            for k in added:
                del table[k]
            for k in [k for k in kept if k not in added]:   # removed by its owner meanwhile
                del kept[k]
            new = [k for k in added if k not in kept]
            kept.update(added)
            if new:
                undone.append(f"{len(new)} hook(s) added to {name} removed")
        from torch.nn.modules import module as nn_module  # lazy: no torch at import (rank.py's rule)
        nn_module._global_is_full_backward_hook = self.full_backward_flag
        return undone

    @staticmethod
    def group_problem(groups: list) -> Optional[str]:
        """Why this rank's process groups can no longer serve cases (None: they can)."""
        import torch.distributed as dist  # lazy: no torch at import (rank.py's rule)
        if not dist.is_initialized():
            return ("the default process group was destroyed during the case (a "
                    "dist.destroy_process_group() call): a sharder must leave the process "
                    "groups it is given alive")
        try:
            known = dist.distributed_c10d._world.pg_map
        except AttributeError:  # another torch's internals: nothing more to check
            return None
        lost = [g for g in groups if g is not None and g not in known]
        if lost:
            return (f"{len(lost)} of the harness's process groups were destroyed during the case "
                    "(dist.destroy_process_group(group)): a sharder must leave the groups it is "
                    "given alive")
        return None

"""Under torchrun: this process is itself a rank.

`current_rank_context` is this process as a rank of the default group (initialised from the
launcher's env if needed); `TorchrunContext` offers `RankPool.run` in-process, so a campaign or
pytest launched by torchrun runs its cases on the launched processes instead of a spawned pool.

This module imports without torch (verify/cli.py calls `is_torchrun` while it parses arguments);
the functions that need torch import it when they run.
"""
from __future__ import annotations

import os
import pickle
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional

from verify.ranks.global_state import align_group_names
from verify.ranks.rank import PoolResult, RankContext, pool_world_sizes, qualified_name

if TYPE_CHECKING:
    import torch

__all__ = ["TorchrunContext", "ProcessGroupLost", "current_rank_context", "is_torchrun"]


def is_torchrun() -> bool:
    """True when this process was launched as a rank by torchrun (or a compatible launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _init_default_group(backend: Optional[str], timeout_s: Optional[float] = None) -> bool:
    """Initialise the default group from the launcher's env unless it is; True if we did.
    ``timeout_s``: the group's collective timeout (a rank stuck past it makes the others
    raise instead of waiting forever)."""
    # lazy: no torch at import (module docstring)
    import torch
    import torch.distributed as dist  # lazy: likewise
    torch.set_num_threads(1)
    if dist.is_initialized():
        return False
    if backend is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local \
            else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, **extra)
    return True


def _default_device() -> "torch.device":
    # lazy: no torch at import (module docstring)
    import torch
    import torch.distributed as dist  # lazy: likewise
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_rank_context(*, backend: Optional[str] = None) -> RankContext:
    """This process as a rank of the default group (initialised from torchrun's env if needed)."""
    # lazy: no torch at import (module docstring)
    import torch.distributed as dist
    _init_default_group(backend)
    return RankContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       group=dist.group.WORLD, device=_default_device())


class TorchrunContext:
    """`RankPool.run` for a process that is itself a rank (pytest or `python -m verify` under
    torchrun).

    Every rank must call `run` with the same arguments in the same order. Ranks below the world
    size run `fn` in-process on their sub-group; then every rank gathers every rank's outcome,
    so all ranks return the same `PoolResult` (the same verdict, so Hypothesis shrinks in step
    and no rank asserts alone). In-process runs cannot be interrupted: ``timeout_s`` is the
    process groups' collective timeout instead (a rank waiting on a peer that raised or hangs
    raises after it). After a failed run the sub-groups are built anew on every rank (a
    collective that timed out can leave a group unusable); if the default group itself does not
    survive, `run` raises `ProcessGroupLost` and the campaign ends with what it has.
    """

    def __init__(self, *, backend: Optional[str] = None, timeout_s: Optional[float] = None):
        self._owns_default_group = _init_default_group(backend, timeout_s)
        base = current_rank_context()
        self.rank, self.max_world_size, self.device = base.rank, base.world_size, base.device
        self.world_sizes = pool_world_sizes(self.max_world_size)
        self.timeout_s = None   # no per-run bound: see the class docstring
        self._group_timeout = timeout_s
        self._contexts: dict[int, RankContext] = {}
        self._build_groups(base.group)
        self.spawned_count, self.restarts = 0, 0
        self._tasks = 0   # every rank runs every task, in one order: the same count everywhere

    def _build_groups(self, world) -> None:
        """A fresh group per world size (the full size too: the default group stays for
        sharders that use it, ``world = "default"``), and a control group for the outcomes,
        whose timeout outlasts a case's (a rank that raised waits there while its peers time
        out in the case's collectives)."""
        # lazy: no torch at import (module docstring)
        import torch.distributed as dist
        t = self._group_timeout
        case = {} if t is None else {"timeout": timedelta(seconds=t)}
        control = {} if t is None else {"timeout": timedelta(seconds=2 * t + 60)}
        self._contexts.clear()
        every = list(range(self.max_world_size))
        self._control = dist.new_group(every, **control) if self.max_world_size > 1 else world
        for w in self.world_sizes:                     # same order on every rank
            group = dist.new_group(list(range(w)), **case)
            if self.rank < w:
                self._contexts[w] = RankContext(self.rank, w, group, self.device)

    def context(self, world_size: int) -> Optional[RankContext]:
        """This rank's context at `world_size`, or None when it is idle at that size."""
        self._check(world_size)
        return self._contexts.get(world_size)

    def run(self, world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any, *,
            timeout_s: Optional[float] = None) -> PoolResult:
        # lazy: no torch at import (module docstring)
        import torch.distributed as dist
        self._check(world_size)
        start = time.perf_counter()
        ctx = self._contexts.get(world_size)
        mine: tuple[bool, Any] = (True, None)
        self._tasks += 1
        align_group_names(self._tasks)   # [Note: group names inside a case], global_state.py
        if ctx is not None:
            try:
                mine = (True, fn(payload, ctx))
                pickle.dumps(mine)          # fail here, on this rank, not inside the gather
            except Exception:
                mine = (False, f"rank {self.rank} raised in {qualified_name(fn)} at world size "
                               f"{world_size}:\n{traceback.format_exc()}")
        gathered: list = [None] * self.max_world_size
        try:
            dist.all_gather_object(gathered, mine, group=self._control)
        except Exception as exc:
            raise ProcessGroupLost(f"rank {self.rank}: the default process group did not survive "
                                   f"a run of {qualified_name(fn)} at world size {world_size} "
                                   f"({type(exc).__name__}: {exc})") from exc
        wall = time.perf_counter() - start
        outcomes = gathered[:world_size]
        errors = [v for ok, v in outcomes if not ok]
        if errors:
            self.restarts += 1
            align_group_names(self._tasks)   # whatever the failed case left on some ranks
            self._build_groups(dist.group.WORLD)   # every rank saw the same errors
            return PoolResult(False, None, "\n\n".join(errors), wall)
        return PoolResult(True, [v for _, v in outcomes], None, wall)

    def submit(self, world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any, *,
               timeout_s: Optional[float] = None) -> "_Done":
        """``RankPool.submit``'s shape: this process is a rank, so the task runs here, now."""
        return _Done(self.run(world_size, fn, payload, timeout_s=timeout_s))

    def settle(self, timeout_s: float = 600.0) -> None:
        """Called by every rank once rank 0 has written the reports: the others wait for it here.
        A rank that returned at once with a failing exit code would have torchrun stop rank 0 in
        the middle of writing. Through the launcher's store, which outlives a process group that
        a hung case broke; where there is no store, nothing to wait on."""
        # lazy: no torch at import (module docstring)
        import torch.distributed as dist
        try:
            store = dist.distributed_c10d._get_default_store()
            key = f"verify-reports-written-{self._tasks}"
            if self.rank == 0:
                store.set(key, "1")
            else:
                store.wait([key], timedelta(seconds=timeout_s))
        except Exception:   # no default group or store (another torch), or rank 0 died
            pass

    def close(self) -> None:
        """Destroy the process groups if this context created the default group (a rank that
        exits with live gloo groups can abort at interpreter teardown)."""
        # lazy: no torch at import (module docstring)
        import torch.distributed as dist
        if self._owns_default_group and dist.is_initialized():
            try:
                dist.barrier()
            except Exception:   # a group a hung case broke: the reports still get written
                pass
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        self._owns_default_group = False
        self._contexts.clear()

    def __enter__(self) -> "TorchrunContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, world_size: int) -> None:
        if world_size not in self.world_sizes:
            raise ValueError(f"world_size {world_size!r} cannot run under torchrun with "
                             f"{self.max_world_size} ranks; allowed: "
                             f"{', '.join(map(str, self.world_sizes))}")


class ProcessGroupLost(RuntimeError):
    """Under torchrun: a rank raised or hung and the default group did not survive it."""


class _Done:
    def __init__(self, result: PoolResult):
        self._result = result

    def result(self) -> PoolResult:
        return self._result

"""The ranks a campaign or a test session runs its cases on: one `RankPool` (or, under torchrun,
the launched processes) with a sub-group per world size, plus, for sharders that use the
default process group (``world = "default"``), one pool per world size whose default group is
exactly that many ranks: spawned on first use, kept for the rest of the run, its startup time
recorded (`default_pool_startups`) so the report can say what it cost.

`PoolSet` offers `run`/`submit`/`world_sizes` of the main pool, so code and tests that take a
pool take a `PoolSet` too.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Optional

import fsdp_core

from verify.ranks.pool import RankPool
from verify.ranks.rank import probe
from verify.sharders import load_class

IMPORT_TIMEOUT_S = 600.0   # an adapter's import on the ranks (a case's own timeout starts after)

__all__ = ["PoolSet", "as_pool_set"]


class PoolSet:
    def __init__(self, main: Any, *, timeout_s: Optional[float] = None):
        self.main = main
        self.timeout_s = timeout_s
        self._default: dict[int, Any] = {}
        self.default_pool_startups: dict[int, float] = {}   # W -> seconds to spawn and serve
        self._hsdp_ready: set = set()
        self._imported: set = set()
        self._hung: dict[str, str] = {}   # spec -> why: an import that timed out, not retried

    # -- the main pool's surface ------------------------------------------------------------------
    @property
    def world_sizes(self):
        return self.main.world_sizes

    @property
    def max_world_size(self) -> int:
        return self.main.max_world_size

    @property
    def pids(self) -> list[int]:
        return list(getattr(self.main, "pids", []))

    @property
    def spawned_count(self) -> int:
        return getattr(self.main, "spawned_count", 0) + sum(
            getattr(p, "spawned_count", 0) for p in self._default.values())

    @property
    def restarts(self) -> int:
        return getattr(self.main, "restarts", 0)

    def run(self, *a, **kw):
        return self.main.run(*a, **kw)

    def submit(self, *a, **kw):
        return self.main.submit(*a, **kw)

    # -- per sharder ------------------------------------------------------------------------------
    def for_world(self, world: str, world_size: int) -> tuple[Optional[Any], str]:
        """(the pool to run a case of ``world_size`` on for a sharder whose ``world`` is
        given, or None, and why not: a case is skipped, not an error, where the ranks are too
        few for it)."""
        sizes = getattr(self.main, "world_sizes", None)   # (a test's stand-in may have none)
        if world == "group" and sizes is not None and world_size not in sizes:
            return None, (f"world size {world_size} needs more ranks than "
                          f"{self.main.max_world_size}")
        if world == "group" or world_size == self.main.max_world_size:
            return self.main, ""
        if not isinstance(self.main, RankPool):   # under torchrun: the launched processes only
            return None, (f"the sharder uses the default process group, which here has "
                          f"{self.main.max_world_size} ranks; launch {world_size} "
                          f"process{'es' if world_size > 1 else ''} for W={world_size}")
        if world_size not in self._default:
            t0 = time.perf_counter()
            pool = RankPool(world_size, timeout_s=self.timeout_s or self.main.timeout_s)
            res = pool.run(world_size, probe, None)   # pays the startup now, measured
            if not res.ok:
                pool.close()
                raise RuntimeError(f"a pool of {world_size} ranks for a default-group sharder "
                                   f"failed to start:\n{res.error}")
            self._default[world_size] = pool
            self.default_pool_startups[world_size] = time.perf_counter() - t0
        return self._default[world_size], ""

    def import_adapter(self, pool: Any, spec: str) -> Optional[str]:
        """Import the adapter ``spec`` on every rank of ``pool`` (once per set of processes),
        under its own limit (`IMPORT_TIMEOUT_S`) rather than a case's: a slow import (DeepSpeed
        checks its op builders; W ranks import at once on few cores) is not a hang. Why it
        failed, or None. An import that timed out is not tried again in this run: every case
        of the adapter would wait out the limit again (a raise is retried: it costs little)."""
        key = (id(pool), getattr(pool, "restarts", 0), spec)
        if spec in self._hung:
            return self._hung[spec]
        if key in self._imported or not isinstance(pool, RankPool):
            return None
        res = pool.run(pool.max_world_size, import_adapter, spec, timeout_s=IMPORT_TIMEOUT_S)
        if not res.ok:
            why = f"importing the adapter {spec} on the ranks failed:\n{res.error}"
            if "timed out after" in (res.error or ""):
                self._hung[spec] = (f"importing the adapter {spec} on the ranks timed out earlier "
                                    f"in this run, so it is not tried again:\n{res.error}")
            return why
        self._imported.add(key)
        return None

    def prepare_hsdp(self, pool: Any) -> None:
        """Create, on every rank of ``pool``, the sub-groups of every 2-D mesh shape that fits
        it (`fsdp_core.prepare_hsdp_groups`: a sub-mesh of a case's ranks can only be built
        from groups every rank of the default group created); once per set of processes."""
        key = (id(pool), getattr(pool, "restarts", 0))
        if key in self._hsdp_ready:
            return
        res = pool.run(pool.max_world_size, prepare_hsdp_groups, None)
        if not res.ok:
            raise RuntimeError(f"preparing the HSDP sub-groups failed:\n{res.error}")
        self._hsdp_ready.add(key)

    def close(self) -> None:
        for pool in self._default.values():
            pool.close()
        self._default.clear()
        self.main.close()

    def __enter__(self) -> "PoolSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def mesh_shapes(world_size: int) -> list[tuple[int, int]]:
    """Every (R, S) with R * S a power of two up to ``world_size``, R and S powers of two."""
    out, w = [], 2
    while w <= world_size:
        r = 1
        while r <= w:
            out.append((r, w // r))
            r *= 2
        w *= 2
    return out


def import_adapter(spec: str, ctx) -> bool:
    """Rank side of `PoolSet.import_adapter`: before any case, so that the adapter's
    import-time wrappers stay under the harness's ([Note: global state between cases])."""
    load_class(spec)
    return True


def prepare_hsdp_groups(payload: Any, ctx) -> bool:
    """Rank side of `PoolSet.prepare_hsdp` (every rank of the pool, at its full world size)."""
    fsdp_core.prepare_hsdp_groups(mesh_shapes(ctx.world_size))
    return True


_WRAPPED: "weakref.WeakKeyDictionary[Any, PoolSet]" = weakref.WeakKeyDictionary()


def as_pool_set(pool: Any) -> PoolSet:
    """A `PoolSet` around ``pool`` (itself if it is one; the same one for the same pool, so the
    default-group pools it spawns are spawned once)."""
    if isinstance(pool, PoolSet):
        return pool
    if pool not in _WRAPPED:
        _WRAPPED[pool] = PoolSet(pool)
    return _WRAPPED[pool]

"""Ranks spawned fresh for one task, as a harness without a pool would run them: `spawn_run`
(a task on fresh processes, timed) and `measure_overhead` (what the pool saves: a trivial
all-reduce through a `RankPool` against spawning processes for it). For measurement only.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from verify.ranks.rank import RankContext, keep_on_loopback, open_store, private_store_dir

if TYPE_CHECKING:   # only an annotation: a fresh rank (which imports this module) needs no pool
    from verify.ranks.pool import RankPool

__all__ = ["OverheadMeasurement", "measure_overhead", "spawn_run"]


class OverheadMeasurement(NamedTuple):
    pool_s: float        # median seconds per trivial task through the pool
    spawn_s: float       # mean seconds per task when spawning fresh processes for it
    ratio: float         # spawn_s / pool_s: how many times cheaper the pool is


def _trivial_collective(payload: Any, ctx: RankContext) -> float:
    t = torch.ones(1, device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    return t.item()


def _fresh_rank(rank: int, world_size: int, store_path: str, prefix: str,
                blob: Optional[bytes] = None, conn: Any = None) -> None:
    """A rank spawned for one task: init a gloo group, run the task (``blob``: a pickled
    ``(fn, payload)``, sent back through ``conn``; none: a trivial all-reduce), tear down."""
    torch.set_num_threads(1)
    keep_on_loopback()
    store = open_store(store_path)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size)
    if blob is not None:
        fn, payload = pickle.loads(blob)
        ctx = RankContext(rank=rank, world_size=world_size, group=dist.group.WORLD,
                          device=torch.device("cpu"))
        conn.send_bytes(pickle.dumps(fn(payload, ctx)))
        dist.destroy_process_group()
        return
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    if t.item() != world_size:
        raise SystemExit(2)


def _spawn_once(world_size: int, number: int, task: Optional[tuple[Callable, Any]] = None
                ) -> tuple[float, Optional[list]]:
    """Spawn ``world_size`` fresh ranks for one task; (seconds until all exited, their values)."""
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    store_dir = private_store_dir("spawn")      # mode 0700, removed below
    try:
        return _run_fresh(ctx, world_size, number, task, os.path.join(store_dir, "store"), start)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def _run_fresh(ctx: Any, world_size: int, number: int, task: Optional[tuple[Callable, Any]],
               store_path: str, start: float) -> tuple[float, Optional[list]]:
    blob = None if task is None else pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)] if task is not None else []
    procs = [ctx.Process(target=_fresh_rank, daemon=True,
                         args=(r, world_size, store_path, f"fresh/{os.getpid()}/{number}", blob,
                               pipes[r][1] if pipes else None))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()   # the ranks hold the write ends: one that dies without a value is EOF here
    values, lost = ([], []) if pipes else (None, [])
    for r, (recv, _) in enumerate(pipes):
        try:
            values.append(pickle.loads(recv.recv_bytes()))
        except EOFError:
            lost.append(r)
    for p in procs:
        p.join(300)
    elapsed = time.perf_counter() - start
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0 or r in lost]
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    if bad:
        raise RuntimeError(f"fresh-spawn measurement failed: (rank, exit code) {bad}")
    return elapsed, values


def spawn_run(world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any,
              number: int = 0) -> tuple[float, list]:
    """Run ``fn(payload, ctx)`` on ``world_size`` freshly spawned ranks, as a harness without a
    pool would: (seconds from spawn to exit, the values in rank order). For measurement only:
    no timeout handling beyond the join."""
    elapsed, values = _spawn_once(world_size, number, (fn, payload))
    return elapsed, values


def measure_overhead(pool: "RankPool", world_size: int, n: int = 20, *,
                     n_spawn: int = 1) -> OverheadMeasurement:
    """Per-task cost of a trivial all-reduce via `pool` vs spawning fresh processes for it.

    The pool figure is the median of `n` runs after one warm-up; the spawn figure is the mean
    of `n_spawn` runs of: spawn `world_size` processes, import torch, init a gloo group,
    all-reduce, tear down. Both are measured now, on this machine (compare ratios, not times).
    """
    if n < 1 or n_spawn < 1:
        raise ValueError(f"n and n_spawn must be >= 1, got n={n}, n_spawn={n_spawn}")
    warm = pool.run(world_size, _trivial_collective, None)
    if not warm.ok:
        raise RuntimeError(f"the pool failed the trivial task:\n{warm.error}")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = pool.run(world_size, _trivial_collective, None)
        times.append(time.perf_counter() - t0)
        if not res.ok:
            raise RuntimeError(f"the pool failed the trivial task:\n{res.error}")
    times.sort()
    pool_s = times[len(times) // 2]
    spawn_s = sum(_spawn_once(world_size, i)[0] for i in range(n_spawn)) / n_spawn
    return OverheadMeasurement(pool_s=pool_s, spawn_s=spawn_s, ratio=spawn_s / pool_s)

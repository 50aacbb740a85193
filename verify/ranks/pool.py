"""A persistent pool of ranks: spawn the processes once, run many cases on them.

Spawning a fresh set of processes per case costs seconds (every rank imports torch and builds a
process group); sending a case to ranks that are already up costs well under a millisecond of
pool overhead. So a test session or a CLI run starts one `RankPool` of `max_world_size` ranks on
one process group, with a sub-group for every world size 1, 2, 4, ... inside it, and sends each
case to ranks `0..W-1` of the sub-group of size W. Idle ranks do nothing.

A case is a module-level function `fn(payload, ctx)` (pickled by reference) and a picklable
payload; the values the ranks return come back in rank order. Failure is a result, not a hang:

- a rank that raises: its traceback comes back in `PoolResult.error`;
- a rank that dies (`os._exit`, a signal) or hangs (say, in a collective another rank skipped):
  the run ends within its timeout with a failed result, and the pool kills every rank and starts
  a fresh set for the next run. The fresh ranks start importing at once, in the background.

[Note: why a pool survives a raising rank]
When every rank of a run reports back (returned or raised), every collective that any of them
entered was matched, so the process group is reusable. A cheap probe (an all-reduce with a
known answer and a barrier, bounded in time) confirms it before the next run; if the probe
fails, or some rank never reported, the pool restarts instead.

[Note: no orphan ranks]
Ranks are children of the process that built the pool. `close()` stops them (and a
`weakref.finalize` runs it at interpreter exit). If that process dies without closing, each rank
has a watchdog thread that waits on multiprocessing's parent sentinel (a pipe that reaches EOF
when the parent is gone) and calls `os._exit` -- it works even while the main thread is stuck
in a collective.

[Note: a hung rank's traceback] (verify/ranks/failure.py): a rank that dies or hangs is
reported with its last stderr output, its Python stacks and the collectives each rank issued.

[Note: nothing on the network] (verify/ranks/generation.py): the ranks meet through a file in
a private directory and listen on loopback only.

This module is the parent side; what runs inside a rank is in verify/ranks/rank.py (and the
torchrun variant, where the process is already a rank, in verify/ranks/torchrun.py); ranks
spawned fresh for one task, to measure what the pool saves, in verify/ranks/spawn.py.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
import time
import traceback
import weakref
from multiprocessing.connection import wait
from typing import Any, Callable, NamedTuple, Optional

import torch

from verify.ranks.failure import collective_sequences, describe_exit, last_words, stacks
from verify.ranks.generation import Generation
from verify.ranks.rank import (
    PoolResult,
    RankContext,
    pool_world_sizes,
    probe,
    qualified_name,
)

__all__ = ["RankPool", "PendingRun"]

_ERROR_GRACE_S = 2.0
_PROBE_TIMEOUT_S = 10.0


def _shutdown(holder: list) -> None:
    gen = holder[0]
    holder[0] = None
    if gen is not None:
        gen.stop(graceful=True)


class _Sent(NamedTuple):
    gen: Any
    task_id: int
    world_size: int
    fn: Callable
    start: float
    deadline: float
    timeout: float
    died: list


class PendingRun:
    """A task sent by ``RankPool.submit``; ``result()`` waits for it (once)."""

    def __init__(self, pool: "RankPool", sent: _Sent):
        self._pool, self._sent, self._result = pool, sent, None

    def shorten(self, timeout_s: float) -> None:
        """Lower the task's timeout (counted from the send) to ``timeout_s`` if that is
        sooner; after ``result()`` it changes nothing."""
        sent = self._sent
        if self._result is None and sent.start + timeout_s < sent.deadline:
            self._sent = sent._replace(deadline=sent.start + timeout_s, timeout=timeout_s)

    def result(self) -> "PoolResult":
        if self._result is None:
            self._result = self._pool._finish(self._sent)
        return self._result


class RankPool:
    """`max_world_size` persistent ranks on one process group; see the module docstring."""

    def __init__(self, max_world_size: int = 8, *, backend: Optional[str] = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 300.0):
        self.world_sizes = pool_world_sizes(max_world_size)
        self.max_world_size = max_world_size
        self.backend = _choose_backend(backend, max_world_size)
        _check_timeout("timeout_s", timeout_s)
        _check_timeout("startup_timeout_s", startup_timeout_s)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._ctx = mp.get_context("spawn")
        self._task_id = 0
        self._in_flight: Optional[PendingRun] = None
        self._generations = 0
        self._closed = False
        self._holder: list[Optional[Generation]] = [None]
        self._finalizer = weakref.finalize(self, _shutdown, self._holder)
        self._spawn()

    # -- public surface -----------------------------------------------------------------------

    @property
    def spawned_count(self) -> int:
        """Rank processes spawned so far (max_world_size per generation)."""
        return self._generations * self.max_world_size

    @property
    def restarts(self) -> int:
        return max(0, self._generations - 1)

    @property
    def pids(self) -> list[int]:
        """The current ranks' process ids, in rank order."""
        gen = self._holder[0]
        return [] if gen is None else gen.pids

    def run(self, world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any, *,
            timeout_s: Optional[float] = None) -> PoolResult:
        """Run `fn(payload, ctx)` on ranks 0..world_size-1; never hangs past the timeout."""
        return self.submit(world_size, fn, payload, timeout_s=timeout_s).result()

    def submit(self, world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any, *,
               timeout_s: Optional[float] = None) -> "PendingRun":
        """Send `fn(payload, ctx)` to the ranks and return at once: the caller works while the
        ranks do (the campaign computes the case's reference), then calls ``result()``. One
        task at a time: a second ``submit`` before ``result()`` raises. The timeout counts from
        the send."""
        if self._closed:
            raise RuntimeError("RankPool.run() after close(); build a new RankPool")
        if self._in_flight is not None:
            raise RuntimeError("RankPool.submit() while a task is in flight: call result() on it first")
        if world_size not in self.world_sizes:
            raise ValueError(
                f"world_size {world_size!r} cannot be served by a pool of {self.max_world_size} "
                f"ranks; allowed: {', '.join(map(str, self.world_sizes))}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        _check_timeout("timeout_s", timeout)
        try:
            blob = pickle.dumps((fn, payload), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"cannot send {qualified_name(fn)} and its payload to the ranks: {exc}. fn must "
                "be a module-level function (pickled by reference) and the payload picklable"
            ) from exc
        self._ensure_ready()
        sent = self._send(world_size, fn, blob, timeout)
        self._in_flight = PendingRun(self, sent)
        return self._in_flight

    def _finish(self, sent: "_Sent") -> PoolResult:
        """Collect a submitted task; restart the ranks if it left them unusable."""
        self._in_flight = None
        result, healthy = self._collect(sent)
        if not healthy:
            self._restart()
        elif not result.ok:
            check, _ = self._dispatch(sent.world_size, probe, pickle.dumps((probe, None)),
                                      _PROBE_TIMEOUT_S)
            if not (check.ok and all(check.values)):
                self._restart()
        return result

    def close(self) -> None:
        """Stop every rank (idempotent). Also runs at interpreter exit."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pids={self.pids}"
        return (f"RankPool(max_world_size={self.max_world_size}, backend={self.backend!r}, "
                f"restarts={self.restarts}, {state})")

    # -- lifecycle ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._generations += 1
        self._holder[0] = Generation(self._ctx, self.max_world_size, self.backend,
                                      self._generations)

    def _restart(self) -> None:
        gen = self._holder[0]
        self._holder[0] = None
        if gen is not None:
            gen.stop(graceful=False)
        self._spawn()           # the new ranks start importing now, while the caller goes on

    def _ensure_ready(self, *, retry: bool = True) -> None:
        gen = self._holder[0]
        if gen is None:
            self._spawn()
            gen = self._holder[0]
        if gen.all_ready():
            if not gen.dead():
                return
            self._restart()     # an idle rank died between runs
            gen = self._holder[0]
        problem = self._await_startup(gen)
        if problem is None:
            return
        gen.stop(graceful=False)
        self._holder[0] = None
        if retry:
            self._ensure_ready(retry=False)
            return
        raise RuntimeError(f"the rank pool ({self.max_world_size} ranks, {self.backend}) "
                           f"failed to start twice; last failure:\n{problem}")

    def _await_startup(self, gen: Generation) -> Optional[str]:
        deadline = time.monotonic() + self.startup_timeout_s
        index = {id(c): r for r, c in enumerate(gen.conns)}
        while not gen.all_ready():
            left = deadline - time.monotonic()
            if left <= 0:
                late = [r for r, ok in enumerate(gen.ready) if not ok]
                return f"ranks {late} were not ready after {self.startup_timeout_s:.0f} s"
            waiting = [c for r, c in enumerate(gen.conns) if not gen.ready[r]]
            sentinels = [p.sentinel for p in gen.procs]
            for obj in wait(waiting + sentinels, left):
                if isinstance(obj, int):
                    continue    # deaths are checked below, after pending messages are read
                rank = index[id(obj)]
                try:
                    kind, _, detail = obj.recv()
                except (EOFError, OSError):
                    continue
                if kind != "ready":
                    return f"rank {rank} failed to start:\n{detail}"
                gen.ready[rank] = True
            for rank in gen.dead():
                return f"rank {rank} {describe_exit(gen.procs[rank].exitcode)} during startup"
        return None

    # -- one run ------------------------------------------------------------------------------

    def _dispatch(self, world_size: int, fn: Callable, blob: bytes,
                  timeout: float) -> tuple[PoolResult, bool]:
        """Send one task and collect it. Returns (result, pool still healthy)."""
        return self._collect(self._send(world_size, fn, blob, timeout))

    def _send(self, world_size: int, fn: Callable, blob: bytes, timeout: float) -> "_Sent":
        gen = self._holder[0]
        self._task_id += 1
        task_id = self._task_id
        msg = pickle.dumps((task_id, world_size, list(sys.path), blob),
                           protocol=pickle.HIGHEST_PROTOCOL)
        start = time.perf_counter()
        died: list[int] = []
        gen.stderr.clear(range(len(gen.procs)))
        for rank in range(world_size):
            try:
                gen.conns[rank].send_bytes(msg)
            except (OSError, ValueError):
                died.append(rank)
        return _Sent(gen, task_id, world_size, fn, start, start + timeout, timeout, died)

    def _collect(self, sent: "_Sent") -> tuple[PoolResult, bool]:
        """Wait for a sent task's results (or deaths, errors, the deadline)."""
        gen, task_id, world_size, fn = sent.gen, sent.task_id, sent.world_size, sent.fn
        start, deadline, timeout, died = sent.start, sent.deadline, sent.timeout, list(sent.died)
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        pending = set(range(world_size))
        index = {id(c): r for r, c in enumerate(gen.conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(gen.procs)}
        first_error_at: Optional[float] = None
        while pending and not died:
            limit = deadline if first_error_at is None else min(deadline,
                                                                first_error_at + _ERROR_GRACE_S)
            left = limit - time.perf_counter()
            if left <= 0:
                break
            ready = wait([gen.conns[r] for r in pending] + list(sentinels), left)
            for obj in ready:       # read results before looking at deaths
                if isinstance(obj, int):
                    continue
                rank = index[id(obj)]
                try:
                    got_id, ok, value = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    died.append(rank)
                    continue
                except Exception:
                    got_id, ok = task_id, False
                    value = ("the parent could not unpickle this rank's return value:\n"
                             + traceback.format_exc())
                if got_id != task_id:
                    continue        # cannot happen after a restart; ignore defensively
                pending.discard(rank)
                if ok:
                    values[rank] = value
                else:
                    errors[rank] = value
                    if first_error_at is None:
                        first_error_at = time.perf_counter()
            died.extend(r for s, r in sentinels.items()
                        if s in ready and r not in died and gen.procs[r].exitcode is not None)
        wall = time.perf_counter() - start
        name = qualified_name(fn)
        parts = [f"rank {r} raised in {name} at world size {world_size}:\n{errors[r]}"
                 for r in sorted(errors)]
        healthy = not pending and not died
        if died:
            died = sorted(set(died))
            gen.procs[died[0]].join(1.0)
            gen.stderr.settle(died, eof=True, within_s=1.0)
            parts += [f"rank {r} (pid {gen.procs[r].pid}) "
                      f"{describe_exit(gen.procs[r].exitcode)} while running {name} at world "
                      f"size {world_size}; the pool restarts" + last_words(gen.stderr, r)
                      for r in died]
        elif pending and errors:
            parts.append(f"ranks {sorted(pending)} did not finish within {_ERROR_GRACE_S:.0f} s "
                         f"of the first error (likely waiting in a collective the failed rank "
                         f"never joined); the pool restarts")
        elif pending:
            parts.append(f"timed out after {timeout:g} s running {name} at world size "
                         f"{world_size}: ranks {sorted(pending)} did not finish "
                         f"(ranks {sorted(values)} did); the pool restarts")
        if pending:  # a hang, or peers left waiting by a rank that raised or died
            parts += collective_sequences(gen.store_dir, world_size)
            parts += stacks(gen.stderr, gen.procs, sorted(r for r in pending if r not in died))
        if healthy and not errors:
            return PoolResult(True, [values[r] for r in range(world_size)], None, wall), True
        return PoolResult(False, None, "\n\n".join(parts), wall), healthy


def _check_timeout(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _choose_backend(backend: Optional[str], max_world_size: int) -> str:
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is None:
        return "nccl" if n_gpus >= max_world_size else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None (choose), got {backend!r}")
    if backend == "nccl" and n_gpus < max_world_size:
        raise ValueError(f"backend 'nccl' needs one CUDA device per rank: {max_world_size} ranks "
                         f"but {n_gpus} devices; use backend='gloo' or a smaller max_world_size")
    return backend

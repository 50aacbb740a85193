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

[Note: a hung rank's traceback]
Every rank's stderr is a pipe into this process: a pump thread forwards it to our stderr and
keeps what each rank wrote during the current run. Ranks enable `faulthandler`, so a rank
killed by a fatal signal leaves its Python stack there, and a rank that hangs is sent SIGUSR1
before it is killed, which makes it write the stacks of its threads: the failed result says
where each rank was stuck. Before the stacks it gives what a stack cannot show: the sequence
of collectives each rank issued in the case (logged as they happen, verify/diagnosis/hangs.py) and the
first position where the ranks' sequences disagree.

[Note: nothing on the network]
The rendezvous store is a `FileStore` in a private directory (`private_store_dir`: mode 0700,
a fresh one per generation, so a restart never meets a previous generation's keys; removed when
the generation stops, or by a later pool if this process was killed), not a `TCPStore`, whose
server listens on every interface. Ranks call
`keep_on_loopback()` before their first process group, so gloo's pairs listen on loopback too.
Concurrent pools (pytest-xdist workers) never clash: each has its own directory.

This module is the parent side; what runs inside a rank (and the torchrun variant, where the
process is already a rank) is in verify/ranks/rank.py.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import selectors
import shutil
import signal
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, NamedTuple, Optional

from verify.ranks.rank import (
    PoolResult,
    RankContext,
    keep_on_loopback,
    open_store,
    private_store_dir,
    pool_world_sizes,
    probe,
    qualified_name,
    serve,
)

__all__ = [
    "RankPool",
    "PoolResult",
    "RankContext",
    "OverheadMeasurement",
    "measure_overhead",
]

_ERROR_GRACE_S = 2.0
_PROBE_TIMEOUT_S = 10.0
_STOP_GRACE_S = 3.0
_TAIL_BYTES = 16384       # per rank: what a failed run reports of the rank's stderr


class _Generation:
    """One set of spawned rank processes, their pipes and their rendezvous store (a file in a
    private directory of this generation's own; see [Note: nothing on the network])."""

    def __init__(self, ctx: Any, max_world_size: int, backend: str, number: int):
        self.store_dir: Optional[str] = private_store_dir("pool")
        store_path = os.path.join(self.store_dir, "store")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.ready = [False] * max_world_size
        self.stderr = _StderrPump(max_world_size)
        prefix = f"rank_pool/{os.getpid()}/{number}"
        for rank in range(max_world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            err_r, err_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=serve, name=f"rank-pool-{rank}", daemon=True,
                               args=(rank, max_world_size, backend, store_path, prefix,
                                     child_conn, err_w))
            proc.start()
            child_conn.close()
            err_w.close()
            self.stderr.add(rank, err_r)
            self.conns.append(parent_conn)
            self.procs.append(proc)
        self.stderr.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def all_ready(self) -> bool:
        return all(self.ready)

    def dead(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.exitcode is not None]

    def stop(self, graceful: bool) -> None:
        if graceful:
            stop = pickle.dumps((None, 0, [], b""))
            for conn in self.conns:
                try:
                    conn.send_bytes(stop)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + _STOP_GRACE_S
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(5.0)
        for conn in self.conns:
            conn.close()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


class _StderrPump:
    """Forwards every rank's stderr to ours and keeps, per rank, what it wrote since the
    current run began (the last `_TAIL_BYTES`), so that a rank that dies or hangs can be
    reported with its last words and its Python stacks."""

    def __init__(self, n: int):
        self._conns: dict[int, Any] = {}
        self._tails = [bytearray() for _ in range(n)]
        self._open = [False] * n
        self._muted = [False] * n
        self._lock = threading.Lock()

    def add(self, rank: int, conn: Any) -> None:
        self._conns[rank] = conn
        self._open[rank] = True

    def start(self) -> None:
        threading.Thread(target=self._pump, name="rank-pool-stderr", daemon=True).start()

    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        for rank, conn in self._conns.items():
            sel.register(conn.fileno(), selectors.EVENT_READ, rank)
        while sel.get_map():
            for key, _ in sel.select():
                rank = key.data
                try:
                    data = os.read(key.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fd)
                    self._conns[rank].close()
                    with self._lock:
                        self._open[rank] = False
                    continue
                with self._lock:
                    tail = self._tails[rank]
                    tail += data
                    del tail[:-_TAIL_BYTES]
                if not self._muted[rank]:
                    try:
                        os.write(2, data)
                    except OSError:
                        pass
        sel.close()

    def mute(self, ranks: Iterable[int]) -> None:
        """Keep the ranks' further output for the report only (no forwarding)."""
        for r in ranks:
            self._muted[r] = True

    def clear(self, ranks: Iterable[int]) -> None:
        with self._lock:
            for r in ranks:
                self._tails[r].clear()

    def tail(self, rank: int) -> str:
        with self._lock:
            return self._tails[rank].decode("utf-8", "replace").strip()

    def settle(self, ranks: Iterable[int], *, eof: bool, within_s: float) -> None:
        """Wait (briefly) until the ranks' output stops growing, or reaches EOF if `eof`."""
        ranks = list(ranks)
        deadline = time.monotonic() + within_s
        last: Optional[list] = None
        while time.monotonic() < deadline:
            with self._lock:
                now = [(len(self._tails[r]), self._open[r]) for r in ranks]
            if eof and not any(o for _, o in now):
                return
            if not eof and now == last and all(n for n, _ in now):
                return
            last = now
            time.sleep(0.1)


def _describe_exit(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


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
        self._holder: list[Optional[_Generation]] = [None]
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
        self._holder[0] = _Generation(self._ctx, self.max_world_size, self.backend,
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

    def _await_startup(self, gen: _Generation) -> Optional[str]:
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
                return f"rank {rank} {_describe_exit(gen.procs[rank].exitcode)} during startup"
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
                      f"{_describe_exit(gen.procs[r].exitcode)} while running {name} at world "
                      f"size {world_size}; the pool restarts" + _last_words(gen, r)
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
            parts += _collective_sequences(gen, world_size)
            parts += _stacks(gen, sorted(r for r in pending if r not in died))
        if healthy and not errors:
            return PoolResult(True, [values[r] for r in range(world_size)], None, wall), True
        return PoolResult(False, None, "\n\n".join(parts), wall), healthy


def _last_words(gen: _Generation, rank: int) -> str:
    tail = gen.stderr.tail(rank)
    return f"; its last stderr output:\n{tail}" if tail else ""


def _stacks(gen: _Generation, ranks: list[int]) -> list[str]:
    """Ask hung ranks for their Python stacks (faulthandler on SIGUSR1) and return them."""
    gen.stderr.mute(ranks)
    for r in ranks:
        try:
            os.kill(gen.procs[r].pid, signal.SIGUSR1)
        except OSError:
            pass
    gen.stderr.settle(ranks, eof=False, within_s=2.0)
    out = []
    for r in ranks:
        # One block per thread; the pool's own watchdog thread is noise.
        blocks = [b for b in gen.stderr.tail(r).split("\n\n") if "_parent_watch_loop" not in b]
        if any(b.strip() for b in blocks):
            out.append(f"rank {r} was stuck here:\n" + "\n\n".join(blocks).strip())
    return out


def _collective_sequences(gen: _Generation, world_size: int) -> list[str]:
    """What the ranks' collective logs (verify/diagnosis/hangs.py) say about a run that did not finish."""
    try:
        from verify.diagnosis.hangs import explain
        text = explain(gen.store_dir, world_size) if gen.store_dir else ""
    except Exception:
        text = "the ranks' collective sequences could not be read:\n" + traceback.format_exc()
    return [text] if text else []


def _check_timeout(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _choose_backend(backend: Optional[str], max_world_size: int) -> str:
    import torch
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is None:
        return "nccl" if n_gpus >= max_world_size else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None (choose), got {backend!r}")
    if backend == "nccl" and n_gpus < max_world_size:
        raise ValueError(f"backend 'nccl' needs one CUDA device per rank: {max_world_size} ranks "
                         f"but {n_gpus} devices; use backend='gloo' or a smaller max_world_size")
    return backend


# --------------------------------------------------------------------------------------------
# What the pool saves
# --------------------------------------------------------------------------------------------

class OverheadMeasurement(NamedTuple):
    pool_s: float        # median seconds per trivial task through the pool
    spawn_s: float       # mean seconds per task when spawning fresh processes for it
    ratio: float         # spawn_s / pool_s: how many times cheaper the pool is


def _trivial_collective(payload: Any, ctx: RankContext) -> float:
    import torch
    import torch.distributed as dist
    t = torch.ones(1, device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    return t.item()


def _fresh_rank(rank: int, world_size: int, store_path: str, prefix: str,
                blob: Optional[bytes] = None, conn: Any = None) -> None:
    """A rank spawned for one task: init a gloo group, run the task (``blob``: a pickled
    ``(fn, payload)``, sent back through ``conn``; none: a trivial all-reduce), tear down."""
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
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
    values = [pickle.loads(recv.recv_bytes()) for recv, _ in pipes] if pipes else None
    for p in procs:
        p.join(300)
    elapsed = time.perf_counter() - start
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
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


def measure_overhead(pool: RankPool, world_size: int, n: int = 20, *,
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

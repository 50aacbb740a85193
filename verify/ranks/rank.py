"""What runs on a rank: the context a case receives, the loop of a pool rank, and the same
context for a process that torchrun launched as a rank.

`RankContext` is what every case function `fn(payload, ctx)` gets: its rank, the world size of
the case, the process group of ranks 0..world_size-1 (pass it to every collective) and the
device. `serve` is the main function of a `RankPool` rank (verify/ranks/pool.py is the parent side).
`TorchrunContext` offers `RankPool.run` in-process when pytest itself runs under torchrun.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # torch is imported lazily so that `--help` paths stay fast
    import torch
    from torch.distributed import ProcessGroup

__all__ = [
    "RankContext",
    "PoolResult",
    "TorchrunContext",
    "ProcessGroupLost",
    "current_rank_context",
    "is_torchrun",
    "pool_world_sizes",
]

HOST = "127.0.0.1"
# Long enough that the pool's own timeout, not the backend's, always decides a hang.
_PG_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    group: "ProcessGroup"          # sub-group of ranks 0..world_size-1; pass it to every collective
    device: "torch.device"         # cpu on gloo, cuda:rank on nccl


@dataclass
class PoolResult:
    ok: bool
    values: Optional[list]         # fn's return value per rank, in rank order (None unless ok)
    error: Optional[str]           # every failing rank's traceback, or what timed out / died
    wall_time_s: float


def pool_world_sizes(max_world_size: int) -> tuple[int, ...]:
    """The world sizes a pool of `max_world_size` ranks serves: powers of two, and the max."""
    if not isinstance(max_world_size, int) or isinstance(max_world_size, bool) \
            or max_world_size < 1:
        raise ValueError(f"max_world_size must be an int >= 1, got {max_world_size!r}")
    sizes, w = [], 1
    while w < max_world_size:
        sizes.append(w)
        w *= 2
    sizes.append(max_world_size)
    return tuple(sizes)


def qualified_name(fn: Callable) -> str:
    """`module.qualname` of a case function, for messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------------------------
# Rendezvous and transport without a network listener
# --------------------------------------------------------------------------------------------

def loopback_interface() -> str:
    """The name of this machine's loopback network interface ("lo" on Linux)."""
    import socket
    for _, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/flags") as f:
                if int(f.read().strip(), 16) & 0x8:     # IFF_LOOPBACK
                    return name
        except (OSError, ValueError):
            continue
    return "lo0" if sys.platform == "darwin" else "lo"


def keep_on_loopback() -> None:
    """Make every process group this process creates from now on listen on loopback only.

    Called in a rank before its first process group. gloo otherwise binds to the address the
    machine's hostname resolves to (reachable from the network wherever that is not a
    loopback address); NCCL's bootstrap picks an interface of its own."""
    lo = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = lo
    os.environ["NCCL_SOCKET_IFNAME"] = lo


_STORE_DIR_KINDS = ("pool", "spawn", "timing")


def private_store_dir(kind: str) -> str:
    """A fresh private directory (mode 0700) for one set of ranks' store file, named
    ``verify-<kind>-<pid>-<random>`` in the temp directory. The caller removes it when the set
    stops; what a killed process left behind (its pid gone) is removed here, on the next call."""
    import glob
    import shutil
    import tempfile
    assert kind in _STORE_DIR_KINDS, kind
    root = tempfile.gettempdir()
    for d in glob.glob(os.path.join(glob.escape(root), "verify-*-*-*")):
        parts = os.path.basename(d).split("-")
        try:
            owner, pid = os.lstat(d).st_uid, int(parts[2])
        except (OSError, ValueError):
            continue
        if parts[1] in _STORE_DIR_KINDS and owner == os.getuid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"verify-{kind}-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def open_store(path: str, timeout: timedelta = timedelta(seconds=300)) -> Any:
    """The rendezvous store of one set of ranks: a `FileStore` at `path`, inside a private
    directory (mode 0700) that the spawning process made for this set only and removes when
    the set stops. No network listener; world_size -1: the store never deletes its own file."""
    import torch.distributed as dist
    store = dist.FileStore(path, -1)
    store.set_timeout(timeout)
    return store


# --------------------------------------------------------------------------------------------
# A pool rank (spawned by RankPool)
# --------------------------------------------------------------------------------------------

def _watch_parent() -> None:
    """Exit this rank as soon as the process that spawned it is gone."""
    threading.Thread(target=_parent_watch_loop, args=(mp.parent_process(), os.getppid()),
                     name="rank-pool-parent-watch", daemon=True).start()


def _parent_watch_loop(parent: Any, ppid: int) -> None:
    while True:
        if parent is not None:
            parent.join(timeout=1.0)          # returns at once when the parent is gone
            if not parent.is_alive():
                os._exit(3)
        else:
            time.sleep(1.0)
        if os.getppid() != ppid:             # re-parented: the parent died
            os._exit(3)


def _reset_global_state(torch_mod: Any) -> None:
    """Undo global torch settings a case may have changed, so cases cannot leak into each other."""
    torch_mod.set_grad_enabled(True)
    torch_mod.set_default_dtype(torch_mod.float32)
    if torch_mod.get_num_threads() != 1:
        torch_mod.set_num_threads(1)
    # global module hooks a foreign sharder registered (register_module_forward_hook & co.)
    # would run inside every later case's model
    from torch.nn.modules import module as nn_module
    for name in dir(nn_module):
        table = getattr(nn_module, name)
        if name.startswith("_global_") and name.endswith("hooks") and hasattr(table, "clear"):
            table.clear()
    nn_module._global_is_full_backward_hook = None


def serve(rank: int, max_world_size: int, backend: str, store_path: str, prefix: str,
               conn: Any, stderr_conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    # stderr goes through the parent (which forwards it and keeps a tail for failure reports);
    # faulthandler writes the Python stacks there on a fatal signal, and on SIGUSR1, which the
    # parent sends to a rank that hangs.
    sys.stderr.flush()
    os.dup2(stderr_conn.fileno(), 2)
    stderr_conn.close()
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Each case logs the collectives it issues here, as they happen, so that the parent can
    # read the sequence of a rank stuck in one (verify/diagnosis/hangs.py).
    os.environ["VERIFY_COLLECTIVE_LOG"] = os.path.join(os.path.dirname(store_path),
                                                      f"collectives.{rank}")
    _watch_parent()
    try:
        import torch
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        keep_on_loopback()
        store = open_store(store_path)
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                                world_size=max_world_size, timeout=_PG_TIMEOUT)
        contexts: dict[int, RankContext] = {}
        for w in pool_world_sizes(max_world_size):     # same order on every rank
            # the whole pool is the default group itself: a sharder that uses the default
            # group (world = "default") runs there at W = max_world_size
            group = dist.group.WORLD if w == max_world_size else dist.new_group(list(range(w)))
            if rank < w:
                contexts[w] = RankContext(rank=rank, world_size=w, group=group, device=device)
    except BaseException:
        conn.send(("startup_error", rank, traceback.format_exc()))
        os._exit(1)
    conn.send(("ready", rank, os.getpid()))

    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            break
        task_id, world_size, sys_path, blob = pickle.loads(raw)
        if task_id is None:                             # stop
            break
        if sys_path != sys.path:
            sys.path[:] = sys_path
        try:
            fn, payload = pickle.loads(blob)
            ok, value = True, fn(payload, contexts[world_size])
        except BaseException:                           # SystemExit too: a rank must report
            ok, value = False, traceback.format_exc()
        finally:
            _reset_global_state(torch)
        try:
            msg = pickle.dumps((task_id, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            msg = pickle.dumps((task_id, False, "fn's return value cannot be pickled (it must "
                                "be, to come back to the caller):\n" + traceback.format_exc()))
        try:
            conn.send_bytes(msg)
        except (EOFError, OSError):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)          # skip interpreter teardown: nothing to flush, and it can be slow


def probe(payload: Any, ctx: RankContext) -> bool:
    """Health check after a failed run: a collective with a known answer, then a barrier."""
    import torch
    import torch.distributed as dist
    t = torch.full((1,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    dist.barrier(group=ctx.group)
    return t.item() == ctx.world_size * (ctx.world_size + 1) / 2


# --------------------------------------------------------------------------------------------
# Under torchrun: this process is a rank
# --------------------------------------------------------------------------------------------

def is_torchrun() -> bool:
    """True when this process was launched as a rank by torchrun (or a compatible launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _init_default_group(backend: Optional[str], timeout_s: Optional[float] = None) -> bool:
    """Initialise the default group from the launcher's env unless it is; True if we did.
    ``timeout_s``: the group's collective timeout (a rank stuck past it makes the others
    raise instead of waiting forever)."""
    import torch
    import torch.distributed as dist
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
    import torch
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_rank_context(*, backend: Optional[str] = None) -> RankContext:
    """This process as a rank of the default group (initialised from torchrun's env if needed)."""
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

    def _build_groups(self, world) -> None:
        """A fresh group per world size (the full size too: the default group stays for
        sharders that use it, ``world = "default"``), and a control group for the outcomes,
        whose timeout outlasts a case's (a rank that raised waits there while its peers time
        out in the case's collectives)."""
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
        import torch.distributed as dist
        self._check(world_size)
        start = time.perf_counter()
        ctx = self._contexts.get(world_size)
        mine: tuple[bool, Any] = (True, None)
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
            self._build_groups(dist.group.WORLD)   # every rank saw the same errors
            return PoolResult(False, None, "\n\n".join(errors), wall)
        return PoolResult(True, [v for _, v in outcomes], None, wall)

    def submit(self, world_size: int, fn: Callable[[Any, RankContext], Any], payload: Any, *,
               timeout_s: Optional[float] = None) -> "_Done":
        """``RankPool.submit``'s shape: this process is a rank, so the task runs here, now."""
        return _Done(self.run(world_size, fn, payload, timeout_s=timeout_s))

    def close(self) -> None:
        """Destroy the process groups if this context created the default group (a rank that
        exits with live gloo groups can abort at interpreter teardown)."""
        import torch.distributed as dist
        if self._owns_default_group and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
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

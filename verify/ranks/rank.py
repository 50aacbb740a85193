"""What runs on a rank: the context a case receives and the loop of a pool rank.

`RankContext` is what every case function `fn(payload, ctx)` gets: its rank, the world size of
the case, the process group of ranks 0..world_size-1 (pass it to every collective) and the
device. `serve` is the main function of a `RankPool` rank (verify/ranks/pool.py is the parent side).
Under torchrun the same context comes from verify/ranks/torchrun.py.

This module imports without torch (verify/cli.py reaches it through verify/ranks/torchrun.py
while it parses arguments); the functions that run on a rank import torch when they run.
"""
from __future__ import annotations

import faulthandler
import glob
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional

from verify.ranks.global_state import GlobalState, align_group_names

if TYPE_CHECKING:  # torch is imported lazily so that `--help` paths stay fast
    import torch
    from torch.distributed import ProcessGroup

__all__ = [
    "RankContext",
    "PoolResult",
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
    import torch.distributed as dist  # lazy: no torch at import (module docstring)
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
        # lazy, and only now: stderr and the parent watchdog are up before the slow import, and
        # an import failure is reported to the parent as this rank's startup error
        import torch
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        import torch.distributed as dist  # lazy: likewise

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
        guard = GlobalState(torch)   # what every case must leave as it found it
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
        sharder = None
        try:
            fn, payload = pickle.loads(blob)
            sharder = payload.get("sharder") if isinstance(payload, dict) else None
            guard.enter(sharder)    # what this sharder's earlier cases left, its own again
            align_group_names(task_id)   # [Note: group names inside a case], global_state.py
            ok, value = True, fn(payload, contexts[world_size])
        except BaseException:                           # SystemExit too: a rank must report
            back = guard.given_back(sharder)
            ok, value = False, traceback.format_exc() + (f"\n{back}" if back else "")
        lost = _after_case(guard, sharder, [c.group for c in contexts.values()])
        if ok and isinstance(value, dict) and sharder:   # what the case ran with: run_one says it
            try:
                value["process_state"] = guard.in_effect(sharder)
            except Exception:   # noqa: BLE001 - a report, never the case's failure
                pass
        if lost is not None:
            ok, value = False, (value if not ok else "") + lost
        try:
            msg = pickle.dumps((task_id, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            msg = pickle.dumps((task_id, False, "fn's return value cannot be pickled (it must "
                                "be, to come back to the caller):\n" + traceback.format_exc()))
        try:
            conn.send_bytes(msg)
        except (EOFError, OSError):
            break
        if lost is not None:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)          # skip interpreter teardown: nothing to flush, and it can be slow


def _after_case(guard: Any, sharder: Optional[str], groups: list) -> Optional[str]:
    """Undo what the case left behind ([Note: global state between cases] in
    verify/ranks/global_state.py), saying so on stderr; the reason this rank must restart
    (its process groups are gone), or None."""
    try:
        undone = guard.restore(sharder)
    except BaseException:
        undone = ["restoring it raised:\n" + traceback.format_exc()]
    if undone:
        who = f"sharder {sharder}" if sharder else "the case"
        sys.stderr.write(f"verify: {who} left process-global state changed; undone for other "
                         "sharders' cases (given back before its own): " + "; ".join(undone) + "\n")
        sys.stderr.flush()
    problem = guard.group_problem(groups)
    if problem is None:
        return None
    return f"{problem}. This rank restarts.\n"


def probe(payload: Any, ctx: RankContext) -> bool:
    """Health check after a failed run: a collective with a known answer, then a barrier."""
    # lazy: no torch at import (module docstring)
    import torch
    import torch.distributed as dist  # lazy: likewise
    if GlobalState.group_problem([ctx.group]) is not None:   # destroyed: it cannot serve
        return False
    t = torch.full((1,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    dist.barrier(group=ctx.group)
    return t.item() == ctx.world_size * (ctx.world_size + 1) / 2

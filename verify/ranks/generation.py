"""One generation of a pool's ranks: the processes spawned together, their pipes, the pump of
their stderr and their private rendezvous store. A `RankPool` restart stops the generation and
spawns the next.

[Note: nothing on the network]
The rendezvous store is a `FileStore` in a private directory (`private_store_dir`: mode 0700,
a fresh one per generation, so a restart never meets a previous generation's keys; removed when
the generation stops, or by a later pool if this process was killed), not a `TCPStore`, whose
server listens on every interface. Ranks call `keep_on_loopback()` before their first process
group, so gloo's pairs listen on loopback too.
Concurrent pools (pytest-xdist workers) never clash: each has its own directory.
"""
from __future__ import annotations

import os
import pickle
import shutil
import time
from typing import Any, Optional

from verify.ranks.rank import private_store_dir, serve
from verify.ranks.stderr import StderrPump

__all__ = ["Generation"]

_STOP_GRACE_S = 3.0


class Generation:
    """One set of spawned rank processes, their pipes and their rendezvous store (a file in a
    private directory of this generation's own; see [Note: nothing on the network])."""

    def __init__(self, ctx: Any, max_world_size: int, backend: str, number: int):
        self.store_dir: Optional[str] = private_store_dir("pool")
        store_path = os.path.join(self.store_dir, "store")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.ready = [False] * max_world_size
        self.stderr = StderrPump(max_world_size)
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

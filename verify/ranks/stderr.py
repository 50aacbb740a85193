"""The pipe reader of every pool rank's stderr: forwards what the ranks write to ours and keeps
the tail of each rank's output in the current run, for the report of a rank that dies or hangs
(see [Note: a hung rank's traceback] in verify/ranks/failure.py).
"""
from __future__ import annotations

import os
import re
import selectors
import threading
import time
from typing import Any, Iterable, Optional

__all__ = ["StderrPump"]

_TAIL_BYTES = 16384       # per rank: what a failed run reports of the rank's stderr

# [Note: a warning once]
# Python prints a warning once per call site per process, so W ranks, and every pool restart
# after a failed case, print the same one again: a sharder calling a name torch deprecates
# (all_gather_into_tensor in 2.13) would bury the progress lines. The pump forwards a warning
# line ("file:line: SomeWarning: message") and the indented source line after it the first time
# any rank writes it, and keeps later copies in the ranks' tails only (what a failure reports).
# A warning of torch's C++ side ("[rank1]:[W1206 05:52:33.214143741 reducer.cpp:1529] Warning:
# ...") carries the rank and the time: it is forwarded once by its source and message. The rank's
# own "verify: ..." notes (what a case left behind, verify/ranks/global_state.py) likewise.
_WARNING = re.compile(rb"^(?:\S.*:\d+: \w*Warning: |verify: )")
_C10_WARNING = re.compile(rb"^(?:\[rank\d+\]:)?\[W\d{4} [\d:.]+ (\S+)\] Warning: (.*)", re.S)


class StderrPump:
    """Forwards every rank's stderr to ours and keeps, per rank, what it wrote since the
    current run began (the last `_TAIL_BYTES`), so that a rank that dies or hangs can be
    reported with its last words and its Python stacks."""

    def __init__(self, n: int):
        self._conns: dict[int, Any] = {}
        self._tails = [bytearray() for _ in range(n)]
        self._open = [False] * n
        self._muted = [False] * n
        self._lock = threading.Lock()
        self._warned: set[bytes] = set()       # see [Note: a warning once]
        self._skip_source = [False] * n

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
                    data = self._once(rank, data)
                    try:
                        if data:
                            os.write(2, data)
                    except OSError:
                        pass
        sel.close()

    def _once(self, rank: int, data: bytes) -> bytes:
        """``data`` without the warnings forwarded before (see [Note: a warning once]); output
        that is not whole lines goes through as it is."""
        if not data.endswith(b"\n"):
            self._skip_source[rank] = False
            return data
        out = []
        for line in data.splitlines(keepends=True):
            if self._skip_source[rank] and line.startswith(b"  "):
                self._skip_source[rank] = False
                continue
            self._skip_source[rank] = False
            c10 = _C10_WARNING.match(line)
            if c10 or _WARNING.match(line):
                key = b" ".join(c10.groups()) if c10 else line
                if key in self._warned:
                    self._skip_source[rank] = not c10
                    continue
                self._warned.add(key)
            out.append(line)
        return b"".join(out)

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

"""What a failed pool run reports about its ranks: how a rank exited, its last stderr output,
the Python stacks of hung ranks and the sequences of collectives the ranks issued.

[Note: a hung rank's traceback]
Every rank's stderr is a pipe into the parent: a pump thread (verify/ranks/stderr.py) forwards
it to the parent's stderr and keeps what each rank wrote during the current run. Ranks enable
`faulthandler`, so a rank killed by a fatal signal leaves its Python stack there, and a rank
that hangs is sent SIGUSR1 before it is killed, which makes it write the stacks of its threads:
the failed result says where each rank was stuck. Before the stacks it gives what a stack
cannot show: the sequence of collectives each rank issued in the case (logged as they happen,
verify/diagnosis/hangs.py) and the first position where the ranks' sequences disagree.
"""
from __future__ import annotations

import os
import signal
import traceback
from typing import Any, Optional

from verify.diagnosis.hangs import explain
from verify.ranks.stderr import StderrPump

__all__ = ["describe_exit", "last_words", "stacks", "collective_sequences"]


def describe_exit(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def last_words(pump: StderrPump, rank: int) -> str:
    tail = pump.tail(rank)
    return f"; its last stderr output:\n{tail}" if tail else ""


def stacks(pump: StderrPump, procs: list[Any], ranks: list[int]) -> list[str]:
    """Ask hung ranks for their Python stacks (faulthandler on SIGUSR1) and return them."""
    pump.mute(ranks)
    for r in ranks:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except OSError:
            pass
    pump.settle(ranks, eof=False, within_s=2.0)
    out = []
    for r in ranks:
        # One block per thread; the pool's own watchdog thread is noise.
        blocks = [b for b in pump.tail(r).split("\n\n") if "_parent_watch_loop" not in b]
        if any(b.strip() for b in blocks):
            out.append(f"rank {r} was stuck here:\n" + "\n\n".join(blocks).strip())
    return out


def collective_sequences(store_dir: Optional[str], world_size: int) -> list[str]:
    """What the ranks' collective logs (verify/diagnosis/hangs.py, next to the store in
    ``store_dir``) say about a run that did not finish."""
    try:
        text = explain(store_dir, world_size) if store_dir else ""
    except Exception:
        text = "the ranks' collective sequences could not be read:\n" + traceback.format_exc()
    return [text] if text else []

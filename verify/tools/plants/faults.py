"""Faults: rank 1 fails during its first gradient reduction (it raises, exits or hangs, in
torch.distributed), which the harness must turn into one 'error' case."""
from __future__ import annotations

import os
import time
from typing import Callable

from verify.tools.plants.patching import REDUCTIONS, Undo, wrap_dist

__all__ = ["rank_raises", "rank_exits", "rank_hangs"]


def _fault_on_rank_1(ctx, act: Callable[[], None]) -> Undo:
    if ctx.rank != 1:
        return lambda: None

    def make(orig):
        def fn(*args, **kwargs):
            act()
            return orig(*args, **kwargs)
        return fn
    return wrap_dist(REDUCTIONS, make)


def rank_raises(ctx) -> Undo:
    """Rank 1 raises in its first gradient reduction; its peers wait in that collective."""
    def act():
        raise RuntimeError("planted fault rank_raises: rank 1 raises in its gradient reduction")
    return _fault_on_rank_1(ctx, act)


def rank_exits(ctx) -> Undo:
    """Rank 1 exits abruptly (``os._exit(17)``) in its first gradient reduction."""
    def act():
        os._exit(17)
    return _fault_on_rank_1(ctx, act)


def rank_hangs(ctx) -> Undo:
    """Rank 1 hangs (sleeps forever) instead of joining its first gradient reduction."""
    return _fault_on_rank_1(ctx, _hang_forever)


def _hang_forever() -> None:
    while True:
        time.sleep(1.0)

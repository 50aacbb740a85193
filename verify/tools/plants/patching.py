"""How a plant patches: set an attribute with an exact undo, wrap torch.distributed's collectives
(both names of each), and wait for an async collective before editing its output."""
from __future__ import annotations

from typing import Callable

import torch.distributed as dist

__all__ = ["Undo", "patch", "undo_all", "group_rank", "completed", "wrap_dist", "GATHERS",
           "REDUCTIONS"]

Undo = Callable[[], None]


def patch(owner, name: str, value) -> Undo:
    """Set ``owner.name = value``; the undo puts back exactly what was there (for a class, the
    raw descriptor from its ``__dict__``, so properties and functions round-trip)."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    return lambda: setattr(owner, name, original)


def undo_all(undos: list[Undo]) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo


def group_rank(kwargs: dict) -> int:
    return dist.get_rank(kwargs.get("group"))


class _Waited:
    """A work already waited on, handed back to the caller in its place: its ``wait()`` returns
    at once. (gloo's async reduce-scatter copies its result into the output on *every*
    ``wait()``: the caller's own wait would undo the plant's edit.)"""

    def __init__(self, work):
        self._work = work

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._work, name)


def completed(work):
    """An async collective's output is written only by its end: a plant that edits the output
    waits first, and hands back a work whose ``wait()`` returns at once."""
    if work is not None:
        work.wait()
        return _Waited(work)
    return work


def wrap_dist(names: tuple[str, ...], make: Callable[[Callable], Callable]) -> Undo:
    """Replace each ``torch.distributed.<name>`` by ``make(original)``."""
    return undo_all([patch(dist, n, make(getattr(dist, n))) for n in names])


# Both names of each collective (the one fsdp_core calls, chosen by torch version, and the
# other), so a plant below the sharder is installed wherever the code calls it.
GATHERS = tuple(n for n in ("all_gather_into_tensor", "all_gather_single") if hasattr(dist, n))
REDUCTIONS = tuple(n for n in ("reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single")
                   if hasattr(dist, n))  # fast, deterministic

"""Pure checkpoint-layout math: which rectangular chunks of a parameter a rank's flat slice is.

[Note: flat slices as chunks]
A rank holds a contiguous *flat* range ``[start, end)`` of each parameter (row-major order over
the parameter's full shape). ``torch.distributed.checkpoint`` describes a saved piece of a tensor
as a rectangular chunk (offsets and sizes per dimension of the full shape). A flat range is not a
rectangle in general, but it is a short run of rectangles: the tail of its first row, a block of
whole rows, the head of its last row, recursively over the trailing dimensions (at most
``2 * ndim - 1`` chunks). Each chunk is itself a contiguous flat range, so a chunk of the local
slice is a plain ``view`` of it, with no copy on save and no scatter on load. Every checkpoint
key then carries the parameter's full shape, whatever the world size that wrote it, and DCP's
resharding reads exactly the overlapping rectangles at any other world size.

Plain ints in, frozen tuples out; no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Chunk", "flat_range_chunks"]


@dataclass(frozen=True)
class Chunk:
    """A rectangle of a tensor of the full shape that is also the flat range [flat_start, flat_end)."""

    flat_start: int
    flat_end: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.flat_end - self.flat_start


def flat_range_chunks(shape: Sequence[int], start: int, end: int) -> tuple[Chunk, ...]:
    """The rectangles, in flat order, that exactly cover elements ``[start, end)`` of a tensor of
    ``shape`` (row-major). Empty ranges give no chunks; a 0-d tensor's one element gives the
    chunk with empty offsets and sizes."""
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if not 0 <= start <= end <= numel:
        raise ValueError(f"flat range [{start}, {end}) is outside a tensor of shape {shape} ({numel} elements)")
    return tuple(_chunks(shape, start, end, 0))


def _chunks(shape: tuple[int, ...], start: int, end: int, base: int) -> list[Chunk]:
    """Chunks of [start, end) relative to a sub-tensor of ``shape`` that begins at flat ``base``."""
    if start >= end:
        return []
    if not shape:  # 0-d: the single element
        return [Chunk(base, base + 1, (), ())]
    inner_shape = shape[1:]
    inner = math.prod(inner_shape)
    zeros = (0,) * len(inner_shape)
    r0, c0 = divmod(start, inner)
    r1, c1 = divmod(end, inner)
    out: list[Chunk] = []

    def in_row(row: int, lo: int, hi: int) -> list[Chunk]:
        return [Chunk(c.flat_start, c.flat_end, (row, *c.offsets), (1, *c.sizes))
                for c in _chunks(inner_shape, lo, hi, base + row * inner)]

    if r0 == r1:  # inside one row
        return in_row(r0, c0, c1)
    if c0:  # the tail of the first, partial row
        out += in_row(r0, c0, inner)
        r0 += 1
    if r1 > r0:  # whole rows
        out.append(Chunk(base + r0 * inner, base + r1 * inner, (r0, *zeros), (r1 - r0, *inner_shape)))
    if c1:  # the head of the last, partial row
        out += in_row(r1, 0, c1)
    return out

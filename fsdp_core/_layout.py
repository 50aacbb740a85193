"""Pure shard-layout math: plain ints in, a frozen layout out. No torch, no torch.distributed.

[Note: flat layout]
A unit's parameters are laid end to end in one flat buffer, in ownership order. Each parameter
starts at a multiple of ``align`` elements (aligned views give the same matmul results as
separately allocated tensors: BLAS kernels pick code paths by address). The used length ``N``
is the end of the last parameter; the buffer is padded to ``W * ceil(N / W)`` so every rank
holds exactly ``shard_numel = ceil(N / W)`` elements. Elements that belong to no parameter
(alignment gaps and the tail) are *padding*; they are zero in every storage, always.

[Note: extended ranges]
Each parameter's *extended range* runs from its offset to the next parameter's offset (the
last one's to the padded end). Extended ranges partition the padded buffer, so a rank's shard
is partitioned into contiguous per-parameter local views; the padding of a local view is its
tail beyond the parameter's real elements. Parameters with no local elements get empty views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["FlatLayout", "LocalPiece", "make_layout", "DEFAULT_ALIGN"]

# 32 elements = 128 bytes of fp32 / 64 bytes of bf16: every view starts on a cache line.
DEFAULT_ALIGN = 32


@dataclass(frozen=True)
class LocalPiece:
    """Param ``index``'s part of one rank's shard.

    The local view is ``shard[shard_start:shard_end]``; its first ``real_numel`` elements are
    the parameter's flat elements ``[param_start, param_start + real_numel)``, the rest padding.
    """

    index: int
    shard_start: int
    shard_end: int
    param_start: int
    real_numel: int

    @property
    def numel(self) -> int:
        return self.shard_end - self.shard_start

    @property
    def pad_numel(self) -> int:
        return self.numel - self.real_numel


@dataclass(frozen=True)
class FlatLayout:
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    world_size: int
    align: int
    used_numel: int        # N: end of the last parameter
    shard_numel: int       # ceil(N / W)

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    @property
    def num_params(self) -> int:
        return len(self.numels)

    def extended_range(self, index: int) -> tuple[int, int]:
        start = self.offsets[index]
        end = self.offsets[index + 1] if index + 1 < self.num_params else self.padded_numel
        return start, end

    def shard_range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def local_pieces(self, rank: int) -> tuple[LocalPiece, ...]:
        """One piece per parameter (possibly empty), partitioning this rank's shard."""
        lo, hi = self.shard_range(rank)
        pieces = []
        for i in range(self.num_params):
            ext_lo, ext_hi = self.extended_range(i)
            a, b = max(lo, ext_lo), min(hi, ext_hi)
            if a >= b:  # no overlap: an empty view placed where the parameter would be
                a = b = min(max(ext_lo, lo), hi)
            real_end = min(b, self.offsets[i] + self.numels[i])
            real = max(0, real_end - a)
            pieces.append(LocalPiece(i, a - lo, b - lo, a - self.offsets[i], real))
        return tuple(pieces)

    def padding_ranges(self, rank: int) -> tuple[tuple[int, int], ...]:
        """Shard-relative [start, end) ranges of padding on ``rank``."""
        out = []
        for p in self.local_pieces(rank):
            if p.pad_numel:
                out.append((p.shard_start + p.real_numel, p.shard_end))
        return tuple(out)

    def owners(self, index: int) -> tuple[tuple[int, int, int], ...]:
        """(rank, param_start, param_end) for every rank holding real elements of ``index``."""
        start, n = self.offsets[index], self.numels[index]
        if n == 0:
            return ()
        first, last = start // self.shard_numel, (start + n - 1) // self.shard_numel
        out = []
        for r in range(first, last + 1):
            lo, hi = r * self.shard_numel, (r + 1) * self.shard_numel
            out.append((r, max(lo, start) - start, min(hi, start + n) - start))
        return tuple(out)


def make_layout(numels: Sequence[int], world_size: int, *, align: int = DEFAULT_ALIGN) -> FlatLayout:
    """Lay out parameters of the given element counts for ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    offsets, cursor = [], 0
    for n in numels:
        if n < 0:
            raise ValueError(f"parameter sizes must be >= 0, got {n}")
        cursor = math.ceil(cursor / align) * align
        offsets.append(cursor)
        cursor += n
    used = cursor
    # At least one element per rank keeps every shard non-empty (a unit of empty parameters
    # still has a storage to point views at).
    shard = max(1, math.ceil(used / world_size))
    return FlatLayout(tuple(numels), tuple(offsets), world_size, align, used, shard)

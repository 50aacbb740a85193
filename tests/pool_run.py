"""The test side of one multi-rank run: skip a world size the ranks at hand cannot serve (under
torchrun with fewer processes), fail with the ranks' own error text, return the values."""
from __future__ import annotations

import pytest

TIMEOUT = 240.0


def run(pool, world_size, fn, payload, timeout_s: float = TIMEOUT):
    if world_size not in pool.world_sizes:  # under torchrun with fewer processes
        pytest.skip(f"world size {world_size} needs more ranks than {max(pool.world_sizes)}")
    res = pool.run(world_size, fn, payload, timeout_s=timeout_s)
    assert res.ok, res.error
    return res.values

"""The fixed small scenarios the plants are judged on: a 2-block MLP at W = 2 and 4, fast and
deterministic, fp32 and bf16."""
from __future__ import annotations

from typing import Optional

from verify.scenarios import Scenario

__all__ = ["mlp_scenario", "FAST2", "FAST4", "DET2", "DET4", "FAST4_ADAM", "FAST2_BF16",
           "DET2_BF16", "DET4_BF16"]

# A 2-block MLP (5 -> 7 -> 3; the 35-element weight and the 7-element bias are padded to 64 and
# 8 by alignment, so every shard holds padding), two steps, SGD unless said otherwise.


def mlp_scenario(world_size: int, mode: str = "fast", *, micro_batches: Optional[int] = None,
                 **kw) -> Scenario:
    """The fixed MLP case at ``world_size``; M = max(4, W) unless given; other fields by name."""
    kw.setdefault("steps", 2)
    s = Scenario(family="mlp", model=(("d_in", 5), ("width", 7)), world_size=world_size,
                 mode=mode, micro_batches=micro_batches or max(4, world_size), **kw)
    s.validate()
    return s


FAST2, FAST4 = mlp_scenario(2), mlp_scenario(4)
DET2, DET4 = mlp_scenario(2, "deterministic"), mlp_scenario(4, "deterministic")
FAST4_ADAM = mlp_scenario(4, optimizer="adam")
FAST2_BF16 = mlp_scenario(2, dtype="bf16")
DET2_BF16 = mlp_scenario(2, "deterministic", dtype="bf16")
DET4_BF16 = mlp_scenario(4, "deterministic", dtype="bf16")

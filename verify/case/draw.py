"""Drawing cases: the Hypothesis strategy of verify/strategies.py turned into a fixed list of
scenarios per world size and mode, the same for the same seed (the campaign, resume cases, the
pytest plugin and the bench all draw here)."""
from __future__ import annotations

import random
from typing import Optional, Sequence

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from verify import strategies
from verify.scenarios import Scenario

__all__ = ["PROFILE_MAX_STEPS", "draw_scenarios"]

# How large drawn cases get, per profile (steps per case).
PROFILE_MAX_STEPS = {"dev": 2, "ci": 3, "nightly": 4}


def draw_scenarios(*, world_size: int, mode: str, n: int, seed: int, profile: str = "ci",
                   dtypes: Sequence[str] = ("fp32", "bf16"),
                   families: Optional[Sequence[str]] = None, meshes: str = "1d",
                   offloads: Sequence[bool] = (False,)) -> list[Scenario]:
    """``n`` distinct scenarios for one world size and mode, the same for the same seed
    (``offloads``: the CPU-offload values drawn; the default draws none, as before it existed).

    Hypothesis generates small examples first; drawing 8n and sampling n of them (seeded)
    spreads the cases over the whole strategy instead of its simplest corner."""
    strategy = strategies.scenarios(world_sizes=(world_size,), modes=(mode,), dtypes=tuple(dtypes),
                                    max_steps=PROFILE_MAX_STEPS.get(profile, 3),
                                    families=None if families is None else tuple(families),
                                    meshes=meshes, offloads=tuple(offloads))
    drawn: list[Scenario] = []

    @hyp_seed(seed * 1_000 + world_size * 10 + (mode == "deterministic"))
    @settings(max_examples=max(8 * n, 20), database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy)
    def collect(s: Scenario) -> None:
        if s not in drawn:
            drawn.append(s)

    collect()
    picked = sorted(random.Random(seed).sample(range(len(drawn)), min(n, len(drawn))))
    return [drawn[i] for i in picked]

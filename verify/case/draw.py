"""Drawing cases: the Hypothesis strategy of verify/strategies.py turned into a fixed list of
scenarios per world size and mode, the same for the same seed (the campaign, resume cases, the
pytest plugin and the bench all draw here).

Draws that run: given the adapters that will run the cases (``sharders``) or any other check
(``accept``), a drawn scenario that they all decline (`skip_reason`: outside its declared
modes, dtypes, offload or meshes, or its ``unsupported()``) is set aside and counted (by reason,
in ``declined``; one that only some decline runs for the others), and the n cases are picked among the rest; where too few are left, up to
`REDRAWS` more rounds are drawn (bounded), and only then are declined ones used to make up n
(they run as ``skipped``). With nothing declined the draw is exactly the plain one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import Counter
from typing import Callable, Optional, Sequence

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from verify import strategies
from verify.scenarios import Scenario
from verify.sharders import load

__all__ = ["PROFILE_MAX_STEPS", "REDRAWS", "draw_scenarios", "skip_reason", "declined_by",
           "with_stateful_optimizer"]

# How large drawn cases get, per profile (steps per case).
PROFILE_MAX_STEPS = {"dev": 2, "ci": 3, "nightly": 4}
REDRAWS = 3     # extra rounds of drawing where the adapters declined too many draws


def skip_reason(s: Scenario, sharder) -> Optional[str]:
    """Why the adapter does not run ``s`` (outside its declared modes, dtypes, offload or
    meshes, or its ``unsupported()``), or None. Parent side, before anything runs."""
    if s.mode not in sharder.modes:
        return f"{sharder.name} declares modes {tuple(sharder.modes)}, not {s.mode!r}"
    if s.dtype not in sharder.dtypes:
        return f"{sharder.name} declares dtypes {tuple(sharder.dtypes)}, not {s.dtype!r}"
    if getattr(s, "offload", False) and not sharder.offload:
        return f"{sharder.name} does not declare offload = True"
    if s.mesh is not None and not getattr(sharder, "hsdp", False):
        return f"{sharder.name} does not declare hsdp = True (a {s.mesh[0]}x{s.mesh[1]} mesh)"
    reason = sharder.unsupported(s)
    return None if reason is None else str(reason)


def declined_by(sharders: Sequence) -> Callable[[Scenario], Optional[str]]:
    """The ``accept`` check of adapters (instances or specs): why none of them runs a scenario
    (the first one's reason), or None when at least one runs it. A scenario that only some
    decline is drawn: it runs for the others and is ``skipped`` with the reason for those (so a
    campaign of several sharders still checks what each one declares: ddp's fp32 alone does not
    take bf16 from fsdp_core). An adapter whose parent side raises is taken at its word later:
    the case is drawn and run_one reports the error."""
    adapters = [load(a) if isinstance(a, str) else a for a in sharders]

    def check(s: Scenario) -> Optional[str]:
        first = None
        for a in adapters:
            try:
                reason = skip_reason(s, a)
            except Exception:
                return None
            if reason is None:
                return None
            first = first or reason
        return first
    return check


# [Note: a draw independent of what the process imported]
# Hypothesis (6.131 on) draws a share of its choices from the literal constants of every local
# module in sys.modules, collected once per process. A seed's cases would then depend on what
# was imported before the draw (a user's adapter is local code; `import verify.compare` alone
# changed seed 0's draw) and on any literal added to verify/. Draws here run with that pool
# empty, so a seed gives the same cases in every process. Guarded: a Hypothesis without the
# pool draws as it does.
@contextlib.contextmanager
def _without_local_constants():
    try:
        from hypothesis.internal.conjecture import providers  # lazy: internal, version-dependent
        empty = providers.Constants(integers=providers.SortedSet(),
                                    floats=providers.SortedSet(key=providers.float_to_int),
                                    bytes=providers.SortedSet(), strings=providers.SortedSet())
        get, cache = providers._get_local_constants, providers.CONSTANTS_CACHE
        fresh = type(cache)(cache.max_size)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    providers._get_local_constants, providers.CONSTANTS_CACHE = (lambda: empty), fresh
    try:
        yield
    finally:
        providers._get_local_constants, providers.CONSTANTS_CACHE = get, cache


def _collect(strategy, seed: int, n_examples: int) -> list[Scenario]:
    drawn: list[Scenario] = []

    @hyp_seed(seed)
    @settings(max_examples=n_examples, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy)
    def collect(s: Scenario) -> None:
        if s not in drawn:
            drawn.append(s)

    with _without_local_constants():
        collect()
    return drawn


def draw_scenarios(*, world_size: int, mode: str, n: int, seed: int, profile: str = "ci",
                   dtypes: Sequence[str] = ("fp32", "bf16"),
                   families: Optional[Sequence[str]] = None, meshes: str = "1d",
                   offloads: Sequence[bool] = (False,), sharders: Sequence = (),
                   accept: Optional[Callable[[Scenario], Optional[str]]] = None,
                   declined: Optional[Counter] = None) -> list[Scenario]:
    """``n`` distinct scenarios for one world size and mode, the same for the same seed
    (``offloads``: the CPU-offload values drawn; the default draws none, as before it existed).
    ``sharders`` / ``accept``: see the module docstring; ``declined`` (a Counter) is added the
    reasons of the draws set aside.

    Hypothesis generates small examples first; drawing 8n and sampling n of them (seeded)
    spreads the cases over the whole strategy instead of its simplest corner."""
    strategy = strategies.scenarios(world_sizes=(world_size,), modes=(mode,), dtypes=tuple(dtypes),
                                    max_steps=PROFILE_MAX_STEPS.get(profile, 3),
                                    families=None if families is None else tuple(families),
                                    meshes=meshes, offloads=tuple(offloads))
    base = seed * 1_000 + world_size * 10 + (mode == "deterministic")
    drawn = _collect(strategy, base, max(8 * n, 20))
    checks = [c for c in (accept, declined_by(sharders) if sharders else None) if c is not None]
    if not checks:
        return _pick(drawn, n, random.Random(seed), families)
    runnable, refused, reasons = [], [], Counter()
    seen: set = set()
    for round_ in range(REDRAWS + 1):
        if round_:   # another round, elsewhere in the strategy: only where too few are left
            if len(runnable) >= n:
                break
            drawn = _collect(strategy, base + 7_919 * round_, max(8 * n, 20) * (round_ + 1))
        for s in drawn:
            if s in seen:
                continue
            seen.add(s)
            why = next((r for r in (c(s) for c in checks) if r is not None), None)
            if why is None:
                runnable.append(s)
            else:
                refused.append(s)
                reasons[why] += 1
    if declined is not None:
        declined.update(reasons)
    rng = random.Random(seed)
    picked = _pick(runnable, n, rng, families)
    short = n - len(picked)
    if short > 0 and refused:   # bounded redraws spent: the rest run as skipped, and say why
        picked += [refused[i] for i in sorted(rng.sample(range(len(refused)), min(short, len(refused))))]
    return picked


def _pick(candidates: list, n: int, rng: random.Random, families: Optional[Sequence[str]]) -> list:
    """``n`` of ``candidates`` at random, in their order. Where the caller named two or more
    families, each named family that has candidates gets one first (n allowing): a family you
    named is not left out by chance (two cases of two families missed one half the time)."""
    k = min(n, len(candidates))
    if not families or len(families) < 2:
        return [candidates[i] for i in sorted(rng.sample(range(len(candidates)), k))]
    chosen: list[int] = []
    for fam in families:
        mine = [i for i, s in enumerate(candidates) if s.family == fam and i not in chosen]
        if mine and len(chosen) < k:
            chosen.append(rng.choice(mine))
    rest = [i for i in range(len(candidates)) if i not in chosen]
    chosen += rng.sample(rest, k - len(chosen))
    return [candidates[i] for i in sorted(chosen)]


# [Note: a resume draw with optimizer state]
# A checkpoint that drops the optimizer's moments or its step count shows only under Adam (SGD
# keeps no state, momentum restarts loudly); with 4 optimizers drawn uniformly, n resume cases are
# all SGD-family one time in 2^n. So where two or more were drawn and none is Adam-family, the last
# double resume (else the last case) trains with AdamW instead, unless an adapter declines that.
_STATEFUL = ("adam", "adamw")


def with_stateful_optimizer(cases: list, accepts: Optional[Callable] = None) -> list:
    """Resume cases (verify/campaign/resume.py ``ResumeCase``) with one switched to AdamW where
    two or more have no Adam-family optimizer (see the Note); ``accepts(case, scenario)``: whether
    the adapters run the case with that scenario."""
    if len(cases) < 2 or any(c.scenario.optimizer in _STATEFUL for c in cases):
        return cases
    i = max((j for j, c in enumerate(cases) if c.resume_again_after is not None), default=len(cases) - 1)
    c = cases[i]
    s = dataclasses.replace(c.scenario, optimizer="adamw")
    if accepts is not None and not accepts(c, s):
        return cases
    return cases[:i] + [dataclasses.replace(c, scenario=s)] + cases[i + 1:]

"""What a checkpoint-resume case is (`ResumeCase`) and how a campaign draws them
(`draw_resume_cases`); running and judging them is verify/campaign/resume.py."""
from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

from verify.case.draw import declined_by, draw_scenarios, with_stateful_optimizer
from verify.scenarios import ALL_WORLD_SIZES, Scenario

__all__ = ["ResumeCase", "draw_resume_cases"]


@dataclass(frozen=True)
class ResumeCase:
    scenario: Scenario        # the case as it finishes: world_size = W_b, steps = the total
    save_world_size: int      # W_a: the world size that trains the first steps and saves
    save_after: int           # s: steps trained before the checkpoint, 1 <= s < steps
    # s2 (s < s2 < steps), or None: a double resume. The loading phase trains to s2, saves again
    # with the same adapter instance (so Stateful app state it keeps is reused), and a third
    # phase loads that at W_b and finishes: load -> train -> save -> load (pytorch#138575).
    resume_again_after: Optional[int] = None

    def __post_init__(self) -> None:
        s = self.scenario
        if self.save_world_size not in ALL_WORLD_SIZES:
            raise ValueError(f"save_world_size={self.save_world_size!r}: must be a power of two "
                             f"from 1 to {ALL_WORLD_SIZES[-1]}")
        if s.micro_batches < self.save_world_size:
            raise ValueError(f"micro_batches={s.micro_batches} is smaller than "
                             f"save_world_size={self.save_world_size}: the two phases would "
                             "train on different data")
        if not (isinstance(self.save_after, int) and 1 <= self.save_after < s.steps):
            raise ValueError(f"save_after={self.save_after!r}: must be in [1, steps={s.steps})")
        again = self.resume_again_after
        if again is not None and not (isinstance(again, int) and self.save_after < again < s.steps):
            raise ValueError(f"resume_again_after={again!r}: must be in (save_after="
                             f"{self.save_after}, steps={s.steps})")

    @property
    def scenario_a(self) -> Scenario:
        """The scenario as the saving world size runs it (same M, same data)."""
        return self.scenario.with_world_size(self.save_world_size)

    @property
    def label(self) -> str:
        again = "" if self.resume_again_after is None else \
            f", saved and resumed again after {self.resume_again_after}"
        return (f"W={self.save_world_size} -> {self.scenario.world_size} after "
                f"{self.save_after}/{self.scenario.steps} steps{again}")


def draw_resume_cases(*, n: int, seed: int, world_sizes: Sequence[int],
                      modes: Sequence[str] = ("fast", "deterministic"), profile: str = "ci",
                      dtypes: Sequence[str] = ("fp32", "bf16"),
                      families: Optional[Sequence[str]] = None,
                      offloads: Sequence[bool] = (False,), sharders: Sequence = (),
                      declined: Optional[Counter] = None) -> list[ResumeCase]:
    """``n`` resume cases, the same for the same arguments: modes in turn, (W_a, W_b) two
    different world sizes of ``world_sizes`` (equal only when there is one), scenarios drawn by
    the campaign's strategy at max(W_a, W_b) (so M serves both) with at least 2 steps, and the
    checkpoint after a step drawn in [1, steps). Every second case is a double resume (saved
    again after a step in (s, steps), steps raised to s + 2 where needed). ``sharders``: the
    adapters that will run them; a scenario one of them declines at either world size is drawn
    again (verify/case/draw.py; ``declined`` counts the reasons)."""
    if n <= 0:
        return []
    sizes = sorted(set(world_sizes))
    rng = random.Random(f"resume/{seed}")
    picks = []
    for i in range(n):
        w_a, w_b = rng.sample(sizes, 2) if len(sizes) > 1 else (sizes[0], sizes[0])
        picks.append((w_a, w_b, modes[i % len(modes)]))
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (w_a, w_b, mode) in enumerate(picks):
        groups[(max(w_a, w_b), mode)].append(i)
    cases: list[Optional[ResumeCase]] = [None] * n
    check = declined_by(sharders) if sharders else None
    for (w, mode), idxs in sorted(groups.items()):
        sizes_here = {picks[i][0] for i in idxs} | {picks[i][1] for i in idxs}
        drawn = draw_scenarios(world_size=w, mode=mode, n=len(idxs), seed=seed + 1009,
                               profile=profile, dtypes=dtypes, offloads=offloads,
                               accept=_at_both(check, sizes_here) if sharders else None,
                               declined=declined,
                               **({} if families is None else {"families": families}))
        for j, i in enumerate(idxs):
            s = drawn[j % len(drawn)]
            # ties kept: a resume case is about the checkpoint, not the wrap plan
            s = dataclasses.replace(s, steps=max(s.steps, 2), ties="kept")
            cut = rng.randint(1, s.steps - 1)
            again = None
            if i % 2:   # every second case resumes twice; its own RNG leaves the others as drawn
                s = dataclasses.replace(s, steps=max(s.steps, cut + 2))
                again = random.Random(f"resume-again/{seed}/{i}").randint(cut + 1, s.steps - 1)
            cases[i] = ResumeCase(s.with_world_size(picks[i][1]), picks[i][0], cut, again)
    out = [c for c in cases if c is not None]
    return with_stateful_optimizer(out, None if check is None else (
        lambda c, s: _at_both(check, {c.save_world_size, s.world_size})(s) is None))


def _at_both(check, sizes):
    """``accept`` for a resume draw: the scenario (at least 2 steps) at every world size its
    cases save or load at."""
    def accept(s: Scenario) -> Optional[str]:
        s = dataclasses.replace(s, steps=max(s.steps, 2))
        for w in sorted(sizes):
            why = check(s.with_world_size(w))
            if why is not None:
                return f"{why} (W={w})"
        return None
    return accept

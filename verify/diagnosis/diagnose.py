"""The campaign's diagnosis of its failing cases, after every case has run (so a clean
campaign pays nothing): failures grouped by signature (`verify.diagnosis.shrink.signature`), and for
each group, once, within the campaign's shrink budget:

1. the representative (the group's first case) is replayed: a failure that does not
   reproduce the same way is reported as flaky (and not shrunk);
2. it is shrunk to a minimal failing scenario (`verify.diagnosis.shrink`);
3. the first divergence is located (`verify.diagnosis.locate`), in the original scenario and in the
   minimal one: the step, the phase (forward / backward / optimizer) and the unit.

Groups run worst first (`worst_first`: beyond tolerance, then other invariants, errors, last-bit;
within a class the greatest excess over the tolerance), each led by its worst case, so the budget
goes to the failure that matters most and every signature gets a minimal case of its own.

A hung case's first divergent collective (`verify.diagnosis.hangs`) comes with the case itself, from the
pool, and needs no re-run. Every case of a group gets the group's fields (`CaseResult`:
signature, flaky, minimal_scenario_json, minimal_replay, minimal_reason, shrink_note,
divergence); `console_lines` is what the campaign prints.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from verify.results import CaseResult, worst_first
from verify.scenarios import Scenario
from verify.diagnosis.locate import locate_divergence
from verify.diagnosis.shrink import first_line, same_failure, shrink, signature, size_line

__all__ = ["diagnose_failures", "console_lines", "first_line", "worst_first", "DEFAULT_SHRINK_BUDGET_S"]

DEFAULT_SHRINK_BUDGET_S = 300.0


def diagnose_failures(pool, results: list[CaseResult], *, run_one: Callable[..., CaseResult],
                      replay_command: Callable[..., str], plant: Optional[str] = None,
                      budget_s: float = DEFAULT_SHRINK_BUDGET_S,
                      timeout_s: Optional[float] = None,
                      log: Callable[[str], None] = lambda line: print(line, flush=True),
                      locate: bool = True) -> list[list[CaseResult]]:
    """Diagnose the failing (non-resume) cases of ``results`` in place; returns the groups.
    ``budget_s`` bounds the whole diagnosis (0: none of it runs). ``run_one`` and
    ``replay_command`` are verify.campaign.run's (passed in: this module does not import the
    campaign, which imports it; `verify.campaign.run.diagnose` passes them)."""
    groups: dict[str, list[CaseResult]] = {}
    for c in sorted((c for c in results if not c.passed and c.save_world_size is None), key=worst_first):
        c.signature = signature(c, plant)
        groups.setdefault(c.signature, []).append(c)   # worst first: the group's worst case leads
    if not groups or budget_s <= 0:
        return list(groups.values())
    deadline = time.monotonic() + budget_s
    log(f"diagnosing {sum(map(len, groups.values()))} failing case(s) with "
        f"{len(groups)} signature(s); shrink budget {budget_s:g} s")
    for sig, cases in groups.items():
        rep = cases[0]
        spec = rep.sharder_spec or rep.sharder
        s = Scenario.from_json(rep.scenario_json)

        def run(cand: Scenario) -> CaseResult:
            return run_one(pool, cand, sharder=spec, plant=plant, timeout_s=timeout_s)

        if time.monotonic() >= deadline:
            rep.shrink_note = "not shrunk: the shrink budget was spent on other signatures"
            _share(cases)
            continue
        again = run(s)
        if not same_failure(rep, again):
            rep.flaky = True
            rep.shrink_note = ("flaky: the failure did not reproduce on replay (the replay "
                               + ("passed" if again.passed else
                                  f"gave {again.verdict}: {first_line(again.reason)}") + ")")
            log(f"  {sig}: FLAKY, {rep.shrink_note}")
            _share(cases)
            continue
        rep.flaky = False
        got = shrink(run, s, rep, deadline=deadline)
        rep.minimal_scenario_json = got.scenario.to_json()
        rep.minimal_replay = replay_command(got.scenario, spec, plant)
        rep.minimal_reason = got.case.reason
        rep.shrink_note = got.note()
        if got.case.hang:
            rep.hang = rep.hang or got.case.hang
        log(f"  {sig}: shrunk to {size_line(got.scenario)}; {got.note()}")
        if locate and rep.verdict == "fail":
            rep.divergence = locate_divergence(pool, s, again, sharder=spec, plant=plant,
                                               timeout_s=timeout_s)
            log(f"  {sig}: {rep.divergence}")
            if got.scenario != s:
                rep.minimal_divergence = locate_divergence(
                    pool, got.scenario, got.case, sharder=spec, plant=plant, timeout_s=timeout_s)
                log(f"  {sig}: minimal scenario: {rep.minimal_divergence}")
        _share(cases)
    return list(groups.values())


def _share(cases: list[CaseResult]) -> None:
    rep = cases[0]
    for c in cases[1:]:
        c.flaky, c.minimal_scenario_json = rep.flaky, rep.minimal_scenario_json
        c.minimal_replay, c.minimal_reason = rep.minimal_replay, rep.minimal_reason
        c.divergence, c.minimal_divergence = rep.divergence, rep.minimal_divergence
        c.shrink_note = f"same signature as the {rep.family} W={rep.world_size} case: " + \
            (rep.shrink_note or "")


def console_lines(groups: list[list[CaseResult]]) -> list[str]:
    out = []
    for cases in groups:
        rep = cases[0]
        out.append(f"\nDIAGNOSIS {rep.signature} ({len(cases)} case{'s' * (len(cases) != 1)})")
        try:
            orig = size_line(Scenario.from_json(rep.scenario_json))
        except Exception:
            orig = rep.family
        out.append(f"  original: {orig}: {first_line(rep.reason)}")
        out.append(f"    replay: {rep.replay}")
        if rep.minimal_scenario_json:
            out.append(f"  minimal:  {size_line(Scenario.from_json(rep.minimal_scenario_json))}: "
                       f"{first_line(rep.minimal_reason)}")
            out.append(f"    replay: {rep.minimal_replay}")
        if rep.flaky:
            out.append("  FLAKY: " + rep.shrink_note)
        elif rep.shrink_note:
            out.append(f"  shrinking: {rep.shrink_note}")
        if rep.divergence:
            out.append(f"  {rep.divergence}")
        if rep.minimal_divergence:
            out.append(f"  minimal scenario's {rep.minimal_divergence}")
        if rep.hang:
            out.append("  hang: " + rep.hang.replace("\n", "\n        "))
    return out

"""The planted-bug suite (`python -m verify mutants`, `make mutants`): run every planted bug of
verify/tools/plants/ on its fixed scenarios through one rank pool and say, per bug, whether the
harness caught it and by which check.

A bug is caught when every one of its ``catch`` scenarios fails (verdict 'fail' or 'error')
with the bug planted. Before any bug runs, each scenario runs once clean and must pass: a
harness that fails a clean run proves nothing by failing a planted one. ``blind`` scenarios
(where the harness cannot see a bug by design, e.g. last bits under the tolerance tier) are run
only on request and reported, never counted.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from verify.campaign.run import run_one
from verify.ranks.pool import RankPool
from verify.results import CaseResult
from verify.scenarios import Scenario
from verify.tools.plants import BUGS, FAULTS, PLANTS

__all__ = ["failed_checks", "describe", "MutantOutcome", "run_mutants", "main"]

# Checks, in the order they are named. Numerical checks are named after the tier that held them.
CHECKS = ("error", "bitwise", "tolerance", "reported", "structure", "gradients", "optimizer_state",
          "padding", "resharded", "reassembly", "collectives", "backend")


def failed_checks(case: CaseResult) -> tuple[str, ...]:
    """Which checks a case failed: 'error' (a rank raised, died or hung), the numerical tier
    that failed ('bitwise', 'tolerance', 'reported'), 'structure' (missing or unexpected
    parameters), 'gradients' (the reduced gradient), 'optimizer_state' (the optimizer's moments
    and momentum buffers), 'padding', 'resharded' (a unit still unsharded after backward),
    'reassembly', 'collectives', 'backend' (a
    torch.distributed collective failed verify/ranks/backend_check.py)."""
    if case.verdict == "error":
        return ("error",)
    found = {c["check"] for c in case.checks if c["status"] == "fail"}
    return tuple(c for c in CHECKS if c in found)


def describe(s: Scenario) -> str:
    """A short label: 'fast W=2 sgd', 'det W=4 M=8 bf16'."""
    mode = "det" if s.mode == "deterministic" else "fast"
    extra = f" M={s.micro_batches}" if s.micro_batches != max(4, s.world_size) else ""
    dtype = " bf16" if s.dtype == "bf16" else ""
    return f"{mode} W={s.world_size}{extra} {s.optimizer}{dtype}"


@dataclass
class MutantOutcome:
    name: str
    kind: str
    caught: bool
    cases: list[tuple[Scenario, CaseResult, tuple[str, ...]]] = field(default_factory=list)
    blind: list[tuple[Scenario, CaseResult, tuple[str, ...]]] = field(default_factory=list)

    @property
    def checks(self) -> tuple[str, ...]:
        found = {c for _, _, checks in self.cases for c in checks}
        return tuple(c for c in CHECKS if c in found)

    def line(self) -> str:
        status = "caught" if self.caught else "MISSED"
        per_case = "; ".join(f"{describe(s)}: {'+'.join(ch) or 'PASSED'}"
                             for s, _, ch in self.cases)
        text = f"{status:<7} {self.name:<30} by {'+'.join(self.checks) or 'nothing'}  ({per_case})"
        for s, case, _ in self.cases:
            if case.verdict == "error":
                first = case.reason.strip().splitlines()[0] if case.reason.strip() else ""
                text += f"\n        {'':<30} {describe(s)} error: {first[:160]}"
        if self.blind:
            seen = "; ".join(f"{describe(s)}: {'+'.join(ch) or 'passes'}"
                             for s, _, ch in self.blind)
            text += f"\n        {'':<30} blind by design: {seen}"
        return text


def run_mutants(pool, names: Optional[Iterable[str]] = None, *, blind: bool = False,
                timeout_s: Optional[float] = None,
                out: Callable[[str], None] = print) -> tuple[list[str], list[MutantOutcome]]:
    """Run the named plants (default: every bug) on their scenarios through ``pool``.

    Returns (clean failures, outcomes): the replay lines of scenarios that failed clean (must be
    empty) and one `MutantOutcome` per plant, printed as they finish."""
    plants = [PLANTS[n] for n in (names if names is not None else BUGS)]
    scenarios: list[Scenario] = []
    for p in plants:
        for s in p.catch + (p.blind if blind else ()):
            if s not in scenarios:
                scenarios.append(s)
    clean_failures = []
    for s in scenarios:
        case = run_one(pool, s, timeout_s=timeout_s)
        if not case.passed:
            clean_failures.append(f"clean run failed ({'+'.join(failed_checks(case))}): "
                                  f"{case.replay}\n{case.reason}")
            out(f"CLEAN RUN FAILED: {describe(s)}: {case.replay}")
    outcomes = []
    for p in plants:
        outcome = MutantOutcome(p.name, p.kind, caught=True)
        for s in p.catch:
            case = run_one(pool, s, timeout_s=timeout_s, plant=p.name)
            checks = failed_checks(case)
            outcome.cases.append((s, case, checks))
            outcome.caught &= not case.passed
        for s in (p.blind if blind else ()):  # blind: to the equivalence checks alone
            case = run_one(pool, s, timeout_s=timeout_s, plant=p.name, backend_check=False)
            outcome.blind.append((s, case, failed_checks(case)))
        outcomes.append(outcome)
        out(outcome.line())
    return clean_failures, outcomes


def main(names: Optional[Sequence[str]] = None, *, blind: bool = False, faults: bool = False,
         timeout_s: float = 60.0, pool=None) -> int:
    """`python -m verify mutants`: 0 when every bug is caught and every clean run passes.
    ``pool``: run the bugs on this pool instead of a new one (faults always get their own)."""
    torch.set_num_threads(1)
    names = list(names) if names else list(BUGS)
    if faults and not set(names) & set(FAULTS):
        names += list(FAULTS)
    bugs = [n for n in names if PLANTS[n].kind == "bug"]
    fault_names = [n for n in names if PLANTS[n].kind == "fault"]
    started = time.perf_counter()
    outcomes: list[MutantOutcome] = []
    clean: list[str] = []
    if bugs:
        width = max(s.world_size for n in bugs for s in PLANTS[n].catch + PLANTS[n].blind)
        print(f"planting {len(bugs)} bug(s) on their scenarios (each also runs clean)",
              flush=True)
        with contextlib.nullcontext(pool) if pool is not None \
                else RankPool(width, timeout_s=timeout_s) as bug_pool:
            c, o = run_mutants(bug_pool, bugs, blind=blind, timeout_s=timeout_s,
                               out=lambda line: print(line, flush=True))
            clean += c
            outcomes += o
    if fault_names:
        # Faults restart the pool: a pool of their own keeps the restarts cheap.
        width = max(s.world_size for n in fault_names for s in PLANTS[n].catch)
        with RankPool(width, timeout_s=timeout_s) as fault_pool:
            c, o = run_mutants(fault_pool, fault_names, timeout_s=min(timeout_s, 20.0),
                               out=lambda line: print(line, flush=True))
            clean += c
            outcomes += o
    caught = sum(o.caught for o in outcomes)
    elapsed = time.perf_counter() - started
    print(f"caught {caught}/{len(outcomes)} in {elapsed:.1f}s"
          + (f"; {len(clean)} clean run(s) FAILED" if clean else ""))
    for text in clean:
        print(text)
    return 0 if caught == len(outcomes) and not clean else 1

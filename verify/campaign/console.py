"""What a replayed case prints (`python -m verify replay`), and what a failed drawn case says in a
test report (the pytest plugin's `failure_message`)."""
from __future__ import annotations

from verify.results import CaseResult

__all__ = ["failure_message", "print_case"]


def print_case(case: CaseResult, what: str) -> int:
    """A replayed case, step by step, then why it failed; returns the exit code."""
    print(f"{case.verdict.upper()}: {case.sharder} {what} tier={case.tier}")
    for st in case.steps:
        print(f"  step {st.step}: loss {st.loss:.9g} vs {st.loss_ref:.9g}  max|d param| {st.max_abs:.3g} "
              f"max ULP {st.max_ulp} bitwise={st.bitwise} padding_ok={st.padding_ok} "
              f"reassembly_ok={st.reassembly_ok} collectives_ok={st.collectives_ok}")
    if case.tier_note:
        print(case.tier_note)
    if case.reason:
        print(case.reason)
    if case.divergence:
        print(case.divergence)
    return 0 if case.passed else 1


def failure_message(case: CaseResult, head: int = 6) -> str:
    """A case that did not pass, for a test report: its verdict, the reason's first ``head``
    lines and the replay command come first (a per-rank traceback can run to hundreds of lines),
    then the rest of the reason."""
    lines = case.reason.splitlines() or ["(no reason recorded)"]
    mesh = f" mesh {case.mesh}" if case.mesh else ""
    out = [f"{case.verdict.upper()}: {case.sharder} W={case.world_size}{mesh} {case.mode} "
           f"{case.dtype} {case.family} (tier {case.tier})"]
    out += ["  " + line for line in lines[:head]]
    rest = lines[head:]
    if rest:
        out.append(f"  ... {len(rest)} more lines of the reason below")
    if case.divergence:
        out.append(f"first divergence: {case.divergence}")
    out.append(f"replay: {case.replay}")
    return "\n".join(out + ([""] + rest if rest else []))

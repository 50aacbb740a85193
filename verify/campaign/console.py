"""What a replayed case prints (`python -m verify replay`)."""
from __future__ import annotations

from verify.results import CaseResult

__all__ = ["print_case"]


def print_case(case: CaseResult, what: str) -> int:
    """A replayed case, step by step, then why it failed; returns the exit code."""
    print(f"{case.verdict.upper()}: {case.sharder} {what} tier={case.tier}")
    for st in case.steps:
        print(f"  step {st.step}: loss {st.loss:.9g} vs {st.loss_ref:.9g}  max|d param| {st.max_abs:.3g} "
              f"max ULP {st.max_ulp} bitwise={st.bitwise} padding_ok={st.padding_ok} "
              f"reassembly_ok={st.reassembly_ok} collectives_ok={st.collectives_ok}")
    if case.reason:
        print(case.reason)
    return 0 if case.passed else 1

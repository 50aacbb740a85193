"""[Note: a regrouped gradient sum]: the tier a fast-mode case is judged at again where one tensor
feeds several wrap units (`regrouping_tier`; verify/case/judge.py re-exports it)."""
from __future__ import annotations

from typing import Optional

from verify.case.severity import LAST_BIT, NUMERIC_CHECKS
from verify.results import CaseResult
from verify.scenarios import Scenario
from verify.sharders._inputs import shared_unit_inputs

__all__ = ["regrouping_tier"]


# [Note: a regrouped gradient sum]
# Where one gradient-requiring tensor feeds two or more wrap units (q, k and v wrapped one by
# one), a sharder that wraps each unit's inputs in an autograd function (FSDP2 does) changes the
# order autograd accumulates that tensor's gradient in: a few ULP from the reference's sum even
# at W = 1, with nothing wrong in the sharding. The built-in FSDP2 and DeepSpeed ZeRO-3 adapters
# say so in `tier()`; an adapter written against DESIGN section 6 alone does not know to. So a
# fast-mode case held to the bitwise tier whose failures are all numerical, in a scenario with
# such a tensor, is judged again at the tier such adapters declare, and says why
# (`CaseResult.tier_note`): with SGD (momentum or not) only if every difference is in the last
# bits (the tolerance tier); with Adam whatever its size, since Adam's first steps turn a
# last-bit gradient difference into a large one (the reported tier, with its bound of what Adam
# can do and, where the adapter gives reduced gradients, the replayed steps). An adapter whose
# ``regroups_shared_inputs`` is False (it leaves its units' inputs alone: fsdp_core, ddp) is
# held to the bitwise tier there too.
def regrouping_tier(s: Scenario, sharder, case: CaseResult) -> tuple[Optional[str], str]:
    """(the looser tier, why) for a case [Note: a regrouped gradient sum] applies to, else
    (None, "")."""
    sgd = s.optimizer in ("sgd", "sgd_momentum")
    if (case.verdict != "fail" or case.tier != "bitwise" or s.mode != "fast"
            or getattr(sharder, "regroups_shared_inputs", None) is False
            or any(c.get("status") == "fail" and c.get("check") not in NUMERIC_CHECKS
                   for c in case.checks) or (sgd and case.severity != LAST_BIT)):
        return None, ""
    units = shared_unit_inputs(s)
    if not units:
        return None, ""
    tier, which = ("tolerance", "in the last bits") if sgd else ("reported", "in its numbers")
    return tier, (f"held to the {tier} tier: it differed only {which}, and "
                  f"one tensor feeds several units ({', '.join(units[:4])}{', ...' * (len(units) > 4)}),"
                  " whose gradient sum a sharder that wraps each unit's inputs in an autograd "
                  "function (as FSDP2 does) regroups; regroups_shared_inputs = False on the "
                  "adapter holds it bitwise ([Note: a regrouped gradient sum], verify/case/regroup.py)")

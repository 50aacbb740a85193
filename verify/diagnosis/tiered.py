"""The first divergence of a case held to the tolerance or reported tier, from the judge's own
tier-aware checks (verify/diagnosis/locate.py asks here before re-running a case bit for bit),
and what both share: which wrap unit owns a parameter."""
from __future__ import annotations

import re
from typing import Any, Optional

from verify.scenarios import Scenario, build_model, wrap_units

__all__ = ["from_tier", "unit_of", "wrap_unit_names", "backward_order"]


def unit_of(name: str, units: list[str]) -> str:
    """The innermost wrap unit (by name) that owns parameter ``name``; "<root>" if none."""
    best = ""
    for u in units:
        if u and (name == u or name.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best or "<root>"


def backward_order(grads: dict, units: list[str]) -> list:
    """``grads``' items in the order backward reduces them: the units in reverse forward order,
    the root's last; within a unit, the parameters in reverse registration order."""
    order = {u: i for i, u in enumerate(reversed([u for u in units if u]))}
    names = list(grads)
    key = {n: (order.get(unit_of(n, units), len(order)), -i) for i, n in enumerate(names)}
    return [(n, grads[n]) for n in sorted(names, key=key.__getitem__)]


_REPLAYED = re.compile(r"parameter '([^']+)' against the replayed step")


def from_tier(s: Scenario, case, d: int) -> Optional[str]:
    """In the tolerance and reported tiers the bits of outputs and gradients differ by design,
    so a bitwise re-run would name the first harmless last-bit difference. There the judge's
    own tier-aware checks of step ``d`` say the phase: the loss (forward; at step 0 the bitwise
    re-run is right and names the unit), the gradients check (backward), or the replayed step
    with the gradients passing (optimizer: [Note: the replayed steps] in verify/case/judge.py)."""
    if case.tier not in ("tolerance", "reported"):
        return None
    at_d = {c["check"]: c for c in case.checks or [] if c.get("step") == d}
    grads, tier = at_d.get("gradients", {}), at_d.get(case.tier, {})
    where = f"first divergence: step {d}"
    loss = next((ln for ln in (tier.get("detail") or "").splitlines() if ": loss: " in ln), None) \
        if tier.get("status") == "fail" else None
    if loss is not None:
        # The forward diverged before any gradient: the phase `first_phase` names in the
        # headline. At step 0 the parameters are the initial ones, bit for bit, so the bitwise
        # re-run names the unit; later they differ in the last bits by design.
        if d == 0:
            return None
        return (f"{where}, forward ({case.tier} tier): the loss is beyond the tier while the "
                f"parameters after step {d - 1} were within it ({loss.split(': ', 1)[-1]}); the "
                f"unit is not named, since a bit-for-bit re-run would stop at a last-bit "
                f"difference")
    if grads.get("status") == "fail":
        detail = (grads.get("detail") or "").splitlines()
        return f"{where}, backward ({case.tier} tier): {detail[0] if detail else 'reduced gradients differ'}"
    state = at_d.get("optimizer_state", {})
    if state.get("status") == "fail" and grads.get("status") == "pass":
        detail = (state.get("detail") or "").splitlines()
        return (f"{where}, optimizer: the reduced gradients are within the {case.tier} tier, and "
                f"the optimizer state after the step is not: {detail[0] if detail else '?'}")
    m = _REPLAYED.search(tier.get("detail") or "") if tier.get("status") == "fail" else None
    if m is not None and grads.get("status") == "pass":
        line = next(ln for ln in tier["detail"].splitlines() if m.group(0) in ln)
        units = [n for n, _ in wrap_unit_names(s)]
        return (f"{where}, {unit_of(m.group(1), units)} optimizer: the reduced gradients are "
                f"within the {case.tier} tier, and the parameters after the step are not what "
                f"{s.optimizer} computes from them ({line.split(': ', 1)[-1]})")
    return None


def wrap_unit_names(s: Scenario) -> list[tuple[str, Any]]:
    """(name, module) of the scenario's wrap units on a meta-device model."""
    model = build_model(s, device="meta")
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in wrap_units(s, model)]

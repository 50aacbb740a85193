"""How bad a failure is: how far a failing check is from the next looser tier.

A numerical check that fails in the bitwise tier is *last-bit* when every differing element is
within the dtype's `torch.testing` tolerance (the tolerance tier's bounds for the scenario,
`verify.compare.bounds_for`), and *beyond tolerance* otherwise; one that fails in the tolerance
or reported tier is beyond its own bounds. The figure is the *excess*: the greatest
|actual - expected| / (atol + rtol * |expected|) over the differing elements (at most 1 for a
last-bit failure; NaN or inf against a finite value counts as infinite).

A case's class is its worst failing check's: ``beyond tolerance`` > ``invariant`` (a
non-numerical check failed: padding, structure, collectives, reassembly, resharded, loaded,
plan, backend) > ``last-bit``; an error (the case did not complete) is ``error``. The
campaign's headline counts the classes apart, the diagnosis runs worst first
(verify/diagnosis/diagnose.py), and signatures carry the class (verify/diagnosis/shrink.py).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional

import torch

from verify.compare import TOLERANCES, Tolerance, bounds_for, int_view, ulp_distance
from verify.results import NEAR_ZERO_ULP, SEVERITY_CLASSES

__all__ = ["LAST_BIT", "BEYOND", "INVARIANT", "ERROR", "CLASSES", "NUMERIC_CHECKS", "Severity",
           "excess", "step_severity", "tensors_severity", "case_severity", "rank",
           "gradient_tolerance", "state_severity"]

LAST_BIT, BEYOND, INVARIANT, ERROR = "last-bit", "beyond tolerance", "invariant", "error"
CLASSES = SEVERITY_CLASSES      # worst first: (BEYOND, INVARIANT, ERROR, LAST_BIT)
NUMERIC_CHECKS = ("bitwise", "tolerance", "reported", "gradients", "optimizer_state")


class Severity(NamedTuple):
    cls: str                 # LAST_BIT or BEYOND
    excess: float            # greatest |d| / (atol + rtol |e|); <= 1 for last-bit
    ulp: int                 # greatest ULP distance
    line: str                # the sentence the check's detail ends with


def excess(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> tuple[float, int]:
    """(greatest |a - e| / (atol + rtol |e|) over the elements that differ, greatest ULP)."""
    a, e = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    differs = int_view(a).ne(int_view(e))
    if not bool(differs.any()):
        return 0.0, 0
    a64, e64 = a[differs].double(), e[differs].double()
    ratio = (a64 - e64).abs() / (tol.atol + tol.rtol * e64.abs())
    worst = math.inf if bool(ratio.isnan().any()) else float(ratio.max())
    return worst, int(ulp_distance(a[differs], e[differs]).max())


def _figure(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _line(cls: str, ratio: float, ulp: int, what: str, tol: Tolerance) -> str:
    bound = f"{what} (rtol {tol.rtol:g}, atol {tol.atol:g})"
    if cls == LAST_BIT:
        near = " (between values near 0, where ulps say nothing of size)" if ulp > NEAR_ZERO_ULP else ""
        return (f"severity: last-bit, {ulp} ulp at most{near}, within {bound}: the worst difference "
                f"is {_figure(ratio)} of it")
    return f"severity: beyond tolerance, {_figure(ratio)}x {bound} at the worst element"


def tensors_severity(pairs, tol: Tolerance, what: str, *, last_bit_possible: bool = True) -> Severity:
    """The severity of (actual, expected) pairs held to ``tol`` (``what`` names it)."""
    worst, ulp = 0.0, 0
    for a, e in pairs:
        if a.shape != e.shape or a.dtype != e.dtype:
            continue
        r, u = excess(a, e, tol)
        worst, ulp = max(worst, r), max(ulp, u)
    cls = LAST_BIT if last_bit_possible and worst <= 1.0 else BEYOND
    return Severity(cls, worst, ulp, _line(cls, worst, ulp, what, tol))


def step_severity(s, tier: str, *, loss: torch.Tensor, loss_ref: torch.Tensor,
                  params: Mapping[str, torch.Tensor], params_ref: Mapping[str, torch.Tensor]
                  ) -> Severity:
    """A failing numerical check of one step: in the bitwise tier against the tolerance tier's
    bounds (the dtype's torch.testing tolerance), in a looser tier against its own bounds."""
    looser = tier == "bitwise"
    bounds = bounds_for(s, "tolerance" if looser else tier)
    what = f"the {s.dtype} torch.testing tolerance" if looser else f"the {tier} tier's bound"
    pairs = [(params[n], params_ref[n]) for n in params_ref if n in params]
    loss_sev = tensors_severity([(loss, loss_ref)], bounds.loss, what, last_bit_possible=looser)
    par_sev = tensors_severity(pairs, bounds.params, what, last_bit_possible=looser)
    worst = max((loss_sev, par_sev), key=lambda v: (v.cls == BEYOND, v.excess))
    return worst._replace(ulp=max(loss_sev.ulp, par_sev.ulp))


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64"}


def gradient_tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def state_severity(tier: str, dtype: str, failed: list) -> Severity:
    """The severity of a failing ``gradients`` or ``optimizer_state`` check
    (verify/case/state_check.py), from what it collected in ``failed``: (reassembled, reference)
    pairs that differ bit for bit, None for a tensor that could not be compared, a group's
    relative norm error over its bound (a float). In the bitwise tier the pairs are held to the
    dtype's torch.testing tolerance (last-bit only where every failing tensor could be
    compared, and where no group of them is off by more than the tolerance tier's relative-norm
    bound: a gradient scaled by 2 is not last-bit even where its elements are below atol); in a
    looser tier the check failed its own relative-norm bound: beyond tolerance, by that ratio."""
    pairs = [p for p in failed if isinstance(p, tuple)]
    ratios = [r for r in failed if isinstance(r, float)]
    if tier == "bitwise" and pairs and not ratios:
        tdtype = pairs[0][1].dtype   # the tensors' own (fp32 gradients of a bf16 scenario)
        name = _DTYPE_NAMES.get(tdtype, str(tdtype).replace("torch.", ""))
        return tensors_severity(pairs, gradient_tolerance(tdtype), f"the {name} torch.testing "
                                "tolerance", last_bit_possible=None not in failed)
    worst = max(ratios) if ratios else math.inf
    bound = "the tolerance tier's" if tier == "bitwise" else f"the {tier} tier's"
    why = (f"{_figure(worst)}x {bound} relative-norm bound over all such tensors" if ratios
           else "the pieces could not be compared element by element")
    return Severity(BEYOND, worst, 0, f"severity: beyond tolerance, {why}")


def rank(cls: str) -> int:
    """0 for the worst class; unknown classes after the known ones."""
    return CLASSES.index(cls) if cls in CLASSES else len(CLASSES)


def case_severity(checks: list[dict], verdict: str) -> tuple[str, Optional[float]]:
    """(class, greatest excess of its numerical checks or None) of a case's failing checks;
    ("", None) for a case that did not fail. An infinite excess (pieces that could not be compared
    element by element) counts only where no check measured a finite one: it would hide the
    measured size."""
    if verdict == "error":
        return ERROR, None
    if verdict != "fail":
        return "", None
    classes, worst, unmeasured = [], None, False
    for c in checks:
        if c.get("status") != "fail":
            continue
        if c.get("check") in NUMERIC_CHECKS and c.get("severity"):
            classes.append(c["severity"])
            if c.get("excess") is not None and math.isinf(float(c["excess"])):
                unmeasured = True
            elif c.get("excess") is not None:
                worst = max(worst or 0.0, float(c["excess"]))
        elif c.get("check") in NUMERIC_CHECKS:
            classes.append(BEYOND)
        else:
            classes.append(INVARIANT)
    if worst is None and unmeasured:
        worst = math.inf
    return (min(classes, key=rank) if classes else BEYOND), worst

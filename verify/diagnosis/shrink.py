"""Shrinking a failing case: the smallest scenario that still fails the same way.

A greedy reducer over the scenario's fields, not Hypothesis' shrinker: every candidate costs a
run through the pool, so the order is chosen to take the largest steps first and to stay
predictable. Candidates, in order (each one field changed, invalid ones skipped):

  fewer steps (1, then one fewer) -> an HSDP mesh to 1-D -> smaller world size (2, 4, ... below the current; never
  1 from W >= 2, since at W=1 nothing is sharded and a failure there is another code path) ->
  the model's shape: root_only / per_block wrapping, each int model kwarg toward 1 (1, 2, 3,
  half, half + 1, one less, two less: both parities, since padding needs odd sizes; the
  family's depth / n_layer / n_blocks and its widths alike, so families named by import path
  shrink too; below 2 only where that removes wrap units: a width of 1 is degenerate), bool
  model kwargs to False, all of these ordered by the size of the model they give (fewest
  wrap units that own parameters, then fewest parameters, built on the meta device) ->
  micro_batches down to W -> micro_batch_size 1 -> optimizer sgd -> weight_decay 0
  -> fp32 -> no CPU offload

A candidate is accepted when it fails the same way (`same_failure`: the same verdict and the
original's first failing check among its failing checks; the three numerical tiers, the
gradients check and the optimizer-state check count as one check, so a W=4 tolerance failure
may shrink to a W=2 bitwise one and a last-bit error may move from the parameters to the
gradients; a numerical failure keeps its severity class, so a gross failure never shrinks to a
last-bit one). After an acceptance the
candidates are generated afresh from the smaller scenario; the reducer stops at a fixpoint
(no candidate is accepted) or when the deadline passes.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from verify.case.severity import BEYOND, INVARIANT, LAST_BIT
from verify.results import CaseResult, reason_line
from verify.scenarios import WORLD_SIZES, Scenario, build_model, wrap_units

__all__ = ["NUMERIC", "failing_checks", "primary_check", "error_kind", "signature", "first_phase",
           "same_failure", "candidates", "shrink", "ShrinkResult", "n_units", "size_line",
           "small_enough", "first_line"]

NUMERIC = ("bitwise", "tolerance", "reported")


def _norm(check: str) -> str:
    return "numerics" if check in NUMERIC else check


def first_line(reason: str) -> str:
    """The line of a reason that says the most (`verify.results.reason_line`)."""
    return reason_line(reason)


def failing_checks(case: CaseResult) -> list[str]:
    """The names of the case's failing checks, in check order, once each (the numerical
    tiers as "numerics")."""
    return _failing_names(case.checks or [])


def _failing_names(checks: list[dict]) -> list[str]:
    out: list[str] = []
    for c in checks:
        if c.get("status") == "fail":
            name = _norm(c.get("check", ""))
            if name not in out:
                out.append(name)
    return out


def first_step_failing_checks(case: CaseResult) -> list[str]:
    """`failing_checks` of the earliest step with a failing check (one at init, step None,
    first): what went wrong first, not what followed once the training had diverged (a wrong
    update at step 0 makes every later gradient differ too)."""
    def when(c):
        return -1 if c.get("step") is None else c["step"]
    fails = [c for c in case.checks or [] if c.get("status") == "fail"]
    if not fails:
        return []
    first = min(map(when, fails))
    return _failing_names([c for c in fails if when(c) == first])


def primary_check(case: CaseResult) -> str:
    names = failing_checks(case)
    return names[0] if names else case.verdict


def error_kind(case: CaseResult) -> str:
    """For an error case: timeout | died | raised (what the pool saw)."""
    reason = case.reason or ""
    if "timed out after" in reason:
        return "timeout"
    if " exited with code " in reason or " was killed by " in reason:
        return "died"
    return "raised"


def _raised(case: CaseResult) -> str:
    """The first exception line of an error's reason, its numbers blanked (a shape shrinks with
    the case): a shrunk case that raises something else is another failure."""
    m = re.search(r"^([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$", case.reason or "", re.M)
    return re.sub(r"\d+", "#", m.group(1))[:80] if m else ""


def first_phase(case: CaseResult) -> str:
    """Where the first failing step's numbers first differ, read from the check records: the
    loss ("forward"), else the reduced gradients ("backward"), else the parameters after the
    step ("optimizer"); "" where no numerical check failed."""
    fails = [c for c in case.checks or [] if c.get("status") == "fail" and c.get("step") is not None
             and c.get("check") in NUMERIC + ("gradients",)]
    if not fails:
        return ""
    at = [c for c in fails if c["step"] == min(c["step"] for c in fails)]
    if any(c["check"] in NUMERIC and ": loss: " in (c.get("detail") or "") for c in at):
        return "forward"
    return "backward" if any(c["check"] == "gradients" for c in at) else "optimizer"


def signature(case: CaseResult, plant: Optional[str] = None) -> str:
    """The check that failed and where: the sharder, the plant, the verdict, the checks failing
    at the first failing step (`first_step_failing_checks`; the error kind for an error), and for
    a numerical failure its severity (last-bit or beyond tolerance, verify/case/severity.py) and
    first divergent phase (`first_phase`). Failures with one signature are shrunk once."""
    what = error_kind(case) if case.verdict == "error" else "+".join(first_step_failing_checks(case))
    numeric = case.severity if case.severity in (LAST_BIT, BEYOND) else ""
    return " ".join(x for x in (case.sharder_spec or case.sharder,
                                f"plant={plant}" if plant else "", case.verdict, what, numeric,
                                first_phase(case) if numeric else "") if x)


def _numeric_class(name: str) -> str:
    # The numerical, gradients and optimizer-state checks see one thing (the numbers differ from the
    # reference's): a last-bit error shows in one or the other depending on the model's size.
    return "numerics" if name in ("numerics", "gradients", "optimizer_state") else name


def same_failure(original: CaseResult, candidate: CaseResult) -> bool:
    """The candidate fails the way the original does: the same verdict, the original's first
    failing check among its own, and the same severity class: a gross failure never shrinks to
    a last-bit one, nor the other way, and an invariant-only failure (padding, collectives, ...
    with every number right) never shrinks to a case whose numbers are also wrong, which would
    read as another bug."""
    if candidate.passed or candidate.verdict != original.verdict:
        return False
    if original.severity in (LAST_BIT, BEYOND, INVARIANT) and candidate.severity != original.severity:
        return False
    if original.verdict == "error":
        return error_kind(candidate) == error_kind(original) and (
            error_kind(original) != "raised" or _raised(candidate) == _raised(original))
    return _numeric_class(primary_check(original)) in map(_numeric_class, failing_checks(candidate))


def _replace(s: Scenario, **kw) -> Optional[Scenario]:
    try:
        c = dataclasses.replace(s, **kw)
        c.validate()
    except (ValueError, TypeError, KeyError, ZeroDivisionError):
        return None
    return c if c != s else None


def _with_model(s: Scenario, key: str, value) -> Optional[Scenario]:
    model = dict(s.model)
    model[key] = value
    return _replace(s, model=tuple(sorted(model.items())))


def _smaller_ints(v: int) -> list[int]:
    out = []
    for c in (1, 2, 3, v // 2, v // 2 + 1, v - 1, v - 2):  # both parities: padding needs odd
        if 1 <= c < v and c not in out:
            out.append(c)
    return out


def candidates(s: Scenario, *, wrap_last: bool = False) -> Iterator[Scenario]:
    """Valid scenarios one field simpler than ``s``, the largest reductions first
    (``wrap_last``: the wrapping changes after every other shape change)."""
    seen = {s}

    def fresh(c: Optional[Scenario]):
        if c is not None and c not in seen:
            seen.add(c)
            return c
        return None

    gen: list[Callable[[], Optional[Scenario]]] = []
    if s.steps > 1:
        gen += [lambda: _replace(s, steps=1), lambda: _replace(s, steps=s.steps - 1)]
    if getattr(s, "mesh", None) is not None:   # HSDP -> a 1-D mesh
        gen.append(lambda: _replace(s, mesh=None))
    for w in WORLD_SIZES:  # never below 2 from W >= 2: at W=1 nothing is sharded (another path)
        if min(2, s.world_size) <= w < s.world_size:
            gen.append(lambda w=w: _replace(s, world_size=w))
    # The model's shape: wrapping and every model kwarg, the smallest resulting model first
    # (fewest units, then fewest parameters), so that removing a block is tried before
    # narrowing one (a narrow model can hide a bug a fewer-units one still shows).
    shaped = [_replace(s, wrap="root_only") if s.wrap != "root_only" else None,
              _replace(s, wrap="per_block") if s.wrap == "every_leaf" else None]
    kw = s.model_kwargs
    for key in sorted(kw):
        v = kw[key]
        if isinstance(v, bool):
            if v:
                shaped.append(_with_model(s, key, False))
        elif isinstance(v, int):
            shaped += [_with_model(s, key, c) for c in _smaller_ints(v)]
    units = _size(s)[0]
    # A width of 1 is degenerate (one ReLU unit, dead on most inputs, hides what a sharder did
    # to the gradients), so a kwarg goes below 2 only where that removes wrap units.
    keep = [(c, _size(c)) for c in shaped if c is not None]
    keep = [(c, size) for c, size in keep if size[0] < units or _min_changed(s, c) >= 2]
    for c, _ in sorted(keep, key=lambda item: (wrap_last and item[0].wrap != s.wrap, item[1])):
        gen.append(lambda c=c: c)
    m = s.micro_batches
    for c in sorted({max(s.world_size, 1)} | {m // 2}):
        if s.world_size <= c < m:
            gen.append(lambda c=c: _replace(s, micro_batches=c))
    if s.micro_batch_size > 1:
        gen.append(lambda: _replace(s, micro_batch_size=1))
    if s.optimizer != "sgd":
        gen.append(lambda: _replace(s, optimizer="sgd"))
    if s.weight_decay:
        gen.append(lambda: _replace(s, weight_decay=0.0))
    if s.dtype != "fp32":
        gen.append(lambda: _replace(s, dtype="fp32"))
    if getattr(s, "offload", False):
        gen.append(lambda: _replace(s, offload=False))
    for make in gen:
        c = fresh(make())
        if c is not None:
            yield c


def _min_changed(s: Scenario, c: Scenario) -> int:
    """The smallest new value among the int model kwargs ``c`` changed (2 if none did)."""
    a, b = s.model_kwargs, c.model_kwargs
    changed = [b[k] for k in b if b[k] != a.get(k) and isinstance(b[k], int)
               and not isinstance(b[k], bool)]
    return min(changed, default=2)


def _size(s: Scenario) -> tuple[int, int]:
    """(wrap units, parameter elements) of the scenario's model, built on the meta device."""
    try:
        model = build_model(s, device="meta")
        return _units(s, model), sum(p.numel() for p in model.parameters())
    except Exception:
        return (1 << 30, 1 << 62)


def _units(s: Scenario, model) -> int:
    owned: set[int] = set()
    n = 0
    for unit in wrap_units(s, model):       # inner first: a unit owns what no inner one did
        mine = {id(p) for p in unit.parameters()} - owned
        n += bool(mine)
        owned |= mine
    return n


def n_units(s: Scenario) -> int:
    """Wrap units of the scenario's model that own parameters (the root counts where it owns
    some that no inner unit does: a model whose blocks hold every parameter has as many units
    as blocks)."""
    return _units(s, build_model(s, device="meta"))


def size_line(s: Scenario) -> str:
    """A short description of a scenario's size, for the console."""
    try:
        units = n_units(s)
    except Exception:
        units = "?"
    ints = [v for v in s.model_kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
    return (f"W={s.world_size} {s.mode} {s.family} {units} unit{'s' * (units != 1)}, "
            f"max int kwarg {max(ints, default=0)}, {s.steps} step{'s' * (s.steps != 1)}, "
            f"M={s.micro_batches} x {s.micro_batch_size}, {s.optimizer}, {s.dtype}, {s.wrap}")


@dataclass
class ShrinkResult:
    scenario: Scenario                 # the smallest failing scenario found
    case: CaseResult                   # its failing case
    runs: int = 0                      # candidates run
    accepted: int = 0                  # candidates that still failed the same way
    seconds: float = 0.0
    complete: bool = False             # True: a fixpoint; False: the deadline stopped it
    tried: list[str] = field(default_factory=list)

    def note(self) -> str:
        how = "a fixpoint" if self.complete else "stopped by the shrink budget"
        return (f"{self.accepted} of {self.runs} candidate runs accepted in {self.seconds:.1f} s "
                f"({how})")


def small_enough(s: Scenario) -> bool:
    """At most 2 units, every int model kwarg at most 8, at most 2 steps."""
    ints = [v for v in s.model_kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
    return _size(s)[0] <= 2 and max(ints, default=0) <= 8 and s.steps <= 2


def _order(s: Scenario) -> tuple:
    units, numel = _size(s)
    return (units, numel, s.steps, s.world_size, s.micro_batches, s.micro_batch_size,
            s.optimizer != "sgd", s.dtype != "fp32")


def shrink(run: Callable[[Scenario], CaseResult], s: Scenario, case: CaseResult, *,
           deadline: float) -> ShrinkResult:
    """Greedy reduction of ``s`` (whose run ``case`` failed) with ``run(candidate)`` as the
    oracle, until a fixpoint or ``time.monotonic() >= deadline``. A greedy path can end in a
    corner (root_only wrapping, taken first, can hide a last-bit bug from every narrower
    model): when the first fixpoint is not `small_enough`, a second pass from ``s`` tries the
    wrapping last, and the smaller of the two results is kept."""
    t0 = time.monotonic()
    memo: dict[Scenario, Optional[CaseResult]] = {s: case}  # the failing run, None: it passed
    out = _greedy(run, s, case, deadline, memo, wrap_last=False)
    if out.complete and not small_enough(out.scenario) and time.monotonic() < deadline:
        second = _greedy(run, s, case, deadline, memo, wrap_last=True)
        runs, accepted = out.runs + second.runs, out.accepted + second.accepted
        if _order(second.scenario) < _order(out.scenario):
            out = second
        out.runs, out.accepted = runs, accepted
    out.seconds = time.monotonic() - t0
    return out


def _greedy(run, s: Scenario, case: CaseResult, deadline: float,
            memo: dict, *, wrap_last: bool) -> ShrinkResult:
    out = ShrinkResult(s, case)
    improved = True
    while improved:
        improved = False
        for cand in candidates(out.scenario, wrap_last=wrap_last):
            if cand not in memo:
                if time.monotonic() >= deadline:
                    return out
                got = run(cand)
                out.runs += 1
                memo[cand] = got if same_failure(case, got) else None
            if memo[cand] is not None:
                out.scenario, out.case = cand, memo[cand]
                out.accepted += 1
                improved = True
                break
    out.complete = True
    return out

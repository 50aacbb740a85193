"""The parent side of a case: the ranks' records against the reference, step by step, as
structured check records (`Check`) and one `CaseResult`.

Every check runs for every sharder whose adapter gave the probe it needs, and is ``n/a``
otherwise; nothing here knows a sharder's name. Checks: ``backend`` (the collectives on known
inputs), the numerical comparison named by the tier (``bitwise`` / ``tolerance`` /
``reported``: loss and every parameter after the step; in the tolerance tier also the step's
update by relative norm, [Note: the update check] in verify/case/state_check.py), ``padding`` (after init, the reduction
and the step), ``resharded``, ``reassembly`` (local pieces vs the gathered parameters),
``gradients`` (the reduced gradient) and ``optimizer_state`` (exp_avg, exp_avg_sq,
momentum_buffer), both in every tier (verify/case/state_check.py), ``collectives`` (vs the
adapter's formula).
"""
from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch

from verify.case.severity import BEYOND, case_severity, state_severity, step_severity, tensors_severity
from verify.case.state_check import (ZERO_EXTRA, gradient_problems, pieces_problems, reassemble,
                                     reassembled_gradients, state_problems, update_problems,
                                     zero_extras)
from verify.compare import TIERS, TOLERANCES, compare_step, diff_stats, format_diff, tier_for, verdict
from verify.plan.units import plan_problems
from verify.case.placement import offload_status
from verify.case.structure import model_names, prefix_hint, ranks_disagree
from verify.reference import Replayer
from verify.results import CaseResult, StepRecord, held_verdict
from verify.scenarios import Scenario, build_model
from verify.sharders import display_name
from verify.case.regroup import regrouping_tier

__all__ = ["Check", "evaluate", "case_tier", "regrouping_tier", "mesh_label", "state_model_bytes",
           "reassemble"]


@dataclass(frozen=True)
class Check:
    check: str                  # which invariant
    status: str                 # "pass" | "fail" | "n/a"
    step: Optional[int] = None  # None: the whole case (backend, padding after init)
    rank: Optional[int] = None  # the first rank it failed on, where one rank is to blame
    detail: str = ""            # for a failure: what and where, torch.testing style
    severity: str = ""          # a failing numerical check: "last-bit" | "beyond tolerance"
    excess: Optional[float] = None   # its worst |d| / (atol + rtol |e|) (verify/case/severity.py)
    ulp: Optional[int] = None        # its greatest ULP distance

    def to_dict(self) -> dict[str, Any]:
        out = dict(check=self.check, status=self.status, step=self.step, rank=self.rank,
                   detail=self.detail)
        if self.severity:
            out.update(severity=self.severity, excess=self.excess, ulp=self.ulp)
        return out


def mesh_label(s: Scenario) -> str:
    return "" if s.mesh is None else f"{s.mesh[0]}x{s.mesh[1]}"


def case_tier(s: Scenario, sharder) -> str:
    """Section 3's tier for the scenario, or the adapter's looser one (`Sharder.tier`; a
    tighter one is ignored: an adapter cannot make the harness stricter than the contract)."""
    tier = tier_for(s)
    own = sharder.tier(s) if sharder is not None else None
    if own is not None:
        if own not in TIERS:
            raise ValueError(f"{type(sharder).__name__}.tier() returned {own!r}; allowed {TIERS}")
        if TIERS.index(own) > TIERS.index(tier):
            tier = own
    return tier


def state_model_bytes(s: Scenario, ref_params: dict) -> int:
    """ZeRO-3 model per rank: (parameters + gradients + optimizer state) / W (S on a mesh), fp32."""
    seen, n = set(), 0
    for t in ref_params.values():
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * 4
    opt_copies = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}[s.optimizer]
    return (n * (2 + opt_copies)) // (s.world_size if s.mesh is None else s.mesh[1])


def _align(s: Scenario, params: dict, ref: dict) -> tuple[dict, dict, list[str]]:
    """The sharded result's parameters and the reference's, restricted to the names both
    compare: a tied parameter may come back under one of its names; buffers are not compared.
    Returns (params, reference, unexpected names)."""
    groups, buffers = model_names(s.to_json())
    want = {}
    for group in groups:
        present = [n for n in group if n in params]
        for n in present or group[:1]:
            if n in ref:
                want[n] = ref[n]
    known = {n for g in groups for n in g} | set(buffers)
    unexpected = [n for n in params if n not in known]
    return {n: params[n] for n in want if n in params}, want, unexpected


# [Note: the replayed steps]
# The reported tier holds parameters to what Adam can do from any gradients (compare.py,
# [Note: reported tier bounds]): up to 2 * lr per element and step, which also admits a step
# skipped on one rank, a shard updated twice, a wrong learning rate, optimizer state reset or not
# restored by a checkpoint. Where the adapter reports its reduced gradients, the steps themselves
# are known: the scenario's optimizer, run in the parent from the initial parameters over *this
# sharder's own* gradients step after step (`verify.reference.Replayer`), gives what its
# parameters must be after each step, whatever its reduction order did to the gradients (the
# gradients check judges those). So in the tolerance and reported tiers the parameters are also
# held to that replay within the fp32 torch.testing tolerance (bf16 cases too: the optimizer
# steps fp32 master parameters with fp32 reduced gradients there): what is left between
# them is the optimizer implementation's rounding, which the replay does not amplify (both apply
# the same gradients). A resume case replays through the checkpoint (`verify.campaign.resume`
# hands the phases one replay), so optimizer state lost in save or load shows at the first step
# after the load. The replay stops at the first step whose gradients are not reported or do not
# reassemble, and is turned off (the case's tier note says so) where the reference's own steps
# are not what the optimizer computes from the reference's gradients: a model that edits its
# parameters outside the optimizer (in place in forward) cannot be replayed.


def replays(s: Scenario, tier: str) -> bool:
    """Whether a case's parameters are held to the replayed steps (see the Note)."""
    return tier in ("tolerance", "reported")


def _against_replay(s: Scenario, values: list[dict], i: int, step: int, ref_grads: Optional[dict],
                    params: dict, where: str, replayer, resumed_at: Optional[int], judged: bool
                    ) -> tuple[list[str], list]:
    """Step ``i``'s parameters against the replayed step (see the Note), and the (actual,
    replayed) pairs of the parameters that failed; nothing where the replay cannot go on, or
    where the step is not ``judged`` (it only advances the replay)."""
    grads = reassembled_gradients(values, i, ref_grads)
    if grads is None:
        replayer.alive = False
        return [], []
    want = replayer.step(grads)
    if not judged:
        return [], []
    tol = TOLERANCES[torch.float32]
    problems, pairs, names = [], [], []
    for name, actual in params.items():
        expected = want.get(name)
        if expected is None or actual.shape != expected.shape or actual.dtype != expected.dtype:
            continue
        d = diff_stats(actual, expected, tol=tol)
        if d.n_bad or d.n_nonfinite:
            problems.append(f"{where}: " + format_diff(f"parameter {name!r} against the replayed step", d,
                                                       "tolerance"))
            pairs.append((actual, expected))
            names.append(name)
    if problems:
        steps = "the first step" if step == 0 else f"step {step}"
        problems.insert(0, f"{where}: the parameters after {steps} are not what {s.optimizer} "
                           "computes from the initial parameters and this sharder's own reduced "
                           f"gradients (steps 0..{step} replayed in the parent, held to the fp32 "
                           "torch.testing tolerance):" + (
                               " this is the first step after the load: optimizer state (moments, "
                               "step counts) that the checkpoint did not restore, or a copy of the "
                               "parameters the optimizer steps that load() did not refresh, shows here"
                               if resumed_at is not None and step == resumed_at else ""))
        zeros = sorted(zero_extras(values, i, ref_grads) & set(names))
        if zeros:
            problems.insert(1, f"{where}: " + ZERO_EXTRA.format(
                names=", ".join(zeros), them="it" if len(zeros) == 1 else "them", opt=s.optimizer))
    return problems, pairs


def _reassembly(values: list[dict], step: int, full: dict) -> Optional[list[str]]:
    pieces = [v["records"][step].get("pieces") for v in values]
    if any(p is None for p in pieces):
        return None
    return pieces_problems(pieces, full)


def _ranked(values: list[dict], get) -> tuple[list[str], Optional[int]]:
    """Every rank's labels from ``get(value)`` (None: not checked), and the first rank with any."""
    out, first = [], None
    for v in values:
        labels = get(v)
        if labels:
            out += [f"rank {v['rank']}: {label}" for label in labels]
            first = v["rank"] if first is None else first
    return out, first


def _plan_check(s: Scenario, sharder, case: CaseResult, ref) -> Check:
    """``plan = measured``: the adapter's planned per-rank state bytes and collectives, exactly
    (bytes, not ratios), against what every step measured. n/a where a trainable parameter got
    no gradient in some step (a branch not taken, a parameter never used): the planner models
    every trainable parameter with a gradient, and a unit without one reduces nothing."""
    try:
        figures = sharder.planned(s) if sharder is not None else None
        if figures is None:
            return Check("plan", "n/a")
        trainable = [n for n, p in build_model(s, device="meta").named_parameters() if p.requires_grad]
        unused = sorted({n for st in ref for n in trainable if n not in (st.grads or {})})
        if unused:
            return Check("plan", "n/a", detail=f"parameters without a gradient in some step, which "
                                               f"the planner does not model: {unused[:5]}")
        if any(r and not h for u in figures.units for r, h in zip(u.requires_grad, u.has_grad)):
            # the planner traced one micro-batch; a parameter it saw no gradient for that the
            # steps had (unused ones are n/a above) is used by some batches only: a branch
            return Check("plan", "n/a", detail="the planner traces one micro-batch, whose gradients "
                         "miss parameters the steps had (a branch some batches take)")
        if any(not st.state_bytes for st in case.steps):   # no state figure measured: n/a
            figures = dataclasses.replace(figures, state_bytes=tuple(() for _ in case.steps))
        problems = plan_problems(s, case, figures)
    except Exception:
        return Check("plan", "fail", detail="the planner raised:\n" + traceback.format_exc())
    return Check("plan", "fail" if problems else "pass",
                 detail="plan != measured: " + "; ".join(problems[:5]) if problems else "")


def _checked(values: list[dict], get) -> bool:
    return all(get(v) is not None for v in values)


def evaluate(s: Scenario, sharder, spec: str, result, ref, wall: float, *,
             step_offset: int = 0, replay: str = "", tier: Optional[str] = None,
             plan: bool = True, replayer: Optional[Replayer] = None) -> CaseResult:
    """A pool result against the reference, step by step. ``sharder``: the adapter (for its
    tier and its planner); ``spec``: how the replay line names it; ``step_offset``: the global
    step of the first record (a resumed run's second phase); ``plan``: run the ``plan`` check
    (not for a resumed phase: the planner models a run from step 0); ``replayer``: the replay
    of the steps before (a resumed phase's; see [Note: the replayed steps]), or None: a fresh one
    where this case is judged by it."""
    tier = tier or case_tier(s, sharder)
    if replayer is None and step_offset == 0 and replays(s, tier):
        replayer = Replayer(s)
    case = CaseResult(scenario_json=s.to_json(), sharder=display_name(spec), family=s.family,
                      world_size=s.world_size, mode=s.mode, dtype=s.dtype, optimizer=s.optimizer,
                      tier=tier, verdict="pass", replay=replay, wall_time_s=wall, sharder_spec=spec,
                      mesh=mesh_label(s), offload=s.offload)
    if not result.ok:
        case.verdict, case.reason = "error", result.error or "the case did not complete"
        case.checks.append(Check("error", "fail", detail=case.reason).to_dict())
        case.severity = "error"
        return case
    values = result.values
    checks: list[Check] = []
    broken = [(v["rank"], v["backend_error"]) for v in values if v.get("backend_error")]
    checks.append(Check("backend", "fail", rank=broken[0][0], detail=f"backend check failed: {broken[0][1]}")
                  if broken else Check("backend", "pass"))
    if s.offload:   # where shards and optimizer state are (verify/case/placement.py)
        checks.append(Check("offload", *offload_status([v.get("placement") for v in values])))
    if _checked(values, lambda v: v.get("pad_init")):
        bad, rank = _ranked(values, lambda v: v.get("pad_init"))
        checks.append(Check("padding", "fail" if bad else "pass", rank=rank,
                            detail=f"padding not zero after init: {bad[:5]}" if bad else ""))
    else:
        checks.append(Check("padding", "n/a"))
    for i, rec0 in enumerate(values[0]["records"]):
        step = i + step_offset
        where = f"step {step}"
        ref_step = ref[i]
        params, params_ref, unexpected = _align(s, rec0["params"] or {}, ref_step.params)
        diff = compare_step(s, loss=rec0["loss"], loss_ref=ref_step.loss, params=params,
                            params_ref=params_ref, where=where, tier=tier)
        pdiff = diff.params
        numeric = verdict(tier, loss=diff.loss, where=where, params=dataclasses.replace(
            pdiff, missing=(), unexpected=(), mismatched=())).reason
        ratios: list = []   # [Note: the update check] in verify/case/state_check.py
        upd = update_problems(s, values[0]["records"], ref, i, step_offset == 0, params,
                              params_ref, ratios) if tier == "tolerance" else []
        numeric = "\n".join([numeric] * bool(numeric) + [f"{where}: {u}" for u in upd])
        structural = [f"{where}: missing parameters (in the unsharded model, not in the "
                      f"result): {list(pdiff.missing)[:5]}"] if pdiff.missing else []
        structural += [f"{where}: parameter {n!r}: {what}" for n, what in pdiff.mismatched]
        if unexpected:
            structural.append(f"{where}: unexpected parameters (not in the unsharded model): "
                              f"{unexpected[:5]}" + prefix_hint(unexpected, pdiff.missing))
        structural += ranks_disagree(s, values, i, where)
        replayed, replay_pairs = [], []
        if replayer is not None and replayer.alive and replayer.follows(ref_step.grads, ref_step.params):
            # a tighter phase (a resume's) only carries the replay on to the looser one
            replayed, replay_pairs = _against_replay(s, values, i, step, ref_step.grads, params, where,
                                                     replayer, step_offset or None, replays(s, tier))
        if numeric or replayed:
            sevs = [] if not numeric else [step_severity(
                s, tier, loss=rec0["loss"], loss_ref=ref_step.loss, params=params, params_ref=params_ref)]
            sevs += [state_severity(tier, s.dtype, ratios)] if ratios else []
            if replayed:
                sevs.append(tensors_severity(replay_pairs, TOLERANCES[torch.float32], "the fp32 "
                                             "torch.testing tolerance of the replayed steps",
                                             last_bit_possible=False))
            sev = max(sevs, key=lambda v: (v.cls == BEYOND, v.excess))
            detail = "\n".join([numeric] * bool(numeric) + replayed)
            checks.append(Check(tier, "fail", step, detail=f"{detail}\n{where}: {sev.line}",
                                severity=sev.cls, excess=sev.excess, ulp=sev.ulp))
        else:
            checks.append(Check(tier, "pass", step))
        checks.append(Check("structure", "fail" if structural else "pass", step,
                            detail="\n".join(structural)))
        pad_ok = None
        if _checked(values, lambda v: v["records"][i].get("pad_reduce")) and \
                _checked(values, lambda v: v["records"][i].get("pad_step")):
            bad, rank = _ranked(values, lambda v: [f"{label} ({when})" for when in ("pad_reduce", "pad_step")
                                                   for label in v["records"][i][when]])
            pad_ok = not bad
            checks.append(Check("padding", "pass" if pad_ok else "fail", step, rank,
                                f"{where}: padding not zero: {bad[:5]}" if bad else ""))
        else:
            bad = []
            checks.append(Check("padding", "n/a", step))
        held_ok = None
        if _checked(values, lambda v: v["records"][i].get("unsharded")):
            held, rank = _ranked(values, lambda v: v["records"][i]["unsharded"])
            held_ok = not held
            checks.append(Check("resharded", "pass" if held_ok else "fail", step, rank,
                                f"{where}: units still unsharded after backward: {held[:5]}" if held else ""))
        else:
            checks.append(Check("resharded", "n/a", step))
        not_reassembled = _reassembly(values, i, rec0["params"] or {})
        checks.append(Check("reassembly", "n/a" if not_reassembled is None else
                            "fail" if not_reassembled else "pass", step,
                            detail=f"{where}: shards do not reassemble for {not_reassembled[:5]}"
                            if not_reassembled else ""))
        held_to = "bitwise equal to" if tier == "bitwise" else f"within the {tier} tier of"
        grads_ok = None
        for check, what, bad_of in (
                ("gradients", "reduced gradients", lambda out: gradient_problems(
                    values, i, ref_step.grads, tier, s.dtype, out)),
                ("optimizer_state", "optimizer state", lambda out: state_problems(
                    values, i, ref_step.optim, tier, s.dtype, out))):
            differing: list = []
            wrong = bad_of(differing)
            if check == "gradients":
                grads_ok = None if wrong is None else not wrong
            if not wrong:
                checks.append(Check(check, "n/a" if wrong is None else "pass", step))
                continue
            sev = state_severity(tier, s.dtype, differing)
            checks.append(Check(check, "fail", step, detail=f"{where}: {what} not {held_to} the "
                                f"reference's: {wrong[:10]}\n{where}: {sev.line}",
                                severity=sev.cls, excess=sev.excess, ulp=sev.ulp))
        coll, expected = rec0["collectives"], rec0.get("expected_collectives")
        coll_ok = None
        if expected is not None:
            expected = {k: list(v) for k, v in expected.items()}
            coll_ok = all(coll.get(kind) == want for kind, want in expected.items()) and \
                all(kind in expected for kind, (count, _) in coll.items() if count)
            checks.append(Check("collectives", "pass" if coll_ok else "fail", step, 0,
                                "" if coll_ok else f"{where}: collectives {coll} differ from the "
                                                   f"adapter's formula (expected_collectives) {expected}"))
        else:
            checks.append(Check("collectives", "n/a", step))
        pd_ = diff.params
        if case.first_divergence is None and not (diff.loss.bitwise and pd_.bitwise):
            case.first_divergence = (step, pd_.first_differing or "loss")
        state = [v["records"][i].get("state_bytes") for v in values]
        case.steps.append(StepRecord(
            step=step, loss=float(rec0["loss"]), loss_ref=float(ref_step.loss),
            loss_bitwise=diff.loss.bitwise, loss_abs_diff=diff.loss.max_abs,
            max_abs=pd_.max_abs, max_rel=pd_.max_rel, max_ulp=pd_.max_ulp,
            bitwise=diff.loss.bitwise and pd_.bitwise, n_params_differ=pd_.n_params_differ,
            worst_param=pd_.worst_param, padding_ok=pad_ok, padding_bad=bad[:10],
            reassembly_ok=None if not_reassembled is None else not not_reassembled,
            grads_ok=grads_ok, resharded_ok=held_ok,
            collectives=coll, collectives_expected=expected or {}, collectives_ok=coll_ok,
            state_bytes=state if all(b is not None for b in state) else [],
            state_bytes_model=state_model_bytes(s, ref_step.params),
            step_time_s=rec0["step_time_s"]))
    checks.append(_plan_check(s, sharder, case, ref) if plan else Check("plan", "n/a"))
    case.checks = [c.to_dict() for c in checks]
    failed = [c for c in checks if c.status == "fail"]
    case.verdict = held_verdict(tier)
    if failed:
        case.verdict, case.reason = "fail", "\n".join(c.detail for c in failed)
    case.severity, case.excess = case_severity(case.checks, case.verdict)
    case.tier_note = replayer.off if replayer is not None else ""
    return case

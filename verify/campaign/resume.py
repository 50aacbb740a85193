"""Checkpoint-resume cases: train ``s`` steps at world size W_a, save a checkpoint, load it at
W_b into a freshly built (differently initialised) model and optimizer, train the remaining
steps, and compare every step with the reference of the uninterrupted run.

A `ResumeCase` (verify/campaign/resume_cases.py, with `draw_resume_cases`) is a `Scenario` (as
it finishes: ``world_size`` = W_b, ``steps`` the total) plus W_a and ``s``, run for any sharder
whose adapter has ``save`` and ``load`` (DESIGN section 6).
Two pool runs make a case: `save_phase` on ranks 0..W_a-1 (the first ``s`` steps, then the
adapter's ``save`` into a directory the parent chose), then `load_phase` on ranks 0..W_b-1 (the
adapter's ``load``, steps ``s..steps-1``). Both train through `verify.case.train.Trainer`, so a
resumed step records exactly what any case's step records, and `verify.case.judge.evaluate`
judges each phase; `evaluate_resume` joins the two into one `CaseResult` (family
``resume:<family>``, ``world_size`` W_b, ``save_world_size`` W_a, ``save_after`` s). A double
resume (``resume_again_after`` s2) splits the loading run in two at W_b: load, train to s2,
save again through the same adapter instance, then load that in a third run and finish; the
second load is checked like the first (a save that writes the state as loaded, not as trained,
rolls training back: pytorch#138575, docs/real_bugs.md).

[Note: the reference of a resumed run]
deterministic: the step gradient is tree(grad(loss_m / k)) / W with k = M / W. W and k are
    powers of two, so grad(loss_m / k) = grad(loss_m) / k exactly (every backward op is linear in
    the incoming gradient, and scaling by a power of two commutes with rounding, barring
    subnormals), and tree(g_m / k) / W = tree(g_m) / M: the same bits at every W. The
    uninterrupted reference is therefore the plain one, `run_reference` of the scenario (at any
    W: M is kept). The steps before the checkpoint (run at W_a) are compared with it too, so a
    resume case also checks the W-independence the contract promises.
fast: the data-parallel reference depends on W (each rank's mean loss, averaged), so the
    reference follows the run: W_a's protocol for steps < s, W_b's after (`run_reference(s,
    world_size_at=...)`). A resumed run inherits the differences of the steps before the
    checkpoint, so the steps after it are held to the looser tier of the two world sizes; the
    steps before it to W_a's own.
Between the phases the loaded state (the adapter's ``full_parameters``) must equal, bit for
bit, the state saved after step s - 1 (check ``loaded``).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist

from verify.campaign.console import print_case
from verify.campaign.resume_cases import ResumeCase, draw_resume_cases
from verify.case.draw import skip_reason
from verify.case.judge import TIERS, Check, case_tier, evaluate, regrouping_tier, replays
from verify.case.judge import state_model_bytes
from verify.case.severity import case_severity
from verify.case.state_check import LOADED_RIGHT, loaded_problems
from verify.case.train import Trainer, snapshot
from verify.diagnosis.collective_log import CollectiveLog
from verify.diagnosis.hangs import hang_summary
from verify.ranks.pool import RankPool
from verify.ranks.poolset import PoolSet, as_pool_set
from verify.reference import Replayer, guarded, run_reference
from verify.results import CaseResult, held_verdict
from verify.scenarios import Scenario, build_model
from verify.sharders import DEFAULT_SHARDER, has_checkpointing, load, replay_env, resolve

__all__ = ["ResumeCase", "save_phase", "load_phase", "resume_reference", "run_resume",
           "evaluate_resume", "draw_resume_cases", "resume_replay_command", "replay_resume"]

# -- rank side ----------------------------------------------------------------------------------

def _shared_path(payload: dict, ctx) -> str:
    """Rank 0's path for every rank (under torchrun each rank's parent chose its own)."""
    paths = [payload["path"]]
    if ctx.world_size > 1:
        dist.broadcast_object_list(paths, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
    return paths[0]


def save_phase(payload: dict, ctx) -> dict:
    """Ranks 0..W_a-1: train steps [0, s), then save model and optimizer to payload["path"]
    through the adapter's ``save``."""
    path = _shared_path(payload, ctx)
    s = Scenario.from_json(payload["scenario_a"])
    with CollectiveLog() as log:   # a hang here is explained from this phase's own calls
        log.install()
        trainer = Trainer(payload["sharder"], s, ctx)
        log.watch(trainer.plan.units, trainer.optimizer)
        pad_init = trainer.padding()
        records = log.run_steps(trainer, range(payload["save_after"]))
        log.outside_steps("the adapter's save", trainer.sharder.save, path, trainer.model,
                          trainer.optimizer)
    return dict(rank=ctx.rank, pad_init=pad_init, records=records)


def load_phase(payload: dict, ctx) -> dict:
    """Ranks 0..W_b-1: a model and optimizer built afresh, their parameters and persistent
    buffers overwritten with another seed's (so that whatever the load misses shows), then
    loaded from payload["path"] through the adapter's ``load`` and trained on steps
    [s, steps). ``pad_init`` is the padding checked right after the load; ``loaded`` (rank 0)
    the full parameters as loaded. With ``save_again_after`` (a double resume's middle phase)
    it trains only to that step and saves again, through the same adapter instance, to
    payload["path_again"]."""
    path = _shared_path(payload, ctx)
    s = Scenario.from_json(payload["scenario_b"])
    model = build_model(s)
    decoy = build_model(dataclasses.replace(s, seed=(s.seed + 0x5EED) % 2**63))
    model.load_state_dict(decoy.state_dict())   # non-persistent buffers keep the real init
    with CollectiveLog() as log:
        log.install()
        trainer = Trainer(payload["sharder"], s, ctx, model=model)
        log.watch(trainer.plan.units, trainer.optimizer)
        log.outside_steps("the adapter's load", trainer.sharder.load, path, trainer.model,
                          trainer.optimizer)
        pad_init = trainer.padding()
        loaded = snapshot(log.outside_steps(   # collective
            "full_parameters after the load", trainer.sharder.full_parameters, trainer.model,
            trainer.optimizer))
        pieces = snapshot(trainer.sharder.local_pieces(trainer.model))   # what each rank steps
        end = payload.get("save_again_after") or s.steps
        records = log.run_steps(trainer, range(payload["save_after"], end))
        if end < s.steps:
            log.outside_steps("the adapter's save", _save_again, payload, ctx, trainer)
    return dict(rank=ctx.rank, pad_init=pad_init, records=records,
                loaded=loaded if ctx.rank == 0 else None, loaded_pieces=pieces)


def _save_again(payload: dict, ctx, trainer) -> None:
    again = _shared_path(dict(payload, path=payload["path_again"]), ctx)
    trainer.sharder.save(again, trainer.model, trainer.optimizer)


# -- parent side --------------------------------------------------------------------------------

def resume_reference(case: ResumeCase):
    """The uninterrupted run's reference; see [Note: the reference of a resumed run]."""
    s, w_a, cut = case.scenario, case.save_world_size, case.save_after
    return run_reference(s, world_size_at=None if s.mode == "deterministic" else
                         (lambda step: w_a if step < cut else s.world_size))


def resume_replay_command(case: ResumeCase, sharder: str = DEFAULT_SHARDER) -> str:
    extra = "" if sharder == DEFAULT_SHARDER else f" --sharder {sharder}"
    again = "" if case.resume_again_after is None else \
        f" --resume-again-after {case.resume_again_after}"
    return (f"{replay_env(sharder, case.scenario.family)}python -m verify replay{extra} "
            f"--resume-from {case.save_world_size} "
            f"--save-after {case.save_after}{again} '{case.scenario.to_json()}'")


def run_resume(pool, case: ResumeCase, *, sharder: str = DEFAULT_SHARDER,
               timeout_s: Optional[float] = None, ckpt_dir: Optional[str] = None,
               keep_values: bool = False, load_fn=None):
    """One resume case through the pool (two runs) with ``sharder``'s save and load, compared
    with its reference. The checkpoint lives in a temporary directory under ``ckpt_dir``
    (default: the system's), removed after. With ``keep_values`` returns (CaseResult,
    save-phase PoolResult, load-phase PoolResult). ``load_fn``: a rank function standing in
    for `load_phase` (tests plant broken loads)."""
    torch.set_num_threads(1)
    spec = resolve(sharder)
    adapter = load(spec)
    if not has_checkpointing(adapter):
        raise ValueError(f"{adapter.name} has no save/load: no resume cases for it")
    s = case.scenario
    try:   # the adapter's parent side, at both world sizes (foreign code: a raise is an error)
        declined = _declined(case, adapter)
    except Exception as exc:
        out = _ended(case, spec, adapter, "error", f"the adapter {spec}'s parent side raised: "
                                                   f"{type(exc).__name__}: {exc}")
        return (out, None, None) if keep_values else out
    if declined is not None:
        out = _ended(case, spec, adapter, "skipped", declined)
        return (out, None, None) if keep_values else out
    pools = as_pool_set(pool)
    pool_a, why_a = pools.for_world(adapter.world, case.save_world_size)
    pool_b, why_b = pools.for_world(adapter.world, s.world_size)
    if pool_a is None or pool_b is None:
        out = _ended(case, spec, adapter, "skipped", why_a or why_b)
        return (out, None, None) if keep_values else out
    problem = pools.import_adapter(pool_a, spec) or pools.import_adapter(pool_b, spec)
    if problem is not None:
        out = _ended(case, spec, adapter, "error", problem)
        return (out, None, None) if keep_values else out
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="verify-resume-", dir=ckpt_dir) as tmp:
        payload = {"scenario_a": case.scenario_a.to_json(), "scenario_b": s.to_json(),
                   "save_after": case.save_after, "path": os.path.join(tmp, "ckpt"),
                   "sharder": spec}
        res_a = pool_a.run(case.save_world_size, save_phase, payload, timeout_s=timeout_s)
        again = case.resume_again_after
        if again is not None and res_a.ok:   # load -> train -> save, then load -> finish
            payload.update(save_again_after=again, path_again=os.path.join(tmp, "ckpt2"))
            res_mid = pool_b.run(s.world_size, load_fn or load_phase, payload, timeout_s=timeout_s)
            last = dict(payload, save_after=again, path=payload["path_again"],
                        save_again_after=None)
            res_b = _joined(res_mid, pool_b.run(s.world_size, load_fn or load_phase, last,
                                                timeout_s=timeout_s) if res_mid.ok else None)
        else:
            res_b = pool_b.run(s.world_size, load_fn or load_phase, payload,
                               timeout_s=timeout_s) if res_a.ok else None
    ref, ref_error = guarded(resume_reference, case) if res_a.ok and res_b.ok else (None, "")
    if ref_error:
        result = _ended(case, spec, adapter, "error", f"{case.label}: {ref_error}")
        return (result, res_a, res_b) if keep_values else result
    wall = time.perf_counter() - t0
    result = evaluate_resume(case, res_a, res_b, ref, wall, sharder=spec)
    looser, why = regrouping_tier(s, adapter, result)
    if looser is not None:   # see [Note: a regrouped gradient sum] in verify/case/regroup.py
        result = evaluate_resume(case, res_a, res_b, ref, wall, sharder=spec, floor=looser)
        result.tier_note = why
    return (result, res_a, res_b) if keep_values else result


def _joined(mid, last):
    """A double resume's two loading phases as one: the records of both, each rank's
    ``loaded`` the first load's, ``loaded_again`` the second's; not ok if either failed."""
    if last is None or not last.ok:
        return mid if last is None else last
    values = [dict(m, records=m["records"] + z["records"], loaded_again=z["loaded"])
              for m, z in zip(mid.values, last.values)]
    return dataclasses.replace(last, values=values, wall_time_s=mid.wall_time_s + last.wall_time_s)


def _looser(case: ResumeCase) -> Scenario:
    """The scenario at the larger of the two world sizes: its tier is the looser one (tiers
    only loosen as W grows) and its M suffices for both."""
    s = case.scenario
    return dataclasses.replace(s, world_size=max(s.world_size, case.save_world_size))


def _ended(case: ResumeCase, spec: str, adapter, verdict: str, reason: str) -> CaseResult:
    """A case that ends without being judged: skipped, or an error (with its check)."""
    out = _resume_result(case, spec, adapter)
    out.verdict, out.reason = verdict, reason
    if verdict == "error":
        out.severity, out.checks = "error", [Check("error", "fail", detail=reason).to_dict()]
    return out


def _resume_result(case: ResumeCase, spec: str, adapter) -> CaseResult:
    s = case.scenario
    return CaseResult(scenario_json=s.to_json(), sharder=adapter.name, family=f"resume:{s.family}",
                      world_size=s.world_size, mode=s.mode, dtype=s.dtype, optimizer=s.optimizer,
                      tier=case_tier(_looser(case), adapter), verdict="pass",
                      replay=resume_replay_command(case, spec), save_world_size=case.save_world_size,
                      save_after=case.save_after, sharder_spec=spec, offload=s.offload)


def evaluate_resume(case: ResumeCase, res_a, res_b, ref, wall: float, *,
                    sharder: str = DEFAULT_SHARDER, floor: str = "bitwise") -> CaseResult:
    """Both phases judged by `verify.case.judge.evaluate` (steps before the checkpoint at W_a's
    tier, steps after at the looser tier; neither tighter than ``floor``), joined in one."""
    adapter = load(sharder)
    s, cut, w_a = case.scenario, case.save_after, case.save_world_size
    loose, at_least = _looser(case), lambda tier: max(tier, floor, key=TIERS.index)
    out = _resume_result(case, sharder, adapter)
    out.tier = at_least(out.tier)
    out.wall_time_s = wall
    if not res_a.ok or res_b is None or not res_b.ok:
        failed, what = (res_a, f"the save phase (W={w_a}, steps 0..{cut - 1})") if not res_a.ok \
            else (res_b, f"the load phase (W={s.world_size}, steps {cut}..{s.steps - 1})")
        out.verdict = "error"
        out.reason = (f"{case.label}: {what} did not complete:\n"
                      f"{failed.error or 'no reason given (the ranks reported none)'}")
        out.checks = [Check("error", "fail", detail=out.reason).to_dict()]
        out.severity = "error"
        out.hang = hang_summary(failed.error or "")   # where the ranks stopped, if they hung
        return out
    replayer = Replayer(s) if replays(s, out.tier) else None   # through the checkpoint
    before = evaluate(case.scenario_a, adapter, sharder, res_a, ref[:cut], wall,
                      tier=at_least(case_tier(case.scenario_a, adapter)), plan=False,
                      replayer=replayer)
    after = evaluate(loose, adapter, sharder, res_b, ref[cut:], wall, step_offset=cut,
                     tier=out.tier, plan=False, replayer=replayer)
    for st in after.steps:
        st.state_bytes_model = state_model_bytes(s, ref[st.step].params)
    checks = [dict(c, phase="save") for c in before.checks]
    for c in after.checks:
        c = dict(c, phase="load")
        if c["check"] == "padding" and c["step"] is None and c["status"] == "fail":
            c["detail"] = c["detail"].replace("after init", "after the load")
        checks.append(c)
    loaded = loaded_problems(res_a.values[0]["records"][-1]["params"], res_b.values[0]["loaded"], cut,
                             [v.get("loaded_pieces") for v in res_b.values])
    checks.append(Check("loaded", "fail" if loaded else "pass", cut, 0, "\n".join(loaded)).to_dict()
                  | {"phase": "load"})
    again = case.resume_again_after
    if again is not None:   # the second load against the state the middle phase saved
        saved = res_b.values[0]["records"][again - cut - 1]["params"]
        loaded = loaded_problems(saved, res_b.values[0]["loaded_again"], again)
        checks.append(Check("loaded", "fail" if loaded else "pass", again, 0,
                            "\n".join(loaded)).to_dict() | {"phase": "load"})
    out.checks = checks
    out.steps = before.steps + after.steps
    out.first_divergence = before.first_divergence or after.first_divergence
    out.verdict = held_verdict(out.tier)
    problems = []
    if before.verdict == "fail":
        problems.append(f"before the checkpoint (W={w_a}):\n{before.reason}")
    after_fails = [c for c in checks if c["phase"] == "load" and c["status"] == "fail"]
    after_fails.sort(key=lambda c: c["check"] != "loaded")   # what the load got wrong leads
    if after_fails:
        problems.append(f"after resuming at W={s.world_size}:\n" + "\n".join(c["detail"] for c in after_fails))
        problems[-1] += "" if after_fails[0]["check"] == "loaded" else LOADED_RIGHT
    if problems:   # "label:" then the problems: the case's one line is the label and the first
        out.verdict = "fail"
        out.reason = f"{case.label}:\n" + "\n".join(problems)
    out.severity, out.excess = case_severity(out.checks, out.verdict)
    return out


def _declined(case: ResumeCase, adapter) -> Optional[str]:
    """Why the adapter does not run this resume case at one of its world sizes, or None."""
    for s in (case.scenario_a, case.scenario):
        why = skip_reason(s, adapter)
        if why is not None:
            return f"{why} (W={s.world_size})"
    return None


def replay_resume(scenario_json: str, save_world_size: int, save_after: int, *,
                  timeout_s: float = 120.0, sharder: str = DEFAULT_SHARDER,
                  resume_again_after: Optional[int] = None) -> int:
    """`python -m verify replay [--sharder X] --resume-from W_A --save-after S
    [--resume-again-after S2] '<json>'`."""
    case = ResumeCase(Scenario.from_json(scenario_json), save_world_size, save_after,
                      resume_again_after)
    main = RankPool(max(case.scenario.world_size, save_world_size), timeout_s=timeout_s)
    with PoolSet(main, timeout_s=timeout_s) as pool:
        result = run_resume(pool, case, sharder=sharder, timeout_s=timeout_s)
    return print_case(result, f"resume {case.label}, {case.scenario.mode} {case.scenario.family}")

"""Checkpoint-resume cases: train ``s`` steps at world size W_a, save a checkpoint, load it at
W_b into a freshly built (differently initialised) model and optimizer, train the remaining
steps, and compare every step with the reference of the uninterrupted run.

A `ResumeCase` is a `Scenario` (as it finishes: ``world_size`` = W_b, ``steps`` the total) plus
W_a and ``s``, run for any sharder whose adapter has ``save`` and ``load`` (DESIGN section 6).
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
import random
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from verify.campaign.console import print_case
from verify.case.draw import declined_by, draw_scenarios, skip_reason, with_stateful_optimizer
from verify.case.judge import Check, case_tier, evaluate, replays, state_model_bytes
from verify.case.severity import case_severity
from verify.case.state_check import LOADED_RIGHT, loaded_problems
from verify.case.train import Trainer, snapshot
from verify.ranks.pool import RankPool
from verify.ranks.poolset import PoolSet, as_pool_set
from verify.reference import Replayer, guarded, run_reference
from verify.results import CaseResult, held_verdict
from verify.scenarios import ALL_WORLD_SIZES, Scenario, build_model
from verify.sharders import DEFAULT_SHARDER, has_checkpointing, load, replay_env, resolve

__all__ = ["ResumeCase", "save_phase", "load_phase", "resume_reference", "run_resume",
           "evaluate_resume", "draw_resume_cases", "resume_replay_command", "replay_resume"]

@dataclass(frozen=True)
class ResumeCase:
    scenario: Scenario        # the case as it finishes: world_size = W_b, steps = the total
    save_world_size: int      # W_a: the world size that trains the first steps and saves
    save_after: int           # s: steps trained before the checkpoint, 1 <= s < steps
    # s2 (s < s2 < steps), or None: a double resume. The loading phase trains to s2, saves again
    # with the same adapter instance (so Stateful app state it keeps is reused), and a third
    # phase loads that at W_b and finishes: load -> train -> save -> load (pytorch#138575).
    resume_again_after: Optional[int] = None

    def __post_init__(self) -> None:
        s = self.scenario
        if self.save_world_size not in ALL_WORLD_SIZES:
            raise ValueError(f"save_world_size={self.save_world_size!r}: must be a power of two "
                             f"from 1 to {ALL_WORLD_SIZES[-1]}")
        if s.micro_batches < self.save_world_size:
            raise ValueError(f"micro_batches={s.micro_batches} is smaller than "
                             f"save_world_size={self.save_world_size}: the two phases would "
                             "train on different data")
        if not (isinstance(self.save_after, int) and 1 <= self.save_after < s.steps):
            raise ValueError(f"save_after={self.save_after!r}: must be in [1, steps={s.steps})")
        again = self.resume_again_after
        if again is not None and not (isinstance(again, int) and self.save_after < again < s.steps):
            raise ValueError(f"resume_again_after={again!r}: must be in (save_after="
                             f"{self.save_after}, steps={s.steps})")

    @property
    def scenario_a(self) -> Scenario:
        """The scenario as the saving world size runs it (same M, same data)."""
        return self.scenario.with_world_size(self.save_world_size)

    @property
    def label(self) -> str:
        again = "" if self.resume_again_after is None else \
            f", saved and resumed again after {self.resume_again_after}"
        return (f"W={self.save_world_size} -> {self.scenario.world_size} after "
                f"{self.save_after}/{self.scenario.steps} steps{again}")


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
    trainer = Trainer(payload["sharder"], s, ctx)
    pad_init = trainer.padding()
    records = trainer.steps(range(payload["save_after"]))
    trainer.sharder.save(path, trainer.model, trainer.optimizer)
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
    trainer = Trainer(payload["sharder"], s, ctx, model=model)
    trainer.sharder.load(path, trainer.model, trainer.optimizer)
    pad_init = trainer.padding()
    loaded = snapshot(trainer.sharder.full_parameters(trainer.model, trainer.optimizer))   # collective
    end = payload.get("save_again_after") or s.steps
    records = trainer.steps(range(payload["save_after"], end))
    if end < s.steps:
        again = _shared_path(dict(payload, path=payload["path_again"]), ctx)
        trainer.sharder.save(again, trainer.model, trainer.optimizer)
    return dict(rank=ctx.rank, pad_init=pad_init, records=records,
                loaded=loaded if ctx.rank == 0 else None)


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
    return (f"{replay_env(sharder)}python -m verify replay{extra} --resume-from {case.save_world_size} "
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
    result = _ended(case, spec, adapter, "error", f"{case.label}: {ref_error}") if ref_error else \
        evaluate_resume(case, res_a, res_b, ref, time.perf_counter() - t0, sharder=spec)
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
                    sharder: str = DEFAULT_SHARDER) -> CaseResult:
    """Both phases judged by `verify.case.judge.evaluate` (steps before the checkpoint at W_a's
    tier, steps after at the looser tier) and joined into one `CaseResult`."""
    adapter = load(sharder)
    s, cut, w_a = case.scenario, case.save_after, case.save_world_size
    loose = _looser(case)
    out = _resume_result(case, sharder, adapter)
    out.wall_time_s = wall
    if not res_a.ok or res_b is None or not res_b.ok:
        failed, what = (res_a, f"the save phase (W={w_a}, steps 0..{cut - 1})") if not res_a.ok \
            else (res_b, f"the load phase (W={s.world_size}, steps {cut}..{s.steps - 1})")
        out.verdict = "error"
        out.reason = (f"{case.label}: {what} did not complete:\n"
                      f"{failed.error or 'no reason given (the ranks reported none)'}")
        out.checks = [Check("error", "fail", detail=out.reason).to_dict()]
        out.severity = "error"
        return out
    replayer = Replayer(s) if replays(s, out.tier) else None   # through the checkpoint
    before = evaluate(case.scenario_a, adapter, sharder, res_a, ref[:cut], wall,
                      tier=case_tier(case.scenario_a, adapter), plan=False, replayer=replayer)
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
    loaded = loaded_problems(res_a.values[0]["records"][-1]["params"], res_b.values[0]["loaded"], cut)
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


def draw_resume_cases(*, n: int, seed: int, world_sizes: Sequence[int],
                      modes: Sequence[str] = ("fast", "deterministic"), profile: str = "ci",
                      dtypes: Sequence[str] = ("fp32", "bf16"),
                      families: Optional[Sequence[str]] = None,
                      offloads: Sequence[bool] = (False,), sharders: Sequence = (),
                      declined: Optional[Counter] = None) -> list[ResumeCase]:
    """``n`` resume cases, the same for the same arguments: modes in turn, (W_a, W_b) two
    different world sizes of ``world_sizes`` (equal only when there is one), scenarios drawn by
    the campaign's strategy at max(W_a, W_b) (so M serves both) with at least 2 steps, and the
    checkpoint after a step drawn in [1, steps). Every second case is a double resume (saved
    again after a step in (s, steps), steps raised to s + 2 where needed). ``sharders``: the
    adapters that will run them; a scenario one of them declines at either world size is drawn
    again (verify/case/draw.py; ``declined`` counts the reasons)."""
    if n <= 0:
        return []
    sizes = sorted(set(world_sizes))
    rng = random.Random(f"resume/{seed}")
    picks = []
    for i in range(n):
        w_a, w_b = rng.sample(sizes, 2) if len(sizes) > 1 else (sizes[0], sizes[0])
        picks.append((w_a, w_b, modes[i % len(modes)]))
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (w_a, w_b, mode) in enumerate(picks):
        groups[(max(w_a, w_b), mode)].append(i)
    cases: list[Optional[ResumeCase]] = [None] * n
    check = declined_by(sharders) if sharders else None
    for (w, mode), idxs in sorted(groups.items()):
        sizes_here = {picks[i][0] for i in idxs} | {picks[i][1] for i in idxs}
        drawn = draw_scenarios(world_size=w, mode=mode, n=len(idxs), seed=seed + 1009,
                               profile=profile, dtypes=dtypes, offloads=offloads,
                               accept=_at_both(check, sizes_here) if sharders else None,
                               declined=declined,
                               **({} if families is None else {"families": families}))
        for j, i in enumerate(idxs):
            s = drawn[j % len(drawn)]
            # ties kept: a resume case is about the checkpoint, not the wrap plan
            s = dataclasses.replace(s, steps=max(s.steps, 2), ties="kept")
            cut = rng.randint(1, s.steps - 1)
            again = None
            if i % 2:   # every second case resumes twice; its own RNG leaves the others as drawn
                s = dataclasses.replace(s, steps=max(s.steps, cut + 2))
                again = random.Random(f"resume-again/{seed}/{i}").randint(cut + 1, s.steps - 1)
            cases[i] = ResumeCase(s.with_world_size(picks[i][1]), picks[i][0], cut, again)
    out = [c for c in cases if c is not None]
    return with_stateful_optimizer(out, None if check is None else (
        lambda c, s: _at_both(check, {c.save_world_size, s.world_size})(s) is None))


def _at_both(check, sizes):
    """``accept`` for a resume draw: the scenario (at least 2 steps) at every world size its
    cases save or load at."""
    def accept(s: Scenario) -> Optional[str]:
        s = dataclasses.replace(s, steps=max(s.steps, 2))
        for w in sorted(sizes):
            why = check(s.with_world_size(w))
            if why is not None:
                return f"{why} (W={w})"
        return None
    return accept


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

"""The parent side of the harness: draw scenarios, send each to the rank pool, run the
reference, compare step by step, and turn it all into `CaseResult`s and reports.

`run_campaign` is `python -m verify run`; `replay` is `python -m verify replay`;
`run_one(pool, scenario)` is what the pytest tests and both commands share.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from verify import blas
from verify.campaign.console import print_case
from verify.campaign.interrupt import CtrlC
from verify.campaign.resume import draw_resume_cases, run_resume
from verify.case.draw import draw_scenarios, skip_reason
from verify.case.judge import Check, case_tier, evaluate, mesh_label, regrouping_tier
from verify.case.train import run_case
from verify.compare import tier_for
from verify.diagnosis.diagnose import DEFAULT_SHRINK_BUDGET_S, console_lines, diagnose_failures
from verify.diagnosis.hangs import hang_summary
from verify.diagnosis.locate import locate_divergence
from verify.diagnosis.shrink import first_line
from verify.ranks.pool import RankPool
from verify.ranks.poolset import PoolSet, as_pool_set
from verify.ranks.torchrun import ProcessGroupLost, TorchrunContext, is_torchrun
from verify.reference import guarded, run_reference
from verify.report import write_peers_report, write_reports
from verify.results import CaseResult, headline, severity_label, worst_first
from verify.scenarios import Scenario
from verify.sharders import (DEFAULT_SHARDER, display_name, expand_checked, has_checkpointing, load,
                             load_class, replay_env, resolve)
from verify.tools import soak
from verify.tools.plants import check_name

__all__ = ["draw_scenarios", "skip_reason", "run_one", "run_campaign", "replay",
           "replay_command", "auto_timeout", "diagnose"]

# A case run without an explicit timeout may take max(floor, factor x its reference's CPU time +
# slack) (and at least twice the reference's wall time; never more than the pool's own timeout),
# so a hang costs seconds, not 120 s.
AUTO_TIMEOUT_FLOOR_S, AUTO_TIMEOUT_FACTOR, AUTO_TIMEOUT_SLACK_S = 30.0, 20.0, 10.0


def auto_timeout(reference_s: float) -> float:
    """The default timeout of a case whose reference took ``reference_s`` seconds."""
    return max(AUTO_TIMEOUT_FLOOR_S, AUTO_TIMEOUT_FACTOR * reference_s + AUTO_TIMEOUT_SLACK_S)


def replay_command(s: Scenario, sharder: str = DEFAULT_SHARDER, plant: Optional[str] = None,
                   ranks: Optional[int] = None, timeout_s: Optional[float] = None) -> str:
    """The one-line command that reruns ``s`` as it ran (``timeout_s``: the one it timed out
    under, where that was given rather than automatic: a slow case passes on the default)."""
    extra = "" if sharder == DEFAULT_SHARDER else f" --sharder {sharder}"
    extra += f" --plant {plant}" if plant else ""
    extra += f" --ranks {ranks}" if ranks and ranks > s.world_size else ""
    extra += f" --timeout {timeout_s:g}" if timeout_s is not None else ""
    return f"{replay_env(sharder, s.family)}python -m verify replay{extra} '{s.to_json()}'"


def _result(s: Scenario, spec: str, verdict: str, reason: str, replay: str, tier: str) -> CaseResult:
    return CaseResult(scenario_json=s.to_json(), sharder=display_name(spec), family=s.family,
                      world_size=s.world_size, mode=s.mode, dtype=s.dtype, optimizer=s.optimizer,
                      tier=tier, verdict=verdict, reason=reason, replay=replay, sharder_spec=spec,
                      mesh=mesh_label(s), offload=s.offload)


def run_one(pool, s: Scenario, *, sharder: str = DEFAULT_SHARDER, timeout_s: Optional[float] = None,
            plant: Optional[str] = None, backend_check: bool = True) -> CaseResult:
    """One case through the pool, compared with its reference. ``sharder``: a built-in name
    or ``pkg.module:Name``; ``plant``: the name of a planted bug (verify/tools/plants/) the ranks
    install for this case; None for the real run. ``timeout_s`` None: `auto_timeout` of the
    reference's time, at most the pool's timeout."""
    torch.set_num_threads(1)
    spec = resolve(sharder)
    try:  # the adapter's parent side is foreign code too: an exception is an error case
        adapter = load(spec)
        replay = replay_command(s, spec, plant)   # once imported: replay_env looks at the module
        reason = skip_reason(s, adapter)
        tier = case_tier(s, adapter)
    except Exception:
        return _result(s, spec, "error", f"the adapter {spec}'s parent side raised:\n"
                       + traceback.format_exc(), replay_command(s, spec, plant), tier_for(s))
    if reason is not None:  # decided from the scenario: nothing runs
        return _result(s, spec, "skipped", reason, replay, tier)
    payload = {"scenario": s.to_json(), "sharder": spec}
    if not backend_check:  # only to study the equivalence checks alone (verify/tools/mutants.py)
        payload["backend_check"] = False
    if plant is not None:
        payload["plant"] = check_name(plant)
    pools = as_pool_set(pool)
    ranks, why = pools.for_world(adapter.world, s.world_size)
    if ranks is None:
        return _result(s, spec, "skipped", why, replay, tier)
    problem = pools.import_adapter(ranks, spec)
    if problem is not None:
        return _result(s, spec, "error", problem, replay, tier)
    if s.mesh is not None:
        pools.prepare_hsdp(ranks)
    t0 = time.perf_counter()
    pending = ranks.submit(s.world_size, run_case, payload, timeout_s=timeout_s)
    try:  # the reference is computed here while the ranks run the case
        cpu0 = time.thread_time()  # CPU, not wall: restarting ranks' imports slow the wall clock
        ref, ref_error = guarded(run_reference, s)
        if timeout_s is None and hasattr(pending, "shorten"):
            pending.shorten(max(auto_timeout(time.thread_time() - cpu0),
                                2 * (time.perf_counter() - t0)))
    finally:
        result = pending.result()
    if ref_error:
        case = _result(s, spec, "error", ref_error, replay, tier)
        case.wall_time_s, case.severity = time.perf_counter() - t0, "error"
        case.checks.append(Check("error", "fail", detail=ref_error).to_dict())
        return case
    wall = time.perf_counter() - t0
    case = evaluate(s, adapter, spec, result, ref if result.ok else None, wall, replay=replay,
                    tier=tier)
    looser, why = regrouping_tier(s, adapter, case)
    if looser is not None:   # see [Note: a regrouped gradient sum] in verify/case/regroup.py
        case = evaluate(s, adapter, spec, result, ref, wall, replay=replay, tier=looser)
        case.tier_note = "\n".join(x for x in (why, case.tier_note) if x)
    state = result.ok and sorted({x for v in result.values for x in v.get("process_state") or ()})
    if state and not case.passed:
        case.reason += ("\nthis sharder's case ran with process-global state the harness (and the "
                        "reference) does not have, which it set and left: " + "; ".join(state)
                        + " (a thread count or a backend flag changes kernels and their last bits)")
    if not result.ok:
        case.hang = hang_summary(result.error or "")
        # the ranks beyond the case's took part in none of it, unless the sharder reached them
        # (the default group): the replay runs in as many ranks, so that it hangs there too
        timed_out = timeout_s if "timed out after" in (result.error or "") else None
        wider = isinstance(ranks, RankPool) and adapter.world == "group"
        if wider or timed_out is not None:
            case.replay = replay_command(s, spec, plant, ranks=ranks.max_world_size if wider else None,
                                         timeout_s=timed_out)
    return case


def _progress(i: int, n: int, case: CaseResult, started: float, show_sharder: bool) -> None:
    elapsed = time.perf_counter() - started
    rate = f"  ({i / elapsed * 60:.0f} cases/min)" if elapsed >= 1.0 else ""  # none from a blink
    width = 24
    bar = "#" * round(width * i / n) + "." * (width - round(width * i / n))
    who = f"{case.sharder:<11} " if show_sharder else ""
    print(f"[{bar}] {i}/{n} {who}W={case.world_size} {case.mode:<13} {case.family:<8} {case.dtype} "
          f"{case.optimizer:<12} {case.verdict.upper():<5} {case.wall_time_s:5.2f}s"
          f"{rate}" + (f": {first_line(case.reason) or 'no reason given'}"
                                       if case.verdict == "error" else ""), flush=True)
    why = (case.hang or "").splitlines()[1:2]   # where the ranks stopped, at once (hangs.py)
    if why:
        print(f"    {why[0]}", flush=True)


def _runnable(sharders: list[str], modes: Sequence[str], dtypes: Sequence[str],
              offloads: Sequence[bool] = (False,)):
    """The modes, dtypes and offload values some chosen sharder declares (the others would
    only draw cases every sharder skips); what was dropped, for the console."""
    classes = [load_class(sp) for sp in sharders]
    keep_m = [m for m in modes if any(m in c.modes for c in classes)] or list(modes)
    keep_d = [d for d in dtypes if any(d in c.dtypes for c in classes)] or list(dtypes)
    keep_o = [o for o in offloads if not o or any(c.offload for c in classes)] or list(offloads)
    dropped = [x for x in list(modes) + list(dtypes) if x not in keep_m + keep_d]
    dropped += ["offload"] if True in offloads and True not in keep_o else []
    return keep_m, keep_d, keep_o, dropped


def _resume_notes(asked: int, sharders: Sequence[str], savers: Sequence[str],
                  plant: Optional[str]) -> list[str]:
    """Why checkpoint-resume cases asked for (``--resume-cases``) are not run, for whom."""
    if not asked:
        return []
    if plant is not None:
        return ["no checkpoint-resume cases: they are not run with a planted bug"]
    return [f"no checkpoint-resume cases for {display_name(sh)}: its adapter has no save() and "
            "load() (DESIGN section 6, optional checkpointing)"
            for sh in sharders if sh not in savers]


def run_campaign(*, world_sizes: Sequence[int], examples: int, seed: int, sharders: Iterable[str],
                 modes: Sequence[str], profile: Optional[str], out_dir,
                 timeout_s: Optional[float] = None,
                 plant: Optional[str] = None, dtypes: Sequence[str] = ("fp32", "bf16"),
                 resume_cases: int = 0, families: Optional[Sequence[str]] = None,
                 interleave: bool = False, meshes: str = "1d",
                 offloads: Sequence[bool] = (False,), shrink_budget_s: Optional[float] = None
                 ) -> list[CaseResult]:
    """``resume_cases``: checkpoint-resume cases (verify/campaign/resume.py) drawn and run after the
    plan, for every sharder whose adapter has save and load (none with a planted bug). After
    every case the RSS of the pool's ranks is sampled (verify/tools/soak.py) and saved as
    ``pool_memory`` in results.json. ``meshes``: "1d", "2d" (HSDP: (R, S) meshes) or "both"
    (verify/strategies.py). ``interleave``: run the plan round-robin over (world
    size, mode) instead of one world size after the other, so that every rank is warm early
    (the soak's leak check measures from case 50; see verify/tools/soak.py). ``offloads``: the CPU
    offload values drawn (`--offload`; the default draws none, so a seed's cases stay those
    drawn before offload existed); True only where some chosen sharder declares offload.
    ``timeout_s``: per case; None: `auto_timeout`, at most 120 s. ``shrink_budget_s``: seconds
    for diagnosing the failing cases after the plan (verify/diagnosis/diagnose.py: replay, shrink,
    locate; default 300, 0: off; not under torchrun); a clean campaign spends none."""
    torch.set_num_threads(1)
    profile = profile or "ci"
    sharders = expand_checked(sharders)
    modes, dtypes, offloads, dropped = _runnable(sharders, modes, dtypes, offloads)
    declined: Counter = Counter()   # draws an adapter declined, by reason (redrawn: see case/draw)
    plan = [(sh, s) for w in world_sizes for mode in modes
            for s in draw_scenarios(world_size=w, mode=mode, n=examples, seed=seed, profile=profile,
                                    dtypes=dtypes, families=families, meshes=meshes,
                                    offloads=offloads, sharders=sharders, declined=declined)
            for sh in sharders]
    if interleave:
        plan = soak.round_robin(plan, key=lambda item: (item[1].world_size, item[1].mode))
    savers = [sh for sh in sharders if has_checkpointing(load(sh))]
    drawn = draw_resume_cases(n=resume_cases, seed=seed, world_sizes=world_sizes, modes=modes,
                              profile=profile, dtypes=dtypes, families=families,
                              offloads=offloads, sharders=savers, declined=declined
                              ) if resume_cases and plant is None and savers else []
    resumes = [(sh, rc) for rc in drawn for sh in savers]
    notes = _resume_notes(resume_cases, sharders, savers, plant)
    cap = 120.0 if timeout_s is None else timeout_s   # None: each case's `auto_timeout`
    pool = PoolSet(_ranks(max(world_sizes), cap), timeout_s=cap)
    say = print if _is_main(pool) else (lambda *a, **k: None)   # under torchrun: rank 0 only
    say(f"drew {len(plan)} cases (sharder{'s' if len(sharders) > 1 else ''} "
          f"{', '.join(sharders)}; world sizes {list(world_sizes)}, modes {list(modes)}, "
          f"seed {seed}, profile {profile})"
          + (f" and {len(resumes)} checkpoint-resume cases" if resumes else "")
          + (f"; not drawn, no chosen sharder runs them: {', '.join(dropped)}" if dropped else "")
          + "".join(f"; {n}" for n in notes)
          + (f"; {sum(declined.values())} candidate draws declined by the adapter, set aside "
             "(the cases were picked among the others)" if declined else "")
          + "; starting the rank pool", flush=True)
    say(blas.describe(), flush=True)
    if declined:
        say("declined while drawing (set aside): " + "; ".join(
            f"{n} x {why}" for why, n in declined.most_common(5))
            + (f"; and {len(declined) - 5} other reasons" if len(declined) > 5 else ""), flush=True)
    if plant is not None:
        say(f"PLANTED BUG {plant!r} is installed in every case (a demo: failures are expected)",
            flush=True)
    results: list[CaseResult] = []
    memory: list[dict] = []
    started = time.perf_counter()
    # Resume cases run after the plan; interleaved (the soak), before it, so that the
    # checkpoint code's one-time cost falls before the leak check's baseline.
    jobs = [(sh, rc, True) for sh, rc in resumes] + [(sh, s, False) for sh, s in plan]
    if not interleave:
        jobs = jobs[len(resumes):] + jobs[:len(resumes)]
    with pool, CtrlC() as ctrl_c:
        try:
            for i, (sharder, s, is_resume) in enumerate(jobs, 1):
                ctrl_c.check()
                try:
                    if is_resume:
                        case = run_resume(pool, s, sharder=sharder, timeout_s=timeout_s)
                    else:
                        case = run_one(pool, s, sharder=sharder, timeout_s=timeout_s, plant=plant)
                except ProcessGroupLost as exc:   # torchrun: the launched group is gone
                    results.append(_aborted(s, sharder, str(exc), len(jobs) - i + 1))
                    say(f"CAMPAIGN ENDED at case {i}/{len(jobs)}: {exc}; writing the reports of "
                        f"the {i - 1} cases run", flush=True)
                    break
                results.append(case)
                memory.append(soak.sample(pool, len(results)))
                if _is_main(pool):
                    _progress(i, len(jobs), case, started, len(sharders) > 1)
            ctrl_c.check()
        except KeyboardInterrupt:   # the cases run so far are reported, undiagnosed; exit 130
            if results and _is_main(pool):
                say(f"interrupted: writing the reports of the {len(results)} of {len(jobs)} "
                    "cases run (not diagnosed)", flush=True)
                _write_and_print(results, [], memory, dict(pool.default_pool_startups), seed=seed,
                                 world_sizes=world_sizes, out_dir=out_dir,
                                 elapsed=time.perf_counter() - started, several=len(sharders) > 1,
                                 declined=declined, notes=list(notes) + [
                                     f"interrupted (Ctrl-C) after {len(results)} of {len(jobs)} "
                                     "cases: the others were not run, and no failure was diagnosed"])
            raise
        groups = diagnose(
            pool, results, plant=plant, timeout_s=timeout_s,
            budget_s=0.0 if is_torchrun() else   # ranks in lockstep: no time-based choices
            DEFAULT_SHRINK_BUDGET_S if shrink_budget_s is None else shrink_budget_s)
        startups = dict(pool.default_pool_startups)
        if _is_main(pool):   # under torchrun only global rank 0 writes and prints; every rank
            # returns the same results (the verdicts were shared before anything printed)
            _write_and_print(results, groups, memory, startups, seed=seed, world_sizes=world_sizes,
                             out_dir=out_dir, elapsed=time.perf_counter() - started,
                             several=len(sharders) > 1, declined=declined, notes=notes)
        settle = getattr(pool.main, "settle", None)
        if settle is not None:   # torchrun: no rank exits before rank 0 has written
            settle()
    return results


def _write_and_print(results: list[CaseResult], groups, memory: list[dict], startups: dict, *,
                     seed: int, world_sizes, out_dir, elapsed: float, several: bool, declined,
                     notes) -> None:
    failed = [c for c in results if not c.passed]
    title = f"Equivalence campaign: seed {seed}, world sizes {','.join(map(str, world_sizes))}"
    paths = write_reports([c.to_dict() for c in results], Path(out_dir), title=title,
                          pool_memory={"samples": memory, "cache_env": soak.cache_env(),
                                       "default_group_pools": startups}, blas=blas.describe(),
                          declined=dict(declined), notes=notes)
    if several:  # the sharders side by side on the same cases (resume cases too)
        paths.append(write_peers_report([c.to_dict() for c in results], Path(out_dir), title=title))
    print(f"{len(results)} cases run in {elapsed:.1f}s ({len(results) / max(elapsed, 1e-9) * 60:.1f} "
          f"cases/min): {headline(results)}; wrote " + ", ".join(str(p) for p in paths))
    if startups:
        print("extra pools of exactly W processes for default-group sharders (spawned once each; "
              "the largest W runs on the campaign's own pool): "
              + ", ".join(f"W={w} {sec:.1f}s" for w, sec in sorted(startups.items())))
    for c in sorted(failed, key=worst_first):   # the worst first, as the diagnosis runs
        how = c.verdict if c.verdict == "error" or not c.severity else \
            f"{c.verdict}, {severity_label(c)}"
        print(f"\nFAILED ({how}) {c.sharder} W={c.world_size} {c.mode} {c.family}: "
              f"{first_line(c.reason) or 'no reason given'}\n  replay: {c.replay}")
    for line in console_lines(groups):
        print(line)


def diagnose(pool, results: list[CaseResult], **kw) -> list[list[CaseResult]]:
    """`verify.diagnosis.diagnose.diagnose_failures` with this module's `run_one` and `replay_command`:
    the failing cases of ``results`` replayed, shrunk and located (in place); the groups."""
    return diagnose_failures(pool, results, run_one=run_one, replay_command=replay_command, **kw)


def _ranks(max_world_size: int, timeout_s: float):
    """The main pool: under torchrun the launched processes (`TorchrunContext`: each is a rank,
    world sizes up to the launched one), else a `RankPool` of ``max_world_size`` processes."""
    if is_torchrun():
        ctx = TorchrunContext(timeout_s=timeout_s)
        if max_world_size > ctx.max_world_size:
            ctx.close()
            raise ValueError(f"world size {max_world_size} needs {max_world_size} processes; "
                             f"torchrun launched {ctx.max_world_size}")
        return ctx
    return RankPool(max_world_size, timeout_s=timeout_s)


def _is_main(pool) -> bool:
    return getattr(pool.main, "rank", 0) == 0


def _aborted(s: Scenario, spec: str, why: str, left: int) -> CaseResult:
    case = _result(s, spec, "error", f"the campaign ended here, {left} case(s) not run: {why}",
                   replay_command(s, spec), tier_for(s))
    return case


def replay(scenario_json: str, *, timeout_s: Optional[float] = None,
           sharder: str = DEFAULT_SHARDER, plant: Optional[str] = None,
           ranks: Optional[int] = None, locate: bool = True) -> int:
    """Run one case as a campaign did (``ranks``: the campaign pool's size, if larger; the
    timeout: the campaign's default, `auto_timeout`, unless given); a failing case's first
    divergence is located (one more run with probes) unless ``locate`` is false."""
    s = Scenario.from_json(scenario_json)
    cap = 120.0 if timeout_s is None else timeout_s
    with PoolSet(_ranks(max(s.world_size, ranks or 1), cap), timeout_s=cap) as pool:
        case = run_one(pool, s, sharder=sharder, timeout_s=timeout_s, plant=plant)
        if locate and case.verdict == "fail":   # every rank under torchrun: the probe run is collective
            case.divergence = locate_divergence(pool, s, case, sharder=sharder, plant=plant,
                                                timeout_s=timeout_s)
        if not _is_main(pool):
            return 0 if case.passed else 1
    planted = f" (planted bug {plant!r})" if plant else ""
    return print_case(case, f"W={s.world_size} {s.mode} {s.family}{planted}")

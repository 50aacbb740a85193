"""The parent side of the harness: draw scenarios, send each to the rank pool, run the
reference, compare step by step, and turn it all into `CaseResult`s and reports.

`run_campaign` is `python -m verify run`; `replay` is `python -m verify replay`;
`run_one(pool, scenario)` is what the pytest tests and both commands share.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from verify.compare import compare_step, diff_stats, tier_for
from verify.reference import run_reference
from verify.results import CaseResult, StepRecord
from verify.scenarios import Scenario
from verify import strategies

__all__ = ["expand_sharders", "draw_scenarios", "run_one", "evaluate", "run_campaign", "replay", "replay_command"]

# How large drawn cases get, per profile (steps per case).
PROFILE_MAX_STEPS = {"dev": 2, "ci": 3, "nightly": 4}


def replay_command(s: Scenario, sharder: str = "fsdp_core", plant: Optional[str] = None) -> str:
    extra = "" if sharder == "fsdp_core" else f" --sharder {sharder}"
    extra += f" --plant {plant}" if plant else ""
    return f"python -m verify replay{extra} '{s.to_json()}'"


def expand_sharders(names: Iterable[str]) -> list[str]:
    """Canonical sharder names, in order, once each; "all" is every sharder (fsdp_core first)."""
    from verify.peers import SHARDER_NAMES, canonical
    out: list[str] = []
    for name in names:
        for one in (SHARDER_NAMES if name == "all" else (canonical(name),)):
            if one not in out:
                out.append(one)
    return out


def draw_scenarios(*, world_size: int, mode: str, n: int, seed: int, profile: str = "ci",
                   dtypes: Sequence[str] = ("fp32", "bf16"),
                   families: Optional[Sequence[str]] = None) -> list[Scenario]:
    """``n`` distinct scenarios for one world size and mode, the same for the same seed.

    Hypothesis generates small examples first; drawing 8n and sampling n of them (seeded)
    spreads the cases over the whole strategy instead of its simplest corner."""
    strategy = strategies.scenarios(world_sizes=(world_size,), modes=(mode,), dtypes=tuple(dtypes),
                                    max_steps=PROFILE_MAX_STEPS.get(profile, 3),
                                    families=None if families is None else tuple(families))
    drawn: list[Scenario] = []

    @hyp_seed(seed * 1_000 + world_size * 10 + (mode == "deterministic"))
    @settings(max_examples=max(8 * n, 20), database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy)
    def collect(s: Scenario) -> None:
        if s not in drawn:
            drawn.append(s)

    collect()
    picked = sorted(random.Random(seed).sample(range(len(drawn)), min(n, len(drawn))))
    return [drawn[i] for i in picked]


def _state_model_bytes(s: Scenario, ref_params: dict) -> int:
    """ZeRO-3 model per rank: (parameters + gradients + optimizer state) / W, fp32."""
    seen, n = set(), 0
    for t in ref_params.values():
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * 4
    opt_copies = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}[s.optimizer]
    return (n * (2 + opt_copies)) // s.world_size


def _reassemble(values: list[dict], step: int, full: dict) -> list[str]:
    """Parameters whose per-rank pieces do not concatenate to the gathered full tensor."""
    bad = []
    for name, (_, _) in values[0]["records"][step]["pieces"].items():
        want = full.get(name)
        if want is None:
            bad.append(name)
            continue
        flat = torch.full((want.numel(),), float("nan"))
        covered = torch.zeros(want.numel(), dtype=torch.int32)
        for v in values:
            start, vals = v["records"][step]["pieces"][name]
            flat[start: start + vals.numel()] = vals
            covered[start: start + vals.numel()] += 1
        if not (torch.all(covered == 1) and torch.equal(flat, want.reshape(-1).float())):
            bad.append(name)
    return bad


def _grads_differ(values: list[dict], step: int, ref_grads: Optional[dict]) -> Optional[list[str]]:
    """Parameters whose reduced gradient, reassembled from the ranks' shards, is not bitwise
    equal to the reference's step gradient; None when the runner recorded no gradients.

    Parameters are compared after the update too, but a last-bit gradient error (a summation
    order, one ulp) is mostly absorbed by ``p - lr * g``: only this check sees it reliably."""
    recs = [v["records"][step].get("grads") for v in values]
    if ref_grads is None or not all(recs):
        return None
    bad = []
    for name in list(ref_grads) + [n for n in recs[0] if n not in ref_grads]:
        want = ref_grads.get(name)
        if want is None or name not in recs[0]:
            bad.append(f"{name} (a gradient on one side only)")
            continue
        flat = torch.full((want.numel(),), float("nan"), dtype=want.dtype)
        for rec in recs:
            start, vals = rec[name]
            flat[start: start + vals.numel()] = vals
        d = diff_stats(flat, want.reshape(-1))
        if not d.bitwise:
            bad.append(f"{name} ({d.n_diff}/{d.numel} elements differ, max ULP {d.max_ulp})")
    return bad


def evaluate(s: Scenario, sharder: str, result, ref, wall: float) -> CaseResult:
    """Compare a pool result with the reference, step by step."""
    case = CaseResult(scenario_json=s.to_json(), sharder=sharder, family=s.family,
                      world_size=s.world_size, mode=s.mode, dtype=s.dtype, optimizer=s.optimizer,
                      tier=tier_for(s), verdict="pass", replay=replay_command(s, sharder),
                      wall_time_s=wall)
    if sharder != "fsdp_core":  # a peer may not owe our tier (verify/peers.py, [Note: peer tiers])
        from verify.peers import peer_tier
        case.tier = peer_tier(s, sharder)
    if not result.ok:
        case.verdict, case.reason = "error", result.error or "the case did not complete"
        return case
    values = result.values
    if values[0].get("unsupported"):  # a peer refused the case on its ranks
        case.verdict, case.reason = "unsupported", values[0]["unsupported"]
        return case
    # A peer (verify/peers.py) has no padding views, local pieces or collective formula: only
    # fsdp_core's cases get those checks; every sharder gets the numerical comparison.
    own = sharder == "fsdp_core"
    problems: list[str] = []
    broken = [v["backend_error"] for v in values if v.get("backend_error")]
    if broken:
        problems.append(f"backend check failed: {broken[0]}")
    pad_init = [f"rank {v['rank']}: {label}" for v in values for label in v.get("pad_init", ())]
    if pad_init:
        problems.append(f"padding not zero after init: {pad_init[:5]}")
    for step, rec0 in enumerate(values[0]["records"]):
        ref_step = ref[step]
        params = {k: v for k, v in rec0["params"].items() if k in ref_step.params}
        missing_buffers_ok = {k for k in rec0["params"] if k not in ref_step.params}
        diff = compare_step(s, loss=rec0["loss"], loss_ref=ref_step.loss, params=params,
                            params_ref=ref_step.params, where=f"step {step}", tier=case.tier)
        if not diff.verdict.ok:
            problems.append(diff.verdict.reason)
        pad_bad = [f"rank {v['rank']}: {label} ({when})" for v in values
                   for when in ("pad_reduce", "pad_step") for label in v["records"][step][when]]
        if pad_bad:
            problems.append(f"step {step}: padding not zero: {pad_bad[:5]}")
        held = [f"rank {v['rank']}: {u}" for v in values for u in v["records"][step].get("unsharded", ())]
        if held:
            problems.append(f"step {step}: units still unsharded after backward: {held[:5]}")
        not_reassembled = _reassemble(values, step, rec0["params"]) if own else []
        if not_reassembled:
            problems.append(f"step {step}: shards do not reassemble for {not_reassembled[:5]}")
        # A peer's rank 0 records the whole gradient (verify/peers.py), fsdp_core every rank its piece.
        grads_bad = (_grads_differ(values if own else values[:1], step, ref_step.grads)
                     if case.tier == "bitwise" else None)
        if grads_bad:
            problems.append(f"step {step}: reduced gradients not bitwise equal to the "
                            f"reference's: {grads_bad[:5]}")
        coll, expected = rec0["collectives"], rec0["expected_collectives"]
        coll_ok = all(coll.get(kind) == want for kind, want in expected.items()) and \
            all(kind in expected for kind, (count, _) in coll.items() if count) if own else None
        if coll_ok is False:
            problems.append(f"step {step}: collectives {coll} differ from the formula {expected}")
        pd_ = diff.params
        if case.first_divergence is None and not (diff.loss.bitwise and pd_.bitwise):
            case.first_divergence = (step, pd_.first_differing or "loss")
        case.steps.append(StepRecord(
            step=step, loss=float(rec0["loss"]), loss_ref=float(ref_step.loss),
            loss_bitwise=diff.loss.bitwise, loss_abs_diff=diff.loss.max_abs,
            max_abs=pd_.max_abs, max_rel=pd_.max_rel, max_ulp=pd_.max_ulp,
            bitwise=diff.loss.bitwise and pd_.bitwise, n_params_differ=pd_.n_params_differ,
            worst_param=pd_.worst_param, padding_ok=(not pad_bad) if own else None,
            padding_bad=pad_bad[:10], reassembly_ok=(not not_reassembled) if own else None,
            grads_ok=None if grads_bad is None else not grads_bad, collectives=coll,
            collectives_expected=expected, collectives_ok=coll_ok,
            state_bytes=[v["records"][step]["state_bytes"] for v in values],
            state_bytes_model=_state_model_bytes(s, ref_step.params),
            step_time_s=rec0["step_time_s"]))
        del missing_buffers_ok
    if problems:
        case.verdict, case.reason = "fail", "\n".join(problems)
    return case


def run_one(pool, s: Scenario, *, sharder: str = "fsdp_core", timeout_s: Optional[float] = None,
            plant: Optional[str] = None, backend_check: bool = True) -> CaseResult:
    """One case through the pool, compared with its reference. ``plant``: the name of a
    planted bug (verify/plant.py) the ranks install for this case; None for the real run."""
    from verify.peers import canonical, unsupported_reason
    from verify.runner import run_case
    torch.set_num_threads(1)
    sharder = canonical(sharder)
    reason = unsupported_reason(s, sharder)
    if reason is not None:  # decided from the scenario: nothing runs
        return CaseResult(scenario_json=s.to_json(), sharder=sharder, family=s.family,
                          world_size=s.world_size, mode=s.mode, dtype=s.dtype,
                          optimizer=s.optimizer, tier=tier_for(s), verdict="unsupported",
                          reason=reason, replay=replay_command(s, sharder, plant))
    payload = {"scenario": s.to_json(), "sharder": sharder}
    if not backend_check:  # only to study the equivalence checks alone (verify/mutants.py)
        payload["backend_check"] = False
    if plant is not None:
        from verify.plant import check_name
        payload["plant"] = check_name(plant)
    t0 = time.perf_counter()
    pending = pool.submit(s.world_size, run_case, payload, timeout_s=timeout_s)
    try:  # the reference is computed here while the ranks run the case
        ref = run_reference(s)
    finally:
        result = pending.result()
    case = evaluate(s, sharder, result, ref if result.ok else None, time.perf_counter() - t0)
    if plant is not None:
        case.replay = replay_command(s, sharder, plant)
    return case


def _progress(i: int, n: int, case: CaseResult, started: float) -> None:
    rate = i / max(time.perf_counter() - started, 1e-9) * 60
    width = 24
    bar = "#" * round(width * i / n) + "." * (width - round(width * i / n))
    who = "" if case.sharder == "fsdp_core" else f"{case.sharder:<11} "
    print(f"[{bar}] {i}/{n} {who}W={case.world_size} {case.mode:<13} {case.family:<8} {case.dtype} "
          f"{case.optimizer:<12} {case.verdict.upper():<5} {case.wall_time_s:5.2f}s  "
          f"({rate:.0f} cases/min)", flush=True)


def run_campaign(*, world_sizes: Sequence[int], examples: int, seed: int, sharders: Iterable[str],
                 modes: Sequence[str], profile: Optional[str], out_dir, timeout_s: float = 120.0,
                 plant: Optional[str] = None, dtypes: Sequence[str] = ("fp32", "bf16"),
                 resume_cases: int = 0, families: Optional[Sequence[str]] = None,
                 interleave: bool = False
                 ) -> list[CaseResult]:
    """``resume_cases``: checkpoint-resume cases (verify/resume.py, fsdp_core's checkpoints;
    none with a planted bug or without fsdp_core among the sharders) drawn and run after the
    plan. After every case the RSS of the pool's ranks is sampled (verify/soak.py) and saved
    as ``pool_memory`` in results.json. ``interleave``: run the plan round-robin over (world
    size, mode) instead of one world size after the other, so that every rank is warm early
    (the soak's leak check measures from case 50; see verify/soak.py)."""
    from verify import soak
    from verify.pool import RankPool
    from verify.report import write_reports
    from verify.resume import draw_resume_cases, run_resume
    torch.set_num_threads(1)
    profile = profile or "ci"
    sharders = expand_sharders(sharders)
    plan = [(sh, s) for w in world_sizes for mode in modes
            for s in draw_scenarios(world_size=w, mode=mode, n=examples, seed=seed, profile=profile,
                                    dtypes=dtypes, families=families)
            for sh in sharders]
    if interleave:
        from verify.soak import round_robin
        plan = round_robin(plan, key=lambda item: (item[1].world_size, item[1].mode))
    resumes = draw_resume_cases(n=resume_cases, seed=seed, world_sizes=world_sizes, modes=modes,
                                profile=profile, dtypes=dtypes, families=families
                                ) if resume_cases and plant is None and "fsdp_core" in sharders else []
    print(f"drew {len(plan)} cases (world sizes {list(world_sizes)}, modes {list(modes)}, "
          f"seed {seed}, profile {profile})"
          + (f" and {len(resumes)} checkpoint-resume cases" if resumes else "")
          + "; starting the rank pool", flush=True)
    if plant is not None:
        print(f"PLANTED BUG {plant!r} is installed in every case (a demo: failures are expected)",
              flush=True)
    results: list[CaseResult] = []
    memory: list[dict] = []
    started = time.perf_counter()
    # Resume cases run after the plan; interleaved (the soak), before it, so that the
    # checkpoint code's one-time cost falls before the leak check's baseline.
    jobs = [(None, rc) for rc in resumes] + list(plan) if interleave else \
        list(plan) + [(None, rc) for rc in resumes]
    with RankPool(max(world_sizes), timeout_s=timeout_s) as pool:
        for i, (sharder, s) in enumerate(jobs, 1):
            if sharder is None:
                case = run_resume(pool, s, timeout_s=timeout_s)
            else:
                case = run_one(pool, s, sharder=sharder, timeout_s=timeout_s, plant=plant)
            results.append(case)
            memory.append(soak.sample(pool, len(results)))
            _progress(i, len(jobs), case, started)
    elapsed = time.perf_counter() - started
    failed = [c for c in results if not c.passed]
    title = f"Equivalence campaign: seed {seed}, world sizes {','.join(map(str, world_sizes))}"
    paths = write_reports([c.to_dict() for c in results], Path(out_dir), title=title,
                          pool_memory={"samples": memory, "cache_env": soak.cache_env()})
    if sharders != ["fsdp_core"]:  # the peers side by side on the same cases
        from verify.report import write_peers_report
        paths.append(write_peers_report([c.to_dict() for c in results[:len(plan)]],
                                        Path(out_dir), title=title))
    print(f"{len(results) - len(failed)}/{len(results)} cases passed in {elapsed:.1f}s "
          f"({len(results) / max(elapsed, 1e-9) * 60:.1f} cases/min); wrote "
          + ", ".join(str(p) for p in paths))
    for c in failed:
        print(f"\nFAILED ({c.verdict}) W={c.world_size} {c.mode} {c.family}: "
              f"{c.reason.splitlines()[0] if c.reason else ''}\n  replay: {c.replay}")
    return results


def replay(scenario_json: str, *, timeout_s: float = 120.0, sharder: str = "fsdp_core",
           plant: Optional[str] = None) -> int:
    from verify.pool import RankPool
    s = Scenario.from_json(scenario_json)
    with RankPool(s.world_size, timeout_s=timeout_s) as pool:
        case = run_one(pool, s, sharder=sharder, timeout_s=timeout_s, plant=plant)
    planted = f" (planted bug {plant!r})" if plant else ""
    return print_case(case, f"W={s.world_size} {s.mode} {s.family}{planted}")


def print_case(case: CaseResult, what: str) -> int:
    """A replayed case, step by step, then why it failed; returns the exit code."""
    print(f"{case.verdict.upper()}: {what} tier={case.tier}")
    for st in case.steps:
        print(f"  step {st.step}: loss {st.loss:.9g} vs {st.loss_ref:.9g}  max|d param| {st.max_abs:.3g} "
              f"max ULP {st.max_ulp} bitwise={st.bitwise} padding_ok={st.padding_ok} "
              f"reassembly_ok={st.reassembly_ok} collectives_ok={st.collectives_ok}")
    if case.reason:
        print(case.reason)
    return 0 if case.passed else 1

"""`python -m verify bench`: our sharder against FSDP2 on the same GPT, in one run.

Measured as ratios in one run (DESIGN section 5): at each world size the variants (fsdp_core
fast, fsdp_core deterministic, FSDP2) train the same model on the same data, interleaved step by
step, with a barrier around each step; the median of the steps after warm-up is reported.
Deterministic mode runs with k = 1 micro-batch per rank (M = W), so it does exactly the work of
fast mode and its extra cost is the all-to-all plus the ordered sum.

Per rank and variant it also measures the bytes of parameters + gradients + optimizer state
(against the ZeRO-3 model 16N/W + the largest unit's unsharded bytes), the peak bytes of
unsharded parameters alive at once (fsdp_core), and the collectives of one step by kind
against the formula. The harness's own cost (a case through the pool vs spawning processes)
is measured in the same run.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from verify.scenarios import Scenario

__all__ = ["bench_case", "run_bench"]

# label -> (sharder spec, mode): every variant trains the same model on the same data through
# the one training protocol (verify/case/train.py), interleaved step by step. `--sharder` adds
# more (labelled by their adapter's name), timed against the same FSDP2.
VARIANTS = {
    "fsdp_core": ("fsdp_core", "fast"),
    "fsdp_core_noprefetch": ("verify.sharders.fsdp_core:FsdpCoreNoPrefetch", "fast"),
    "fsdp_core_det": ("fsdp_core", "deterministic"),
    "fsdp2": ("torch_fsdp2", "fast"),
}
# HSDP at W = 8: fsdp_core and FSDP2 on the same (replicate, shard) mesh.
HSDP_MESHES = ((2, 4), (4, 2))
HSDP_VARIANTS = {"fsdp_core_hsdp": ("fsdp_core", "fast"), "fsdp2_hsdp": ("torch_fsdp2", "fast")}
# One optimizer implementation for every variant: PyTorch picks the per-tensor loop for DTensor
# (FSDP2) parameters and foreach for plain tensors unless told.
BENCH_OPTIMIZER = {"foreach": True}


def bench_scenario(world_size: int, *, width: int, layers: int, vocab: int, seq: int, batch: int) -> Scenario:
    return Scenario(family="gpt", world_size=world_size, mode="fast", optimizer="adamw",
                    model=tuple(sorted(dict(vocab_size=vocab, n_embd=width, n_head=max(1, width // 64),
                                            n_layer=layers, block_size=seq, tied=True, bias=True).items())),
                    micro_batches=world_size, micro_batch_size=batch, lr=1e-3, steps=1)


@contextlib.contextmanager
def _stderr_quiet():
    """The profiler's C++ side prints start/stop lines on fd 2 in every rank: drop them."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _FSDP2Unsharded:
    """Peak bytes of FSDP2's unsharded parameters alive at once: its param groups' transitions
    to and from the unsharded state, wrapped for one step (the all-gather output buffers FSDP2
    copies out of are not counted; the profiler's peak step memory sees those)."""

    def __init__(self) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        self.cls, self.now, self.peak = FSDPParamGroup, 0, 0
        self.orig = {n: getattr(FSDPParamGroup, n) for n in ("_to_unsharded", "_to_sharded",
                                                              "_to_sharded_post_forward")}
        tracker = self

        def nbytes(group) -> int:
            return sum(t.numel() * t.element_size() for fp in group.fsdp_params
                       for t in fp.all_gather_outputs)

        def to_unsharded(group):
            was = group.is_unsharded
            tracker.orig["_to_unsharded"](group)
            if not was:
                tracker.now += nbytes(group)
                tracker.peak = max(tracker.peak, tracker.now)

        def leaving(name):
            def fn(group):
                if group.is_unsharded:
                    tracker.now -= nbytes(group)
                tracker.orig[name](group)
            return fn

        FSDPParamGroup._to_unsharded = to_unsharded
        FSDPParamGroup._to_sharded = leaving("_to_sharded")
        FSDPParamGroup._to_sharded_post_forward = leaving("_to_sharded_post_forward")

    def close(self) -> None:
        for name, fn in self.orig.items():
            setattr(self.cls, name, fn)


def _uses_fsdp2(model) -> bool:
    """Whether PyTorch's FSDP2 shards ``model`` (its unsharded bytes are measured through its
    param groups; fsdp_core's are counted where it allocates them)."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def peak_allocated(step) -> int:
    """Peak bytes of tensor memory allocated during ``step()`` above what was allocated before
    it, from the profiler's allocation events: the same yardstick for every sharder
    (unsharded parameters, activations, gradient buffers, communication buffers)."""
    from torch.profiler import ProfilerActivity, profile
    with _stderr_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak


def bench_case(payload: dict, ctx) -> dict:
    """Rank side: build every variant, time interleaved steps, measure memory and traffic."""
    import dataclasses
    from fsdp_core._flat_param import UNSHARDED_BYTES
    from verify.case.probes import CollectiveRecorder, state_bytes, watch_units
    from verify.case.train import Trainer
    from verify.sharders import StepTrace
    torch.set_num_threads(1)
    s = Scenario.from_json(payload["scenario"])
    variants = payload.get("variants") or VARIANTS
    if not isinstance(variants, dict):   # labels of VARIANTS
        variants = {v: VARIANTS[v] for v in variants}
    trainers = {}
    for v, (spec, mode) in variants.items():
        trainers[v] = Trainer(spec, dataclasses.replace(s, mode=mode), ctx,
                              optimizer_kwargs=BENCH_OPTIMIZER)
    times: dict[str, list[float]] = {v: [] for v in variants}
    out: dict = {"rank": ctx.rank, "variants": {v: {} for v in variants}}
    steps, warmup = payload.get("steps", 5), payload.get("warmup", 2)

    def train(tr, step) -> Optional[int]:
        tr.forward_backward(step)
        state = state_bytes(tr.optimizer)
        tr.optimizer.step()
        return state

    for step in range(warmup + steps + 1):  # the last step measures memory and traffic, untimed
        measure = step == warmup + steps
        for v, tr in trainers.items():
            entry = out["variants"][v]
            dist.barrier(group=ctx.group)
            if not measure:
                t0 = time.perf_counter()
                train(tr, step)
                dist.barrier(group=ctx.group)
                if step >= warmup:
                    times[v].append(time.perf_counter() - t0)
            else:
                rec = CollectiveRecorder()
                calls, in_bw, handles = watch_units(tr.plan.units)
                UNSHARDED_BYTES.reset_peak()
                base = UNSHARDED_BYTES.now  # other variants' buffers: all resharded between steps
                fsdp2 = _FSDP2Unsharded() if _uses_fsdp2(tr.model) else None
                result: dict = {}
                try:
                    with rec.recording():
                        entry["peak_allocated"] = peak_allocated(lambda: result.update(state=train(tr, step)))
                finally:
                    if fsdp2 is not None:
                        fsdp2.close()
                        entry["peak_unsharded"] = fsdp2.peak
                for h in handles:
                    h.remove()
                entry["state_bytes"] = result["state"]
                entry["collectives"] = rec.take()
                if fsdp2 is None:
                    entry["peak_unsharded"] = UNSHARDED_BYTES.peak - base
                trace = StepTrace(mode=tr.s.mode, micro_batches=1, forward_calls=dict(calls),
                                  backward_units=set(in_bw), recorded=entry["collectives"])
                entry["expected"] = tr.sharder.expected_collectives(tr.model, trace)
            tr.zero_grad()
    for v in variants:
        out["variants"][v]["step_s"] = statistics.median(times[v])
    if "fsdp_core" in trainers:
        import fsdp_core
        units = fsdp_core.units_of(trainers["fsdp_core"].model)
        out["n_params"] = sum(sum(u.layout.numels) for u in units)
        out["largest_unit_bytes"] = max(u.layout.used_numel for u in units) * 4
    return out


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _row(w: int, values: list[dict]) -> dict:
    r0 = values[0]
    v = r0["variants"]
    n = r0["n_params"]
    ms = {k: 1e3 * v[k]["step_s"] for k in v}
    state = {k: max(rv["variants"][k]["state_bytes"] for rv in values) for k in v}
    peak_alloc = {k: max(rv["variants"][k]["peak_allocated"] for rv in values) for k in v}
    peak_unsharded = {k: max(rv["variants"][k]["peak_unsharded"] for rv in values) for k in v}
    zero3_state = 16 * n / w  # fp32 parameters + gradients + AdamW's two moments, divided by W
    ours = v["fsdp_core"]
    return dict(
        world_size=w, n_params=n, ms=ms,
        ours_over_fsdp2=ms["fsdp_core"] / ms["fsdp2"],
        noprefetch_over_ours=ms["fsdp_core_noprefetch"] / ms["fsdp_core"],
        det_over_fast=ms["fsdp_core_det"] / ms["fsdp_core"],
        state=state, state_over_fsdp2=state["fsdp_core"] / state["fsdp2"],
        zero3_state=zero3_state, state_over_zero3=state["fsdp_core"] / zero3_state,
        largest_unit=r0["largest_unit_bytes"], peak_unsharded=peak_unsharded,
        zero3_model=zero3_state + r0["largest_unit_bytes"],
        total_over_model=(state["fsdp_core"] + peak_unsharded["fsdp_core"]) / (zero3_state + r0["largest_unit_bytes"]),
        peak_allocated=peak_alloc, peak_alloc_over_fsdp2=peak_alloc["fsdp_core"] / peak_alloc["fsdp2"],
        unsharded_over_fsdp2=(peak_unsharded["fsdp_core"] / peak_unsharded["fsdp2"]
                              if peak_unsharded["fsdp2"] else None),
        collectives=ours["collectives"], expected=ours["expected"],
        collectives_ok=all(_same_traffic(v[k]) for k in v if v[k].get("expected") is not None),
        det_collectives=v["fsdp_core_det"]["collectives"], det_expected=v["fsdp_core_det"]["expected"],
        fsdp2_collectives=v["fsdp2"]["collectives"],
    )


def _bench_run(ranks, s: Scenario, steps: int, warmup: int, variants, timeout_s: float,
               what: str) -> list[dict]:
    """`bench_case` of ``s`` on ``ranks``; its values per rank, or RuntimeError naming ``what``."""
    payload = {"scenario": s.to_json(), "steps": steps, "warmup": warmup}
    if variants is not None:
        payload["variants"] = variants
    res = ranks.run(s.world_size, bench_case, payload, timeout_s=timeout_s)
    if not res.ok:
        raise RuntimeError(f"bench of {what} failed:\n{res.error}")
    return res.values


def _extra_row(w: int, label: str, values: list[dict]) -> dict:
    v = values[0]["variants"]
    state = [rv["variants"][label]["state_bytes"] for rv in values]
    return dict(world_size=w, sharder=label, ms=1e3 * v[label]["step_s"],
                fsdp2_ms=1e3 * v["fsdp2"]["step_s"],
                over_fsdp2=v[label]["step_s"] / v["fsdp2"]["step_s"],
                state=None if None in state else max(state),
                fsdp2_state=max(rv["variants"]["fsdp2"]["state_bytes"] for rv in values),
                collectives=v[label]["collectives"], expected=v[label]["expected"])


def _hsdp_row(mesh, values: list[dict]) -> dict:
    v = values[0]["variants"]
    ours, theirs = v["fsdp_core_hsdp"], v["fsdp2_hsdp"]
    state = {k: max(rv["variants"][k]["state_bytes"] for rv in values) for k in v}
    return dict(mesh=f"{mesh[0]}x{mesh[1]}", ms=1e3 * ours["step_s"], fsdp2_ms=1e3 * theirs["step_s"],
                over_fsdp2=ours["step_s"] / theirs["step_s"], state=state["fsdp_core_hsdp"],
                fsdp2_state=state["fsdp2_hsdp"],
                state_over_fsdp2=state["fsdp_core_hsdp"] / state["fsdp2_hsdp"],
                collectives=ours["collectives"], expected=ours["expected"],
                collectives_ok=_same_traffic(ours), fsdp2_collectives=theirs["collectives"])


def _same_traffic(entry: dict) -> bool:
    return entry["collectives"] == entry["expected"]


def run_bench(*, world_sizes: Sequence[int] = (1, 2, 4, 8), steps: int = 10, warmup: int = 2,
              width: int = 256, layers: int = 6, vocab: int = 1024, seq: int = 64, batch: int = 8,
              out_dir: str | Path = "reports", harness_cases: int = 20, spawn_cases: Optional[int] = None,
              timeout_s: float = 600.0, sharders: Sequence[str] = ()) -> dict:
    """``sharders``: more sharder specs (a user's ``pkg.module:Name``), each timed at every
    world size against FSDP2 in the same run, on its own ranks (interleaved with FSDP2 step by
    step), reported in a table of their own."""
    from verify.ranks.pool import RankPool
    from verify.ranks.poolset import PoolSet
    from verify.sharders import display_name, load_class, resolve
    torch.set_num_threads(1)
    rows, extra_rows = [], []
    extra = {}
    for spec in sharders:
        spec = resolve(spec)
        if spec not in [sp for sp, _ in VARIANTS.values()]:
            extra[display_name(spec)] = spec
    with PoolSet(RankPool(max(world_sizes), timeout_s=timeout_s), timeout_s=timeout_s) as pool:
        for w in world_sizes:
            s = bench_scenario(w, width=width, layers=layers, vocab=vocab, seq=seq, batch=batch)
            for label, spec in extra.items():
                ranks, why = pool.for_world(load_class(spec).world, w)
                if ranks is None:
                    print(f"bench: {label} at W={w} skipped: {why}", flush=True)
                    continue
                variants = {label: (spec, "fast"), "fsdp2": VARIANTS["fsdp2"]}
                values = _bench_run(ranks, s, steps, warmup, variants, timeout_s, f"{label} at W={w}")
                extra_rows.append(_extra_row(w, label, values))
                r = extra_rows[-1]
                print(f"  {label} {r['ms']:.1f} ms, FSDP2 {r['fsdp2_ms']:.1f} ms, {label}/FSDP2 "
                      f"{r['over_fsdp2']:.2f}; state {_fmt_bytes(r['state'])} vs FSDP2 "
                      f"{_fmt_bytes(r['fsdp2_state'])}", flush=True)
            s = bench_scenario(w, width=width, layers=layers, vocab=vocab, seq=seq, batch=batch)
            print(f"bench: W={w} ({', '.join(VARIANTS)}), {warmup} warm-up + {steps} timed steps", flush=True)
            rows.append(_row(w, _bench_run(pool, s, steps, warmup, None, timeout_s, f"W={w}")))
            row = rows[-1]
            print(f"  ours {row['ms']['fsdp_core']:.1f} ms, FSDP2 {row['ms']['fsdp2']:.1f} ms, ours/FSDP2 "
                  f"{row['ours_over_fsdp2']:.2f}; no-prefetch/prefetch {row['noprefetch_over_ours']:.2f}; "
                  f"deterministic/fast {row['det_over_fast']:.2f}; state ours/FSDP2 {row['state_over_fsdp2']:.3f}, "
                  f"ours/(16N/W) {row['state_over_zero3']:.3f}; peak step memory ours/FSDP2 "
                  f"{row['peak_alloc_over_fsdp2']:.2f}; collectives = formula: {row['collectives_ok']}", flush=True)
        hsdp_rows = []
        for mesh in HSDP_MESHES if max(world_sizes) >= 8 else ():
            import dataclasses
            s = dataclasses.replace(bench_scenario(8, width=width, layers=layers, vocab=vocab,
                                                   seq=seq, batch=batch), mesh=mesh)
            pool.prepare_hsdp(pool.main)
            hsdp_rows.append(_hsdp_row(mesh, _bench_run(pool, s, steps, warmup, HSDP_VARIANTS,
                                                        timeout_s, f"HSDP {mesh}")))
            r = hsdp_rows[-1]
            print(f"bench: HSDP {mesh[0]}x{mesh[1]}: ours {r['ms']:.1f} ms, FSDP2 {r['fsdp2_ms']:.1f} ms, "
                  f"ours/FSDP2 {r['over_fsdp2']:.2f}; state ours/FSDP2 {r['state_over_fsdp2']:.3f}; "
                  f"collectives = formula: {r['collectives_ok']}", flush=True)
        overhead = _harness_cost(pool, min(4, max(world_sizes)), harness_cases, spawn_cases)
        print(f"  harness at W={overhead['world_size']}: {overhead['pool_same_cases_s']:.3f} s per drawn case "
              f"through the pool vs {overhead['spawn_case_s']:.2f} s on freshly spawned ranks: "
              f"{overhead['case_ratio']:.1f}x ({overhead['spawn_cases']} of {overhead['cases']} cases run both ways)",
              flush=True)
    report = {"rows": rows, "overhead": overhead, "extra_rows": extra_rows, "hsdp_rows": hsdp_rows,
              "config": dict(width=width, layers=layers, vocab=vocab, seq=seq, batch=batch,
                             steps=steps, warmup=warmup)}
    _write(report, Path(out_dir))
    return report


def _harness_cost(pool, world_size: int, n: int, n_spawn: Optional[int] = None) -> dict:
    """Drawn cases through the pool vs the same cases each on freshly spawned ranks (what a
    harness without a pool pays: spawn, import, group init, a cold case, teardown), both with
    the reference and the comparison, measured now. The pool first runs one other case, so
    its ranks have imported the harness (a campaign pays that once)."""
    from verify.campaign.run import draw_scenarios, replay_command, run_one
    from verify.case.judge import evaluate
    from verify.case.train import run_case
    from verify.ranks.spawn import measure_overhead, spawn_run
    from verify.ranks.rank import PoolResult
    from verify.reference import run_reference
    from verify.sharders import load
    cases = draw_scenarios(world_size=world_size, mode="deterministic", n=n + 1, seed=0)
    run_one(pool, cases[0])
    pool_times = []
    for s in cases[1:]:
        t0 = time.perf_counter()
        case = run_one(pool, s)
        pool_times.append(time.perf_counter() - t0)
        if not case.passed:
            raise RuntimeError(f"harness cost: a drawn case did not pass through the pool: {case.replay}")
    n_spawn = n if n_spawn is None else min(n_spawn, n)  # default: every case both ways
    picked = sorted({round(i * (n - 1) / max(n_spawn - 1, 1)) for i in range(n_spawn)})
    spawn_times = []
    for i, s in enumerate(cases[1 + j] for j in picked):
        t0 = time.perf_counter()
        box: dict = {}
        ranks = threading.Thread(target=lambda: box.update(out=spawn_run(
            world_size, run_case, {"scenario": s.to_json(), "sharder": "fsdp_core"}, i)))
        ranks.start()  # the reference meanwhile, as run_one does with the pool
        ref = run_reference(s)
        ranks.join()
        wall, values = box["out"]
        case = evaluate(s, load("fsdp_core"), "fsdp_core", PoolResult(True, values, None, wall), ref,
                        wall, replay=replay_command(s))
        spawn_times.append(time.perf_counter() - t0)
        if not case.passed:
            raise RuntimeError(f"harness cost: a drawn case did not pass on spawned ranks: {case.replay}")
    trivial = measure_overhead(pool, world_size, n=10)
    per_case = sum(pool_times) / len(pool_times)
    same = sum(pool_times[j] for j in picked) / len(picked)
    spawn_case = sum(spawn_times) / len(spawn_times)
    # What spawning adds to a case (spawn, imports, group init, cold start, teardown), measured
    # on the picked cases, added to every drawn case's pool time: the ratio over the whole draw.
    spawn_extra = spawn_case - same
    return dict(world_size=world_size, cases=len(pool_times), pool_case_s=per_case,
                spawn_cases=len(spawn_times), spawn_case_s=spawn_case, pool_same_cases_s=same,
                case_ratio=spawn_case / same, pool_times=pool_times, picked=picked,
                spawn_extra_s=spawn_extra, draw_ratio=(per_case + spawn_extra) / per_case, spawn_s=trivial.spawn_s, pool_trivial_s=trivial.pool_s,
                trivial_ratio=trivial.ratio, cases_per_min=60.0 / per_case,
                spawn_cases_per_min=60.0 / spawn_case)


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg, rows, ov = report["config"], report["rows"], report["overhead"]
    backend = "NCCL" if torch.cuda.is_available() else "gloo on CPU"
    lines = [
        "# Performance: fsdp_core vs FSDP2",
        "",
        f"GPT width {cfg['width']}, {cfg['layers']} layers, vocab {cfg['vocab']}, sequence {cfg['seq']}, "
        f"batch {cfg['batch']} per rank, AdamW; per block units + root. Median of {cfg['steps']} steps "
        f"after {cfg['warmup']} warm-up, variants interleaved step by step in one run ({backend}); "
        "memory and traffic from one more, untimed step. Reproduce: `python -m verify bench`.",
        "",
        "## Step time",
        "",
        "| W | params | ours ms | FSDP2 ms | ours/FSDP2 | ours without prefetch ms | without/with prefetch | det ms | det/fast |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['world_size']} | {r['n_params']:,} | {ms['fsdp_core']:.1f} | {ms['fsdp2']:.1f} | "
            f"{r['ours_over_fsdp2']:.2f} | {ms['fsdp_core_noprefetch']:.1f} | {r['noprefetch_over_ours']:.2f} | "
            f"{ms['fsdp_core_det']:.1f} | {r['det_over_fast']:.2f} |")
    lines += [
        "",
        "## Memory per rank",
        "",
        "State is parameters + gradients + optimizer state; the ZeRO-3 model of it is 16N/W (fp32 "
        "parameters, gradients and AdamW's two moments). Unsharded is the peak of unsharded parameter "
        "buffers allocated at once (counted where fsdp_core allocates them; for FSDP2, its param groups' "
        "unsharded parameters, without the all-gather buffers it copies them out of); the ZeRO-3 model "
        "of it is the largest unit. Peak step memory is the peak of all tensor memory allocated during a step "
        "above what was allocated before it (profiler allocation events; the same yardstick for both "
        "sharders).",
        "",
        "| W | state ours | state FSDP2 | ours/FSDP2 | 16N/W | ours/(16N/W) | unsharded peak | without prefetch | FSDP2 | largest unit | (state+unsharded)/(16N/W+largest) | peak step memory ours | FSDP2 | ours/FSDP2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st, pu, pa = r["state"], r["peak_unsharded"], r["peak_allocated"]
        lines.append(
            f"| {r['world_size']} | {_fmt_bytes(st['fsdp_core'])} | {_fmt_bytes(st['fsdp2'])} | "
            f"{r['state_over_fsdp2']:.3f} | {_fmt_bytes(r['zero3_state'])} | {r['state_over_zero3']:.3f} | "
            f"{_fmt_bytes(pu['fsdp_core'])} | {_fmt_bytes(pu['fsdp_core_noprefetch'])} | {_fmt_bytes(pu['fsdp2'])} | "
            f"{_fmt_bytes(r['largest_unit'])} | {r['total_over_model']:.3f} | "
            f"{_fmt_bytes(pa['fsdp_core'])} | {_fmt_bytes(pa['fsdp2'])} | {r['peak_alloc_over_fsdp2']:.2f} |")
    lines += ["", "## Collectives of one step",
              "", "Count and bytes by kind; fsdp_core against the formula (two all-gathers and one "
              "reduction per unit per step with resharding after forward; nothing at W=1).", ""]
    for r in rows:
        lines.append(f"- W={r['world_size']} ({'= formula' if r['collectives_ok'] else 'NOT the formula'}): "
                     f"fast {r['collectives']} (formula {r['expected']}); deterministic {r['det_collectives']} "
                     f"(formula {r['det_expected']}); FSDP2 {r['fsdp2_collectives']}")
    if report.get("hsdp_rows"):
        lines += ["", "## HSDP (W = 8)", "",
                  "fsdp_core and FSDP2 on the same 2-D (replicate, shard) mesh: parameters sharded "
                  "over S, replicated over R; gradients reduce-scattered in the shard group and "
                  "all-reduced over the replicate group. Same GPT, data and optimizer.", "",
                  "| mesh RxS | ours ms | FSDP2 ms | ours/FSDP2 | state ours | state FSDP2 | ours/FSDP2 | collectives = formula |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["hsdp_rows"]:
            lines.append(f"| {r['mesh']} | {r['ms']:.1f} | {r['fsdp2_ms']:.1f} | {r['over_fsdp2']:.2f} | "
                         f"{_fmt_bytes(r['state'])} | {_fmt_bytes(r['fsdp2_state'])} | "
                         f"{r['state_over_fsdp2']:.3f} | {'yes' if r['collectives_ok'] else 'NO'} |")
        for r in report["hsdp_rows"]:
            lines.append(f"- {r['mesh']}: ours {r['collectives']} (formula {r['expected']}); FSDP2 "
                         f"{r['fsdp2_collectives']}")
    if report.get("extra_rows"):
        lines += ["", "## Other sharders against FSDP2", "",
                  "Each named with `--sharder`, timed against FSDP2 interleaved step by step on the "
                  "same ranks, the same GPT, data and optimizer options.", "",
                  "| sharder | W | ms | FSDP2 ms | sharder/FSDP2 | state/rank | FSDP2 state/rank |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["extra_rows"]:
            lines.append(f"| {r['sharder']} | {r['world_size']} | {r['ms']:.1f} | {r['fsdp2_ms']:.1f} | "
                         f"{r['over_fsdp2']:.2f} | {_fmt_bytes(r['state'])} | "
                         f"{_fmt_bytes(r['fsdp2_state'])} |")
    every = ov["spawn_cases"] == ov["cases"]
    lines += ["", "## Harness", "",
              f"At W={ov['world_size']}, drawn deterministic cases, each with its reference and comparison: "
              f"{ov['cases']} cases through the pool took {ov['pool_case_s']:.3f} s each "
              f"({ov['cases_per_min']:.0f} cases/min); "
              + (f"the same {ov['cases']} cases" if every else
                 f"{ov['spawn_cases']} of them (spread over the draw, {ov['pool_same_cases_s']:.3f} s each "
                 f"through the pool)")
              + f", each on freshly spawned ranks, took {ov['spawn_case_s']:.2f} s each "
              f"({ov['spawn_cases_per_min']:.1f} cases/min): the pool is **{ov['case_ratio']:.1f}x** cheaper "
              "per case"
              + ("." if every else
                 f"; with the {ov['spawn_extra_s']:.2f} s spawning added to every drawn case, "
                 f"**{ov['draw_ratio']:.1f}x** over the whole draw.")
              + f" A trivial task: {ov['pool_trivial_s'] * 1e3:.2f} ms through the pool vs "
              f"{ov['spawn_s']:.2f} s spawned ({ov['trivial_ratio']:.0f}x).", ""]
    (out / "performance.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ws = [r["world_size"] for r in rows]
        ax.plot(ws, [r["ms"]["fsdp_core"] for r in rows], "o-", label="fsdp_core (fast)")
        ax.plot(ws, [r["ms"]["fsdp_core_noprefetch"] for r in rows], "x:", label="fsdp_core (no prefetch)")
        ax.plot(ws, [r["ms"]["fsdp_core_det"] for r in rows], "s--", label="fsdp_core (deterministic)")
        ax.plot(ws, [r["ms"]["fsdp2"] for r in rows], "^-", label="FSDP2")
        ax.set_xlabel("world size W")
        ax.set_ylabel("step time (ms, median)")
        ax.set_xscale("log", base=2)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "performance.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print(f"wrote {out / 'performance.md'}")

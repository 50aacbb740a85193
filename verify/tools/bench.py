"""`python -m verify bench`: our sharder against FSDP2 on the same GPT, in one run.

Measured as ratios in one run (DESIGN section 5): at each world size the variants (fsdp_core
fast, fsdp_core deterministic, FSDP2) train the same model on the same data, interleaved step by
step, with a barrier around each step; the median of the steps after warm-up is reported. So is
the median of the per-step ratios ours/FSDP2 (each timed step paired with FSDP2's step of the
same round) with a distribution-free confidence interval for that median (`median_interval`):
how far a ratio near a target is from it, measured in the run's own noise.
Deterministic mode runs with k = 1 micro-batch per rank (M = W), so it does exactly the work of
fast mode and its extra cost is the all-to-all plus the ordered sum.

The compute floor is the same model trained unsharded (no collectives, no hooks) by every rank
on its own batch, interleaved with the others: ours over it is the distance to the limit.

Per rank and variant it also measures the bytes of parameters + gradients + optimizer state
(against the ZeRO-3 model 16N/W + the largest unit's unsharded bytes), the peak bytes of
unsharded parameters alive at once (fsdp_core), and the collectives of one step by kind
against the formula. The harness's own cost (a case through the pool vs spawning processes)
is measured in the same run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

import fsdp_core
from fsdp_core._flat_param import UNSHARDED_BYTES
from verify.case.probes import CollectiveRecorder, state_bytes, watch_units
from verify.case.train import Trainer
from verify.ranks.pool import RankPool
from verify.ranks.poolset import PoolSet
from verify.scenarios import Scenario
from verify.sharders import Sharder, StepTrace, display_name, load_class, resolve
from verify.tools.bench_memory import FSDP2Unsharded, peak_allocated, uses_fsdp2
from verify.tools.bench_overhead import harness_cost
from verify.tools.bench_report import fmt_bytes, fmt_paired, write_performance_report

__all__ = ["bench_case", "run_bench", "Unsharded", "median_interval", "paired_ratio"]


def median_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, lo, hi, coverage): the sample median of ``xs`` and the order-statistic interval
    ``[x_(k), x_(n+1-k)]`` (sorted, 1-based) for the population median, with k the largest
    integer whose two-sided miss probability ``2 * P(Binomial(n, 1/2) <= k - 1)`` is at most
    ``1 - level`` (no assumption on the distribution; steps taken as independent). ``coverage``
    is that interval's own probability of holding the median; with too few values for ``level``
    (n <= 5 at 0.95) the interval is the full range and ``coverage`` says how much less it is."""
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval of no values")

    def miss(k: int) -> float:   # P(the median lies outside [x_(k), x_(n+1-k)])
        return 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and miss(k + 1) <= 1 - level:
        k += 1
    return statistics.median(xs), xs[k - 1], xs[n - k], 1 - miss(k)


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Per-step ratios ``ours[i] / theirs[i]`` (steps of the same round) summarized by
    `median_interval`: ``{"median", "lo", "hi", "coverage", "n"}``."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired_ratio: {len(ours)} steps against {len(theirs)}")
    med, lo, hi, cov = median_interval([a / b for a, b in zip(ours, theirs)])
    return dict(median=med, lo=lo, hi=hi, coverage=cov, n=len(ours))


class Unsharded(Sharder):
    """The compute floor: the model as it is, trained by each rank alone on its own batch (the
    same per-rank batch as the sharded variants); nothing is communicated."""
    name = "unsharded"

    def shard(self, model, plan, group):
        return model

    def set_gradient_sync(self, model, flag: bool) -> None:
        pass


# label -> (sharder spec, mode): every variant trains the same model on the same data through
# the one training protocol (verify/case/train.py), interleaved step by step. `--sharder` adds
# more (labelled by their adapter's name), timed against the same FSDP2.
VARIANTS = {
    "fsdp_core": ("fsdp_core", "fast"),
    "fsdp_core_noprefetch": ("verify.sharders.fsdp_core:FsdpCoreNoPrefetch", "fast"),
    "fsdp_core_det": ("fsdp_core", "deterministic"),
    "fsdp2": ("torch_fsdp2", "fast"),
    "floor": ("verify.tools.bench:Unsharded", "fast"),
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


def bench_case(payload: dict, ctx) -> dict:
    """Rank side: build every variant, time interleaved steps, measure memory and traffic."""
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
    cpu: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}  # (main thread, process)
    out: dict = {"rank": ctx.rank, "variants": {v: {} for v in variants}}
    steps, warmup = payload.get("steps", 5), payload.get("warmup", 2)

    def train(tr, step, measure: bool = False) -> Optional[int]:
        tr.forward_backward(step)
        state = state_bytes(tr.optimizer) if measure else None  # a probe: not in timed steps
        tr.optimizer.step()
        return state

    for step in range(warmup + steps + 1):  # the last step measures memory and traffic, untimed
        measure = step == warmup + steps
        for v, tr in trainers.items():
            entry = out["variants"][v]
            dist.barrier(group=ctx.group)
            if not measure:
                t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                train(tr, step)
                c1, p1 = time.thread_time(), time.process_time()
                dist.barrier(group=ctx.group)
                if step >= warmup:
                    times[v].append(time.perf_counter() - t0)
                    cpu[v].append((c1 - c0, p1 - p0))
            else:
                rec = CollectiveRecorder()
                calls, in_bw, handles = watch_units(tr.plan.units)
                UNSHARDED_BYTES.reset_peak()
                base = UNSHARDED_BYTES.now  # other variants' buffers: all resharded between steps
                fsdp2 = FSDP2Unsharded() if uses_fsdp2(tr.model) else None
                result: dict = {}
                try:
                    with rec.recording():
                        entry["peak_allocated"] = peak_allocated(lambda: result.update(state=train(tr, step, True)))
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
                                  backward_units=set(in_bw), recorded=entry["collectives"],
                                  with_grad=frozenset(n for n, p in tr.model.named_parameters()
                                                      if p.grad is not None))
                entry["expected"] = tr.sharder.expected_collectives(tr.model, trace)
            tr.zero_grad()
    for v in variants:
        out["variants"][v]["step_s"] = statistics.median(times[v])
        out["variants"][v]["steps_s"] = times[v]
        out["variants"][v]["cpu_main_s"] = statistics.median(c for c, _ in cpu[v])
        out["variants"][v]["cpu_s"] = statistics.median(p for _, p in cpu[v])
    if "fsdp_core" in trainers:
        units = fsdp_core.units_of(trainers["fsdp_core"].model)
        out["n_params"] = sum(sum(u.layout.numels) for u in units)
        out["largest_unit_bytes"] = max(u.layout.used_numel for u in units) * 4
    return out


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
    cpu, cpu_main, least = _cpu(values, w, "fsdp_core", ms["fsdp2"])
    return dict(
        world_size=w, n_params=n, ms=ms, cpu_ms=cpu, cpu_main_ms=cpu_main, cores=_cores(),
        least_ours_over_fsdp2=least,
        ours_over_fsdp2=ms["fsdp_core"] / ms["fsdp2"],
        paired=paired_ratio(v["fsdp_core"]["steps_s"], v["fsdp2"]["steps_s"]),
        ours_over_floor=ms["fsdp_core"] / ms["floor"], fsdp2_over_floor=ms["fsdp2"] / ms["floor"],
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
        floor_peak_over_fsdp2=peak_alloc["floor"] / peak_alloc["fsdp2"],
        det_collectives=v["fsdp_core_det"]["collectives"], det_expected=v["fsdp_core_det"]["expected"],
        fsdp2_collectives=v["fsdp2"]["collectives"],
    )


def _cpu(values: list[dict], w: int, ours: str, theirs_ms: float) -> tuple[dict, dict, float]:
    """Per variant, the CPU per rank per step in ms (mean over ranks): the whole process's and
    the main thread's; and the least ours/theirs possible at ``ours``' CPU.

    [Note: the CPU-bound limit]
    A step cannot take less wall time than its main thread's CPU, nor, with W ranks on `cores`
    cores, less than W times a rank's CPU (every thread) over the cores. At ours' measured CPU,
    ours/FSDP2 cannot go below this, whatever is overlapped or prefetched: lower it only by doing
    less work per rank."""
    names = values[0]["variants"]
    cpu = {k: 1e3 * statistics.fmean(rv["variants"][k]["cpu_s"] for rv in values) for k in names}
    main = {k: 1e3 * statistics.fmean(rv["variants"][k]["cpu_main_s"] for rv in values) for k in names}
    return cpu, main, max(main[ours], w * cpu[ours] / _cores()) / theirs_ms


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
                paired=paired_ratio(v[label]["steps_s"], v["fsdp2"]["steps_s"]),
                state=None if None in state else max(state),
                fsdp2_state=max(rv["variants"]["fsdp2"]["state_bytes"] for rv in values),
                collectives=v[label]["collectives"], expected=v[label]["expected"])


def _hsdp_row(mesh, values: list[dict]) -> dict:
    v = values[0]["variants"]
    ours, theirs = v["fsdp_core_hsdp"], v["fsdp2_hsdp"]
    state = {k: max(rv["variants"][k]["state_bytes"] for rv in values) for k in v}
    cpu, cpu_main, least = _cpu(values, len(values), "fsdp_core_hsdp", 1e3 * theirs["step_s"])
    return dict(mesh=f"{mesh[0]}x{mesh[1]}", ms=1e3 * ours["step_s"], fsdp2_ms=1e3 * theirs["step_s"],
                cpu_ms=cpu, cpu_main_ms=cpu_main, least_over_fsdp2=least,
                over_fsdp2=ours["step_s"] / theirs["step_s"], state=state["fsdp_core_hsdp"],
                paired=paired_ratio(ours["steps_s"], theirs["steps_s"]),
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
                      f"{r['over_fsdp2']:.2f} (per step {fmt_paired(r['paired'])}); state {fmt_bytes(r['state'])} vs FSDP2 "
                      f"{fmt_bytes(r['fsdp2_state'])}", flush=True)
            s = bench_scenario(w, width=width, layers=layers, vocab=vocab, seq=seq, batch=batch)
            print(f"bench: W={w} ({', '.join(VARIANTS)}), {warmup} warm-up + {steps} timed steps", flush=True)
            load0 = os.getloadavg()[0]
            rows.append(_row(w, _bench_run(pool, s, steps, warmup, None, timeout_s, f"W={w}")))
            row = rows[-1]
            row["load"] = (load0, os.getloadavg()[0])  # the machine's 1-minute load, before and after
            print(f"  ours {row['ms']['fsdp_core']:.1f} ms, FSDP2 {row['ms']['fsdp2']:.1f} ms, ours/FSDP2 "
                  f"{row['ours_over_fsdp2']:.2f} (per step {fmt_paired(row['paired'])}); ours/floor {row['ours_over_floor']:.2f}; no-prefetch/prefetch {row['noprefetch_over_ours']:.2f}; "
                  f"deterministic/fast {row['det_over_fast']:.2f}; state ours/FSDP2 {row['state_over_fsdp2']:.3f}, "
                  f"ours/(16N/W) {row['state_over_zero3']:.3f}; peak step memory ours/FSDP2 "
                  f"{row['peak_alloc_over_fsdp2']:.2f}; collectives = formula: {row['collectives_ok']}; load "
                  f"{row['load'][0]:.1f} -> {row['load'][1]:.1f}", flush=True)
            cm, cmain = row["cpu_ms"], row["cpu_main_ms"]
            print("  CPU per rank per step (main thread + gloo's and other threads): "
                  + ", ".join(f"{label} {cm[k]:.0f} ms ({cmain[k]:.0f} + {cm[k] - cmain[k]:.0f})"
                              for k, label in (("fsdp_core", "ours"), ("fsdp2", "FSDP2"), ("floor", "floor")))
                  + f"; at ours' CPU on {row['cores']} cores ours/FSDP2 cannot be below "
                  f"{row['least_ours_over_fsdp2']:.2f}", flush=True)
        hsdp_rows = []
        for mesh in HSDP_MESHES if max(world_sizes) >= 8 else ():
            s = dataclasses.replace(bench_scenario(8, width=width, layers=layers, vocab=vocab,
                                                   seq=seq, batch=batch), mesh=mesh)
            pool.prepare_hsdp(pool.main)
            load0 = os.getloadavg()[0]
            hsdp_rows.append(_hsdp_row(mesh, _bench_run(pool, s, steps, warmup, HSDP_VARIANTS,
                                                        timeout_s, f"HSDP {mesh}")))
            r = hsdp_rows[-1]
            r["load"] = (load0, os.getloadavg()[0])
            print(f"bench: HSDP {mesh[0]}x{mesh[1]}: ours {r['ms']:.1f} ms, FSDP2 {r['fsdp2_ms']:.1f} ms, "
                  f"ours/FSDP2 {r['over_fsdp2']:.2f} (per step {fmt_paired(r['paired'])}); CPU per rank ours "
                  f"{r['cpu_ms']['fsdp_core_hsdp']:.0f} ms, FSDP2 {r['cpu_ms']['fsdp2_hsdp']:.0f} ms, least ours/FSDP2 "
                  f"{r['least_over_fsdp2']:.2f}; state ours/FSDP2 {r['state_over_fsdp2']:.3f}; "
                  f"collectives = formula: {r['collectives_ok']}; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}",
                  flush=True)
        overhead = harness_cost(pool, min(4, max(world_sizes)), harness_cases, spawn_cases)
        print(f"  harness at W={overhead['world_size']}: {overhead['pool_same_cases_s']:.3f} s per drawn case "
              f"through the pool vs {overhead['spawn_case_s']:.2f} s on freshly spawned ranks: "
              f"{overhead['case_ratio']:.1f}x ({overhead['spawn_cases']} of {overhead['cases']} cases run both ways)",
              flush=True)
    report = {"rows": rows, "overhead": overhead, "extra_rows": extra_rows, "hsdp_rows": hsdp_rows,
              "config": dict(width=width, layers=layers, vocab=vocab, seq=seq, batch=batch,
                             steps=steps, warmup=warmup)}
    write_performance_report(report, Path(out_dir))
    return report

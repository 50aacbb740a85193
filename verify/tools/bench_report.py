"""The bench's report: performance.md (step time, distance to the compute floor, memory per
rank, collectives, HSDP, other sharders, the harness's cost) and performance.png (step time by world size)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["fmt_bytes", "fmt_paired", "write_performance_report"]


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def fmt_paired(p: dict) -> str:
    """A `paired_ratio` summary: ``0.80 [0.77, 0.82] (98 %)``."""
    return f"{p['median']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}] ({100 * p['coverage']:.0f} %)"


def _load(row: dict) -> str:
    load = row.get("load")
    return "n/a" if load is None else f"{load[0]:.1f} -> {load[1]:.1f}"


def write_performance_report(report: dict, out: Path) -> None:
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
        "Load: the machine's 1-minute load average before and after the world size ran (other "
        "processes share the cores: ratios of interleaved variants, not absolute times, are the result).",
        "Per step: the median of the per-step ratios ours/FSDP2 (each step against FSDP2's step of the "
        "same round), with a distribution-free confidence interval for that median (order "
        "statistics; its coverage in parentheses): the run's own noise around the ratio.",
        "",
        "| W | params | ours ms | FSDP2 ms | ours/FSDP2 | per step: median [interval] | ours without prefetch ms | without/with prefetch | det ms | det/fast | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['world_size']} | {r['n_params']:,} | {ms['fsdp_core']:.1f} | {ms['fsdp2']:.1f} | "
            f"{r['ours_over_fsdp2']:.2f} | {fmt_paired(r['paired'])} | {ms['fsdp_core_noprefetch']:.1f} | {r['noprefetch_over_ours']:.2f} | "
            f"{ms['fsdp_core_det']:.1f} | {r['det_over_fast']:.2f} | {_load(r)} |")
    lines += [
        "",
        "## Distance to the limit",
        "",
        "The compute floor: the same model trained unsharded by every rank alone on its own batch "
        "(the same per-rank batch; no collectives, no hooks), interleaved with the variants above, "
        "so it sees the same machine load. ours/floor - 1 is what sharding costs us (collectives "
        "not hidden behind compute, flattening and casting, hooks).",
        "",
        "| W | floor ms | ours ms | ours/floor | FSDP2/floor | ours - floor ms | FSDP2 - floor ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['world_size']} | {ms['floor']:.1f} | {ms['fsdp_core']:.1f} | {r['ours_over_floor']:.2f} | "
            f"{r['fsdp2_over_floor']:.2f} | {ms['fsdp_core'] - ms['floor']:.1f} | {ms['fsdp2'] - ms['floor']:.1f} |")
    lines += [
        "",
        f"CPU per rank per step (median of the timed steps, mean over ranks): the main thread's and the "
        f"whole process's (gloo's threads and any other). With W ranks on {rows[0]['cores']} cores a "
        "step takes at least its main thread's CPU and at least W x a rank's CPU / cores of wall time: "
        "*least ours/FSDP2* is the ratio ours would have at its measured CPU with no idle time at all, "
        "the limit no overlap or prefetch can pass ([Note: the CPU-bound limit] in "
        "`verify/tools/bench.py`). Meaningful where ranks share CPU cores (gloo on CPU).",
        "",
        "| W | floor CPU ms | ours CPU ms | ours main thread | ours other threads | FSDP2 CPU ms | FSDP2 main thread | FSDP2 other threads | ours/FSDP2 CPU | least ours/FSDP2 | ours/FSDP2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cm, mn = r["cpu_ms"], r["cpu_main_ms"]
        lines.append(
            f"| {r['world_size']} | {cm['floor']:.1f} | {cm['fsdp_core']:.1f} | {mn['fsdp_core']:.1f} | "
            f"{cm['fsdp_core'] - mn['fsdp_core']:.1f} | {cm['fsdp2']:.1f} | {mn['fsdp2']:.1f} | "
            f"{cm['fsdp2'] - mn['fsdp2']:.1f} | {cm['fsdp_core'] / cm['fsdp2']:.2f} | "
            f"{r['least_ours_over_fsdp2']:.2f} | {r['ours_over_fsdp2']:.2f} |")
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
            f"| {r['world_size']} | {fmt_bytes(st['fsdp_core'])} | {fmt_bytes(st['fsdp2'])} | "
            f"{r['state_over_fsdp2']:.3f} | {fmt_bytes(r['zero3_state'])} | {r['state_over_zero3']:.3f} | "
            f"{fmt_bytes(pu['fsdp_core'])} | {fmt_bytes(pu['fsdp_core_noprefetch'])} | {fmt_bytes(pu['fsdp2'])} | "
            f"{fmt_bytes(r['largest_unit'])} | {r['total_over_model']:.3f} | "
            f"{fmt_bytes(pa['fsdp_core'])} | {fmt_bytes(pa['fsdp2'])} | {r['peak_alloc_over_fsdp2']:.2f} |")
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
                  "| mesh RxS | ours ms | FSDP2 ms | ours/FSDP2 | per step: median [interval] | CPU ours ms | CPU FSDP2 ms | least ours/FSDP2 | state ours | state FSDP2 | ours/FSDP2 | collectives = formula | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["hsdp_rows"]:
            lines.append(f"| {r['mesh']} | {r['ms']:.1f} | {r['fsdp2_ms']:.1f} | {r['over_fsdp2']:.2f} | "
                         f"{fmt_paired(r['paired'])} | {r['cpu_ms']['fsdp_core_hsdp']:.1f} | "
                         f"{r['cpu_ms']['fsdp2_hsdp']:.1f} | {r['least_over_fsdp2']:.2f} | "
                         f"{fmt_bytes(r['state'])} | {fmt_bytes(r['fsdp2_state'])} | "
                         f"{r['state_over_fsdp2']:.3f} | {'yes' if r['collectives_ok'] else 'NO'} | {_load(r)} |")
        for r in report["hsdp_rows"]:
            lines.append(f"- {r['mesh']}: ours {r['collectives']} (formula {r['expected']}); FSDP2 "
                         f"{r['fsdp2_collectives']}")
    if report.get("extra_rows"):
        lines += ["", "## Other sharders against FSDP2", "",
                  "Each named with `--sharder`, timed against FSDP2 interleaved step by step on the "
                  "same ranks, the same GPT, data and optimizer options.", "",
                  "| sharder | W | ms | FSDP2 ms | sharder/FSDP2 | per step: median [interval] | state/rank | FSDP2 state/rank |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["extra_rows"]:
            lines.append(f"| {r['sharder']} | {r['world_size']} | {r['ms']:.1f} | {r['fsdp2_ms']:.1f} | "
                         f"{r['over_fsdp2']:.2f} | {fmt_paired(r['paired'])} | {fmt_bytes(r['state'])} | "
                         f"{fmt_bytes(r['fsdp2_state'])} |")
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
        import matplotlib  # lazy: optional (without it the plot is skipped), and heavy
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")
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

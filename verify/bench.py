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

import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from verify.peers import state_bytes as _state_bytes
from verify.scenarios import Scenario, build_model, cat_batches, loss_fn, make_batch, wrap_units

__all__ = ["bench_case", "run_bench"]

VARIANTS = ("fsdp_core", "fsdp_core_det", "fsdp2")


def bench_scenario(world_size: int, *, width: int, layers: int, vocab: int, seq: int, batch: int) -> Scenario:
    return Scenario(family="gpt", world_size=world_size, mode="fast", optimizer="adamw",
                    model=tuple(sorted(dict(vocab_size=vocab, n_embd=width, n_head=max(1, width // 64),
                                            n_layer=layers, block_size=seq, tied=True, bias=True).items())),
                    micro_batches=world_size, micro_batch_size=batch, lr=1e-3, steps=1)


def _shard(variant: str, s: Scenario, model, group):
    if variant == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
        mesh = DeviceMesh.from_group(group, "cuda" if dist.get_backend(group) == "nccl" else "cpu")
        for unit in wrap_units(s, model):
            fully_shard(unit, mesh=mesh)
        return model
    import fsdp_core
    for unit in wrap_units(s, model):
        fsdp_core.fully_shard(unit, mesh=group, deterministic=(variant == "fsdp_core_det"))
    return model


class _PeakUnsharded:
    """Peak bytes of fsdp_core unsharded parameter buffers alive at once (wraps unshard/reshard)."""

    def __init__(self) -> None:
        from fsdp_core._unit import FlatUnit
        self.cls, self.now, self.peak = FlatUnit, 0, 0
        self.orig = (FlatUnit.unshard, FlatUnit.reshard)
        bench = self

        def unshard(unit):
            was = unit.state.value
            bench.orig[0](unit)
            if was != unit.state.value:
                bench.now += unit.unsharded_flat.numel() * unit.unsharded_flat.element_size()
                bench.peak = max(bench.peak, bench.now)

        def reshard(unit):
            was = unit.state.value
            bench.orig[1](unit)
            if was != unit.state.value:
                bench.now -= unit.unsharded_flat.numel() * unit.unsharded_flat.element_size()

        FlatUnit.unshard, FlatUnit.reshard = unshard, reshard

    def close(self) -> None:
        self.cls.unshard, self.cls.reshard = self.orig


def bench_case(payload: dict, ctx) -> dict:
    """Rank side: build every variant, time interleaved steps, measure memory and traffic."""
    from verify.runner import CollectiveRecorder, expected_collectives, _watch_units
    torch.set_num_threads(1)
    s = Scenario.from_json(payload["scenario"])
    variants = payload.get("variants", VARIANTS)
    models, opts = {}, {}
    for v in variants:
        models[v] = _shard(v, s, build_model(s), ctx.group)
        opts[v] = torch.optim.AdamW(models[v].parameters(), lr=s.lr)
    times: dict[str, list[float]] = {v: [] for v in variants}
    out: dict = {"rank": ctx.rank, "variants": {}}
    steps, warmup = payload.get("steps", 5), payload.get("warmup", 2)
    for step in range(warmup + steps):
        batch = cat_batches([make_batch(s, step, ctx.rank)])
        for v in variants:
            peak = _PeakUnsharded() if (v == "fsdp_core" and step == warmup) else None
            rec = CollectiveRecorder() if step == warmup else None
            calls, in_bw, handles = _watch_units(models[v]) if (rec and v != "fsdp2") else ({}, set(), [])
            dist.barrier(group=ctx.group)
            t0 = time.perf_counter()
            with (rec.recording() if rec else _null()):
                loss_fn(s, models[v], batch).backward()
                state = _state_bytes(models[v], opts[v])
                opts[v].step()
            dist.barrier(group=ctx.group)
            dt = time.perf_counter() - t0
            opts[v].zero_grad(set_to_none=True)
            for h in handles:
                h.remove()
            if step >= warmup:
                times[v].append(dt)
            if rec is not None:
                entry = out["variants"].setdefault(v, {})
                entry["state_bytes"] = state
                entry["collectives"] = rec.take()
                if v != "fsdp2":
                    det = s.__class__(**{**s.__dict__, "mode": "deterministic" if v.endswith("det") else "fast"})
                    entry["expected"] = expected_collectives(det, models[v], calls, in_bw)
            if peak is not None:
                peak.close()
                out["variants"][v]["peak_unsharded"] = peak.peak
    for v in variants:
        out["variants"][v]["step_s"] = statistics.median(times[v])
    if "fsdp_core" in models:
        import fsdp_core
        units = fsdp_core.units_of(models["fsdp_core"])
        out["n_params"] = sum(sum(u.layout.numels) for u in units)
        out["largest_unit_bytes"] = max(u.layout.used_numel for u in units) * 4
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run_bench(*, world_sizes: Sequence[int] = (1, 2, 4, 8), steps: int = 5, warmup: int = 2,
              width: int = 256, layers: int = 6, vocab: int = 1024, seq: int = 64, batch: int = 8,
              out_dir: str | Path = "reports", harness_cases: int = 20, timeout_s: float = 600.0) -> dict:
    from verify.pool import RankPool, measure_overhead
    torch.set_num_threads(1)
    rows = []
    with RankPool(max(world_sizes), timeout_s=timeout_s) as pool:
        for w in world_sizes:
            s = bench_scenario(w, width=width, layers=layers, vocab=vocab, seq=seq, batch=batch)
            print(f"bench: W={w} ({', '.join(VARIANTS)}), {warmup} warm-up + {steps} timed steps", flush=True)
            res = pool.run(w, bench_case, {"scenario": s.to_json(), "steps": steps, "warmup": warmup},
                           timeout_s=timeout_s)
            if not res.ok:
                raise RuntimeError(f"bench at W={w} failed:\n{res.error}")
            r0 = res.values[0]
            v = r0["variants"]
            n = r0["n_params"]
            model_bytes = 16 * n / w + r0["largest_unit_bytes"]
            state = {k: max(rv["variants"][k]["state_bytes"] for rv in res.values) for k in v}
            rows.append(dict(
                world_size=w, n_params=n,
                ours_ms=1e3 * v["fsdp_core"]["step_s"], fsdp2_ms=1e3 * v["fsdp2"]["step_s"],
                det_ms=1e3 * v["fsdp_core_det"]["step_s"],
                ours_over_fsdp2=v["fsdp_core"]["step_s"] / v["fsdp2"]["step_s"],
                det_over_fast=v["fsdp_core_det"]["step_s"] / v["fsdp_core"]["step_s"],
                ours_state=state["fsdp_core"], fsdp2_state=state["fsdp2"],
                state_over_fsdp2=state["fsdp_core"] / state["fsdp2"],
                zero3_model=model_bytes,
                peak_unsharded=v["fsdp_core"].get("peak_unsharded"),
                ours_state_plus_peak_over_model=(state["fsdp_core"] + (v["fsdp_core"].get("peak_unsharded") or 0)) / model_bytes,
                collectives=v["fsdp_core"]["collectives"], expected=v["fsdp_core"]["expected"],
                collectives_ok=all(v["fsdp_core"]["collectives"].get(k) == e for k, e in v["fsdp_core"]["expected"].items()),
                det_collectives=v["fsdp_core_det"]["collectives"], det_expected=v["fsdp_core_det"]["expected"],
                fsdp2_collectives=v["fsdp2"]["collectives"],
            ))
            row = rows[-1]
            print(f"  ours {row['ours_ms']:.1f} ms, FSDP2 {row['fsdp2_ms']:.1f} ms, ours/FSDP2 "
                  f"{row['ours_over_fsdp2']:.2f}; deterministic/fast {row['det_over_fast']:.2f}; "
                  f"state ours/FSDP2 {row['state_over_fsdp2']:.3f}; collectives = formula: "
                  f"{row['collectives_ok']}", flush=True)
        overhead = _harness_cost(pool, min(4, max(world_sizes)), harness_cases)
    report = {"rows": rows, "overhead": overhead,
              "config": dict(width=width, layers=layers, vocab=vocab, seq=seq, batch=batch,
                             steps=steps, warmup=warmup)}
    _write(report, Path(out_dir))
    return report


def _harness_cost(pool, world_size: int, n: int) -> dict:
    """Drawn cases through the pool vs the same cases with a fresh set of processes each: the
    spawn figure is the measured spawn cost plus the case's own time through the pool."""
    from verify.campaign import draw_scenarios, run_one
    from verify.pool import measure_overhead
    cases = draw_scenarios(world_size=world_size, mode="deterministic", n=n, seed=0)
    t0 = time.perf_counter()
    for s in cases:
        run_one(pool, s)
    per_case = (time.perf_counter() - t0) / max(len(cases), 1)
    trivial = measure_overhead(pool, world_size, n=10)
    return dict(world_size=world_size, cases=len(cases), pool_case_s=per_case,
                spawn_s=trivial.spawn_s, pool_trivial_s=trivial.pool_s,
                case_ratio=(trivial.spawn_s + per_case) / per_case,
                trivial_ratio=trivial.ratio, cases_per_min=60.0 / per_case)


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg, rows, ov = report["config"], report["rows"], report["overhead"]
    lines = [
        "# Performance: fsdp_core vs FSDP2",
        "",
        f"GPT width {cfg['width']}, {cfg['layers']} layers, vocab {cfg['vocab']}, sequence {cfg['seq']}, "
        f"batch {cfg['batch']} per rank, AdamW; per block units + root. Median of {cfg['steps']} steps "
        f"after {cfg['warmup']} warm-up, variants interleaved step by step in one run "
        f"({'NCCL' if torch.cuda.is_available() else 'gloo on CPU'}). Reproduce: `python -m verify bench`.",
        "",
        "| W | params | ours ms | FSDP2 ms | ours/FSDP2 | det ms | det/fast | state ours | state FSDP2 | ours/FSDP2 | ZeRO-3 model | peak unsharded | (state+peak)/model | collectives = formula |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['n_params']:,} | {r['ours_ms']:.1f} | {r['fsdp2_ms']:.1f} | "
            f"{r['ours_over_fsdp2']:.2f} | {r['det_ms']:.1f} | {r['det_over_fast']:.2f} | "
            f"{_fmt_bytes(r['ours_state'])} | {_fmt_bytes(r['fsdp2_state'])} | {r['state_over_fsdp2']:.3f} | "
            f"{_fmt_bytes(r['zero3_model'])} | {_fmt_bytes(r['peak_unsharded'])} | "
            f"{r['ours_state_plus_peak_over_model']:.3f} | {'yes' if r['collectives_ok'] else 'NO'} |")
    lines += ["", "Collectives of one step (count, bytes), fsdp_core fast / deterministic / FSDP2:", ""]
    for r in rows:
        lines.append(f"- W={r['world_size']}: fast {r['collectives']} (formula {r['expected']}); "
                     f"deterministic {r['det_collectives']} (formula {r['det_expected']}); FSDP2 {r['fsdp2_collectives']}")
    lines += ["", f"Harness at W={ov['world_size']}: {ov['cases']} drawn cases through the pool took "
              f"{ov['pool_case_s']:.3f} s each ({ov['cases_per_min']:.0f} cases/min, reference and comparison "
              f"included); spawning a fresh set of ranks costs {ov['spawn_s']:.2f} s before any work, so a "
              f"case is {ov['case_ratio']:.0f}x cheaper through the pool (a trivial task: "
              f"{ov['pool_trivial_s'] * 1e3:.2f} ms vs {ov['spawn_s']:.2f} s, {ov['trivial_ratio']:.0f}x).", ""]
    (out / "performance.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ws = [r["world_size"] for r in rows]
        ax.plot(ws, [r["ours_ms"] for r in rows], "o-", label="fsdp_core (fast)")
        ax.plot(ws, [r["det_ms"] for r in rows], "s--", label="fsdp_core (deterministic)")
        ax.plot(ws, [r["fsdp2_ms"] for r in rows], "^-", label="FSDP2")
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

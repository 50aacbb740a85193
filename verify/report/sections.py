"""The sections of equivalence.md for checkpoint-resume cases and the pool's memory."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from verify.report._format import _cell, _int, _md, _num
from verify.report.plots import _pyplot
from verify.report.tables import _has_offload, _yes
from verify.tools.soak import BASELINE_CASE, samples_of, summarize


def resume_table(df: pd.DataFrame) -> str:
    """Markdown: one row per checkpoint-resume case (verify/campaign/resume.py): W_a -> W_b, when."""
    rows = []
    res = df[df["save_world_size"].notna()] if "save_world_size" in df else df[:0]
    several = res["sharder"].nunique() > 1 if not res.empty else False
    offload = _has_offload(res) if not res.empty else False
    for _, r in res.iterrows():
        rows.append(([_cell(r["sharder"])] if several else [])
                    + [_cell(r["family"]), f"{int(r['save_world_size'])} -> {r['world_size']}",
                       f"{int(r['save_after'])}/{r['n_steps']}", _cell(r["mode"]), _cell(r["dtype"])]
                    + ([_yes(r.get("offload"))] if offload else [])
                    + [_cell(r["optimizer"]), _cell(r["tier"]), _cell(r["verdict"]),
                       f"{r['bitwise_steps']}/{r['n_steps']}", _num(r["max_abs"]),
                       _int(r["max_ulp"])])
    if not rows:
        return "No checkpoint-resume cases."
    return _md(rows, (["sharder"] if several else [])
               + ["family", "W save -> load", "saved after", "mode", "dtype"]
               + (["offload"] if offload else [])
               + ["optimizer", "tier", "verdict", "bitwise steps", "max \\|Δ param\\|",
                  "max ULP"])


_RESUME_LEGEND = """\
Each case trains the first steps at the saving world size, saves with the adapter's `save`
(fsdp_core: `fsdp_core.checkpoint`; torch_fsdp2: `get_state_dict` + `dcp.save`; ddp: a full
state dict), loads with its `load` at the other world size into a model initialised
differently, and trains the remaining steps; every step is compared with the
uninterrupted run's reference (deterministic: the plain reference, the same bits at every W;
fast: the data-parallel reference that switches W at the checkpoint, steps after it held to the
looser tier of the two world sizes). The loaded state must equal the saved one bit for bit."""


def pool_memory_section(pool_memory: Any) -> str:
    """Markdown: the rank processes' RSS at the leak check's baseline case and at the end.
    ``pool_memory``: as `run_campaign` saves it (verify/tools/soak.py `samples_of`)."""
    summary = summarize(samples_of(pool_memory))
    if summary is None:
        return "No RSS samples (/proc not readable on this platform)."
    mib = lambda k: "-" if k is None else f"{k / 1024:.1f} MiB"  # noqa: E731
    status = {True: "held", False: "GREW", None: "not judged"}[summary["within_limit"]]
    rows = [[f"after case {summary['baseline_case']}", mib(summary["baseline_kib"]),
             mib(summary["parent_baseline_kib"])],
            [f"after case {summary['end_case']} (the end)", mib(summary["end_kib"]),
             mib(summary["parent_end_kib"])],
            ["change", f"{summary['change_pct']:+.1f}%", _pct(summary["parent_baseline_kib"],
                                                               summary["parent_end_kib"])],
            [f"peak after case {summary['baseline_case']}", mib(summary["peak_kib"]), "-"]]
    if summary.get("anon_baseline_kib") is not None:
        rows[0].append(mib(summary["anon_baseline_kib"]))
        rows[1].append(mib(summary["anon_end_kib"]))
        rows[2].append(_pct(summary["anon_baseline_kib"], summary["anon_end_kib"]))
        rows[3].append("-")
    headers = ["", "largest rank RSS", "parent RSS"] + (
        ["largest rank anonymous RSS"] if len(rows[0]) > 3 else [])
    text = [_md(rows, headers), "",
            f"**{status}**: the largest rank RSS changed by {summary['change_pct']:+.1f}% from "
            f"case {summary['baseline_case']} to the end (limit +{summary['limit_pct']:g}%)."]
    if summary["short"]:
        text[-1] += (f" Fewer than {BASELINE_CASE} cases ran, so the comparison starts at the first case "
                     "and includes the warm-up; the soak (`make soak`) runs 500+.")
    if summary["restarted_between"]:
        text[-1] += (" The pool restarted in between (a failed case), so these are different "
                     "processes and the change says nothing of a leak.")
    text.append("")
    text.append("Per rank (baseline -> end): " + "; ".join(
        f"{p['rank']}: {mib(p['baseline_kib'])} -> {mib(p['end_kib'])}"
        + ("" if p["change_pct"] is None else f" ({p['change_pct']:+.1f}%)")
        for p in summary["per_rank"]) + ".")
    text.append("")
    text.append("RSS (VmRSS of /proc/<pid>/status) of every rank process is sampled after every "
                "case; the first cases load libraries and warm the allocator, so growth is "
                "measured from the baseline case on.")
    env = pool_memory.get("cache_env") if isinstance(pool_memory, dict) else None
    if env is not None:
        caps = ", ".join(f"{k}={v or 'default (1024)'}" for k, v in env.items())
        text.append(f"oneDNN kernel caches: {caps}. At their defaults they fill with every new "
                    "shape for thousands of cases and look like a leak; `--soak` caps them "
                    "(verify/tools/soak.py, [Note: oneDNN's kernel caches look like a leak]).")
    pools = pool_memory.get("default_group_pools") if isinstance(pool_memory, dict) else None
    if pools:
        text.append("")
        text.append("Sharders that use the default process group ran on pools of exactly W "
                    "processes, each spawned once for the run: " + ", ".join(
                        f"W={w}: {float(sec):.1f} s to start" for w, sec in sorted(
                            pools.items(), key=lambda kv: int(kv[0]))) + ".")
    return "\n".join(text)


def _pct(a: Optional[int], b: Optional[int]) -> str:
    return "-" if not a or b is None else f"{100.0 * (b - a) / a:+.1f}%"


def _plot_pool_memory(pool_memory: Any, out: Path) -> list[Path]:
    """pool_memory.png: RSS per rank process (and the parent) after every case."""
    samples = samples_of(pool_memory)
    if not samples or not any(v is not None for s in samples for v in s.get("rss_kib") or []):
        return []
    plt = _pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(7, 3.8))
    cases = [s["case"] for s in samples]
    n_ranks = max(len(s.get("rss_kib") or []) for s in samples)
    for r in range(n_ranks):
        ys = [(s["rss_kib"][r] / 1024 if r < len(s["rss_kib"]) and s["rss_kib"][r] is not None
               else math.nan) for s in samples]
        ax.plot(cases, ys, linewidth=1, label=f"rank {r}")
    ax.plot(cases, [math.nan if s.get("parent_kib") is None else s["parent_kib"] / 1024
                    for s in samples], linewidth=1, linestyle="--", color="black", label="parent")
    if len(cases) > BASELINE_CASE:
        ax.axvline(BASELINE_CASE, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("case")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pool memory after every case")
    ax.legend(fontsize="x-small", ncol=3)
    fig.tight_layout()
    path = out / "pool_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

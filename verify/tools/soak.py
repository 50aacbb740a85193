"""Pool memory over a campaign: the resident set size (VmRSS) of every rank process after every
case, and whether it stayed flat.

`sample(pool, case)` reads ``/proc/<pid>/status`` of the pool's current ranks (and of this
process); `run_campaign` keeps one sample per case and `write_reports` stores the list as
``pool_memory`` in results.json and renders it in the "Pool memory" section. The leak check
(`summarize`, `check`) compares the largest rank RSS after case `BASELINE_CASE` with the largest
after the last case: the first cases load libraries, warm the allocator and build the process
groups' buffers, so growth is measured from there (issue 9: "stable within 10% from case 50 to
the end"). `python -m verify run --soak` and `make soak` fail when it grew by more than
`LIMIT_PCT`.

A pool that restarted (a rank died or hung) has new processes: samples carry the pool's restart
count, and the summary says when the two samples compared belong to different generations.
Linux only (/proc); elsewhere the samples are empty and the section says so.

[Note: oneDNN's kernel caches look like a leak]
On the CPU, PyTorch runs matmuls and convolutions through oneDNN, which keeps two LRU caches of
compiled kernels keyed by shape: oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and
ideep's (LRU_CACHE_CAPACITY), 1024 entries each by default. A campaign draws new shapes in
nearly every case, so both fill for thousands of cases: measured on a 504-case nightly campaign,
RSS grew by 22% to 40% from case 50 to the end in the ranks, and by 36% in the parent, which runs
only the plain-PyTorch reference. It is not a leak: the same case run 120 times leaves RSS flat, no
Python objects, modules, tensors or fsdp_core units outlive their case (gc and tracemalloc), and
with both caches capped at 16 entries the growth over 84 new cases drops from +6.2% to +0.8%
(with torch.backends.mkldnn disabled: +1.1%). So the soak caps both caches (`SOAK_ENV`, set
before the ranks are spawned; an explicit setting in the environment wins): what grows then is
what a case leaves behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["BASELINE_CASE", "LIMIT_PCT", "SOAK_ENV", "apply_soak_env", "cache_env", "rss_kib",
           "sample", "samples_of", "summarize", "check", "load_pool_memory", "round_robin"]

BASELINE_CASE = 50
LIMIT_PCT = 10.0
# See [Note: oneDNN's kernel caches look like a leak].
SOAK_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}


def apply_soak_env() -> dict[str, str]:
    """Cap oneDNN's kernel caches for this process and the ranks it spawns (unless the
    environment already says otherwise); returns the settings in force."""
    for k, v in SOAK_ENV.items():
        os.environ.setdefault(k, v)
    return cache_env()


def cache_env() -> dict[str, Optional[str]]:
    """The kernel-cache settings in force (None: the library default, 1024 entries)."""
    return {k: os.environ.get(k) for k in SOAK_ENV}


def samples_of(pool_memory: Any) -> list[dict]:
    """The samples of a ``pool_memory`` record: {"samples": [...], "cache_env": {...}} as
    `run_campaign` writes it, or a bare list of samples."""
    if isinstance(pool_memory, dict):
        return list(pool_memory.get("samples") or [])
    return list(pool_memory or [])


def round_robin(items: list, key: Callable[[Any], Any]) -> list:
    """``items`` regrouped by ``key`` (groups in order of first appearance, order kept within a
    group) and dealt one from each group in turn: [a1, a2, b1, b2] -> [a1, b1, a2, b2]."""
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out, queues = [], [list(reversed(g)) for g in groups.values()]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out


def rss_kib(pid: int, field: str = "VmRSS") -> Optional[int]:
    """VmRSS (or another KiB ``field`` of /proc/<pid>/status, e.g. RssAnon) of ``pid``, or None
    when it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def sample(pool: Any, case: int) -> dict[str, Any]:
    """One sample after case number ``case`` (1-based): RSS per rank (KiB, rank order), its
    anonymous part (heap; the rest is mapped files, e.g. library code as it is first used),
    this process's RSS, and the pool's restart count (a different count: other processes)."""
    pids = list(getattr(pool, "pids", []) or [])
    return {"case": case, "rss_kib": [rss_kib(p) for p in pids],
            "anon_kib": [rss_kib(p, "RssAnon") for p in pids], "parent_kib": rss_kib(os.getpid()),
            "restarts": getattr(pool, "restarts", 0)}


def _peak(s: dict) -> Optional[int]:
    known = [v for v in s.get("rss_kib") or [] if v is not None]
    return max(known) if known else None


def summarize(samples: list[dict], *, baseline_case: int = BASELINE_CASE,
              limit_pct: float = LIMIT_PCT) -> Optional[dict[str, Any]]:
    """The leak check's figures: largest rank RSS at ``baseline_case`` (the first sample when
    the campaign was shorter) and at the end, the change in percent, whether it stayed within
    ``limit_pct``, the peak after the baseline, and per-rank start/end. None without samples."""
    samples = [s for s in samples if _peak(s) is not None]
    if not samples:
        return None
    base = next((s for s in samples if s["case"] == baseline_case), None)
    short = base is None
    if base is None:
        base = samples[0]
    end = samples[-1]
    b, e = _peak(base), _peak(end)
    change = 100.0 * (e - b) / b if b else 0.0
    restarted = base.get("restarts") != end.get("restarts")
    after = [s for s in samples if s["case"] >= base["case"]]
    per_rank = []
    for r, (rb, re_) in enumerate(zip(base["rss_kib"], end["rss_kib"])):
        per_rank.append({"rank": r, "baseline_kib": rb, "end_kib": re_,
                         "change_pct": (100.0 * (re_ - rb) / rb) if rb and re_ is not None else None})
    return {
        "baseline_case": base["case"], "end_case": end["case"], "cases": len(samples),
        "baseline_kib": b, "end_kib": e, "change_pct": change,
        "peak_kib": max(_peak(s) for s in after),
        # None: not judged: after a restart the end's processes are not the baseline's (whose
        # sample may even be of fresh ranks still importing), so a change says nothing of a leak
        "limit_pct": limit_pct, "within_limit": None if restarted else change <= limit_pct,
        "short": short,  # fewer cases than the baseline: compared from the first case
        "restarted_between": restarted,
        "parent_baseline_kib": base.get("parent_kib"), "parent_end_kib": end.get("parent_kib"),
        "anon_baseline_kib": _peak({"rss_kib": base.get("anon_kib")}),
        "anon_end_kib": _peak({"rss_kib": end.get("anon_kib")}),
        "per_rank": per_rank,
    }


def load_pool_memory(path: str | Path) -> Optional[Any]:
    """The ``pool_memory`` record saved in a results.json, or None (older files, a bare list)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("pool_memory"), (list, dict)):
        return data["pool_memory"]
    return None


def check(path: str | Path, *, baseline_case: int = BASELINE_CASE,
          limit_pct: float = LIMIT_PCT) -> tuple[bool, str]:
    """The soak verdict for a results.json: (passed, one line saying why)."""
    summary = summarize(samples_of(load_pool_memory(path)), baseline_case=baseline_case,
                        limit_pct=limit_pct)
    if summary is None:
        return False, f"soak: {path} holds no pool memory samples"
    if summary["short"]:
        return False, (f"soak: only {summary['cases']} cases; the leak check needs more than "
                       f"{baseline_case}")
    line = (f"soak: largest rank RSS {summary['baseline_kib'] / 1024:.1f} MiB after case "
            f"{summary['baseline_case']} -> {summary['end_kib'] / 1024:.1f} MiB after case "
            f"{summary['end_case']} ({summary['change_pct']:+.1f}%, limit +{limit_pct:g}%)")
    if summary["within_limit"] is None:
        return False, line + ": not judged, the pool restarted in between (other processes)"
    return summary["within_limit"], line + (": held" if summary["within_limit"] else ": GREW")

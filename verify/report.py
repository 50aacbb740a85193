"""Rendering: case results (dicts from `CaseResult.to_dict()`) -> tables, CSV, JSON and plots.

The only module that imports pandas, tabulate and matplotlib (matplotlib optional: without it
the plots are skipped). Everything here reads records and writes text; nothing runs a case.

Frames:
- `results_frame`: one row per case; the per-step figures reduced to their worst value.
- `steps_frame`: one row per (case, step); what the plots and per-step tables read.
"""
from __future__ import annotations

import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
from tabulate import tabulate

__all__ = [
    "results_frame",
    "steps_frame",
    "summary_table",
    "invariants_table",
    "failures_table",
    "steps_table",
    "write_reports",
    "load_results",
    "resume_table",
    "pool_memory_section",
    "peers_table",
    "write_peers_report",
    "write_convergence_report",
]

_GROUP = ["family", "world_size", "mode"]
_FAILED = ("fail", "error")


def _as_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def _passed(r: dict[str, Any]) -> bool:
    from verify.results import PASSING
    return bool(r["passed"]) if "passed" in r else r.get("verdict") in PASSING


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _fmt_divergence(div: Any) -> str:
    if not div:
        return ""
    step, name = div
    return f"step {step}: {name}"


# -- frames -----------------------------------------------------------------------------------

def results_frame(results: Iterable[Any]) -> pd.DataFrame:
    """One row per case. Top-level scalar fields are kept as they are (so fields a producer adds,
    e.g. a formula to compare against, flow through); the per-step records are reduced to:
    n_steps, max_loss_diff, max_abs, max_rel, max_ulp, bitwise (every step), bitwise_steps,
    padding_ok, reassembly_ok, collectives_ok (every step; None without steps), coll_count and
    coll_bytes (per step, summed over kinds, median over steps), coll_bytes_expected (the same
    for the formula, when recorded), state_bytes (largest rank, largest step), state_bytes_model
    (the ZeRO-3 model, when recorded), step_time_s (median)."""
    rows = []
    for r in map(_as_dict, results):
        steps = r.get("steps") or []
        row = {k: v for k, v in r.items() if k != "steps" and _scalar(v)}
        row["passed"] = _passed(r)
        row["first_divergence"] = _fmt_divergence(r.get("first_divergence"))
        row["n_steps"] = len(steps)
        row["max_loss_diff"] = max((s["loss_abs_diff"] for s in steps), default=math.nan)
        row["max_abs"] = max((s["max_abs"] for s in steps), default=math.nan)
        row["max_rel"] = max((s["max_rel"] for s in steps), default=math.nan)
        row["max_ulp"] = max((s["max_ulp"] for s in steps), default=None)
        row["bitwise"] = bool(steps) and all(s["bitwise"] for s in steps)
        row["bitwise_steps"] = sum(bool(s["bitwise"]) for s in steps)
        row["padding_ok"] = _all_checked(steps, "padding_ok")
        row["reassembly_ok"] = _all_checked(steps, "reassembly_ok")
        row["collectives_ok"] = _all_checked(steps, "collectives_ok")
        colls = [list(s.get("collectives", {}).values()) for s in steps]
        row["coll_count"] = _median([sum(c for c, _ in kinds) for kinds in colls if kinds])
        row["coll_bytes"] = _median([sum(b for _, b in kinds) for kinds in colls if kinds])
        expected = [list(s.get("collectives_expected", {}).values()) for s in steps]
        row["coll_bytes_expected"] = _median([sum(b for _, b in kinds)
                                              for kinds in expected if kinds])
        state = [max(s["state_bytes"]) for s in steps if s.get("state_bytes")]
        row["state_bytes"] = max(state) if state else None
        model = [s["state_bytes_model"] for s in steps if s.get("state_bytes_model")]
        if model or "state_bytes_model" not in row:
            row["state_bytes_model"] = max(model) if model else None
        row["step_time_s"] = _median([s["step_time_s"] for s in steps])
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["max_ulp"] = df["max_ulp"].astype("Int64")
        for col in ("padding_ok", "reassembly_ok", "collectives_ok"):
            df[col] = df[col].astype("boolean")
    return df


def _all_checked(steps: list[dict], key: str) -> Optional[bool]:
    """Whether a check held at every step; None without steps or where it was not checked (a
    step records None for it: a peer sharder has no padding, pieces or formula)."""
    values = [s.get(key, True) for s in steps]
    if not values or any(v is None for v in values):
        return None
    return all(values)


def steps_frame(results: Iterable[Any]) -> pd.DataFrame:
    """One row per (case, step): the case's identity columns plus every StepRecord field."""
    rows = []
    for i, r in enumerate(map(_as_dict, results)):
        ident = {k: r.get(k) for k in ("sharder", "family", "world_size", "mode", "dtype",
                                       "optimizer", "verdict")}
        for s in r.get("steps") or []:
            rows.append({"case": i, **ident,
                         **{k: v for k, v in s.items() if k not in ("collectives",
                                                                     "state_bytes",
                                                                     "padding_bad")},
                         "state_bytes": max(s["state_bytes"]) if s.get("state_bytes") else None})
    return pd.DataFrame(rows)


def _median(xs: list) -> Optional[float]:
    return statistics.median(xs) if xs else None


# -- formatting -------------------------------------------------------------------------------

def _missing(x: Any) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _num(x: Any) -> str:
    if _missing(x):
        return "-"
    if x == 0:
        return "0"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def _int(x: Any) -> str:
    return "-" if _missing(x) else str(int(x))


def _bytes(x: Any) -> str:
    if _missing(x):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def _held(col: pd.Series) -> str:
    known = col.dropna()
    return "-" if known.empty else f"{int(known.sum())}/{len(known)}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md(rows: list[list[str]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _ratio(num: pd.Series, den: pd.Series) -> str:
    both = pd.DataFrame({"n": num, "d": den}).astype(float).dropna()
    both = both[both["d"] > 0]
    return "-" if both.empty else f"{(both['n'] / both['d']).max():.2f}x"


# -- tables -----------------------------------------------------------------------------------

def _keys(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The grouping of both tables: (sharder if several) x family x W x mode (x mesh, offload
    where any case has them)."""
    keys = (["sharder"] if df["sharder"].nunique() > 1 else []) + _GROUP
    if "mesh" in df and (df["mesh"].fillna("") != "").any():   # HSDP cases: by mesh shape too
        df = df.assign(mesh=df["mesh"].fillna("").replace("", "1-D"))
        keys = keys + ["mesh"]
    keys += ["offload"] if _has_offload(df) else []
    return df, keys


def _passes(g: pd.DataFrame) -> str:
    """'3 (2 bitwise, 1 tolerance)': the passing cases and the tier each passed in."""
    ok = g[g["verdict"] == "pass"]
    if ok.empty:
        return "0"
    tiers = ok["tier"].value_counts()
    return f"{len(ok)} (" + ", ".join(f"{n} {t}" for t, n in tiers.items()) + ")"


def summary_table(df: pd.DataFrame) -> str:
    """Markdown: a row per (sharder if several) x family x world size x mode, the verdicts in
    one vocabulary (pass, saying in which tier; reported; fail; error; skipped) and the worst
    differences. The invariants are `invariants_table`'s."""
    if df.empty:
        return "No cases."
    df, keys = _keys(df)
    headers = [{"world_size": "W"}.get(k, k) for k in keys]
    headers += ["pass", "reported", "fail", "error", "skipped", "max ULP", "max \\|Δ param\\|"]
    rows = []
    for key, g in df.sort_values(keys).groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [str(k) for k in key] + [_passes(g)]
        row += [str(int(g["verdict"].eq(v).sum())) for v in ("reported", "fail", "error", "skipped")]
        row += [_int(g["max_ulp"].max()), _num(g["max_abs"].max())]
        rows.append(row)
    return _md(rows, headers)


def invariants_table(df: pd.DataFrame) -> str:
    """Markdown: the invariant figures per group of `summary_table`.

    Where the records carry them, the measured communication is set against the ZeRO-3
    formula (`coll vs formula`: the worst measured/expected ratio of bytes per step; `coll
    held`: cases whose every collective kind matched the formula) and the per-rank state
    against the ZeRO-3 memory model (`state vs model`: the worst measured/model ratio)."""
    if df.empty:
        return "No cases."
    df, keys = _keys(df)
    has = {col: col in df and df[col].notna().any()
           for col in ("coll_bytes_expected", "state_bytes_model")}
    headers = [{"world_size": "W"}.get(k, k) for k in keys]
    headers += ["bitwise", "max \\|Δ loss\\|", "max rel", "padding held", "reassembly held",
                "coll bytes/step"]
    headers += ["coll vs formula", "coll held"] if has["coll_bytes_expected"] else []
    headers += ["state/rank"] + (["state vs model"] if has["state_bytes_model"] else [])
    headers += ["step ms"]
    rows = []
    for key, g in df.sort_values(keys).groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [_yes(k) if isinstance(k, (bool, np.bool_)) else str(k) for k in key]
        row += [str(int(g["bitwise"].sum())), _num(g["max_loss_diff"].max()),
                _num(g["max_rel"].max()), _held(g["padding_ok"]), _held(g["reassembly_ok"]),
                _bytes(g["coll_bytes"].median())]
        if has["coll_bytes_expected"]:
            row += [_ratio(g["coll_bytes"], g["coll_bytes_expected"]),
                    _held(g["collectives_ok"])]
        row += [_bytes(g["state_bytes"].max())]
        if has["state_bytes_model"]:
            row += [_ratio(g["state_bytes"], g["state_bytes_model"])]
        step = g["step_time_s"].median()
        row += ["-" if _missing(step) else f"{step * 1e3:.1f}"]
        rows.append(row)
    return _md(rows, headers)


def _has_offload(df: pd.DataFrame) -> bool:
    """Whether some case offloaded (the ``offload`` column is shown only then, so a run without
    offload cases renders as before)."""
    return "offload" in df and bool(df["offload"].fillna(False).astype(bool).any())


def _yes(x: Any) -> str:
    return "yes" if not _missing(x) and bool(x) else "no"


def failures_table(df: pd.DataFrame, *, reason_chars: int = 160) -> str:
    """Markdown: the failing cases (verdict fail or error), then their replay commands."""
    bad = df[~df["passed"].astype(bool)] if not df.empty else df
    if bad.empty:
        return "No failing cases."
    rows, replays = [], []
    for n, (_, r) in enumerate(bad.iterrows(), 1):
        reason = _reason_line(str(r.get("reason") or ""))
        if len(reason) > reason_chars:
            reason = reason[: reason_chars - 3] + "..."
        rows.append([str(n), _cell(r["sharder"]), _cell(r["family"]), str(r["world_size"]),
                     _cell(r["mode"]), _cell(r["verdict"]), _cell(r.get("first_divergence", "")),
                     _cell(reason)])
        replays.append(f"# [{n}] {r['family']} W={r['world_size']} {r['mode']} "
                       f"({r['sharder']}): {r['verdict']}\n{r.get('replay') or '(no replay)'}")
    table = _md(rows, ["#", "sharder", "family", "W", "mode", "verdict", "first divergence",
                       "reason"])
    return table + "\n\nReplay commands:\n\n```sh\n" + "\n".join(replays) + "\n```"


def _reason_line(reason: str) -> str:
    """A traceback's last line says the most; a hang's first line ("timed out after ...")."""
    lines = [ln for ln in reason.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    hang = next((ln for ln in lines if ln.startswith("timed out after")
                 or " did not finish within " in ln), None)
    return hang or lines[-1]


def diagnosis_section(results: list[dict]) -> str:
    """Markdown: per failure signature (verify/diagnose.py), the original and the minimal
    scenario, how each fails, a replay command for both, flakiness, the first divergence and,
    for a hang, the first divergent collective. "" when no case was diagnosed."""
    seen, parts = set(), []
    for r in results:
        sig = r.get("signature")
        if not sig or sig in seen:
            continue
        seen.add(sig)
        n = sum(1 for x in results if x.get("signature") == sig)
        lines = [f"### {sig} ({n} case{'s' * (n != 1)})", ""]
        lines.append(f"- original ({r['family']} W={r['world_size']} {r['mode']}): "
                     f"{_cell(_reason_line(str(r.get('reason') or '')))}")
        if r.get("minimal_scenario_json"):
            lines.append(f"- minimal: {_cell(_reason_line(str(r.get('minimal_reason') or '')))}")
        if r.get("flaky"):
            lines.append(f"- **flaky**: {r.get('shrink_note', '')}")
        elif r.get("shrink_note"):
            lines.append(f"- shrinking: {r['shrink_note']}")
        for key, label in (("divergence", "original"), ("minimal_divergence", "minimal")):
            if r.get(key):
                lines.append(f"- {label}: {r[key]}")
        lines.append("")
        cmds = [f"# original\n{r.get('replay') or '(no replay)'}"]
        if r.get("minimal_replay"):
            cmds.append(f"# minimal\n{r['minimal_replay']}")
        lines += ["```sh", "\n".join(cmds), "```"]
        if r.get("minimal_scenario_json"):
            lines += ["", "Minimal scenario:", "", "```json", r["minimal_scenario_json"], "```"]
        if r.get("hang"):
            lines += ["", "Collectives of the hung ranks:", "", "```", r["hang"], "```"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def steps_table(result: Any) -> str:
    """Markdown: per-step detail of one case (loss sharded vs reference, diffs, invariants)."""
    r = _as_dict(result)
    rows = []
    for s in r.get("steps") or []:
        rows.append([str(s["step"]), f"{s['loss']:.8g}", f"{s['loss_ref']:.8g}",
                     _num(s["loss_abs_diff"]), _num(s["max_abs"]), _num(s["max_rel"]),
                     str(s["max_ulp"]), "yes" if s["bitwise"] else "no",
                     str(s["n_params_differ"]), _cell(s["worst_param"] or "-"),
                     _check(s["padding_ok"], ", ".join(s["padding_bad"])),
                     _check(s["reassembly_ok"]), f"{s['step_time_s'] * 1e3:.1f}"])
    if not rows:
        return f"No steps recorded ({r.get('verdict')}: {_cell(r.get('reason', ''))})."
    return _md(rows, ["step", "loss", "loss ref", "\\|Δ loss\\|", "max \\|Δ param\\|",
                      "max rel", "max ULP", "bitwise", "params differ", "worst param",
                      "padding", "reassembly", "ms"])


def _check(ok: Optional[bool], bad: str = "") -> str:
    if ok is None:
        return "-"
    return "ok" if ok else ("BAD: " + _cell(bad) if bad else "BAD")


def _representative(results: list[dict], df: pd.DataFrame, k: int) -> list[int]:
    """Case indices worth showing step by step: failures first, then per mode the case with the
    largest parameter difference (or any case, when all are bitwise)."""
    picks: list[int] = [i for i in df.index[~df["passed"].astype(bool)] if df.at[i, "n_steps"]]
    for mode in sorted(df["mode"].dropna().unique()):
        cands = df[(df["mode"] == mode) & (df["n_steps"] > 0)]
        if not cands.empty:
            picks.append(int(cands["max_abs"].fillna(-1).idxmax()))
    out: list[int] = []
    for i in picks:
        if i not in out:
            out.append(int(i))
    return out[:k]


# -- files ------------------------------------------------------------------------------------

def load_results(path: str | Path) -> tuple[str, list[dict]]:
    """Read results.json (as `write_reports` writes it, or a bare list) -> (title, results)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return "Equivalence report", data
    return data.get("title", "Equivalence report"), list(data["results"])


def write_reports(results: Iterable[Any], out_dir: str | Path, *,
                  title: str = "Equivalence report", detail_cases: int = 4,
                  pool_memory: Any = None) -> list[Path]:
    """Write equivalence.md, results.csv, results.json (+ PNG plots when matplotlib is
    installed) into `out_dir`; return the paths written. ``pool_memory``: the RSS samples of
    the pool's ranks after every case (verify/soak.py), saved in results.json under that key
    and rendered as the "Pool memory" section."""
    results = [_as_dict(r) for r in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_frame(results)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    written = []

    path = out / "results.json"
    saved: dict[str, Any] = {"title": title, "generated": now, "results": results}
    if pool_memory is not None:
        saved["pool_memory"] = pool_memory
    path.write_text(json.dumps(saved, indent=1, default=list) + "\n")
    written.append(path)
    path = out / "results.csv"
    df.to_csv(path, index=False)
    written.append(path)
    plots = _write_plots(results, out)
    plots += _plot_pool_memory(pool_memory, out)
    written += plots

    n = len(df)
    passed = int(df["passed"].sum()) if n else 0
    failed = int(df["verdict"].isin(_FAILED).sum()) if n else 0
    skipped = int((df["verdict"] == "skipped").sum()) if n else 0
    reported = int((df["verdict"] == "reported").sum()) if n else 0
    status = "PASS" if passed == n else "FAIL"
    lines = [f"# {title}", "",
             f"**{status}**: {n} cases, {passed} passed, {failed} failed"
             + (f" ({reported} of the passed reported, not asserted tight)" if reported else "")
             + (f", {skipped} skipped" if skipped else "") + f". Generated {now}.",
             ""]
    if n:
        lines += [_describe_run(df), ""]
    lines += ["## Summary", "", summary_table(df), "", _VERDICTS_LEGEND, "",
              "## Invariants", "", invariants_table(df) if n else "No cases.", "", _LEGEND, "",
              "## Failing cases", "", failures_table(df) if n else "No cases.", ""]
    diagnosis = diagnosis_section(results)
    if diagnosis:
        lines += ["## Diagnosis", "", diagnosis, ""]
    if n and "save_world_size" in df and df["save_world_size"].notna().any():
        lines += ["## Checkpoint-resume cases", "", resume_table(df), "", _RESUME_LEGEND, ""]
    if pool_memory is not None:
        lines += ["## Pool memory", "", pool_memory_section(pool_memory), ""]
    if n:
        lines += ["## Per-step detail", ""]
        for i in _representative(results, df, detail_cases):
            r = results[i]
            lines += [f"### {r['family']}, W={r['world_size']}, {r['mode']}, {r['dtype']}, "
                      f"{r['optimizer']} ({r['sharder']}): {r['verdict']}", "",
                      steps_table(r), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "equivalence.md"
    path.write_text("\n".join(lines))
    written.append(path)
    return written


def resume_table(df: pd.DataFrame) -> str:
    """Markdown: one row per checkpoint-resume case (verify/resume.py): W_a -> W_b, when."""
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
    ``pool_memory``: as `run_campaign` saves it (verify/soak.py `samples_of`)."""
    from verify.soak import samples_of, summarize
    summary = summarize(samples_of(pool_memory))
    if summary is None:
        return "No RSS samples (/proc not readable on this platform)."
    mib = lambda k: "-" if k is None else f"{k / 1024:.1f} MiB"  # noqa: E731
    status = "held" if summary["within_limit"] else "GREW"
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
        from verify.soak import BASELINE_CASE
        text[-1] += (f" Fewer than {BASELINE_CASE} cases ran, so the comparison starts at the first case "
                     "and includes the warm-up; the soak (`make soak`) runs 500+.")
    if summary["restarted_between"]:
        text[-1] += " The pool restarted in between (a failed case), so these are different processes."
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
                    "(verify/soak.py, [Note: oneDNN's kernel caches look like a leak]).")
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
    from verify.soak import samples_of
    samples = samples_of(pool_memory)
    if not samples or not any(v is not None for s in samples for v in s.get("rss_kib") or []):
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    from verify.soak import BASELINE_CASE
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


def _describe_run(df: pd.DataFrame) -> str:
    def vals(col: str) -> str:
        return ", ".join(str(v) for v in sorted(df[col].dropna().unique()))
    return (f"Sharders: {vals('sharder')}. World sizes: {vals('world_size')}. "
            f"Modes: {vals('mode')}. Families: {vals('family')}.")


_VERDICTS_LEGEND = """\
Verdicts: *pass*: every check held, in the tier named (bitwise: every loss and parameter equal
the reference bit for bit; tolerance: within the dtype's `torch.testing` tolerance); *reported*:
fast mode with an Adam-family optimizer at W >= 4, where last-bit gradient differences may flip
tiny updates, so the figures are reported and held only to the bound of what Adam can do
(`verify/compare.py`, [Note: reported tier bounds]), not asserted tight; *fail*: a check failed
(the failing cases below say which); *error*: the case did not complete (a rank raised, died or
hung); *skipped*: the sharder does not run the case (outside its declared modes, dtypes,
offload or mesh support, or its `unsupported()`), with the reason. *max ULP* and *max |Δ param|*
are the worst over the group's cases and steps."""

_LEGEND = """\
Columns: *bitwise* counts cases whose loss and every parameter equal the reference bit for bit
at every step; *max |Δ loss|*, *max |Δ param|*, *max rel* and *max ULP* are the worst over the
group's cases and steps; *padding held* and *reassembly held* count cases whose padding stayed
bitwise zero and whose shards reassembled to the reference at every step; *coll bytes/step* is
the median communication per step on rank 0; *state/rank* the largest per-rank bytes of
parameters + gradients + optimizer state; *coll vs formula* and *state vs model* (when
recorded) are the worst ratios of measured to expected (the state model is the ZeRO-3
(parameters + gradients + optimizer state) / W; on these tiny models the per-parameter alignment
to 32 elements and the padding to a multiple of W dominate, so it runs above 1; see
`reports/performance.md` for a real size), and *coll held* counts cases whose collective counts
and bytes matched the formula at every step. Tiers: deterministic mode owes bitwise equality at
every world size; fast mode is bitwise at W <= 2 (against the data-parallel reference a
two-term sum has one result), within the dtype's `torch.testing` tolerance with SGD at
W >= 4, and reported only with Adam-family optimizers at W >= 4."""


# -- plots ------------------------------------------------------------------------------------

def _write_plots(results: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    steps = steps_frame(results)
    if steps.empty:
        return []
    written = []
    for col, label, name in (("max_abs", "max |Δ param|", "param_diff.png"),
                             ("loss_abs_diff", "|Δ loss|", "loss_diff.png")):
        path = out / name
        _plot_per_step(plt, steps, col, label, path)
        written.append(path)
    if steps["state_bytes"].notna().any():
        path = out / "state_memory.png"
        _plot_state(plt, results, path)
        written.append(path)
    return written


def _plot_per_step(plt: Any, steps: pd.DataFrame, col: str, label: str, path: Path) -> None:
    """One panel per mode, one line per world size: the worst `col` over cases at each step.
    Zeros (bitwise agreement) cannot sit on a log axis: they are drawn on a floor line."""
    from matplotlib.ticker import MaxNLocator
    worst = steps.groupby(["mode", "world_size", "step"])[col].max().reset_index()
    positive = worst[col][worst[col] > 0]
    floor = positive.min() / 100 if not positive.empty else 1e-16
    modes = sorted(worst["mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False,
                             sharey=True)
    for ax, mode in zip(axes[0], modes):
        m = worst[worst["mode"] == mode]
        for w, g in m.groupby("world_size"):
            ax.plot(g["step"], g[col].clip(lower=floor), marker="o", label=f"W={w}")
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(floor / 10, max(floor * 10, worst[col].max() * 10))
        ax.set_yscale("log")
        ax.set_title(f"{mode}: worst {label} per step")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(f"{label} (dotted line: exactly 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_state(plt: Any, results: list[dict], path: Path) -> None:
    """State bytes per rank vs W, one colour per family; and, where the records carry the
    ZeRO-3 model, measured/model per case (1.0 is the model exactly)."""
    df = results_frame(results)
    df = df[df["state_bytes"].notna()]
    sizes = sorted(int(w) for w in df["world_size"].unique())
    with_model = df[df["state_bytes_model"].notna()] if "state_bytes_model" in df else df[:0]
    panels = 2 if not with_model.empty else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for fam, g in df.groupby("family"):
        ax.scatter(g["world_size"], g["state_bytes"], label=str(fam), alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(w) for w in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("world size W")
    ax.set_ylabel("params + grads + optimizer state per rank (bytes)")
    ax.set_title("state memory per rank")
    ax.legend(fontsize="small")
    if panels == 2:
        ax = axes[0][1]
        for fam, g in with_model.groupby("family"):
            ax.scatter(g["world_size"], g["state_bytes"] / g["state_bytes_model"].astype(float),
                       label=str(fam), alpha=0.7)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="ZeRO-3 model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(w) for w in sizes])
        ax.set_xlabel("world size W")
        ax.set_ylabel("measured / model")
        ax.set_title("state memory vs the ZeRO-3 model")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- peers: the same cases through every sharder ----------------------------------------------

_CASE_KEYS = ["family", "world_size", "mode", "dtype", "optimizer", "wrap"]


def _case_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The wrap plan of each case, from its scenario JSON (the other identity columns are
    top-level fields already)."""
    df = df.copy()
    specs = [json.loads(j) if isinstance(j, str) else {} for j in df["scenario_json"]]
    df["wrap"] = [d.get("wrap", "") for d in specs]
    df["offload"] = [bool(d.get("offload", False)) for d in specs]
    resume = df["save_world_size"] if "save_world_size" in df else pd.Series([None] * len(df),
                                                                             index=df.index)
    after = df["save_after"] if "save_after" in df else resume
    df["resume"] = [f"{int(a)} -> {w} after {int(s)}" if not _missing(a) else ""
                    for a, w, s in zip(resume, df["world_size"], after)]
    df["kind"] = [("resume" if r else "case") + (" + offload" if o else "")
                  for r, o in zip(df["resume"], df["offload"])]
    return df


def peers_table(df: pd.DataFrame, sharders: list[str]) -> str:
    """Markdown: one row per case (scenario), one column group per sharder: verdict, max |Δ
    param| over the steps, bitwise at every step, median step time, largest per-rank state."""
    if df.empty:
        return "No cases."
    extra = [k for k in ("offload", "resume") if k in df and df[k].astype(bool).any()]
    headers = ["#", "family", "W", "mode", "dtype", "optimizer", "wrap"] + extra
    for sh in sharders:
        headers += [f"{sh}: verdict", "max \\|Δ param\\|", "bitwise", "step ms", "state/rank"]
    rows = []
    keys = ["scenario_json"] + (["resume"] if "resume" in df else [])
    for n, (key, g) in enumerate(df.groupby(keys, sort=False), 1):
        first = g.iloc[0]
        row = [str(n)] + [_cell(first[k]) for k in _CASE_KEYS]
        row += [_yes(first[k]) if k == "offload" else _cell(first[k] or "-") for k in extra]
        for sh in sharders:
            mine = g[g["sharder"] == sh]
            if mine.empty:
                row += ["-"] * 5
                continue
            r = mine.iloc[0]
            ran = r["n_steps"] > 0
            step = r["step_time_s"]
            row += [_cell(r["verdict"]), _num(r["max_abs"]) if ran else "-",
                    ("yes" if r["bitwise"] else "no") if ran else "-",
                    "-" if _missing(step) else f"{step * 1e3:.1f}", _bytes(r["state_bytes"])]
        rows.append(row)
    return _md(rows, headers)


def _peers_summary(df: pd.DataFrame, sharders: list[str]) -> str:
    """Markdown: per sharder, world size and tier: cases, passed, skipped, bitwise, worst
    |Δ param| and |Δ loss|, median step time and state per rank. Where the run has more than
    plain cases (offload, checkpoint-resume), a first column says which kind a row counts, and
    the sharders' rows of one kind stand next to each other."""
    kinds = "kind" in df and df["kind"].nunique() > 1
    by = (["kind"] if kinds else []) + ["sharder", "world_size", "tier"]
    order = {sh: i for i, sh in enumerate(sharders)}
    rows, keys = [], []
    for key, g in df.groupby(by, sort=False):
        kind, sh, w, tier = key if kinds else ("",) + tuple(key)
        ran = g[g["n_steps"] > 0]
        step = ran["step_time_s"].median() if not ran.empty else None
        keys.append((kind, int(w), order.get(sh, 99), tier))   # the sharders next to each other
        rows.append(([kind] if kinds else []) + [
            sh, str(w), tier, str(len(g)), str(int(g["verdict"].eq("pass").sum())),
            str(int(g["verdict"].eq("skipped").sum())), str(int(g["verdict"].isin(_FAILED).sum())),
            f"{int(ran['bitwise'].sum())}/{len(ran)}", _num(ran["max_abs"].max()),
            _num(ran["max_loss_diff"].max()), "-" if _missing(step) else f"{step * 1e3:.1f}",
            _bytes(ran["state_bytes"].median())])
    rows = [r for _, r in sorted(zip(keys, rows), key=lambda kr: kr[0])]
    return _md(rows, (["kind"] if kinds else []) + [
        "sharder", "W", "tier", "cases", "passed", "skipped", "failed", "bitwise (of run)",
        "max \\|Δ param\\|", "max \\|Δ loss\\|", "median step ms", "median state/rank"])


_PEERS_LEGEND = """\
Every sharder runs the same drawn cases (the same scenario JSON: model, data, optimizer, wrap
plan, world size) against the same reference, held to the tier of DESIGN section 3 (an adapter
may only loosen it where it provably cannot owe it, e.g. `verify/sharders/torch_fsdp2.py`,
[Note: peer tiers]): bitwise at W <= 2 in fast mode, the dtype's `torch.testing` tolerance with
SGD at W >= 4, reported bounds with Adam at W >= 4. *skipped* cases are those a sharder does
not run (below, why); they do not fail the run. The invariant checks (padding, resharded, shard
reassembly, reduced gradients, the collective formula) run for every sharder whose adapter has
the probe, n/a otherwise; they are in `equivalence.md`.
*step ms* is rank 0's forward + backward + optimizer step, median over the steps (tiny models
on CPU/gloo, so mostly per-call overhead: compare within a row, not across machines); *state/rank*
is the largest per-rank bytes of parameters + gradients + optimizer state (DDP holds a full
replica; FSDP2 and fsdp_core a 1/W shard, fsdp_core's padded and aligned)."""


def write_peers_report(results: Iterable[Any], out_dir: str | Path, *,
                       title: str = "Peers") -> Path:
    """Write peers.md: the same cases side by side, one column group per sharder."""
    results = [_as_dict(r) for r in results]
    df = results_frame(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peers.md"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if df.empty:
        path.write_text(f"# Peers: {title}\n\nNo cases. Generated {now}.\n")
        return path
    df = _case_columns(df)
    sharders = list(dict.fromkeys(df["sharder"]))
    counts = []
    for sh in sharders:
        g = df[df["sharder"] == sh]
        counts.append(f"{sh}: {int(g['verdict'].eq('pass').sum())} passed, "
                      f"{int(g['verdict'].eq('skipped').sum())} skipped, "
                      f"{int(g['verdict'].isin(_FAILED).sum())} failed")
    status = "PASS" if bool(df["passed"].all()) else "FAIL"
    lines = [f"# Peers: {title}", "",
             f"**{status}**: {df['scenario_json'].nunique()} cases x {len(sharders)} "
             f"sharder(s). " + "; ".join(counts) + f". Generated {now}.", "",
             "## By sharder and world size", "", _peers_summary(df, sharders), "",
             "## Case by case", "", peers_table(df, sharders), "", _PEERS_LEGEND, ""]
    skipped = df[df["verdict"] == "skipped"]
    if not skipped.empty:
        lines += ["## Skipped: why", ""]
        reasons = skipped.groupby(["sharder", "reason"], sort=False).size()
        lines += [_md([[sh, _cell(reason), str(n)] for (sh, reason), n in reasons.items()],
                      ["sharder", "reason", "cases"]), ""]
    bad = df[df["verdict"].isin(_FAILED)]
    if not bad.empty:
        lines += ["## Failing cases", "", failures_table(bad), ""]
    path.write_text("\n".join(lines))
    return path



# -- convergence on real text (verify/converge.py) --------------------------------------------

def write_convergence_report(data: dict, out_dir: str | Path) -> list[Path]:
    """Write convergence.json, convergence.png (when matplotlib is installed) and
    convergence.md from `verify.converge.run_converge`'s record; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    written = []
    path = out / "convergence.json"
    path.write_text(json.dumps({"generated": now, **data}, indent=1) + "\n")
    written.append(path)
    plot = _plot_convergence(data["runs"], out / "convergence.png")
    written += [plot] if plot else []
    corpus, cfg, runs = data["corpus"], data["config"], data["runs"]
    rows = []
    for r in runs:
        n = len(r["sharded"])
        rows.append([r["mode"], str(r["world_size"]), str(n), f"{r['sharded'][-1]:.6f}",
                     f"{r['unsharded'][-1]:.6f}", _num(abs(r["sharded"][-1] - r["unsharded"][-1])),
                     _num(r["max_abs_loss_diff"]), f"{r['bitwise_steps']}/{n}",
                     "yes" if r["final_params_bitwise"] else f"no ({_num(r['final_params_max_abs'])})",
                     f"{r['held_out_sharded']:.6f}", f"{r['held_out_unsharded']:.6f}",
                     f"{r['sharded_step_s'] * 1e3:.1f} / {r['unsharded_step_s'] * 1e3:.1f}"])
    table = _md(rows, ["mode", "W", "steps", "final loss, sharded", "final loss, unsharded",
                       "\\|Δ final loss\\|", "max \\|Δ loss\\| (any step)", "bitwise steps",
                       "final params bitwise", "held-out, sharded", "held-out, unsharded",
                       "median step ms (sharded / unsharded)"])
    first = runs[0]["sharded"][0] if runs else float("nan")
    lines = [
        "# Convergence on real text: sharded vs unsharded", "",
        f"Generated {now}. Corpus: the top-level standard-library sources of Python "
        f"{corpus['python']} (`{corpus['root']}/*.py`, {corpus['files']} files by name, "
        f"{corpus['bytes']:,} bytes, sha256 `{corpus['sha256']}`), byte-level vocabulary of "
        "256; the last tenth held out.", "",
        f"Model: the nanoGPT-style GPT of `verify/scenarios/gpt.py` (width {cfg['width']}, "
        f"{cfg['layers']} blocks, context {cfg['seq']}, tied head), AdamW (lr {cfg['lr']:g}, "
        f"weight decay {cfg['weight_decay']:g}), {cfg['micro_batches']} micro-batches of "
        f"{cfg['micro_batch_size']} sequences per step, seed {cfg['seed']}. Sharded: fsdp_core "
        f"at W = {cfg['world_size']} (one unit per block plus the root). Unsharded: plain "
        "single-process PyTorch on the same batches; in fast mode one forward/backward on the "
        "whole global batch, in deterministic mode the micro-batch gradients summed by the "
        "balanced tree that deterministic mode promises to equal bit for bit.", "",
        table, "",
        f"The loss starts near ln 256 = 5.55 (step 0: {first:.3f}). Fast mode may differ from "
        "the unsharded run in the last bits (the sharded gradient is a sum of per-rank "
        "gradients, in the backend's order, instead of one full-batch gradient), and AdamW "
        "carries such differences forward, so its curves agree closely rather than exactly; "
        "deterministic mode owes equality at every step.", ""]
    if plot:
        lines += [f"![convergence]({plot.name})", ""]
    path = out / "convergence.md"
    path.write_text("\n".join(lines))
    written.append(path)
    return written


def _plot_convergence(runs: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not runs:
        return None
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 6.5), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for col, r in enumerate(runs):
        steps = list(range(len(r["sharded"])))
        ax = axes[0][col]
        ax.plot(steps, r["unsharded"], label="unsharded", linewidth=2.5, alpha=0.5)
        ax.plot(steps, r["sharded"], label=f"fsdp_core, W={r['world_size']}", linewidth=1)
        ax.set_title(f"{r['mode']}: training loss")
        ax.set_ylabel("loss (nats/byte)")
        ax.legend(fontsize="small")
        ax = axes[1][col]
        diffs = [abs(a - b) for a, b in zip(r["sharded"], r["unsharded"])]
        positive = [d for d in diffs if d > 0]
        floor = min(positive) / 100 if positive else 1e-9
        ax.plot(steps, [max(d, floor) for d in diffs], linewidth=1)
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(floor / 10, max(floor * 10, max(diffs) * 10))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|Δ loss| (dotted: exactly 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

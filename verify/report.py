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

import pandas as pd
from tabulate import tabulate

__all__ = [
    "results_frame",
    "steps_frame",
    "summary_table",
    "failures_table",
    "steps_table",
    "write_reports",
    "load_results",
]

_GROUP = ["family", "world_size", "mode"]
_FAILED = ("fail", "error")


def _as_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def _passed(r: dict[str, Any]) -> bool:
    return bool(r["passed"]) if "passed" in r else r.get("verdict") in ("pass", "unsupported")


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
        row["padding_ok"] = all(s["padding_ok"] for s in steps) if steps else None
        row["reassembly_ok"] = all(s["reassembly_ok"] for s in steps) if steps else None
        row["collectives_ok"] = (all(s.get("collectives_ok", True) for s in steps)
                                 if steps else None)
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

def summary_table(df: pd.DataFrame) -> str:
    """Markdown: a row per (sharder if several) x family x world size x mode.

    Where the records carry them, the measured communication is set against the ZeRO-3
    formula (`coll vs formula`: the worst measured/expected ratio of bytes per step; `coll
    held`: cases whose every collective kind matched the formula) and the per-rank state
    against the ZeRO-3 memory model (`state vs model`: the worst measured/model ratio)."""
    if df.empty:
        return "No cases."
    keys = (["sharder"] if df["sharder"].nunique() > 1 else []) + _GROUP
    has = {col: col in df and df[col].notna().any()
           for col in ("coll_bytes_expected", "state_bytes_model")}
    headers = [{"world_size": "W"}.get(k, k) for k in keys]
    headers += ["cases", "passed", "failed", "bitwise", "max \\|Δ loss\\|", "max \\|Δ param\\|",
                "max rel", "max ULP", "padding held", "reassembly held", "coll bytes/step"]
    headers += ["coll vs formula", "coll held"] if has["coll_bytes_expected"] else []
    headers += ["state/rank"] + (["state vs model"] if has["state_bytes_model"] else [])
    headers += ["step ms"]
    rows = []
    for key, g in df.sort_values(keys).groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [str(k) for k in key]
        row += [str(len(g)), str(int(g["passed"].sum())),
                str(int(g["verdict"].isin(_FAILED).sum())), str(int(g["bitwise"].sum())),
                _num(g["max_loss_diff"].max()), _num(g["max_abs"].max()),
                _num(g["max_rel"].max()), _int(g["max_ulp"].max()),
                _held(g["padding_ok"]), _held(g["reassembly_ok"]),
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


def failures_table(df: pd.DataFrame, *, reason_chars: int = 160) -> str:
    """Markdown: the failing cases (verdict fail or error), then their replay commands."""
    bad = df[~df["passed"].astype(bool)] if not df.empty else df
    if bad.empty:
        return "No failing cases."
    rows, replays = [], []
    for n, (_, r) in enumerate(bad.iterrows(), 1):
        reason = str(r.get("reason") or "").strip().splitlines()
        reason = reason[-1] if reason else ""          # a traceback's last line says the most
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


def steps_table(result: Any) -> str:
    """Markdown: per-step detail of one case (loss sharded vs reference, diffs, invariants)."""
    r = _as_dict(result)
    rows = []
    for s in r.get("steps") or []:
        rows.append([str(s["step"]), f"{s['loss']:.8g}", f"{s['loss_ref']:.8g}",
                     _num(s["loss_abs_diff"]), _num(s["max_abs"]), _num(s["max_rel"]),
                     str(s["max_ulp"]), "yes" if s["bitwise"] else "no",
                     str(s["n_params_differ"]), _cell(s["worst_param"] or "-"),
                     "ok" if s["padding_ok"] else "BAD: " + _cell(", ".join(s["padding_bad"])),
                     "ok" if s["reassembly_ok"] else "BAD", f"{s['step_time_s'] * 1e3:.1f}"])
    if not rows:
        return f"No steps recorded ({r.get('verdict')}: {_cell(r.get('reason', ''))})."
    return _md(rows, ["step", "loss", "loss ref", "\\|Δ loss\\|", "max \\|Δ param\\|",
                      "max rel", "max ULP", "bitwise", "params differ", "worst param",
                      "padding", "reassembly", "ms"])


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
                  title: str = "Equivalence report", detail_cases: int = 4) -> list[Path]:
    """Write equivalence.md, results.csv, results.json (+ PNG plots when matplotlib is
    installed) into `out_dir`; return the paths written."""
    results = [_as_dict(r) for r in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_frame(results)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    written = []

    path = out / "results.json"
    path.write_text(json.dumps({"title": title, "generated": now, "results": results},
                               indent=1, default=list) + "\n")
    written.append(path)
    path = out / "results.csv"
    df.to_csv(path, index=False)
    written.append(path)
    plots = _write_plots(results, out)
    written += plots

    n = len(df)
    passed = int(df["passed"].sum()) if n else 0
    failed = int(df["verdict"].isin(_FAILED).sum()) if n else 0
    unsupported = int((df["verdict"] == "unsupported").sum()) if n else 0
    status = "PASS" if passed == n else "FAIL"
    lines = [f"# {title}", "",
             f"**{status}**: {n} cases, {passed} passed, {failed} failed"
             + (f", {unsupported} unsupported" if unsupported else "") + f". Generated {now}.",
             ""]
    if n:
        lines += [_describe_run(df), ""]
    lines += ["## Summary", "", summary_table(df), "", _LEGEND, "",
              "## Failing cases", "", failures_table(df) if n else "No cases.", ""]
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


def _describe_run(df: pd.DataFrame) -> str:
    def vals(col: str) -> str:
        return ", ".join(str(v) for v in sorted(df[col].dropna().unique()))
    return (f"Sharders: {vals('sharder')}. World sizes: {vals('world_size')}. "
            f"Modes: {vals('mode')}. Families: {vals('family')}.")


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

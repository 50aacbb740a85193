"""peers.md: the same cases through every sharder, side by side."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from verify.results import headline
from verify.report._format import _FAILED, _as_dict, _bytes, _cell, _md, _missing, _num
from verify.report.frames import results_frame
from verify.report.tables import _yes, failures_table


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
    """Markdown: per sharder, world size and tier: cases, passed, reported, skipped, bitwise, worst
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
            str(int(g["verdict"].eq("reported").sum())), str(int(g["verdict"].eq("skipped").sum())), str(int(g["verdict"].isin(_FAILED).sum())),
            f"{int(ran['bitwise'].sum())}/{len(ran)}", _num(ran["max_abs"].max()),
            _num(ran["max_loss_diff"].max()), "-" if _missing(step) else f"{step * 1e3:.1f}",
            _bytes(ran["state_bytes"].median())])
    rows = [r for _, r in sorted(zip(keys, rows), key=lambda kr: kr[0])]
    return _md(rows, (["kind"] if kinds else []) + [
        "sharder", "W", "tier", "cases", "passed", "reported", "skipped", "failed", "bitwise (of run)",
        "max \\|Δ param\\|", "max \\|Δ loss\\|", "median step ms", "median state/rank"])


_PEERS_LEGEND = """\
Every sharder runs the same drawn cases (the same scenario JSON: model, data, optimizer, wrap
plan, world size) against the same reference, held to the tier of DESIGN section 3 (an adapter
may only loosen it where it provably cannot owe it, e.g. `verify/sharders/torch_fsdp2.py`,
[Note: peer tiers]): bitwise at W <= 2 in fast mode, the dtype's `torch.testing` tolerance with
SGD at W >= 4, reported bounds with Adam at W >= 4. *skipped* cases are those a sharder does
not run (below, why); they do not fail the run. The invariant checks (padding, resharded, shard
reassembly, reduced gradients, optimizer state, the collective formula) run for every sharder
whose adapter has the probe, n/a otherwise: each case's checks and their status are in
`results.json` (`checks`), `equivalence.md` counts padding, reassembly and the formula per row
and lists every check that failed.
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
        counts.append(f"{sh}: {headline(g.to_dict('records'))}")
    status = "FAIL" if bool(df["verdict"].isin(_FAILED).any()) else "PASS"
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

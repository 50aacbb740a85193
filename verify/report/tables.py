"""The markdown tables of equivalence.md: the verdicts by family x W x mode, the invariant figures, the failing cases and their diagnosis, one case step by step."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from verify.results import reason_line, worst_first
from verify.report._format import (
    _GROUP, _as_dict, _bytes, _cell, _held, _int, _md, _missing, _num, _ratio)


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


def _fails(g: pd.DataFrame) -> str:
    """'3 (1 last-bit, 2 beyond tolerance)': the failing cases by severity
    (verify/case/severity.py; none given: unclassified)."""
    bad = g[g["verdict"] == "fail"]
    if bad.empty:
        return "0"
    sev = bad["severity"].fillna("").replace("", "unclassified") if "severity" in bad else \
        pd.Series(["unclassified"] * len(bad))
    counts = sev.value_counts()
    order = [c for c in ("last-bit", "beyond tolerance", "invariant") if c in counts]
    order += sorted(c for c in counts.index if c not in order)
    return f"{len(bad)} (" + ", ".join(f"{counts[c]} {c}" for c in order) + ")"


def summary_table(df: pd.DataFrame) -> str:
    """Markdown: a row per (sharder if several) x family x world size x mode, the verdicts in
    one vocabulary (pass, saying in which tier; reported; fail, by severity; error; skipped) and
    the worst differences. The invariants are `invariants_table`'s."""
    if df.empty:
        return "No cases."
    df, keys = _keys(df)
    headers = [{"world_size": "W"}.get(k, k) for k in keys]
    headers += ["pass", "reported", "fail", "error", "skipped", "max ULP", "max \\|Δ param\\|"]
    rows = []
    for key, g in df.sort_values(keys).groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [str(k) for k in key] + [_passes(g), str(int(g["verdict"].eq("reported").sum())),
                                       _fails(g)]
        row += [str(int(g["verdict"].eq(v).sum())) for v in ("error", "skipped")]
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
                _coll_bytes(g)]
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


def _coll_bytes(g: pd.DataFrame) -> str:
    """The median bytes per step, or "not seen" where a case's traffic ran below the recorder
    (verify/case/recorder.py, [Note: three layers of recording])."""
    if "coll_seen" in g and not g["coll_seen"].fillna(True).astype(bool).all():
        return "not seen"
    return _bytes(g["coll_bytes"].median())


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


_reason_line = reason_line   # the console's line (verify/results.py)


def diagnosis_section(results: list[dict]) -> str:
    """Markdown: per failure signature (verify/diagnosis/diagnose.py), the original and the minimal
    scenario, how each fails, a replay command for both, flakiness, the first divergence and,
    for a hang, the first divergent collective. "" when no case was diagnosed."""
    seen, parts = set(), []
    for r in sorted(results, key=worst_first):   # the worst signature first, led by its worst case
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
(`verify/compare.py`, [Note: reported tier bounds]), not asserted tight against the reference
(where the adapter has the `reduced_gradients` probe, its gradients and optimizer state are
held to a relative norm and its parameters, to the fp32 tolerance, to the optimizer replayed
from its own gradients: `verify/case/judge.py`, [Note: the replayed steps]); *fail*: a check failed
(the failing cases below say which), counted by severity: *last-bit* (every difference within the
dtype's `torch.testing` tolerance), *beyond tolerance*, *invariant* (a non-numerical check);
*error*: the case did not complete (a rank raised, died or
hung); *skipped*: the sharder does not run the case (outside its declared modes, dtypes,
offload or mesh support, or its `unsupported()`), with the reason. *max ULP* and *max |Δ param|*
are the worst over the group's cases and steps."""

_LEGEND = """\
Columns: *bitwise* counts cases whose loss and every parameter equal the reference bit for bit
at every step; *max |Δ loss|*, *max |Δ param|*, *max rel* and *max ULP* are the worst over the
group's cases and steps; *padding held* counts cases whose padding stayed bitwise zero at every
step, *reassembly held* those whose shards (the adapter's `local_pieces`) reassembled bit for bit
into the full parameters the sharder gathered (`full_parameters`) at every step: it says nothing
is lost or misplaced between a sharder's shards and its own gather, and only the parameter
columns compare those with the reference (a sharder that shards wrongly but gathers the same
way holds reassembly and fails on the numbers); *coll bytes/step* is
the median communication per step on rank 0 ("not seen" where some of it ran below the
recorder, e.g. DDP's C++ reducer: the process groups' own counts said so); *state/rank* the largest per-rank bytes of
parameters + gradients + optimizer state ("-": not measured, where the optimizer has no
`param_groups` and `state` to read, e.g. a wrapper of the sharder's own, and the adapter has no
`state_bytes`); *coll vs formula* and *state vs model* (when
recorded) are the worst ratios of measured to expected (the state model is the ZeRO-3
(parameters + gradients + optimizer state) / W, / S on an (R, S) mesh; the state is read after backward and before
the optimizer step, so a case whose only step is its first has no optimizer state yet (torch's
optimizers create it in their first step) and runs below 1; on these tiny models a flat-parameter
sharder's alignment (fsdp_core's: 32 elements per parameter) and padding to a multiple of W run
it above 1; see `reports/performance.md` for a real size), and *coll held* counts cases whose collective counts
and bytes matched the formula at every step. Tiers: deterministic mode owes bitwise equality at
every world size; fast mode is bitwise at W <= 2 (against the data-parallel reference a
two-term sum has one result), within the dtype's `torch.testing` tolerance with SGD at
W >= 4, and reported only with Adam-family optimizers at W >= 4. *offload* (where shown) says
the case asked for CPU offload (`WrapPlan.offload`); that the shards and optimizer state were on
the CPU is the `offload` check, which only a run that computes on an accelerator can see (it
is n/a on a CPU-only run: a pass there says the training, not the placement, was checked)."""

"""Frames: `results_frame` (one row per case, the per-step figures reduced to their worst value) and `steps_frame` (one row per case and step)."""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Optional

import pandas as pd

from verify.report._format import _as_dict, _fmt_divergence, _passed, _scalar
from verify.results import UNSEEN


# -- frames -----------------------------------------------------------------------------------

def results_frame(results: Iterable[Any]) -> pd.DataFrame:
    """One row per case. Top-level scalar fields are kept as they are (so fields a producer adds,
    e.g. a formula to compare against, flow through); the per-step records are reduced to:
    n_steps, max_loss_diff, max_abs, max_rel, max_ulp, bitwise (every step), bitwise_steps,
    padding_ok, reassembly_ok, collectives_ok (every step; None without steps), coll_count and
    coll_bytes (per step, summed over kinds, median over steps; coll_bytes None and coll_seen
    False where a step ran collectives the recorder could not see, `verify.results.UNSEEN`), coll_bytes_expected (the same
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
        row["coll_seen"] = not any(UNSEEN in s.get("collectives", {}) for s in steps)
        if not row["coll_seen"]:   # some traffic ran below the recorder: no byte count is right
            row["coll_bytes"] = None
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

"""Shared pieces of the report: record helpers and cell formatting."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
from tabulate import tabulate

from verify.results import PASSING

_GROUP = ["family", "world_size", "mode"]
_FAILED = ("fail", "error")


def _as_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def _passed(r: dict[str, Any]) -> bool:
    return bool(r["passed"]) if "passed" in r else r.get("verdict") in PASSING


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _fmt_divergence(div: Any) -> str:
    if not div:
        return ""
    step, name = div
    return f"step {step}: {name}"


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

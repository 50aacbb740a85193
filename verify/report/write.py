"""Files: `write_reports` (equivalence.md, results.csv, results.json, plots) and `load_results`."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from verify.report._format import _FAILED, _as_dict
from verify.results import headline
from verify.report.frames import results_frame
from verify.report.plots import _write_plots
from verify.report.sections import (
    _RESUME_LEGEND, _plot_pool_memory, pool_memory_section, resume_table)
from verify.report.tables import (
    _LEGEND, _VERDICTS_LEGEND, _describe_run, _representative, diagnosis_section, failures_table,
    invariants_table, steps_table, summary_table)


# -- files ------------------------------------------------------------------------------------

def _saved(path: str | Path, key: str) -> Any:
    data = json.loads(Path(path).read_text())
    return data.get(key) if isinstance(data, dict) else None


def load_blas(path: str | Path) -> Any:
    """The BLAS line results.json was written with (verify/blas.py), or None."""
    return _saved(path, "blas")


def load_declined(path: str | Path) -> Optional[dict]:
    """The draws declined while drawing, by reason, as results.json saved them, or None."""
    return _saved(path, "declined")


def load_notes(path: str | Path) -> list[str]:
    """What the campaign did not run and why, as results.json saved it ([] if nothing)."""
    return list(_saved(path, "notes") or [])


def declined_line(declined: dict) -> str:
    """One line: how many draws the adapters declined, and why (the most frequent first)."""
    parts = [f"{n}: {reason}" for reason, n in sorted(declined.items(), key=lambda kv: -kv[1])]
    return (f"Declined while drawing (set aside; the cases were picked among the other candidates, "
            f"so that they run): {sum(declined.values())} candidate draws; " + "; ".join(parts[:8])
            + (f"; and {len(parts) - 8} other reasons" if len(parts) > 8 else ""))


def load_results(path: str | Path) -> tuple[str, list[dict]]:
    """Read results.json (as `write_reports` writes it, or a bare list) -> (title, results)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return "Equivalence report", data
    return data.get("title", "Equivalence report"), list(data["results"])


def write_reports(results: Iterable[Any], out_dir: str | Path, *,
                  title: str = "Equivalence report", detail_cases: int = 4,
                  pool_memory: Any = None, blas: Any = None,
                  declined: Optional[dict] = None, notes: Sequence[str] = ()) -> list[Path]:
    """Write equivalence.md, results.csv, results.json (+ PNG plots when matplotlib is
    installed) into `out_dir`; return the paths written. ``pool_memory``: the RSS samples of
    the pool's ranks after every case (verify/tools/soak.py), saved in results.json under that key
    and rendered as the "Pool memory" section. ``blas``: what the campaign set for the BLAS's
    reproducibility (`verify.blas.describe`), saved and said under the headline. ``declined``:
    {reason: draws} the adapters declined while drawing (verify/case/draw.py), likewise.
    ``notes``: what the campaign was asked for and did not run, and why; likewise."""
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
    if blas is not None:
        saved["blas"] = blas
    if declined:
        saved["declined"] = declined
    if notes:
        saved["notes"] = list(notes)
    path.write_text(json.dumps(saved, indent=1, default=list) + "\n")
    written.append(path)
    path = out / "results.csv"
    df.to_csv(path, index=False)
    written.append(path)
    plots = _write_plots(results, out)
    plots += _plot_pool_memory(pool_memory, out)
    written += plots

    n = len(df)
    failed = int(df["verdict"].isin(_FAILED).sum()) if n else 0
    status = "FAIL" if failed else "PASS"
    lines = [f"# {title}", "", f"**{status}**: {n} cases: {headline(results)}. Generated {now}.",
             ""]
    if blas:
        lines += [str(blas), ""]
    if declined:
        lines += [declined_line(declined), ""]
    lines += [f"Not run: {n}." for n in notes] + ([""] if notes else [])
    loosened = [r for r in results if r.get("tier_note")]
    if loosened:
        lines += [f"Judged at a looser tier after the run ({len(loosened)} "
                  f"case{'s' if len(loosened) > 1 else ''}: "
                  + ", ".join(f"{r['sharder']} W={r['world_size']} {r['family']}"
                              for r in loosened[:6]) + (", ..." if len(loosened) > 6 else "")
                  + f"); the first: {loosened[0]['tier_note']}.", ""]
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

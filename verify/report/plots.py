"""The plots of a campaign (matplotlib, optional: without it they are skipped)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from verify.report.frames import results_frame, steps_frame


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display), or None where matplotlib
    is not installed: every report's plots are skipped without it."""
    try:
        import matplotlib  # lazy: optional and heavy; only a report that plots needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: as matplotlib above
    except ImportError:
        return None
    return plt


# -- plots ------------------------------------------------------------------------------------

def _write_plots(results: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
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
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib is optional (see _pyplot)
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

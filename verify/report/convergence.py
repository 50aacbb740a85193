"""convergence.md/png/json: sharded vs unsharded loss curves on real text (verify/tools/converge.py)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from verify.report._format import _md, _num
from verify.report.plots import _pyplot


# -- convergence on real text (verify/tools/converge.py) --------------------------------------------

def write_convergence_report(data: dict, out_dir: str | Path) -> list[Path]:
    """Write convergence.json, convergence.png (when matplotlib is installed) and
    convergence.md from `verify.tools.converge.run_converge`'s record; return the paths."""
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
    plt = _pyplot()
    if plt is None or not runs:
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

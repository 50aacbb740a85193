"""`python -m verify plan`: the arguments (imported by verify/cli.py without torch, so `--help`
stays instant), the markdown table and the plot. The figures come from verify/plan/scale.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

__all__ = ["add_plan_arguments", "run_plan", "render_markdown"]

_DESCRIPTION = """\
Per-rank memory and per-step traffic of fsdp_core at any world size, before anyone rents a
cluster: the model is built on the meta device (no parameter memory) and sharded on paper with
fsdp_core's own layout code (alignment, padding to a multiple of W, units from the wrap policy).
FSDP2's per-parameter layout and DeepSpeed's ZeRO-3 estimate are shown beside it. The same
computation is checked against every measured harness case (verify.plan.units.plan_scenario)."""


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: true or false")


def _sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive integers")
    if not out or any(w < 1 for w in out):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive integers")
    return out


def _mesh(text: str) -> tuple[int, int]:
    r, sep, s = text.lower().partition("x")
    try:
        rs = (int(r), int(s))
    except ValueError:
        rs = (0, 0)
    if not sep or min(rs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: RxS, e.g. 128x8 (replicate x shard)")
    return rs


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.description = _DESCRIPTION
    p.add_argument("--model", required=True, metavar="NAME_OR_CONFIG",
                   help="gpt2, gpt2-xl, llama-7b, llama-13b, llama-70b; a HuggingFace config.json; "
                        "or a scenario family with keyword arguments, e.g. gpt:n_embd=768,n_layer=12")
    p.add_argument("--world-sizes", type=_sizes, default=None, metavar="W,W,...",
                   help="1-D world sizes (default: 8,64,512,1024 unless --mesh is given)")
    p.add_argument("--mesh", type=_mesh, action="append", default=[], metavar="RxS",
                   help="a 2-D HSDP mesh: replicate over R, shard over S (repeatable)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameter/compute dtype; master and reduce dtype stay fp32 (default: fp32)")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "sgd_momentum"), default="adamw")
    p.add_argument("--wrap", choices=("per_block", "root_only", "every_leaf"), default="per_block")
    p.add_argument("--reshard-after-forward", type=_bool, default=True, metavar="true|false")
    p.add_argument("--offload", action="store_true", help="shards, gradients and optimizer state in CPU memory")
    p.add_argument("--prefetch", type=_bool, default=True, metavar="true|false",
                   help="the next unit's all-gather in flight (default: true)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G")
    p.add_argument("--intra-bw", type=float, default=150.0, metavar="GB/s",
                   help="per-GPU bandwidth inside a node (default: 150 GB/s)")
    p.add_argument("--inter-bw", type=float, default=25.0, metavar="GB/s",
                   help="per-GPU bandwidth across nodes (default: 25 GB/s, a 200 Gb/s NIC per GPU)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write DIR/plan.md, DIR/plan.json and DIR/plan.png")


def _gib(n: float) -> str:
    if n == 0:
        return "0"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def _mesh_name(r) -> str:
    return f"{r.replicate}x{r.shard}" if r.replicate > 1 else f"{r.shard}"


def render_markdown(plan: dict, elapsed_s: float | None = None) -> str:
    o, rows = plan["options"], plan["rows"]
    hsdp = any(r.replicate > 1 for r in rows)
    lines = [
        f"# Scale plan: {plan['model']}",
        "",
        f"{plan['n_params']:,} parameters in {plan['n_units']} fsdp_core units ({o.wrap}; largest "
        f"unit {plan['largest_unit_params']:,} parameters). Param dtype {o.dtype}, fp32 master and "
        f"reduce; {o.optimizer}; reshard after forward {str(o.reshard_after_forward).lower()}; "
        f"prefetch {str(o.prefetch).lower()}; offload {str(o.offload).lower()}. Built on the meta device, "
        "sharded with fsdp_core._layout (the code the sharder runs).",
        "",
        "## Memory per rank",
        "",
        "State = parameters + gradients + optimizer state (fp32 shards, padding included). Peak "
        "unsharded = unsharded unit buffers alive at once (the root unit stays gathered through "
        "forward and backward; prefetch adds the next unit). Reduce = the largest unit's flat "
        "gradient + reduce-scatter output. GPU = state + peak unsharded + reduce (no activations). "
        "FSDP2: per-parameter dim-0 padding, ceil(d0/S) rows per rank. DeepSpeed: its "
        "`estimate_zero3_model_states_mem_needs` formula (18 bytes/param / W + 4 x largest layer). "
        "Unpadded: the ZeRO-3 model without padding or units.",
        "",
        "| W | mesh | params | grads | optimizer | state | CPU offloaded | largest unit | peak unsharded "
        "| reduce | GPU total | FSDP2 state | FSDP2 largest unit | DeepSpeed est. | unpadded state | padding |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = r.params + r.grads + r.optim
        lines.append(
            f"| {r.world_size} | {_mesh_name(r)} | {_gib(r.params)} | {_gib(r.grads)} | {_gib(r.optim)} | "
            f"{_gib(r.state)} | {_gib(r.offloaded)} | {_gib(r.largest_unit)} | {_gib(r.peak_unsharded)} | "
            f"{_gib(r.reduce_buffers)} | **{_gib(r.total)}** | {_gib(r.fsdp2_state)} | "
            f"{_gib(r.fsdp2_largest_unit)} | {_gib(r.deepspeed_gpu)} | {_gib(r.unpadded_state)} | "
            f"{ours - r.unpadded_state:,} B |")
    lines += [
        "",
        "## Collectives per step",
        "",
        f"One step, one micro-batch per rank; bytes as the harness records them (the unsharded side of a gather or "
        f"reduce-scatter, the buffer of an all-reduce). Time: ring estimate at {o.intra_gbps:g} GB/s "
        f"inside a node, {o.inter_gbps:g} GB/s across nodes, {o.gpus_per_node} GPUs per node.",
        "",
        "| W | mesh | collective | group | ranks | calls | bytes | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.collectives:
            lines.append(f"| {r.world_size} | {_mesh_name(r)} | none (one rank) | | | 0 | 0 | 0 |")
        for c in r.collectives:
            lines.append(f"| {r.world_size} | {_mesh_name(r)} | {c['kind']} | {c['group']} | {c['ranks']} | "
                         f"{c['calls']} | {c['bytes']:,} ({_gib(c['bytes'])}) | {c['time_s'] * 1e3:.1f} ms |")
    if hsdp:
        lines += ["", "Rows with a mesh RxS model fsdp_core's HSDP (DESIGN section 2: sharded over S, "
                  "replicated over R, a reduce-scatter in the shard group then an all-reduce of the "
                  "shard in the replicate group); they are not yet checked against a measured run."]
    if elapsed_s is not None:
        lines += ["", f"Planned in {elapsed_s:.2f} s."]
    return "\n".join(lines) + "\n"


def _plot(plan: dict, path: Path) -> None:
    import matplotlib  # lazy: heavy, and only --out draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after use("Agg")
    rows = plan["rows"]
    labels = [_mesh_name(r) for r in rows]
    x = range(len(rows))
    parts = [("parameters", [r.params if not r.offloaded else 0 for r in rows]),
             ("gradients", [r.grads if not r.offloaded else 0 for r in rows]),
             ("optimizer state", [r.optim if not r.offloaded else 0 for r in rows]),
             ("peak unsharded", [r.peak_unsharded for r in rows]),
             ("reduce buffers", [r.reduce_buffers for r in rows])]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for name, vals in parts:
        gib = [v / 2**30 for v in vals]
        ax.bar(x, gib, bottom=bottom, label=name)
        bottom = [b + g for b, g in zip(bottom, gib)]
    ax.plot(x, [(r.fsdp2_state + r.fsdp2_largest_unit) / 2**30 for r in rows], "k^--",
            label="FSDP2 state + largest unit")
    ax.plot(x, [r.deepspeed_gpu / 2**30 for r in rows], "rs:", label="DeepSpeed ZeRO-3 estimate")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("world size W (or mesh RxS)")
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{plan['model']}: bytes per rank by kind")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json(plan: dict) -> dict:
    rows = []
    for r in plan["rows"]:
        d = dataclasses.asdict(r)
        d.update(state=r.state, total=r.total, comm_time_s=r.comm_time_s)
        rows.append(d)
    return {**plan, "options": dataclasses.asdict(plan["options"]), "rows": rows}


def run_plan(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    # lazy: the planner imports torch, and verify/cli.py imports this module for `--help`
    from verify.plan.models import load_model
    from verify.plan.scale import PlanOptions, plan_scale  # lazy: torch, as above
    worlds = args.world_sizes if args.world_sizes is not None else ([] if args.mesh else [8, 64, 512, 1024])
    opts = PlanOptions(dtype=args.dtype, optimizer=args.optimizer, wrap=args.wrap,
                       reshard_after_forward=args.reshard_after_forward, offload=args.offload,
                       prefetch=args.prefetch, gpus_per_node=args.gpus_per_node,
                       intra_gbps=args.intra_bw, inter_gbps=args.inter_bw)
    try:
        pm = load_model(args.model)
        plan = plan_scale(pm, worlds, args.mesh, opts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render_markdown(plan, time.perf_counter() - t0)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.md").write_text(text)
        (args.out / "plan.json").write_text(json.dumps(_json(plan), indent=1))
        _plot(plan, args.out / "plan.png")
        print(f"wrote {args.out / 'plan.md'}, plan.json, plan.png")
    return 0

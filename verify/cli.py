"""`python -m verify`: run a campaign, replay one case, re-render a report, run the planted
bugs (`mutants`).

This module parses and validates arguments only; the work is done by `verify.campaign.run`
(imported when a command needs it, so `--help` stays instant) and `verify.report`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Built-in sharders (verify/sharders/; "all" is every one of them, side by side); any other is
# named by import path, pkg.module:Name.
SHARDERS = ("fsdp_core", "torch_fsdp2", "fsdp2", "ddp", "all")
MODES = {"fast": ("fast",), "deterministic": ("deterministic",),
         "both": ("fast", "deterministic")}
PROFILES = ("dev", "ci", "nightly")
DTYPES = {"fp32": ("fp32",), "bf16": ("bf16",), "both": ("fp32", "bf16")}
OFFLOADS = {"no": (False,), "yes": (True,), "both": (False, True)}
MAX_WORLD_SIZE = 8   # a rank pool's default; VERIFY_MAX_WORLD_SIZE raises it (e.g. 16)


def max_world_size() -> int:
    """The largest world size a run may ask for: VERIFY_MAX_WORLD_SIZE (default 8) for the rank
    pool; under torchrun, the launched world size (any power of two: 16, 32, ...)."""
    from verify.ranks.torchrun import is_torchrun
    if is_torchrun():
        return int(os.environ["WORLD_SIZE"])
    try:
        return max(1, int(os.environ.get("VERIFY_MAX_WORLD_SIZE") or MAX_WORLD_SIZE))
    except ValueError:
        return MAX_WORLD_SIZE

# `run --preset NAME`: the flags a preset stands for. They go in front of the command line's
# own, so a flag given with the preset overrides the preset's value of it.
PRESETS = {
    # The FSDP2 integration guide's recipe end to end: HF models wrapped per _no_split_modules,
    # MixedPrecisionPolicy(bf16, fp32), CPUOffloadPolicy, DCP checkpoints (get_state_dict /
    # set_state_dict, dcp.save / dcp.load) resumed at another world size, W = 1, 2, 4, 8.
    "fsdp2-integration": ["--sharder", "torch_fsdp2", "--families", "hf_gpt2,hf_llama",
                          "--mode", "fast", "--dtype", "bf16", "--offload", "yes",
                          "--world-sizes", "1,2,4,8", "--examples", "2", "--resume-cases", "6",
                          "--seed", "1", "--profile", "dev",
                          "--out", "reports/fsdp2-integration"],
}

_EXIT_CODES = """\
exit codes:
  0  every verdict passed (report: the saved results all passed)
  1  some verdict failed or a case errored; each failure prints a replay command
  2  usage error (bad arguments, unreadable input)
"""


def _world_sizes(text: str) -> list[int]:
    top = max_world_size()
    allowed = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            w = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not an integer; give a comma-separated list such as 1,2,4,8")
        if w not in allowed:
            raise argparse.ArgumentTypeError(
                f"world size {w} is not supported; allowed: {', '.join(map(str, allowed))} "
                f"(more with VERIFY_MAX_WORLD_SIZE, or under torchrun with more processes)")
        if w not in sizes:
            sizes.append(w)
    return sorted(sizes)


def _sharders(text: str) -> list[str]:
    """Built-in names and import paths, checked for syntax here; importing them is
    `_load_sharders`' job (after parsing, so a bad path exits 2 with its own message)."""
    from verify.sharders import SharderSpecError, resolve
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no sharder in {text!r}")
    try:
        return list(dict.fromkeys(n if n == "all" else resolve(n) for n in names))
    except SharderSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _sharder(text: str) -> str:
    names = _sharders(text)
    if len(names) != 1 or names[0] == "all":
        raise argparse.ArgumentTypeError(f"{text!r}: give one sharder")
    return names[0]


def _load_sharders(specs: Sequence[str]) -> list[str]:
    """Import every named adapter now, in this process, before any rank starts: a path that
    does not import or an object that is not a verify.Sharder is a usage error (exit 2)."""
    from verify.sharders import SharderSpecError, expand, load_class
    try:
        specs = expand(specs)
        for spec in specs:
            load_class(spec)
    except SharderSpecError as exc:
        raise _Usage(str(exc))
    return specs


def _families(text: str) -> list[str]:
    from verify.scenarios import FAMILIES, family_module, is_family_path
    names = list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in names if f not in FAMILIES and not is_family_path(f)]
    if bad or not names:
        hint = ("; the hf_* families need transformers: pip install -e '.[hf]'"
                if any(f.startswith("hf_") for f in bad) else "")
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(bad) or repr(text)}; choose from "
            f"{', '.join(FAMILIES)} or name a module with the family interface by import path "
            f"(pkg.module or pkg.module:obj) (comma-separated for several){hint}")
    for name in names:
        if is_family_path(name):
            try:
                family_module(name)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc))
    return names


def _int_from(text: str, least: int, message: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if n < least:
        raise argparse.ArgumentTypeError(f"{message}, got {n}")
    return n


def _positive_int(text: str) -> int:
    return _int_from(text, 1, "must be at least 1")


def _count(text: str) -> int:
    return _int_from(text, 0, "must be >= 0")


def _world_size(text: str) -> int:
    sizes = _world_sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one world size")
    return sizes[0]


_seed = _count  # a seed is any count: an int >= 0


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return s


def _budget(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not (0 <= s < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return s


def _plant(text: str) -> str:
    from verify.tools.plants import PLANTS
    if text not in PLANTS:
        raise argparse.ArgumentTypeError(
            f"unknown planted bug {text!r}; choose from {', '.join(PLANTS)} "
            "(see docs/planted_bugs.md)")
    return text


def _plants(text: str) -> list[str]:
    return list(dict.fromkeys(_plant(n.strip()) for n in text.split(",") if n.strip()))


def _scenario_json(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc}); pass the scenario exactly as the replay line prints it, "
            "in single quotes")
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("the scenario must be a JSON object")
    return text


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m verify", formatter_class=fmt, epilog=_EXIT_CODES,
        description="Prove that a sharded run trains exactly like the unsharded one: draw "
                    "cases, run them on 1/2/4/8 ranks and a reference, compare step by step.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", formatter_class=fmt, epilog=_EXIT_CODES,
        help="draw scenarios, run them at each world size, write tables",
        description="Draw N scenarios per world size and mode, run each through the sharder "
                    "and its reference, and write OUT/equivalence.md, OUT/results.csv and "
                    "OUT/results.json (plus plots).")
    run.add_argument("--world-sizes", type=_world_sizes, default=[1, 2, 4, 8], metavar="LIST",
                     help="comma-separated world sizes, powers of two up to VERIFY_MAX_WORLD_SIZE "
                          f"(default {MAX_WORLD_SIZE}) or, under torchrun, the launched world "
                          "(default: 1,2,4,8)")
    run.add_argument("--examples", type=_positive_int, default=6, metavar="N",
                     help="scenarios drawn per world size and mode (default: 6)")
    run.add_argument("--seed", type=_seed, default=0, metavar="S",
                     help="seed for drawing scenarios; the same seed draws the same cases "
                          "(default: 0)")
    run.add_argument("--sharder", type=_sharders, default=["fsdp_core"], metavar="NAME",
                     help=f"sharder(s) under test, comma-separated: {', '.join(SHARDERS)} "
                          "or pkg.module:Name, an adapter of yours (a verify.Sharder subclass; "
                          "fsdp2 = torch_fsdp2; all = every built-in; several run the same "
                          "cases, side by side in OUT/peers.md; default: fsdp_core)")
    run.add_argument("--families", type=_families, default=None, metavar="LIST",
                     help="model families to draw, comma-separated (default: the core ones: "
                          "mlp, gpt, cs336, convnet, special; hf_gpt2 and hf_llama when "
                          "transformers is installed and they are named here; or pkg.module, "
                          "a module of yours with the family interface)")
    run.add_argument("--mode", choices=sorted(MODES), default="both",
                     help="numerics mode(s) to run (default: both)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="both",
                     help="dtype policy of the drawn cases: fp32, bf16 (bf16 compute, fp32 "
                          "reduce and master) or both (default: both)")
    run.add_argument("--mesh", choices=("1d", "2d", "both"), default="1d",
                     help="process meshes of the drawn cases: 1d (default), 2d (HSDP: "
                          "replicate x shard meshes (R, S) with R * S = W, for sharders that "
                          "declare hsdp) or both")
    run.add_argument("--profile", choices=PROFILES, default=None,
                     help="Hypothesis settings profile for drawing (default: the campaign's)")
    run.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                     help="directory for the tables, data and plots (default: reports)")
    run.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                     help="seconds a case may run before its ranks are killed and it is "
                          "reported as an error (default: from the case's size, max(30, 20 x "
                          "its reference's time + 10), at most 120)")
    run.add_argument("--shrink-budget", type=_budget, default=None, metavar="SECONDS",
                     help="seconds, for the whole campaign, to diagnose failing cases: replay "
                          "each failure signature once (flaky?), shrink it to a minimal failing "
                          "scenario, locate its first divergence (default: 300; 0: off)")
    run.add_argument("--resume-cases", type=_count, default=0, metavar="N",
                     help="also draw N checkpoint-resume cases (train at one world size, save, "
                          "load at another, finish), run after the others (default: 0)")
    run.add_argument("--offload", choices=sorted(OFFLOADS), default="no",
                     help="draw CPU-offload cases (WrapPlan.offload: shards and optimizer state "
                          "on the CPU) for sharders that declare offload = True: no, yes (every "
                          "case) or both (drawn; changes which cases a seed draws) (default: no)")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="a named campaign; flags given with it override its values. "
                          "fsdp2-integration: "
                          + " ".join(PRESETS["fsdp2-integration"]).replace("%", "%%"))
    run.add_argument("--soak", action="store_true",
                     help="leak check: exit 1 when the largest rank RSS grew by more than "
                          "10%% from case 50 to the end (RSS is recorded in every run)")
    # For demos and harness tests only, hence hidden: plant a named bug in every case.
    run.add_argument("--plant", type=_plant, default=None, help=argparse.SUPPRESS)

    replay = sub.add_parser(
        "replay", formatter_class=fmt, epilog=_EXIT_CODES,
        help="rerun one case from its scenario JSON",
        description="Rerun exactly one case, as printed by a failing run: "
                    "python -m verify replay '<scenario json>'")
    replay.add_argument("scenario", type=_scenario_json, metavar="SCENARIO_JSON",
                        help="the scenario as a JSON object (quote it for the shell)")
    replay.add_argument("--timeout", type=_seconds, default=120.0, metavar="S",
                        help="seconds before the case's ranks are killed (default: 120)")
    replay.add_argument("--sharder", type=_sharder, default="fsdp_core", metavar="NAME",
                        help="the sharder to run it through: a built-in name or pkg.module:Name "
                             "(default: fsdp_core)")
    replay.add_argument("--plant", type=_plant, default=None, help=argparse.SUPPRESS)
    replay.add_argument("--resume-from", type=_world_size, default=None, metavar="W_A",
                        help="a checkpoint-resume case: train at W_A, save, load at the "
                             "scenario's world size and finish (with --save-after)")
    replay.add_argument("--save-after", type=_positive_int, default=None, metavar="S",
                        help="steps trained at W_A before the checkpoint")

    mutants = sub.add_parser(
        "mutants", formatter_class=fmt, epilog=_EXIT_CODES,
        help="prove the harness can fail: run every planted bug, print caught/total",
        description="Plant each named bug of verify/tools/plants/ (docs/planted_bugs.md) in the "
                    "ranks, run it on its fixed scenarios, and print per bug whether the "
                    "harness caught it and by which check, then `caught N/N`. Exits 1 if a "
                    "bug is missed or a clean run fails. One bug can be demonstrated on any "
                    "case with `run --plant NAME` or `replay --plant NAME`.")
    mutants.add_argument("--only", type=_plants, default=None, metavar="NAMES",
                         help="comma-separated plant names (default: every bug)")
    mutants.add_argument("--blind", action="store_true",
                         help="also run the scenarios each bug is invisible to by design, "
                              "and report what they saw")
    mutants.add_argument("--faults", action="store_true",
                         help="also run the rank faults (raise, exit, hang on rank 1); each "
                              "must become one 'error' case")
    mutants.add_argument("--timeout", type=_seconds, default=60.0, metavar="S",
                         help="seconds a case may run (default: 60)")

    bench = sub.add_parser(
        "bench", formatter_class=fmt, epilog=_EXIT_CODES,
        help="time fsdp_core against FSDP2 on a GPT, measure memory and traffic",
        description="In one run, at each world size: fsdp_core (fast, fast without prefetch, "
                    "deterministic) and FSDP2 train the same GPT on the same data, interleaved "
                    "step by step; prints ours/FSDP2, without/with prefetch and "
                    "deterministic/fast step-time ratios (medians after warm-up), state memory "
                    "against FSDP2 and the ZeRO-3 model, unsharded and peak step memory, "
                    "collectives against the formula, and the harness's cost per case through "
                    "the pool vs spawning fresh ranks per case. "
                    "Writes OUT/performance.md and OUT/performance.png.")
    bench.add_argument("--world-sizes", type=_world_sizes, default=[1, 2, 4, 8], metavar="LIST",
                       help="comma-separated world sizes (default: 1,2,4,8)")
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps (default: 10)")
    bench.add_argument("--warmup", type=_positive_int, default=2, help="warm-up steps (default: 2)")
    bench.add_argument("--width", type=_positive_int, default=256, help="model width (default: 256)")
    bench.add_argument("--layers", type=_positive_int, default=6, help="blocks (default: 6)")
    bench.add_argument("--vocab", type=_positive_int, default=1024, help="vocabulary (default: 1024)")
    bench.add_argument("--seq", type=_positive_int, default=64, help="sequence length (default: 64)")
    bench.add_argument("--batch", type=_positive_int, default=8, help="sequences per rank (default: 8)")
    bench.add_argument("--harness-cases", type=_positive_int, default=20, metavar="N",
                       help="drawn cases timed through the pool (default: 20)")
    bench.add_argument("--spawn-cases", type=_positive_int, default=None, metavar="N",
                       help="of those, cases also run on freshly spawned ranks, ~8 s each "
                            "(default: all of them)")
    bench.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                       help="directory for performance.md/png (default: reports)")
    bench.add_argument("--timeout", type=_seconds, default=600.0, metavar="S",
                       help="seconds one world size may take (default: 600)")
    bench.add_argument("--sharder", type=_sharders, default=[], metavar="NAME",
                       help="more sharders to time against FSDP2 at each world size, "
                            "comma-separated built-in names or pkg.module:Name")

    converge = sub.add_parser(
        "converge", formatter_class=fmt, epilog=_EXIT_CODES,
        help="sharded vs unsharded loss curves on real text (Python's stdlib sources)",
        description="Train a small GPT on the bytes of Python's standard-library sources "
                    "(byte-level, vocabulary 256), sharded by fsdp_core at W ranks and "
                    "unsharded, in each mode, for the same steps on the same batches; write "
                    "OUT/convergence.md (final and held-out losses), OUT/convergence.png (the "
                    "curves) and OUT/convergence.json. Exits 1 if deterministic mode's curves "
                    "are not bitwise equal.")
    converge.add_argument("--world-size", type=_world_size, default=4, metavar="W",
                          help="ranks of the sharded run (default: 4)")
    converge.add_argument("--steps", type=_positive_int, default=200,
                          help="training steps (default: 200)")
    converge.add_argument("--mode", choices=sorted(MODES), default="both",
                          help="numerics mode(s) (default: both)")
    converge.add_argument("--width", type=_positive_int, default=64, help="model width (default: 64)")
    converge.add_argument("--layers", type=_positive_int, default=2, help="blocks (default: 2)")
    converge.add_argument("--seq", type=_positive_int, default=32,
                          help="context length in bytes (default: 32)")
    converge.add_argument("--micro-batches", type=_positive_int, default=8, metavar="M",
                          help="micro-batches per step, a power of two >= W (default: 8)")
    converge.add_argument("--batch", type=_positive_int, default=2,
                          help="sequences per micro-batch (default: 2)")
    converge.add_argument("--lr", type=_positive_float, default=3e-3,
                          help="AdamW lr (default: 3e-3)")
    converge.add_argument("--seed", type=_seed, default=0, help="seed (default: 0)")
    converge.add_argument("--corpus-bytes", type=_positive_int, default=2_000_000, metavar="N",
                          help="bytes of the corpus to use (default: 2000000)")
    converge.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                          help="directory for convergence.md/png/json (default: reports)")
    converge.add_argument("--timeout", type=_seconds, default=1800.0, metavar="S",
                          help="seconds the sharded run of one mode may take (default: 1800)")

    report = sub.add_parser(
        "report", formatter_class=fmt, epilog=_EXIT_CODES,
        help="re-render the tables and plots from DIR/results.json",
        description="Re-render DIR/equivalence.md, DIR/results.csv and the plots from "
                    "DIR/results.json, without running anything.")
    report.add_argument("dir", type=Path, metavar="DIR",
                        help="a directory written by `run` (holds results.json)")
    report.add_argument("--title", default=None, help="title for the markdown (default: saved)")

    from verify.plan.cli import add_plan_arguments  # torch-free: --help stays instant
    add_plan_arguments(sub.add_parser(
        "plan", formatter_class=fmt, help="per-rank memory and per-step traffic at scale, without running"))
    return parser


def _exit_code(outcome: Any) -> int:
    """What a campaign returns, as an exit code: an int is one; a bool or a list of results
    (objects with .passed or dicts with "passed") says whether everything passed."""
    if isinstance(outcome, bool):
        return EXIT_OK if outcome else EXIT_FAILED
    if isinstance(outcome, int):
        return outcome
    if isinstance(outcome, (list, tuple)):
        passed = [r["passed"] if isinstance(r, dict) else r.passed for r in outcome]
        return EXIT_OK if all(passed) else EXIT_FAILED
    raise TypeError(f"unexpected campaign outcome {type(outcome).__name__}")


def _campaign() -> Any:
    try:
        campaign = importlib.import_module("verify.campaign.run")
    except ModuleNotFoundError as exc:
        if exc.name != "verify.campaign.run":
            raise
        sys.exit("python -m verify: verify.campaign.run is not available in this checkout")
    return campaign


def _planted(args: argparse.Namespace) -> dict:
    return {} if args.plant is None else {"plant": args.plant}


def _cmd_run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise _Usage(f"--out {args.out} exists and is not a directory")
    extra = {"resume_cases": args.resume_cases} if args.resume_cases else {}
    if args.soak:  # round-robin over world sizes; oneDNN's kernel caches capped (verify/tools/soak.py)
        from verify.tools.soak import apply_soak_env
        apply_soak_env()
        extra["interleave"] = True
    if args.families is not None:
        extra["families"] = args.families
    if args.offload != "no":
        extra["offloads"] = OFFLOADS[args.offload]
    if args.mesh != "1d":
        extra["meshes"] = args.mesh
    if args.shrink_budget is not None:
        extra["shrink_budget_s"] = args.shrink_budget
    sharders = _load_sharders(args.sharder)
    code = _exit_code(_campaign().run_campaign(
        world_sizes=args.world_sizes, examples=args.examples, seed=args.seed,
        sharders=sharders, modes=MODES[args.mode], profile=args.profile,
        out_dir=args.out, timeout_s=args.timeout, **_dtypes(args), **_planted(args), **extra))
    if args.soak:
        from verify.tools.soak import check
        held, line = check(args.out / "results.json")
        print(line)
        code = code if held else EXIT_FAILED
    return code


def _dtypes(args: argparse.Namespace) -> dict:
    return {} if args.dtype == "both" else {"dtypes": DTYPES[args.dtype]}


def _cmd_bench(args: argparse.Namespace) -> int:
    from verify.tools.bench import run_bench
    run_bench(world_sizes=args.world_sizes, steps=args.steps, warmup=args.warmup, width=args.width,
              layers=args.layers, vocab=args.vocab, seq=args.seq, batch=args.batch,
              out_dir=args.out, harness_cases=args.harness_cases, spawn_cases=args.spawn_cases,
              timeout_s=args.timeout, sharders=_load_sharders(args.sharder) if args.sharder else ())
    return EXIT_OK


def _cmd_converge(args: argparse.Namespace) -> int:
    w = args.world_size
    m = args.micro_batches
    if m & (m - 1) or m < w:
        raise _Usage(f"--micro-batches {m} must be a power of two >= the world size {w}")
    if args.out.exists() and not args.out.is_dir():
        raise _Usage(f"--out {args.out} exists and is not a directory")
    from verify.tools.converge import run_converge
    paths = run_converge(world_size=w, steps=args.steps, width=args.width, layers=args.layers,
                         seq=args.seq, micro_batches=m, micro_batch_size=args.batch, lr=args.lr,
                         seed=args.seed, corpus_bytes=args.corpus_bytes, modes=MODES[args.mode],
                         out_dir=args.out, timeout_s=args.timeout)
    for p in paths:
        print(p)
    runs = json.loads((args.out / "convergence.json").read_text())["runs"]
    det_ok = all(r["bitwise_steps"] == len(r["sharded"]) and r["final_params_bitwise"]
                 for r in runs if r["mode"] == "deterministic")
    if not det_ok:
        print("deterministic mode: the sharded curve is NOT bitwise equal to the unsharded one",
              file=sys.stderr)
    return EXIT_OK if det_ok else EXIT_FAILED


def _cmd_replay(args: argparse.Namespace) -> int:
    from verify.scenarios import Scenario
    if (args.resume_from is None) != (args.save_after is None):
        raise _Usage("--resume-from and --save-after go together (a checkpoint-resume case)")
    try:
        Scenario.from_json(args.scenario)
    except (ValueError, TypeError) as exc:
        raise _Usage(f"invalid scenario: {exc}")
    sharder = _load_sharders([args.sharder])[0]
    if args.resume_from is not None:
        if args.plant is not None:
            raise _Usage("--resume-from replays a checkpoint-resume case, without --plant")
        from verify.campaign.resume import ResumeCase, replay_resume
        from verify.sharders import has_checkpointing, load
        if not has_checkpointing(load(sharder)):
            raise _Usage(f"--resume-from: the sharder {sharder} has no save/load")
        try:
            ResumeCase(Scenario.from_json(args.scenario), args.resume_from, args.save_after)
        except (ValueError, TypeError) as exc:
            raise _Usage(f"not a checkpoint-resume case: {exc}")
        return replay_resume(args.scenario, args.resume_from, args.save_after,
                             timeout_s=args.timeout, sharder=sharder)
    return _exit_code(_campaign().replay(args.scenario, timeout_s=args.timeout,
                                         sharder=sharder, **_planted(args)))


def _cmd_plan(args: argparse.Namespace) -> int:
    from verify.plan.cli import run_plan
    return run_plan(args)


def _cmd_mutants(args: argparse.Namespace) -> int:
    from verify.tools.mutants import main as mutants_main
    return mutants_main(args.only, blind=args.blind, faults=args.faults,
                        timeout_s=args.timeout)


def _cmd_report(args: argparse.Namespace) -> int:
    from verify.report import load_results, write_reports
    path = args.dir / "results.json"
    if not path.is_file():
        raise _Usage(f"{path} not found; pass a directory written by `python -m verify run`")
    try:
        title, results = load_results(path)
    except (ValueError, KeyError) as exc:
        raise _Usage(f"{path} is not a results file: {exc}")
    from verify.tools.soak import load_pool_memory
    for p in write_reports(results, args.dir, title=args.title or title,
                           pool_memory=load_pool_memory(path)):
        print(p)
    from verify.results import PASSING
    passed = all(r.get("passed", r.get("verdict") in PASSING) for r in results)
    return EXIT_OK if passed else EXIT_FAILED


class _Usage(Exception):
    pass


def expand_preset(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` (a `run` command line with ``--preset name``) with the preset's flags inserted
    right after ``run``: argparse keeps the last value of a flag, so the command line's own
    flags override the preset's. Prints the command it stands for."""
    argv = list(argv)
    at = argv.index("run") + 1
    flags = PRESETS[name]
    given = argv[at:]
    own = _without_preset(given)
    print(f"preset {name}: python -m verify run {' '.join(flags)}"
          + (f" (overridden by: {' '.join(own)})" if own else ""),
          flush=True)
    return argv[:at] + flags + given


def _without_preset(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--preset":
            skip = True
        elif not a.startswith("--preset="):
            out.append(a)
    return out


_COMMANDS = {"run": _cmd_run, "replay": _cmd_replay, "report": _cmd_report,
             "mutants": _cmd_mutants, "converge": _cmd_converge, "bench": _cmd_bench,
             "plan": _cmd_plan}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)      # exits with 2 and a message on bad arguments
    if args.command == "run" and args.preset is not None:
        args = parser.parse_args(expand_preset(sys.argv[1:] if argv is None else list(argv),
                                               args.preset))
    try:
        return _COMMANDS[args.command](args)
    except _Usage as exc:
        parser.error(str(exc))          # exits 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""`python -m verify mutants | bench | converge`: their arguments (torch-free, so `--help` stays
instant) and the commands, which hand the work to verify/tools/mutants.py, bench.py and
converge.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verify._args import (EXIT_FAILED, EXIT_OK, MODES, UsageError, check_out_dir, load_sharders,
                          plants, positive_float, positive_int, seconds, seed, sharders,
                          world_size, world_sizes)

__all__ = ["add_mutants_arguments", "add_bench_arguments", "add_converge_arguments",
           "cmd_mutants", "cmd_bench", "cmd_converge"]


def add_mutants_arguments(mutants: argparse.ArgumentParser) -> None:
    mutants.description = (
        "Plant each named bug of verify/tools/plants/ (docs/planted_bugs.md) in the "
        "ranks, run it on its fixed scenarios, and print per bug whether the "
        "harness caught it and by which check, then `caught N/N`. Exits 1 if a "
        "bug is missed or a clean run fails. One bug can be demonstrated on any "
        "case with `run --plant NAME` or `replay --plant NAME`.")
    mutants.add_argument("--only", type=plants, default=None, metavar="NAMES",
                         help="comma-separated plant names (default: every bug)")
    mutants.add_argument("--blind", action="store_true",
                         help="also run the scenarios each bug is invisible to by design, "
                              "and report what they saw")
    mutants.add_argument("--faults", action="store_true",
                         help="also run the rank faults (raise, exit, hang on rank 1); each "
                              "must become one 'error' case")
    mutants.add_argument("--timeout", type=seconds, default=60.0, metavar="S",
                         help="seconds a case may run (default: 60)")


def _positive_ints(p: argparse.ArgumentParser, **options: tuple[int, str]) -> None:
    """A positive-int option per keyword, ``name=(default, what)``: ``--name`` (underscores
    become dashes), its help "what (default: N)"."""
    for name, (default, what) in options.items():
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=default,
                       help=f"{what} (default: {default})")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.description = (
        "In one run, at each world size: fsdp_core (fast, fast without prefetch, "
        "deterministic) and FSDP2 train the same GPT on the same data, interleaved "
        "step by step; prints ours/FSDP2, without/with prefetch and "
        "deterministic/fast step-time ratios (medians after warm-up), state memory "
        "against FSDP2 and the ZeRO-3 model, unsharded and peak step memory, "
        "collectives against the formula, and the harness's cost per case through "
        "the pool vs spawning fresh ranks per case. "
        "Writes OUT/performance.md and OUT/performance.png.")
    bench.add_argument("--world-sizes", type=world_sizes, default=[1, 2, 4, 8], metavar="LIST",
                       help="comma-separated world sizes (default: 1,2,4,8)")
    _positive_ints(bench, steps=(10, "timed steps"), warmup=(2, "warm-up steps"),
                   width=(256, "model width"), layers=(6, "blocks"), vocab=(1024, "vocabulary"),
                   seq=(64, "sequence length"), batch=(8, "sequences per rank"))
    bench.add_argument("--harness-cases", type=positive_int, default=20, metavar="N",
                       help="drawn cases timed through the pool (default: 20)")
    bench.add_argument("--spawn-cases", type=positive_int, default=None, metavar="N",
                       help="of those, cases also run on freshly spawned ranks, ~8 s each "
                            "(default: all of them)")
    bench.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                       help="directory for performance.md/png (default: reports)")
    bench.add_argument("--timeout", type=seconds, default=600.0, metavar="S",
                       help="seconds one world size may take (default: 600)")
    bench.add_argument("--sharder", type=sharders, default=[], metavar="NAME",
                       help="more sharders to time against FSDP2 at each world size, "
                            "comma-separated built-in names or pkg.module:Name")


def add_converge_arguments(converge: argparse.ArgumentParser) -> None:
    converge.description = (
        "Train a small GPT on the bytes of Python's standard-library sources "
        "(byte-level, vocabulary 256), sharded by fsdp_core at W ranks and "
        "unsharded, in each mode, for the same steps on the same batches; write "
        "OUT/convergence.md (final and held-out losses), OUT/convergence.png (the "
        "curves) and OUT/convergence.json. Exits 1 if deterministic mode's curves "
        "are not bitwise equal.")
    converge.add_argument("--world-size", type=world_size, default=4, metavar="W",
                          help="ranks of the sharded run (default: 4)")
    converge.add_argument("--steps", type=positive_int, default=200,
                          help="training steps (default: 200)")
    converge.add_argument("--mode", choices=sorted(MODES), default="both",
                          help="numerics mode(s) (default: both)")
    _positive_ints(converge, width=(64, "model width"), layers=(2, "blocks"),
                   seq=(32, "context length in bytes"))
    converge.add_argument("--micro-batches", type=positive_int, default=8, metavar="M",
                          help="micro-batches per step, a power of two >= W (default: 8)")
    converge.add_argument("--batch", type=positive_int, default=2,
                          help="sequences per micro-batch (default: 2)")
    converge.add_argument("--lr", type=positive_float, default=3e-3,
                          help="AdamW lr (default: 3e-3)")
    converge.add_argument("--seed", type=seed, default=0, help="seed (default: 0)")
    converge.add_argument("--corpus-bytes", type=positive_int, default=2_000_000, metavar="N",
                          help="bytes of the corpus to use (default: 2000000)")
    converge.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                          help="directory for convergence.md/png/json (default: reports)")
    converge.add_argument("--timeout", type=seconds, default=1800.0, metavar="S",
                          help="seconds the sharded run of one mode may take (default: 1800)")


def cmd_mutants(args: argparse.Namespace) -> int:
    from verify.tools.mutants import main as mutants_main  # lazy: imports torch
    return mutants_main(args.only, blind=args.blind, faults=args.faults,
                        timeout_s=args.timeout)


def cmd_bench(args: argparse.Namespace) -> int:
    from verify.tools.bench import run_bench  # lazy: imports torch
    run_bench(world_sizes=args.world_sizes, steps=args.steps, warmup=args.warmup, width=args.width,
              layers=args.layers, vocab=args.vocab, seq=args.seq, batch=args.batch,
              out_dir=args.out, harness_cases=args.harness_cases, spawn_cases=args.spawn_cases,
              timeout_s=args.timeout, sharders=load_sharders(args.sharder) if args.sharder else ())
    return EXIT_OK


def cmd_converge(args: argparse.Namespace) -> int:
    w = args.world_size
    m = args.micro_batches
    if m & (m - 1) or m < w:
        raise UsageError(f"--micro-batches {m} must be a power of two >= the world size {w}")
    check_out_dir(args.out)
    from verify.tools.converge import run_converge  # lazy: imports torch
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

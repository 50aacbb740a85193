"""`python -m verify run | replay | report`: their arguments (torch-free, so `--help` stays instant),
the `--preset` campaigns, and the commands, which hand the work to verify.campaign.run,
verify.campaign.resume and verify.report."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

from verify._args import (EXIT_FAILED, EXIT_OK, MAX_WORLD_SIZE, MODES, UsageError, budget,
                          check_out_dir, count, families, load_sharders, plant, positive_int,
                          scenario_json, seconds, seed, sharder, sharders, world_size, world_sizes)
from verify.results import PASSING
from verify.sharders import ALIASES, BUILTINS, has_checkpointing, load
from verify.tools import soak

__all__ = ["add_run_arguments", "add_replay_arguments", "add_report_arguments",
           "cmd_run", "cmd_replay", "cmd_report", "expand_preset", "PRESETS"]

# Built-in sharders (verify/sharders/; "all" is every one of them, side by side); any other is
# named by import path, pkg.module:Name.
SHARDERS = (*BUILTINS, *ALIASES, "all")
PROFILES = ("dev", "ci", "nightly")
DTYPES = {"fp32": ("fp32",), "bf16": ("bf16",), "both": ("fp32", "bf16")}
OFFLOADS = {"no": (False,), "yes": (True,), "both": (False, True)}

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


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.description = ("Draw N scenarios per world size and mode, run each through the sharder "
                       "and its reference, and write OUT/equivalence.md, OUT/results.csv and "
                       "OUT/results.json (plus plots).")
    run.add_argument("--world-sizes", type=world_sizes, default=[1, 2, 4, 8], metavar="LIST",
                     help="comma-separated world sizes, powers of two up to VERIFY_MAX_WORLD_SIZE "
                          f"(default {MAX_WORLD_SIZE}) or, under torchrun, the launched world "
                          "(default: 1,2,4,8)")
    run.add_argument("--examples", type=positive_int, default=6, metavar="N",
                     help="scenarios drawn per world size and mode (default: 6)")
    run.add_argument("--seed", type=seed, default=0, metavar="S",
                     help="seed for drawing scenarios; the same seed draws the same cases "
                          "(default: 0)")
    run.add_argument("--sharder", type=sharders, default=["fsdp_core"], metavar="NAME",
                     help=f"sharder(s) under test, comma-separated: {', '.join(SHARDERS)} "
                          "or pkg.module:Name, an adapter of yours (a verify.Sharder subclass; "
                          "fsdp2 = torch_fsdp2; all = every built-in; several run the same "
                          "cases, side by side in OUT/peers.md; default: fsdp_core)")
    run.add_argument("--families", type=families, default=None, metavar="LIST",
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
    run.add_argument("--timeout", type=seconds, default=None, metavar="S",
                     help="seconds a case may run before its ranks are killed and it is "
                          "reported as an error (default: from the case's size, max(30, 20 x "
                          "its reference's time + 10), at most 120)")
    run.add_argument("--shrink-budget", type=budget, default=None, metavar="SECONDS",
                     help="seconds, for the whole campaign, to diagnose failing cases: replay "
                          "each failure signature once (flaky?), shrink it to a minimal failing "
                          "scenario, locate its first divergence (default: 300; 0: off)")
    run.add_argument("--resume-cases", type=count, default=0, metavar="N",
                     help="also draw N checkpoint-resume cases (train at one world size, save, "
                          "load at another, finish), run after the others, for each sharder whose "
                          "adapter has save() and load(); none with a planted bug (default: 0)")
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
    run.add_argument("--plant", type=plant, default=None, help=argparse.SUPPRESS)


def add_replay_arguments(replay: argparse.ArgumentParser) -> None:
    replay.description = ("Rerun exactly one case, as printed by a failing run: "
                          "python -m verify replay '<scenario json>'")
    replay.add_argument("scenario", type=scenario_json, metavar="SCENARIO_JSON",
                        help="the scenario as a JSON object (quote it for the shell)")
    replay.add_argument("--timeout", type=seconds, default=None, metavar="S",
                        help="seconds before the case's ranks are killed (default: as `run`'s, "
                             "from the case's size; 120 for a checkpoint-resume case)")
    replay.add_argument("--sharder", type=sharder, default="fsdp_core", metavar="NAME",
                        help="the sharder to run it through: a built-in name or pkg.module:Name "
                             "(default: fsdp_core)")
    replay.add_argument("--plant", type=plant, default=None, help=argparse.SUPPRESS)
    replay.add_argument("--ranks", type=world_size, default=None, metavar="N",
                        help="run the case on ranks 0..W-1 of a pool of N ranks, as the campaign "
                             "did (a sharder that uses a group it was not given hangs only then; "
                             "a failing case's replay line carries it)")
    replay.add_argument("--no-locate", dest="locate", action="store_false",
                        help="do not locate a failing case's first divergence (the step, phase "
                             "and unit where it first differs; one more run of the case)")
    replay.add_argument("--resume-from", type=world_size, default=None, metavar="W_A",
                        help="a checkpoint-resume case: train at W_A, save, load at the "
                             "scenario's world size and finish (with --save-after)")
    replay.add_argument("--save-after", type=positive_int, default=None, metavar="S",
                        help="steps trained at W_A before the checkpoint")
    replay.add_argument("--resume-again-after", type=positive_int, default=None, metavar="S2",
                        help="a double resume: the loaded run trains to S2, saves again and a "
                             "third run loads that and finishes")


def add_report_arguments(report: argparse.ArgumentParser) -> None:
    report.description = ("Re-render DIR/equivalence.md, DIR/results.csv, the plots and, for "
                          "several sharders, DIR/peers.md from DIR/results.json, without running "
                          "anything.")
    report.add_argument("dir", type=Path, metavar="DIR",
                        help="a directory written by `run` (holds results.json)")
    report.add_argument("--title", default=None, help="title for the markdown (default: saved)")


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
    try:  # lazy: the campaign imports torch, and a test may stand in for it in sys.modules
        campaign = importlib.import_module("verify.campaign.run")
    except ModuleNotFoundError as exc:
        if exc.name != "verify.campaign.run":
            raise
        sys.exit("python -m verify: verify.campaign.run is not available in this checkout")
    return campaign


def _planted(args: argparse.Namespace) -> dict:
    return {} if args.plant is None else {"plant": args.plant}


def _dtypes(args: argparse.Namespace) -> dict:
    return {} if args.dtype == "both" else {"dtypes": DTYPES[args.dtype]}


def cmd_run(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    extra = {"resume_cases": args.resume_cases} if args.resume_cases else {}
    if args.soak:  # round-robin over world sizes; oneDNN's kernel caches capped (verify/tools/soak.py)
        soak.apply_soak_env()
        extra["interleave"] = True
    if args.families is not None:
        extra["families"] = args.families
    if args.offload != "no":
        extra["offloads"] = OFFLOADS[args.offload]
    if args.mesh != "1d":
        extra["meshes"] = args.mesh
    if args.shrink_budget is not None:
        extra["shrink_budget_s"] = args.shrink_budget
    specs = load_sharders(args.sharder)
    code = _exit_code(_campaign().run_campaign(
        world_sizes=args.world_sizes, examples=args.examples, seed=args.seed,
        sharders=specs, modes=MODES[args.mode], profile=args.profile,
        out_dir=args.out, timeout_s=args.timeout, **_dtypes(args), **_planted(args), **extra))
    if args.soak:
        held, line = soak.check(args.out / "results.json")
        print(line)
        code = code if held else EXIT_FAILED
    return code


def cmd_replay(args: argparse.Namespace) -> int:
    from verify.scenarios import Scenario  # lazy: imports torch
    if (args.resume_from is None) != (args.save_after is None):
        raise UsageError("--resume-from and --save-after go together (a checkpoint-resume case)")
    if args.resume_again_after is not None and args.resume_from is None:
        raise UsageError("--resume-again-after goes with --resume-from and --save-after")
    try:
        Scenario.from_json(args.scenario)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid scenario: {exc}")
    spec = load_sharders([args.sharder])[0]
    if args.resume_from is not None:
        if args.plant is not None:
            raise UsageError("--resume-from replays a checkpoint-resume case, without --plant")
        from verify.campaign.resume import ResumeCase, replay_resume  # lazy: imports torch
        if not has_checkpointing(load(spec)):
            raise UsageError(f"--resume-from: the sharder {spec} has no save/load")
        try:
            ResumeCase(Scenario.from_json(args.scenario), args.resume_from, args.save_after,
                       args.resume_again_after)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"not a checkpoint-resume case: {exc}")
        return replay_resume(args.scenario, args.resume_from, args.save_after,
                             timeout_s=args.timeout or 120.0, sharder=spec,
                             resume_again_after=args.resume_again_after)
    return _exit_code(_campaign().replay(args.scenario, timeout_s=args.timeout,
                                         sharder=spec, locate=args.locate, **_planted(args),
                                         **({"ranks": args.ranks} if args.ranks else {})))


def cmd_report(args: argparse.Namespace) -> int:
    from verify.report import load_results, write_peers_report, write_reports  # lazy: pandas
    from verify.report.write import load_blas, load_declined, load_notes  # lazy: likewise
    path = args.dir / "results.json"
    if not path.is_file():
        raise UsageError(f"{path} not found; pass a directory written by `python -m verify run`")
    try:
        title, results = load_results(path)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{path} is not a results file: {exc}")
    for p in write_reports(results, args.dir, title=args.title or title,
                           pool_memory=soak.load_pool_memory(path), blas=load_blas(path),
                           declined=load_declined(path), notes=load_notes(path)):
        print(p)
    if len({r.get("sharder_spec") or r.get("sharder") for r in results}) > 1:   # as `run` wrote it
        print(write_peers_report(results, args.dir, title=args.title or title))
    passed = all(r.get("passed", r.get("verdict") in PASSING) for r in results)
    return EXIT_OK if passed else EXIT_FAILED


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

"""`python -m verify`: run a campaign, replay one case, re-render a report, run the planted
bugs (`mutants`), time (`bench`), train on real text (`converge`), plan at scale (`plan`).

This module assembles the parser and dispatches; each subcommand's arguments and command live
beside its work: verify/campaign/cli.py (run, replay, report), verify/tools/cli.py (mutants,
bench, converge), verify/plan/cli.py (plan); what they share (argument types, exit codes) is
verify/_args.py. None of them imports torch until a command runs, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from verify._args import EXIT_CODES, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from verify.campaign.cli import (add_replay_arguments, add_report_arguments, add_run_arguments,
                                 cmd_replay, cmd_report, cmd_run, expand_preset)
from verify.plan.cli import add_plan_arguments, run_plan
from verify.tools.cli import (add_bench_arguments, add_converge_arguments, add_mutants_arguments,
                              cmd_bench, cmd_converge, cmd_mutants)

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

# (name, one-line help, adds its arguments, runs it), in the order `--help` lists them.
_SUBCOMMANDS = (
    ("run", "draw scenarios, run them at each world size, write tables",
     add_run_arguments, cmd_run),
    ("replay", "rerun one case from its scenario JSON", add_replay_arguments, cmd_replay),
    ("mutants", "prove the harness can fail: run every planted bug, print caught/total",
     add_mutants_arguments, cmd_mutants),
    ("bench", "time fsdp_core against FSDP2 on a GPT, measure memory and traffic",
     add_bench_arguments, cmd_bench),
    ("converge", "sharded vs unsharded loss curves on real text (Python's stdlib sources)",
     add_converge_arguments, cmd_converge),
    ("report", "re-render the tables and plots from DIR/results.json",
     add_report_arguments, cmd_report),
    ("plan", "per-rank memory and per-step traffic at scale, without running",
     add_plan_arguments, run_plan),
)
_COMMANDS = {name: command for name, _, _, command in _SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m verify", formatter_class=fmt, epilog=EXIT_CODES,
        description="Prove that a sharded run trains exactly like the unsharded one: draw "
                    "cases, run them on 1/2/4/8 ranks and a reference, compare step by step.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary, add_arguments, _ in _SUBCOMMANDS:
        # plan judges nothing, so its help does not list the verdicts' exit codes
        add_arguments(sub.add_parser(name, formatter_class=fmt, help=summary,
                                     epilog=None if name == "plan" else EXIT_CODES))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)      # exits with 2 and a message on bad arguments
    if args.command == "run" and args.preset is not None:
        args = parser.parse_args(expand_preset(sys.argv[1:] if argv is None else list(argv),
                                               args.preset))
    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        parser.error(str(exc))          # exits 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""What the `python -m verify` subcommands share: the argument types (each turns a flag's text into
its value or exits 2 with a message), the exit codes, the usage error a command raises after
parsing, and the world sizes a run may ask for. Imports no torch, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from verify.ranks.torchrun import is_torchrun
from verify.sharders import SharderSpecError, expand_checked, resolve

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_CODES = """\
exit codes:
  0  every verdict passed (report: the saved results all passed)
  1  some verdict failed or a case errored; each failure prints a replay command
  2  usage error (bad arguments, unreadable input)
"""
MODES = {"fast": ("fast",), "deterministic": ("deterministic",),
         "both": ("fast", "deterministic")}
MAX_WORLD_SIZE = 8   # a rank pool's default; VERIFY_MAX_WORLD_SIZE raises it (e.g. 16)


class UsageError(Exception):
    """Bad arguments found after parsing; `verify.cli.main` turns it into exit 2 and a message."""


def max_world_size() -> int:
    """The largest world size a run may ask for: VERIFY_MAX_WORLD_SIZE (default 8) for the rank
    pool; under torchrun, the launched world size (any power of two: 16, 32, ...)."""
    if is_torchrun():
        return int(os.environ["WORLD_SIZE"])
    try:
        return max(1, int(os.environ.get("VERIFY_MAX_WORLD_SIZE") or MAX_WORLD_SIZE))
    except ValueError:
        return MAX_WORLD_SIZE


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")


# -- numbers ---------------------------------------------------------------------------------

N = TypeVar("N", int, float)


def _bounded(parse: Callable[[str], N], ok: Callable[[N], bool], not_a: str,
             must: str) -> Callable[[str], N]:
    """An argument type: ``parse(text)``, kept when ``ok``; else "'text' is not {not_a}" or
    "{must}, got ..." (an int as parsed, a float as given)."""
    def parse_bounded(text: str) -> N:
        try:
            x = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {not_a}")
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{must}, got {x if parse is int else text}")
        return x
    return parse_bounded


positive_int = _bounded(int, lambda n: n >= 1, "an integer", "must be at least 1")
count = _bounded(int, lambda n: n >= 0, "an integer", "must be >= 0")
seed = count  # a seed is any count: an int >= 0
positive_float = _bounded(float, lambda x: 0 < x < float("inf"), "a number",
                          "must be a finite number > 0")
seconds = _bounded(float, lambda s: s > 0, "a number of seconds",
                   "must be a positive number of seconds")
budget = _bounded(float, lambda s: 0 <= s < float("inf"), "a number of seconds",
                  "must be a number of seconds >= 0")


def world_sizes(text: str) -> list[int]:
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


def world_size(text: str) -> int:
    sizes = world_sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one world size")
    return sizes[0]


# -- names -----------------------------------------------------------------------------------

def sharders(text: str) -> list[str]:
    """Built-in names and import paths, checked for syntax here; importing them is
    `load_sharders`' job (after parsing, so a bad path exits 2 with its own message)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no sharder in {text!r}")
    try:
        return list(dict.fromkeys(n if n == "all" else resolve(n) for n in names))
    except SharderSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def sharder(text: str) -> str:
    names = sharders(text)
    if len(names) != 1 or names[0] == "all":
        raise argparse.ArgumentTypeError(f"{text!r}: give one sharder")
    return names[0]


def load_sharders(specs: Sequence[str]) -> list[str]:
    """Import every named adapter now, in this process, before any rank starts: a path that
    does not import or an object that is not a verify.Sharder is a usage error (exit 2)."""
    try:
        return expand_checked(specs)
    except SharderSpecError as exc:
        raise UsageError(str(exc))


def families(text: str) -> list[str]:
    from verify.scenarios import FAMILIES, family_module, is_family_path  # lazy: imports torch
    names = list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in names if f not in FAMILIES and not is_family_path(f)]
    if bad or not names:
        hint = ("; the hf_* families need transformers: pip install -e '.[hf]'"
                if any(f.startswith("hf_") for f in bad) else "")
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(bad) or repr(text)}; choose from "
            f"{', '.join(FAMILIES)} or name a module with the family interface by import path "
            f"(pkg.module, pkg.module:obj, or module: for a top-level module) (comma-separated "
            f"for several){hint}")
    for name in names:
        if is_family_path(name):
            try:
                family_module(name)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc))
    return names


def plant(text: str) -> str:
    from verify.tools.plants import PLANTS  # lazy: imports torch
    if text not in PLANTS:
        raise argparse.ArgumentTypeError(
            f"unknown planted bug {text!r}; choose from {', '.join(PLANTS)} "
            "(see docs/planted_bugs.md)")
    return text


def plants(text: str) -> list[str]:
    return list(dict.fromkeys(plant(n.strip()) for n in text.split(",") if n.strip()))


def scenario_json(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc}); pass the scenario exactly as the replay line prints it, "
            "in single quotes")
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("the scenario must be a JSON object")
    return text

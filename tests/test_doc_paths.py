"""Every file path and dotted name the docs and docstrings give a reader exists: README.md,
docs/, the examples' READMEs and the sources of both packages and the tests name
``verify/ranks/pool.py``-style paths and ``verify.case.judge.evaluate``-style names; a module
that moves without them being updated leaves a newcomer a map to nowhere."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w./-])((?:fsdp_core|verify|tests|docs|examples)/[\w./-]*\w/?)")
NAME = re.compile(r"(?<![\w./-])((?:fsdp_core|verify)(?:\.[A-Za-z_]\w*)+)(?!\w)")
# file names, not modules: fsdp_core.json (a checkpoint's metadata)
FILE_SUFFIXES = (".json", ".md", ".py", ".png", ".csv", ".pt")


def _texts() -> list[Path]:
    """Docs and sources; tests are scanned for paths only (their strings plant fake names)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "examples").rglob("*.md"))]
    for pkg in ("fsdp_core", "verify", "tests", "examples"):
        files += sorted((ROOT / pkg).rglob("*.py"))
    return [f for f in files if f != Path(__file__).resolve()]


def missing_paths(text: str) -> list[str]:
    out = []
    for m in PATH.finditer(text):
        p = m.group(1).rstrip(".")
        if "*" in p or "<" in p:
            continue
        if not (ROOT / p).exists():
            out.append(p)
    return out


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def missing_names(text: str) -> list[str]:
    return [m.group(1) for m in NAME.finditer(text)
            if not m.group(1).endswith(FILE_SUFFIXES)
            and not _resolves(m.group(1))]


@pytest.mark.parametrize("path", _texts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_modules_exist(path):
    text = path.read_text()
    bad = set(missing_paths(text))
    if path.parent.name != "tests":
        bad |= set(missing_names(text))
    bad = sorted(bad)
    assert not bad, f"{path.relative_to(ROOT)} names what does not exist: {bad}"


def test_a_stale_path_and_a_stale_name_are_found():
    text = "see verify/plant.py and verify.campaign.replay_one, not verify/ranks/pool.py"
    assert missing_paths(text) == ["verify/plant.py"]
    assert missing_names(text) == ["verify.campaign.replay_one"]

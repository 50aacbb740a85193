"""The pytest plugin from a user's side: a copy of examples/textbook_fsdp as a package of a
project outside this repository, tested there with the user's own `pytest --sharder ...` (no
PYTHONPATH into the repository, none of its conftest or pytest settings). The correct sharder's
drawn cases pass; a mistaken one's fail, each leading with its verdict, its reason and a replay
command that, run from the user's folder, fails the same way. And the failure message's shape."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from verify.campaign.console import failure_message
from verify.results import CaseResult

ROOT = Path(__file__).resolve().parents[1]
PKG = "textbook_fsdp.adapter:"


def _user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
        "MASTER_PORT", "HYPOTHESIS_PROFILE")}   # pytest itself may run under torchrun
    return dict(env, VERIFY_MAX_WORLD_SIZE="2")


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("user_project")
    shutil.copytree(ROOT / "examples" / "textbook_fsdp", proj / "textbook_fsdp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert not (proj / "examples").exists() and ROOT not in proj.parents
    return proj


def _pytest(proj: Path, sharder: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "multigpu",
           "--sharder", sharder, "--verify-world-sizes", "2", "--verify-examples", "2",
           "--verify-seed", "3"]
    out = subprocess.run(cmd, cwd=proj, env=_user_env(), capture_output=True, text=True,
                         timeout=600)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_the_plugin_in_a_users_project_passes_the_correct_sharder(user_project):
    rc, text = _pytest(user_project, PKG + "Textbook")
    assert rc == 0, text
    passed = re.search(r"\b(\d+) passed\b", text)
    assert passed and int(passed.group(1)) >= 1 and "failed" not in text, text


@pytest.mark.slow
def test_the_plugin_in_a_users_project_fails_a_mistake_with_its_replay_line(user_project):
    rc, text = _pytest(user_project, PKG + "StaleGather")
    failed = re.search(r"\b(\d+) failed\b", text)
    assert rc == 1 and failed, text
    assert "CaseResult(" not in text, text
    # each failure: the verdict, then the reason's first lines, then the replay command
    blocks = re.findall(r"^_+ test_drawn_case_trains_like_the_reference\[.*?\] _+$\n(.*?)(?=^_{5,} |^=+ )",
                        text, flags=re.M | re.S)
    assert len(blocks) == int(failed.group(1)), text
    for block in blocks:
        lines = block.strip().splitlines()
        assert lines[0].startswith("FAIL: textbook_fsdp[stale_gather] W=2 fast fp32 "), block
        replay = next(i for i, line in enumerate(lines) if line.startswith("replay: "))
        assert lines[1].startswith("  ") and 1 < replay <= 9, block   # the reason's first lines
        assert lines[replay].startswith(f"replay: python -m verify replay --sharder {PKG}StaleGather '")
    # the replay command, run where the user ran pytest, fails the same way
    argv = shlex.split(lines[replay][len("replay: "):])
    assert argv[:3] == ["python", "-m", "verify"]
    out = subprocess.run([sys.executable] + argv[1:], cwd=user_project, env=_user_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and out.stdout.startswith("FAIL: textbook_fsdp[stale_gather]"), \
        out.stdout + out.stderr


def _case(reason: str, **kw) -> CaseResult:
    kw = dict(dict(verdict="fail", replay="python -m verify replay --sharder pkg:Mine '{}'"), **kw)
    return CaseResult(scenario_json="{}", sharder="mine", family="mlp", world_size=4,
                      mode="fast", dtype="fp32", optimizer="adam", tier="bitwise", reason=reason,
                      **kw)


def test_the_failure_message_leads_with_verdict_reason_and_replay():
    reason = "\n".join(f"line {i}" for i in range(1, 41))
    text = failure_message(_case(reason, divergence="step 1, backward, unit blocks.0"))
    lines = text.splitlines()
    assert lines[0] == "FAIL: mine W=4 fast fp32 mlp (tier bitwise)"
    assert lines[1:7] == [f"  line {i}" for i in range(1, 7)]
    assert lines[7] == "  ... 34 more lines of the reason below"
    assert lines[8] == "first divergence: step 1, backward, unit blocks.0"
    assert lines[9] == "replay: python -m verify replay --sharder pkg:Mine '{}'"
    assert lines[10:] == [""] + [f"line {i}" for i in range(7, 41)]   # nothing of it is lost
    short = failure_message(_case("one line", verdict="error"), head=6).splitlines()
    assert short == ["ERROR: mine W=4 fast fp32 mlp (tier bitwise)", "  one line",
                     "replay: python -m verify replay --sharder pkg:Mine '{}'"]
    assert "CaseResult(" not in text


def test_under_torchrun_a_default_group_sharder_runs_only_at_the_launched_world():
    """What the multigpu tests skip on under torchrun: `PoolSet.for_world` over the launched
    processes (a stand-in with their surface) offers them for the launched W only."""
    from verify.ranks.poolset import PoolSet

    class Launched:   # a TorchrunContext's surface, without a process group
        max_world_size, world_sizes = 4, [1, 2, 4]

        def close(self):
            pass

    launched = Launched()
    ranks = PoolSet(launched)
    assert ranks.for_world("default", 4) == (launched, "")
    assert ranks.for_world("group", 2) == (launched, "")
    assert ranks.for_world("default", 2) == (None, "the sharder uses the default process group, "
                                             "which here has 4 ranks; launch 2 processes for W=2")
    assert ranks.for_world("default", 1)[1].endswith("launch 1 process for W=1")


def test_the_plugins_pool_is_no_bigger_than_its_world_sizes_and_its_timeout_is_the_campaigns():
    """Each xdist worker spawns its own pool: it has as many ranks as the largest
    --verify-world-sizes (8 where the option does not parse); --verify-timeout defaults to
    the campaign's automatic timeout (None), not a fixed 120 s."""
    from verify import pytest_plugin

    class Config:
        def __init__(self, sizes):
            self.sizes = sizes

        def getoption(self, name):
            return {"verify_world_sizes": self.sizes}[name]
    assert pytest_plugin._largest_world_size(Config("1,2")) == 2
    assert pytest_plugin._largest_world_size(Config("1,2,4,8")) == 8
    assert pytest_plugin._largest_world_size(Config("x")) == 8
    import argparse
    parser = argparse.ArgumentParser()

    class Group:
        def addoption(self, *a, **kw):
            parser.add_argument(*a, **kw)

    class Parser:
        def getgroup(self, *a, **kw):
            return Group()
    pytest_plugin.pytest_addoption(Parser())
    assert parser.parse_args([]).verify_timeout is None


def test_the_fixture_refuses_an_invalid_scenario_before_running_it():
    """A scenario the harness cannot run (fewer micro-batches than ranks) is the test's own
    mistake: ValueError naming the field, not an ``error`` case blamed on the sharder."""
    import dataclasses

    from verify.pytest_plugin import Equivalence
    from verify.tools.plants import mlp_scenario

    class Config:
        def getoption(self, name):
            return {"verify_timeout": None, "sharder": None}[name]

    eq = Equivalence(pool=None, config=Config())   # never reached: refused first
    with pytest.raises(ValueError, match="micro_batches"):
        eq.check(dataclasses.replace(mlp_scenario(4), micro_batches=2))

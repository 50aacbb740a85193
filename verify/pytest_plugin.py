"""The pytest plugin (registered through the ``pytest11`` entry point): the harness inside any
project's test run.

    pytest --sharder mypkg.adapters:MyFSDP [--families mypkg.models] -m multigpu
    torchrun --nproc_per_node=8 -m pytest --sharder mypkg.adapters:MyFSDP -m multigpu

With ``--sharder``, the drawn equivalence cases (`verify.pytest_cases`) are added to the run: one
test per (sharder, world size, mode, drawn scenario), each asserting the case's verdict; one
that fails says the verdict, the reason's first lines and the replay command first
(`verify.campaign.console.failure_message`). Fixtures for tests of your own:

- ``rank_pool``: the session's ranks (a `verify.ranks.poolset.PoolSet` over a `RankPool` of
  VERIFY_MAX_WORLD_SIZE processes, default 8; under torchrun, the launched processes);
- ``equivalence``: ``equivalence.check(scenario, sharder=None)`` runs one case through the
  harness and returns its `CaseResult` (``sharder`` defaults to the first ``--sharder``, else
  fsdp_core); ``equivalence.draw(world_size, mode, n, sharder=None)`` draws scenarios as the
  CLI does, only ones that sharder (default: as ``check``) runs.

Under torchrun every rank draws the same cases and gets the same verdict (the ranks share their
outcomes before anything is asserted), so no rank fails or hangs alone. A sharder on the default
process group (``world = "default"``) runs there only at the launched world size; its cases at
other world sizes are skipped, saying so.

Only this module imports pytest; the work is `verify.campaign.run`'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from verify.ranks.torchrun import TorchrunContext, is_torchrun
from verify.sharders import DEFAULT_SHARDER, SharderSpecError, expand, expand_checked

__all__ = ["Equivalence"]

_CASES = Path(__file__).with_name("pytest_cases.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("verify", "sharded-training equivalence (verify)")
    group.addoption("--sharder", default=None, metavar="NAMES",
                    help="run the drawn equivalence cases for these sharders: built-in names "
                         "(fsdp_core, torch_fsdp2, ddp) or pkg.module:Name, comma-separated")
    group.addoption("--families", default=None, metavar="LIST",
                    help="model families to draw: built-in names or pkg.module (the family "
                         "interface), comma-separated (default: the core families)")
    group.addoption("--verify-world-sizes", default="1,2,4,8", metavar="LIST",
                    help="world sizes of the drawn cases (default: 1,2,4,8)")
    group.addoption("--verify-examples", default=4, type=int, metavar="N",
                    help="scenarios drawn per world size and mode (default: 4)")
    group.addoption("--verify-seed", default=0, type=int, metavar="S",
                    help="seed of the draw (default: 0)")
    group.addoption("--verify-timeout", default=None, type=float, metavar="S",
                    help="seconds a case may run (default: as `python -m verify run`'s, from "
                         "the case's size, at most 120; under torchrun 120, the process "
                         "groups' collective timeout)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "multigpu: runs on several ranks; under torchrun the pytest process is a rank "
        "(torchrun --nproc_per_node=8 -m pytest -m multigpu)")
    spec = config.getoption("sharder", None)
    if spec:
        try:
            expand_checked(x.strip() for x in spec.split(",") if x.strip())
        except SharderSpecError as exc:
            raise pytest.UsageError(str(exc))
        if str(_CASES) not in config.args:
            config.args.append(str(_CASES))


class Equivalence:
    """``check(scenario)``: one case through the harness, as `python -m verify replay` runs it
    (a scenario that is not valid raises ValueError naming the field, as replay refuses it)."""

    def __init__(self, pool, config: pytest.Config):
        self.pool, self.config = pool, config
        self.timeout_s = config.getoption("verify_timeout")
        spec = config.getoption("sharder") or DEFAULT_SHARDER
        self.sharders = expand(x.strip() for x in spec.split(",") if x.strip())

    # The campaign is imported when a test uses it: this plugin loads in every pytest run of the
    # environment (the pytest11 entry point), and the campaign imports torch and Hypothesis.
    def check(self, scenario, sharder: Optional[str] = None, **kw):
        from verify.campaign.run import run_one  # lazy: torch, see above
        scenario.validate()   # the test's own mistake, not a case of the sharder's
        return run_one(self.pool, scenario, sharder=sharder or self.sharders[0],
                       timeout_s=kw.pop("timeout_s", self.timeout_s), **kw)

    def draw(self, world_size: int, mode: str, n: int, *, seed: Optional[int] = None,
             sharder: Optional[str] = None, **kw):
        """``n`` scenarios the sharder runs (``sharder``: a spec; default the first
        ``--sharder``, else fsdp_core): its declarations and ``unsupported()`` are consulted
        while drawing (verify/case/draw.py)."""
        from verify.case.draw import draw_scenarios  # lazy: torch, see above
        kw.setdefault("sharders", [sharder or self.sharders[0]])
        return draw_scenarios(world_size=world_size, mode=mode, n=n,
                              seed=self.config.getoption("verify_seed") if seed is None else seed,
                              **kw)


@pytest.fixture(scope="session")
def rank_pool(pytestconfig):
    """The session's ranks: a RankPool of VERIFY_MAX_WORLD_SIZE spawned processes (default: the
    largest of --verify-world-sizes, 8 by default; in a PoolSet, so default-group sharders get
    pools of their own size), or, when pytest itself runs under torchrun, a TorchrunContext on
    the launcher's group, whose collectives time out after --verify-timeout (default 120 s).
    Both offer run(world_size, fn, payload) -> PoolResult."""
    from verify.ranks.pool import RankPool  # lazy: torch, and this plugin loads in every pytest run
    from verify.ranks.poolset import PoolSet  # lazy: likewise (it imports fsdp_core)
    if is_torchrun():
        pool = PoolSet(TorchrunContext(timeout_s=pytestconfig.getoption("verify_timeout") or 120.0))
    else:
        pool = PoolSet(RankPool(int(os.environ.get("VERIFY_MAX_WORLD_SIZE") or
                                    _largest_world_size(pytestconfig))))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def equivalence(rank_pool, pytestconfig) -> Equivalence:
    return Equivalence(rank_pool, pytestconfig)


def _largest_world_size(config: pytest.Config) -> int:
    """The largest of --verify-world-sizes (a pool no bigger than the cases need: each xdist
    worker spawns its own); 8 where the option does not parse (the draw says why)."""
    try:
        return max(int(w) for w in config.getoption("verify_world_sizes").split(",") if w.strip())
    except (ValueError, TypeError):
        return 8

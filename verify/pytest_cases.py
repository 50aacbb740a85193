"""The drawn equivalence cases that ``pytest --sharder ...`` adds to a run (verify/pytest_plugin.py):
one test per (sharder, world size, mode the sharder declares, drawn scenario)."""
from __future__ import annotations

import pytest

from verify.campaign.console import failure_message
from verify.case.draw import draw_scenarios
from verify.sharders import expand, load_class


def _cases(config: pytest.Config) -> list:
    specs = expand(x.strip() for x in config.getoption("sharder").split(",") if x.strip())
    families = config.getoption("families")
    families = [f.strip() for f in families.split(",") if f.strip()] if families else None
    sizes = [int(w) for w in config.getoption("verify_world_sizes").split(",") if w.strip()]
    out = []
    for spec in specs:
        cls = load_class(spec)
        for w in sizes:
            for mode in cls.modes:
                drawn = draw_scenarios(world_size=w, mode=mode, seed=config.getoption("verify_seed"),
                                       n=config.getoption("verify_examples"), dtypes=cls.dtypes,
                                       families=families, sharders=[spec])   # draws it runs
                out += [pytest.param(spec, s, id=f"{cls.name}-W{w}-{mode}-{i}-{s.family}")
                        for i, s in enumerate(drawn)]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"sharder_spec", "scenario"} <= set(metafunc.fixturenames):
        metafunc.parametrize("sharder_spec, scenario", _cases(metafunc.config))


@pytest.mark.multigpu
def test_drawn_case_trains_like_the_reference(equivalence, rank_pool, sharder_spec, scenario):
    if scenario.world_size not in rank_pool.world_sizes:
        pytest.skip(f"world size {scenario.world_size} needs more ranks than "
                    f"{max(rank_pool.world_sizes)}")
    case = equivalence.check(scenario, sharder=sharder_spec)
    if case.verdict == "skipped":
        pytest.skip(case.reason)
    if not case.passed:   # the verdict, the reason and the replay command, not the case's repr
        pytest.fail(failure_message(case), pytrace=False)

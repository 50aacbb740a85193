"""Diagnosis (verify/diagnose.py, shrink.py, hangs.py, locate.py): planted bugs and the textbook
FSDP's mistakes shrink to minimal failing scenarios whose first divergence names the right
phase; sharders that hang on purpose (tests/hang_sharders.py) are explained by the first
divergent collective, within the timeout + 15 s, and the campaign goes on.

The bugs run on a 2-rank pool of this module's own (the hang tests restart it; the textbook
sharder uses the default group, so it runs on the 2-rank pool as its main pool).
"""
from __future__ import annotations

import dataclasses
import time

import pytest

from verify import campaign
from verify.campaign import run_one
from verify.diagnose import console_lines, diagnose_failures, first_line
from verify.hangs import CollectiveLog, explain
from verify.pool import RankPool
from verify.scenarios import Scenario
from verify.shrink import candidates, n_units, same_failure, signature

BUDGET_S = 120.0
HANG_TIMEOUT_S = 8.0

# A case larger than it needs to be: 3 blocks, odd widths, 3 steps, M=8 x 3, Adam.
BIG = Scenario(family="mlp", model=(("d_in", 9), ("depth", 3), ("width", 13), ("d_out", 5)),
               world_size=2, mode="fast", optimizer="adam", steps=3, micro_batches=8,
               micro_batch_size=3, weight_decay=0.1)
BIG = dataclasses.replace(BIG, model=tuple(sorted(BIG.model)))
# ... with an odd-sized first block (8*13 + 13 = 117 elements: padded at W=2) that reduces after
# a larger one, so that a stale gradient bucket shows in its padding.
BIG_ODD = dataclasses.replace(BIG, model=tuple(sorted({**dict(BIG.model), "d_in": 8}.items())))
BIG_SPECIAL = Scenario(family="special", model=(("n_blocks", 3), ("n_out", 5), ("width", 9)),
                       world_size=2, mode="fast", optimizer="sgd_momentum", steps=3,
                       micro_batches=4, micro_batch_size=3)


@pytest.fixture(scope="module")
def pool():
    with RankPool(2, timeout_s=60.0) as p:
        yield p


def _minimal_ok(case) -> Scenario:
    s = Scenario.from_json(case.minimal_scenario_json)
    ints = [v for v in s.model_kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
    assert n_units(s) <= 2 and max(ints) <= 8 and s.steps <= 2, case.minimal_scenario_json
    assert case.minimal_replay.startswith("python -m verify replay") and case.flaky is False
    return s


@pytest.mark.parametrize("plant, start, phase", [
    ("allgather_one_ulp", BIG, " forward: output of "),
    ("drop_rank_grad", BIG, " backward: reduced gradient of "),
    ("dist_reduce_one_ulp", BIG, " backward: reduced gradient of "),
    ("update_one_ulp", BIG, " optimizer: the reduced gradients are equal, parameter "),
    ("padding_written_after_step", BIG, "optimizer (padding after the step)"),
])
def test_planted_bug_shrinks_and_names_its_phase(pool, plant, start, phase):
    case = run_one(pool, start, plant=plant)
    assert not case.passed
    groups = diagnose_failures(pool, [case], plant=plant, budget_s=BUDGET_S, log=lambda _: None)
    assert len(groups) == 1
    s = _minimal_ok(case)
    assert f"--plant {plant}" in case.minimal_replay and s.world_size == 2
    assert case.divergence.startswith("first divergence: step ") and phase in case.divergence, \
        case.divergence
    text = "\n".join(console_lines(groups))
    assert "original:" in text and "minimal:" in text and case.replay in text


@pytest.mark.parametrize("mistake, start, phase", [
    ("NoDivide", BIG, " backward: reduced gradient of "),
    ("StaleGather", BIG, " forward: output of "),
    ("FrozenHookCount", BIG_SPECIAL, " backward: reduced gradient of "),
    ("StalePadding", BIG_ODD, "(padding after the"),
])
def test_textbook_mistake_shrinks_and_names_its_phase(pool, mistake, start, phase):
    sharder = f"examples.textbook_fsdp.adapter:{mistake}"
    case = run_one(pool, start, sharder=sharder)
    assert not case.passed, case.reason
    diagnose_failures(pool, [case], budget_s=BUDGET_S, log=lambda _: None)
    s = _minimal_ok(case)
    assert sharder in case.minimal_replay and s.family == start.family
    assert phase in case.divergence, case.divergence

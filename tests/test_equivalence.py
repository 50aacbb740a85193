"""The harness end to end: Hypothesis draws scenarios, the session's ranks run them through
fsdp_core, the reference runs in this process, and every verdict must pass. A failure shows
the case's reason and its one-line replay command."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from verify.campaign.run import run_one
from verify.scenarios import split_ties
from verify.strategies import scenarios

pytestmark = pytest.mark.multigpu


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@given(data=st.data())
def test_drawn_scenarios_train_like_the_reference(rank_pool, world_size, data):
    if world_size not in rank_pool.world_sizes:
        pytest.skip(f"world size {world_size} needs more ranks than {max(rank_pool.world_sizes)}")
    s = data.draw(scenarios(world_sizes=(world_size,)), label="scenario")
    case = run_one(rank_pool, s, timeout_s=120.0)
    assert case.passed, f"{case.verdict}: {case.reason}\nreplay: {case.replay}"
    if case.verdict == "skipped":   # fsdp_core refuses a tie split across units, and only that
        assert split_ties(s), case.reason
        return
    assert len(case.steps) == s.steps
    if case.tier == "bitwise":
        assert all(st_.bitwise for st_ in case.steps), case.first_divergence


# Cases that once failed, kept as fixed regressions (the comment says what they caught).
REGRESSIONS = [
    # A tensor feeding several units (q/k/v projections as every_leaf units): an identity
    # autograd node on unit inputs changed autograd's summation order -> 1-ulp gradients.
    '{"family":"cs336","model":{"context_length":2,"d_ff":18,"d_model":12,"num_heads":2,"num_layers":3,'
    '"rope_theta":10000.0,"vocab_size":16},"world_size":2,"mode":"fast","optimizer":"sgd","lr":0.05,'
    '"weight_decay":0.0,"steps":3,"micro_batches":8,"micro_batch_size":1,"dtype":"fp32",'
    '"wrap":"every_leaf","reshard_after_forward":true,"seed":41864}',
    # The same fan-out in deterministic mode at W=4, AdamW.
    '{"family":"cs336","model":{"context_length":3,"d_ff":10,"d_model":8,"num_heads":2,"num_layers":2,'
    '"rope_theta":10000.0,"vocab_size":13},"world_size":4,"mode":"deterministic","optimizer":"adamw",'
    '"lr":0.01,"weight_decay":0.1,"steps":2,"micro_batches":8,"micro_batch_size":1,"dtype":"fp32",'
    '"wrap":"every_leaf","reshard_after_forward":true,"seed":3}',
    # A frozen unit that backward never reaches, kept unsharded by reshard_after_forward=False,
    # must be resharded at the end of backward (named_parameters() yielded bf16 full tensors).
    '{"family":"special","model":{"n_blocks":1,"n_out":2,"width":1},"world_size":1,"mode":"fast",'
    '"optimizer":"sgd","lr":0.01,"weight_decay":0.0,"steps":1,"micro_batches":1,"micro_batch_size":1,'
    '"dtype":"bf16","wrap":"every_leaf","reshard_after_forward":false,"seed":0}',
]


@pytest.mark.parametrize("scenario_json", REGRESSIONS)
def test_regressions(rank_pool, scenario_json):
    from verify.scenarios import Scenario
    s = Scenario.from_json(scenario_json)
    if s.world_size not in rank_pool.world_sizes:
        pytest.skip(f"world size {s.world_size} needs more ranks")
    case = run_one(rank_pool, s, timeout_s=120.0)
    assert case.passed and all(st_.bitwise for st_ in case.steps), f"{case.reason}\nreplay: {case.replay}"

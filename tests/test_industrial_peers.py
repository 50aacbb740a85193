"""DeepSpeed ZeRO-1/2/3 and FSDP1 as peers (verify/sharders/deepspeed_zero.py, fsdp1.py), the
optional protocol hooks they needed (verify/sharders/base.py) and the collective recorder that
sees their traffic (verify/case/recorder.py). The DeepSpeed tests skip where the extra is not
installed (pip install '.[deepspeed]')."""
from __future__ import annotations

import dataclasses

import pytest

from pool_run import run
from recorder_cases import record, wrapped_over
from verify.campaign.run import run_one, skip_reason
from verify.case.judge import case_tier
from verify.results import UNSEEN
from verify.scenarios import Scenario
from verify.sharders import expand_checked, load
from verify.sharders.deepspeed_zero import MISSING
from verify.report.frames import results_frame
from verify.report.tables import invariants_table
from verify.ranks.torchrun import is_torchrun

# these drive world sizes of the rank pool's own (a default-group engine at W=2, the
# recorder's process-group layers); the pool run covers them
NOT_UNDER_TORCHRUN = pytest.mark.skipif(
    is_torchrun(), reason="drives the rank pool's own world sizes; the pool run covers it")

needs_deepspeed = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

GPT = Scenario("gpt", (("n_embd", 8), ("n_head", 2), ("n_layer", 2), ("vocab_size", 13)), 2,
               optimizer="sgd", lr=0.05, micro_batches=4, steps=2)
NEW = ["fsdp1", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]


def test_the_new_peers_are_built_ins_in_all():
    assert expand_checked(["all"])[3:] == NEW


def test_without_deepspeed_every_case_is_skipped_with_the_install_line(monkeypatch):
    import verify.sharders.deepspeed_zero as ds  # reason: its MISSING is faked here
    monkeypatch.setattr(ds, "MISSING", "DeepSpeed is not installed; pip install '.[deepspeed]'")
    for sharder in NEW[1:]:
        assert "pip install '.[deepspeed]'" in skip_reason(GPT, load(sharder))
        assert load(sharder).tier(GPT) is None


@pytest.mark.parametrize("sharder", NEW)
def test_declared_limits_are_skip_reasons(sharder):
    special = Scenario("special", (), 2)   # logit_scale is a 0-d parameter
    if sharder.startswith("deepspeed") and MISSING is not None:
        pytest.skip(MISSING)
    assert "0-d parameters (logit_scale)" in skip_reason(special, load(sharder))
    assert "modes ('fast',)" in skip_reason(dataclasses.replace(GPT, mode="deterministic"),
                                            load(sharder))
    bf16 = skip_reason(dataclasses.replace(GPT, dtype="bf16"), load(sharder))
    assert (bf16 is None) == (sharder == "fsdp1")


@needs_deepspeed
def test_zero3_is_loosened_only_where_a_tensor_feeds_two_modules():
    mlp = Scenario("mlp", (("d_in", 4), ("d_out", 3), ("depth", 2), ("width", 8)), 2)
    cs336 = Scenario("cs336", (), 2)   # q, k, v read one normed input
    assert case_tier(mlp, load("deepspeed_zero3")) == "bitwise"
    assert case_tier(cs336, load("deepspeed_zero3")) == "tolerance"
    assert case_tier(dataclasses.replace(cs336, optimizer="adam"), load("deepspeed_zero3")) == "reported"
    assert case_tier(cs336, load("deepspeed_zero2")) == "bitwise"


# -- the recorder --------------------------------------------------------------------------------

@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_the_recorder_counts_captured_aliases_once_and_says_what_it_could_not_see(rank_pool):
    W = 2
    captured = run(rank_pool, W, record, "captured")[0]
    assert captured == {"all_gather_single": [1, 16 * W], "reduce_scatter_single": [1, 8 * W]}
    nested = run(rank_pool, W, record, "nested")[0]
    assert nested == {"all_gather_into_tensor": [1, 16 * W]}
    assert run(rank_pool, W, record, "paused")[0] == {}
    ddp = run(rank_pool, W, record, "ddp_backward")[0]
    assert ddp.get(UNSEEN, [0])[0] >= 1 and set(ddp) == {UNSEEN}, ddp


@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_a_wrapper_a_sharder_puts_over_the_recorders_stays_and_is_counted_once(rank_pool):
    got = run(rank_pool, 2, wrapped_over, None)[0]
    assert got == {"kept": True, "outside": {}, "counted": {"all_reduce": [1, 4]}}, got


def test_unseen_traffic_is_not_a_byte_count_in_the_tables():
    from verify.results import CaseResult, StepRecord  # reason: the records of two cases
    rows = [CaseResult(scenario_json=GPT.to_json(), sharder=sh, family="gpt", world_size=2,
                       mode="fast", dtype="fp32", optimizer="sgd", tier="bitwise", verdict="pass",
                       steps=[StepRecord(step=0, loss=1.0, loss_ref=1.0, bitwise=True,
                                         collectives=coll, state_bytes=[8, 8])])
            for sh, coll in (("seen", {"all_reduce": [2, 64]}),
                             ("hidden", {"all_reduce": [1, 64], UNSEEN: [1, 0]}))]
    df = results_frame(rows)
    assert list(df["coll_bytes"].isna()) == [False, True]
    table = invariants_table(df)
    assert "64 B" in table and "not seen" in table


# -- the hooks, through the harness (DDP adapters that change one hook each) -----------------------

FS = "tests.foreign_sharders:"


@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_the_hooks_are_what_the_harness_calls(rank_pool):
    assert run_one(rank_pool, GPT, sharder=f"{FS}HalfBackward").verdict == "fail"
    det = dataclasses.replace(GPT, mode="deterministic")
    case = run_one(rank_pool, det, sharder=f"{FS}NoSyncOnly")
    assert case.verdict == "pass" and case.tier == "bitwise", case.reason
    case = run_one(rank_pool, GPT, sharder=f"{FS}EngineBuilt")
    assert case.verdict == "pass", case.reason
    assert all(st.state_bytes and len(set(st.state_bytes)) == 1 and st.state_bytes[0] % 7 == 0
               for st in case.steps)
    case = run_one(rank_pool, GPT, sharder=f"{FS}LauncherEnv")
    assert case.verdict == "pass", case.reason


# -- the peers, through the pool ------------------------------------------------------------------

@pytest.mark.multigpu
def test_fsdp1_trains_bitwise_with_every_probe(rank_pool):
    case = run_one(rank_pool, GPT, sharder="fsdp1", timeout_s=120.0)
    assert case.verdict == "pass" and case.tier == "bitwise", case.reason
    for st in case.steps:
        assert st.bitwise and st.padding_ok and st.reassembly_ok and st.grads_ok
        assert st.collectives and UNSEEN not in st.collectives


@needs_deepspeed
@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
@pytest.mark.parametrize("sharder", ["deepspeed_zero1", "deepspeed_zero3"])
def test_deepspeed_trains_bitwise_and_its_traffic_is_seen(rank_pool, sharder):
    case = run_one(rank_pool, GPT, sharder=sharder, timeout_s=120.0)
    assert case.verdict == "pass" and case.tier == "bitwise", case.reason
    for st in case.steps:
        assert st.bitwise and st.state_bytes and UNSEEN not in st.collectives, st.collectives
    kinds = set(case.steps[-1].collectives)
    if sharder == "deepspeed_zero3":   # gathers and reduce-scatters through captured aliases
        assert {"all_gather_single", "reduce_scatter_single"} <= kinds, kinds
        assert all(st.reassembly_ok for st in case.steps)


@needs_deepspeed
@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_reduced_gradients_are_checked_and_replay_its_first_step(rank_pool, stage):
    """Each stage's `reduced_gradients` (ZeRO-3: DeepSpeed's ``safe_get_local_grad``; ZeRO-1/2:
    the parameter's fragment of the averaged gradient partition, [Note: ZeRO-1/2 reduced
    gradients]) feeds the `gradients` check and the replayed first step: the correct engine
    passes or is reported with every step's gradients held to the reference (the ranks' local
    gradients differ from it: only the averaged ones match); a 1.5x learning rate, inside fast
    Adam's reported bound at W = 4, fails in the optimizer phase."""
    if 4 not in rank_pool.world_sizes:
        pytest.skip("world size 4 needs a pool of 4 ranks")
    from verify.diagnosis.shrink import first_phase
    s = dataclasses.replace(GPT, world_size=4, optimizer="adamw", lr=0.01)
    ok = run_one(rank_pool, s, sharder=f"deepspeed_zero{stage}", timeout_s=120.0)
    assert ok.verdict in ("pass", "reported"), ok.reason
    assert ok.steps and all(st.grads_ok for st in ok.steps)
    bad = run_one(rank_pool, s, sharder=f"tests.verdict_sharders:FastLrZero{stage}",
                  timeout_s=120.0)
    assert bad.verdict == "fail", bad.reason
    assert "reduced gradients" in bad.reason and first_phase(bad) == "optimizer", bad.reason

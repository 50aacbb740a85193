"""Models of the kinds users bring (tests/odd_families.py) through the harness: no false alarm
for a correct sharder, and a model a sharder cannot shard is declined with the reason, not run
and blamed on it."""
from __future__ import annotations

import pytest

from verify.campaign.run import run_one
from verify.diagnosis.locate import locate_divergence
from verify.scenarios import Scenario
from verify.sharders import load

F = "tests.odd_families:"
V = "tests.verdict_sharders:"


def _skip_unless(pool, w):
    if w not in pool.world_sizes:
        pytest.skip(f"world size {w} needs more ranks than {max(pool.world_sizes)}")


def _dead(w: int, **kw) -> Scenario:
    return Scenario(F + "DeadHead", (("n_blocks", 2), ("width", 4)), w, **kw)


@pytest.mark.multigpu
@pytest.mark.parametrize("reshard", [True, False])
def test_units_whose_forward_never_runs_have_no_gathers_in_fsdp_cores_formula(rank_pool, reshard):
    """A dead Linear in every block and a dead head, each a unit of its own (every_leaf): kept
    unsharded after forward, fsdp_core gathers a unit once per micro-batch its forward runs in,
    never for one whose forward never runs; the formula says the same."""
    _skip_unless(rank_pool, 2)
    s = _dead(2, wrap="every_leaf", reshard_after_forward=reshard, optimizer="adam")
    case = run_one(rank_pool, s, sharder="fsdp_core")
    assert case.verdict == "pass", case.reason
    assert all(st.collectives_ok for st in case.steps), case.reason


@pytest.mark.multigpu
def test_a_zero_gradient_for_an_unused_parameter_is_the_same_training_under_plain_sgd(rank_pool):
    """FSDP1 gives unused parameters a zero gradient where unsharded training gives none: under
    plain SGD that trains the same, so the gradients check must not fail it."""
    _skip_unless(rank_pool, 2)
    case = run_one(rank_pool, _dead(2), sharder=V + "ZeroFillsUnused")
    assert case.verdict == "pass", case.reason
    assert all(st.bitwise for st in case.steps)


@pytest.mark.multigpu
def test_weight_decay_on_a_zero_gradient_fails_on_the_parameter_and_says_why(rank_pool):
    """With AdamW's weight decay the zero gradient moves the dead parameters: a real difference,
    reported on the parameters, and the located divergence says where it comes from."""
    _skip_unless(rank_pool, 2)
    s = _dead(2, optimizer="adamw", weight_decay=0.1, steps=1)
    case = run_one(rank_pool, s, sharder=V + "ZeroFillsUnused")
    assert case.verdict == "fail" and "dead" in case.reason, case.reason
    assert "a gradient the reference has none of" not in case.reason, case.reason
    line = locate_divergence(rank_pool, s, case, sharder=V + "ZeroFillsUnused")
    assert " optimizer: the reduced gradients are equal, parameter " in line, line
    assert "this sharder gave it an all-zero gradient where unsharded training gives none" in line


@pytest.mark.multigpu
def test_the_replayed_step_names_the_zero_gradients_a_decayed_parameter_got(rank_pool):
    """In the reported tier (fast AdamW at W = 4) the replay of the sharder's own gradients is
    what catches the decayed dead parameters; the reason says that it was the zero gradients,
    not that the optimizer went wrong."""
    _skip_unless(rank_pool, 4)
    s = _dead(4, optimizer="adamw", weight_decay=0.1, micro_batches=4, steps=1, lr=0.1)
    case = run_one(rank_pool, s, sharder=V + "ZeroFillsUnused")
    assert case.tier == "reported" and case.verdict == "fail", case.reason
    assert "this sharder gave them an all-zero gradient where unsharded training gives none" \
        in case.reason, case.reason


@pytest.mark.parametrize("sharder", ["fsdp_core", "torch_fsdp2", "fsdp1"])
def test_a_weight_tied_between_two_blocks_is_declined_not_blamed(sharder):
    """The FSDP sharders refuse a parameter two units own: per_block puts the first and the last
    block's shared weight in two units even with the scenario's ties kept."""
    s = Scenario(F + "TiedBlocks", (("n_blocks", 2), ("width", 3)), 2)
    reason = load(sharder).unsupported(s)
    assert reason and "blocks.0.fc.weight" in reason, reason
    assert load(sharder).unsupported(Scenario(F + "TiedBlocks", (("n_blocks", 2), ("width", 3)), 2,
                                              wrap="root_only")) is None


@pytest.mark.multigpu
@pytest.mark.parametrize("sharder", ["fsdp_core", "torch_fsdp2"])
def test_a_child_whose_parent_reads_its_weights_is_not_made_a_unit(rank_pool, sharder):
    """every_leaf leaves out a module whose forward never runs (its parent reads its weights,
    as nn.MultiheadAttention does with out_proj): as a unit of its own no sharder could gather
    them in time, and the case errored for every sharder."""
    _skip_unless(rank_pool, 2)
    s = Scenario(F + "FunctionalChild", (("n_blocks", 2), ("width", 3)), 2, wrap="every_leaf")
    from verify.scenarios import build_model, wrap_units
    model = build_model(s)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(u)] for u in wrap_units(s, model)] == ["blocks.0.fc", "blocks.1.fc", "head", ""]
    case = run_one(rank_pool, s, sharder=sharder)
    assert case.verdict == "pass", case.reason


@pytest.mark.multigpu
@pytest.mark.parametrize("mode", ["fast", "deterministic"])
@pytest.mark.parametrize("w", [1, 2])
def test_a_root_parameter_passed_into_a_block_leaves_the_blocks_gradients_whole(rank_pool, w, mode):
    """blocks.0's only input that needs a gradient is the root's alpha, used at the end of its
    forward: fsdp_core reduced the block when alpha's gradient was ready, before its own
    weights had theirs (their gradients were missing)."""
    _skip_unless(rank_pool, w)
    s = Scenario(F + "RootArg", (("n_blocks", 2), ("width", 5)), w, mode=mode, lr=0.05)
    case = run_one(rank_pool, s, sharder="fsdp_core")
    assert case.verdict == "pass", case.reason
    assert all(st.bitwise for st in case.steps)


@pytest.mark.multigpu
def test_a_closure_over_the_model_reads_the_bf16_compute_copy_in_the_reference(rank_pool):
    """The bf16 reference's compute copy was deep-copied: the blocks' ``lambda: self.alpha``
    still read the fp32 master, and a correct sharder failed by 340x and more."""
    _skip_unless(rank_pool, 2)
    s = Scenario(F + "RootGetter", (("n_blocks", 2), ("width", 5)), 2, dtype="bf16", lr=0.05)
    case = run_one(rank_pool, s, sharder="fsdp_core")
    assert case.verdict == "pass", case.reason


@pytest.mark.multigpu
@pytest.mark.parametrize("mode", ["fast", "deterministic"])
def test_a_dict_batch_with_padding_runs_in_both_modes(rank_pool, mode):
    """A batch that is a dict (input_ids, attention_mask, labels) is concatenated key by key
    (fast mode's local batch) and moved whole: it raised 'too many values to unpack'."""
    _skip_unless(rank_pool, 2)
    s = Scenario(F + "DictBatch", (("n_blocks", 2), ("width", 4)), 2, mode=mode, micro_batches=4)
    case = run_one(rank_pool, s, sharder="fsdp_core")
    assert case.verdict == "pass", case.reason


@pytest.mark.multigpu
def test_a_model_that_edits_its_parameters_in_forward_turns_the_replay_off_not_a_failure(rank_pool):
    """DDP trains a clamping model as the reference does, but the replayed steps (the optimizer
    alone, from its gradients) cannot follow a forward that edits parameters: the reference's
    own steps show it, so the replay is turned off, saying why, instead of failing DDP."""
    _skip_unless(rank_pool, 4)
    s = Scenario(F + "ClampsInForward", (("n_blocks", 2), ("width", 5)), 4, optimizer="adamw",
                 lr=0.2, micro_batches=4, steps=2)
    case = run_one(rank_pool, s, sharder="ddp")
    assert case.verdict in ("pass", "reported"), case.reason
    assert "the replayed-step check is off for this case" in case.tier_note, case.tier_note
    plain = run_one(rank_pool, _dead(4, optimizer="adamw", micro_batches=4), sharder="ddp")
    assert plain.tier_note == "", plain.tier_note

"""fsdp_core on model features at the edge of what it takes: a unit that owns no parameter
(the mixed-precision input cast still applies), non-contiguous parameters (refused), a sharded
parameter used outside its unit's forward (an error at the end of backward), and a parameter
used on some ranks only (an error on the ranks that own it and saw no gradient)."""
from __future__ import annotations

import pytest
import torch

import model_edge_cases as cases
from pool_run import run
from verify.ranks.torchrun import is_torchrun

pytestmark = pytest.mark.multigpu

ONE_RANK_RAISES = pytest.mark.skipif(
    is_torchrun(), reason="only some ranks raise (caught in the case); the pool run covers it")


@pytest.mark.parametrize("world_size", [1, 2])
def test_unit_without_parameters_casts_its_inputs_and_outputs(rank_pool, world_size):
    """As FSDP2's cast_forward_inputs: a fully_shard'ed module with no parameters of its own
    casts its floating inputs to param_dtype (and its outputs to output_dtype)."""
    for v in run(rank_pool, world_size, cases.paramless_unit_cast, {}):
        assert v == dict(seen="torch.bfloat16", out="torch.bfloat16", has_grad=True), v
    for v in run(rank_pool, world_size, cases.paramless_unit_cast, {"output_dtype": torch.float32}):
        assert v == dict(seen="torch.bfloat16", out="torch.float32", has_grad=True), v


def test_non_contiguous_parameter_is_refused_with_what_to_do(rank_pool):
    for v in run(rank_pool, 2, cases.noncontiguous, {}):
        kind, msg = v["refused"]
        assert kind == "ValueError", v
        for frag in ("_Transposed", "'proj.wt'", "(3, 4)", "(1, 3)", "contiguous()"):
            assert frag in msg, f"message lacks {frag!r}: {msg}"
        assert v["class"] == "_Transposed", "refused, yet the module was swapped"
        assert v["fixed"] == ("no error", ""), v


@pytest.mark.parametrize("world_size", [1, 2])
def test_shard_used_outside_its_units_forward_is_an_error(rank_pool, world_size):
    for v in run(rank_pool, world_size, cases.shard_used_outside, {"where": "all"}):
        kind, msg = v["penalty"]
        assert kind == "RuntimeError", v
        for frag in ("'0.weight'", "'2.bias'", "outside the forward", "local shard", "unshard"):
            assert frag in msg, f"message lacks {frag!r}: {msg}"
        assert v["plain_step"] == ("no error", "") and all(v["grads"]) and v["finite"], v


@ONE_RANK_RAISES
def test_shard_used_outside_on_one_rank_leaves_no_peer_waiting(rank_pool):
    """The error is raised after the pass's end-of-backward callback: every collective of the
    pass was issued on every rank, so the next step and a collective still run everywhere."""
    v0, v1 = run(rank_pool, 2, cases.shard_used_outside, {"where": "rank0"}, timeout_s=60.0)
    assert v0["penalty"][0] == "RuntimeError" and "outside the forward" in v0["penalty"][1], v0
    assert v1["penalty"] == ("no error", ""), v1
    for v in (v0, v1):
        assert v["plain_step"] == ("no error", "") and all(v["grads"]) and v["finite"], v


@pytest.mark.parametrize("mode", ["fast", "deterministic", "accumulation", "offload", "bf16"])
def test_normal_training_raises_no_false_alarm(rank_pool, mode):
    for v in run(rank_pool, 2, cases.no_false_alarm, {"mode": mode}):
        assert v["error"] == ("no error", ""), v


@ONE_RANK_RAISES
def test_parameter_used_on_some_ranks_only_is_an_error(rank_pool):
    """Rank 0 takes the branch, rank 1 does not: rank 1 owns b[3:8], saw no gradient for b, yet
    its reduced piece is not zero. Rank 0 saw one and is fine; a collective still runs after."""
    v0, v1 = run(rank_pool, 2, cases.branch_on_some_ranks, {"taken": [0]}, timeout_s=60.0)
    assert v0["error"] == ("no error", "") and v0["b_grad"], v0
    kind, msg = v1["error"]
    assert kind == "RuntimeError", v1
    for frag in ("'b'", "every rank must produce gradients for the same parameters", "0 * branch(x)"):
        assert frag in msg, f"message lacks {frag!r}: {msg}"
    assert v0["keys"] == v1["keys"] == ["a", "b"]


def test_branch_taken_everywhere_or_nowhere_is_fine(rank_pool):
    for taken in ([0, 1], []):
        for v in run(rank_pool, 2, cases.branch_on_some_ranks, {"taken": taken}):
            assert v["error"] == ("no error", ""), v
            assert v["b_grad"] == bool(taken), v


def test_deterministic_parameter_used_in_some_micro_batches_gets_its_gradient(rank_pool):
    """A parameter with a gradient in an earlier micro-batch of the step but not the last one
    still gets its shard gradient, bitwise the tree reference's."""
    for v in run(rank_pool, 2, cases.branch_in_some_microbatches, {}):
        assert v["error"] == ("no error", ""), v
        assert all(ok for _, ok in v["same"]), v


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_inference_mode_forward_before_training_then_trains_right(rank_pool, world_size):
    """The unsharded buffer first made under inference_mode was an inference tensor, and the
    next gather raised (W = 2) 'Inference tensors do not track version counter'."""
    for v in run(rank_pool, world_size, cases.eval_first_then_train, {}):
        assert v["eval"] == ("no error", "") and v["equal"], v


def test_reentrant_checkpointing_around_a_unit_is_a_clear_error_not_lost_gradients(rank_pool):
    for v in run(rank_pool, 2, cases.reentrant_checkpoint, {"reentrant": True}):
        kind, msg = v["error"]
        assert kind == "RuntimeError" and "use_reentrant=True" in msg and "use_reentrant=False" in msg, v
    for v in run(rank_pool, 2, cases.reentrant_checkpoint, {"reentrant": False}):
        assert v["error"] == ("no error", ""), v


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_gradient_penalty_trains_on_one_rank_and_is_a_clear_error_on_more(rank_pool, world_size):
    for v in run(rank_pool, world_size, cases.gradient_penalty, {}):
        if world_size == 1:
            assert v["error"] == ("no error", ""), v
        else:
            kind, msg = v["error"]
            assert kind == "RuntimeError" and "create_graph=True" in msg, v

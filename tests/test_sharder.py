"""Multi-rank tests of fsdp_core on gloo at W = 1, 2, 4, 8, through the session's rank pool."""
from __future__ import annotations

import pytest
import torch

import sharder_cases as cases
from pool_run import run

pytestmark = pytest.mark.multigpu


def check_parity(values, *, bitwise: bool, atol=None, rtol=None):
    for rank_value in values:
        assert rank_value["names"] == rank_value["ref_names"], "named_parameters() lost the original names"
        assert rank_value["pad_init"] == [], f"padding non-zero after init: {rank_value['pad_init']}"
        for rec in rank_value["records"]:
            step = rec["step"]
            assert rec["pad_reduce"] == [], f"step {step}: padding non-zero after reduction: {rec['pad_reduce']}"
            assert rec["pad_step"] == [], f"step {step}: padding non-zero after optimizer step: {rec['pad_step']}"
            assert rec["reassembled"], f"step {step}: local shards do not reassemble to the full parameters"
            for name, (max_abs, equal) in rec["diffs"].items():
                if bitwise:
                    assert equal, f"step {step}: {name} not bitwise equal to the reference (max |d| {max_abs:.3g})"
                else:
                    tol = atol + rtol  # parameters are O(1): a combined bound per element
                    assert max_abs <= tol, f"step {step}: {name} differs by {max_abs:.3g} > {tol:.3g}"


FP32 = dict(atol=1e-5, rtol=1.3e-6)   # torch.testing defaults for float32


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("wrap", ["per_block", "root_only", "every_leaf"])
def test_fast_sgd_parity(rank_pool, world_size, wrap):
    values = run(rank_pool, world_size, cases.parity, dict(wrap=wrap, steps=4, M=8, opt="sgd"))
    check_parity(values, bitwise=(world_size == 1), **FP32)


@pytest.mark.parametrize("world_size", [2, 8])
def test_fast_parity_no_reshard_and_offload(rank_pool, world_size):
    values = run(rank_pool, world_size, cases.parity,
                 dict(wrap="per_block", steps=3, M=8, opt="sgd", reshard=False, offload=True))
    check_parity(values, bitwise=False, **FP32)


def test_offload_exact_at_world_size_one(rank_pool):
    values = run(rank_pool, 1, cases.parity, dict(wrap="per_block", steps=3, M=4, opt="adamw", offload=True))
    check_parity(values, bitwise=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fast_bf16_mixed_precision_within_bf16_tolerance(rank_pool, world_size):
    values = run(rank_pool, world_size, cases.parity, dict(wrap="per_block", steps=3, M=4, opt="sgd", bf16=True))
    check_parity(values, bitwise=False, atol=1e-5, rtol=1.6e-2)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("opt,bf16", [("sgd", False), ("adam", False), ("adamw", False), ("adamw", True)])
def test_deterministic_bitwise_to_tree_reference(rank_pool, world_size, opt, bf16):
    values = run(rank_pool, world_size, cases.parity,
                 dict(wrap="per_block", steps=3, M=8, opt=opt, bf16=bf16, det=True, clip=0.5))
    check_parity(values, bitwise=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_deterministic_deep_nesting_bitwise(rank_pool, world_size):
    values = run(rank_pool, world_size, cases.parity,
                 dict(wrap="every_leaf", steps=2, M=4, opt="adamw", det=True))
    check_parity(values, bitwise=True)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("mode", [True, "full_recompute"])
def test_activation_checkpointing_inside_units(rank_pool, world_size, det, mode):
    """Non-reentrant activation checkpointing recomputes a unit's forward inside backward: the
    recompute must neither reshard (backward needs the parameters) nor count as a new call."""
    values = run(rank_pool, world_size, cases.parity,
                 dict(wrap="per_block", steps=2, M=4, opt="adamw", det=det, act_ckpt=mode))
    check_parity(values, bitwise=det, **FP32)  # fast: this file's reference is full-batch


@pytest.mark.parametrize("world_size", [1, 4])
def test_gradient_accumulation_equals_one_big_batch(rank_pool, world_size):
    values = run(rank_pool, world_size, cases.accumulation, dict(k=4, wrap="per_block"))
    for v in values:
        assert v["keys_a"] == v["keys_b"]
        assert v["max_diff"] < 1e-6


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_meta_init_equals_eager_bitwise(rank_pool, world_size):
    for v in run(rank_pool, world_size, cases.meta_init, dict(wrap="per_block")):
        assert v == dict(equal=True, keys=True, buffers=True, grads=True, pad=[])


def test_meta_init_missing_buffer_is_refused(rank_pool):
    msg = run(rank_pool, 2, cases.meta_init_missing_buffer, dict(wrap="per_block"))[0]
    assert "phase" in msg and "uninitialised" in msg, msg


@pytest.mark.parametrize("world_size", [1, 4])
def test_state_dict_roundtrip(rank_pool, world_size):
    for v in run(rank_pool, world_size, cases.roundtrip, dict(wrap="per_block")):
        assert v == dict(same=True, keys=True, shapes=True, plain_equal=True, pad=[])


def test_unshard_reshard_api(rank_pool):
    v = run(rank_pool, 2, cases.unshard_api, dict(wrap="per_block"))[0]
    assert v["during"] == (6, 6) and v["equal"]
    assert v["before"] == v["after"] and len(v["before"]) == 1   # a 1-D local shard
    assert v["cls"] == "FSDPZoo" and v["is_fsdp"]
    assert v["in_flight"] in ("gathering", "unsharded") and v["async_equal"]
    assert v["after_async"] == v["before"]


EXPECTED_ERRORS = {
    "mixed_devices": ("ValueError", ["mixed devices", "'1.weight'"]),
    "tied_across_units": ("ValueError", ["head.weight", "tied"]),
    "forward_on_meta": ("RuntimeError", ["meta", "materialize_meta"]),
    "already_sharded": ("ValueError", ["already sharded"]),
    "outer_first": ("ValueError", ["inner modules first"]),
    "sd_missing": ("RuntimeError", ["blocks.0.fc.weight", "bogus.weight"]),
    "sd_shape": ("RuntimeError", ["blocks.1.fc.weight", "(3, 3)"]),
    "not_a_module": ("TypeError", ["nn.Module"]),
    "container": ("ValueError", ["ModuleDict has no forward", "modules inside it"]),
    "det_grad_sync_odd": ("RuntimeError", ["power of two"]),
}


@pytest.mark.parametrize("world_size", [1, 2])
def test_user_errors_are_clear(rank_pool, world_size):
    got = run(rank_pool, world_size, cases.errors, dict(wrap="per_block"))[0]
    for case, (etype, fragments) in EXPECTED_ERRORS.items():
        kind, msg = got[case]
        assert kind == etype, f"{case}: expected {etype}, got {kind}: {msg}"
        for frag in fragments:
            assert frag in msg, f"{case}: message lacks {frag!r}: {msg}"


def test_no_process_group_is_a_clear_error():
    import torch.distributed as dist
    import fsdp_core

    if dist.is_initialized():
        pytest.skip("this process is a rank (torchrun): the default group exists")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fsdp_core.fully_shard(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("det", [False, True])
def test_prefetch_is_bitwise_neutral_and_follows_the_learned_order(rank_pool, world_size, det):
    """Prefetch (the next unit's all-gather started asynchronously, order learned from the
    previous pass) changes neither results nor gather counts while the order holds; when the
    order changes (a block skipped, blocks reordered) results stay bitwise equal, nothing is left
    unsharded after the step, and at most the mispredicted prefetches are extra gathers."""
    full, skip, back = [0, 1, 2, 3], [0, 2, 3], [3, 2, 1, 0]
    routes = [full, full, full, skip, full, back, back]
    values = run(rank_pool, world_size, cases.prefetch, {"routes": routes, "det": det})
    for rv in values:
        for step, (route, rec) in enumerate(zip(routes, rv["steps"])):
            on, off = rec["on"], rec["off"]
            assert rec["equal"], f"step {step}: prefetch changed the parameters"
            assert on["loss"] == off["loss"], f"step {step}: prefetch changed the loss"
            assert on["left"] == [] and off["left"] == [], f"step {step}: units left unsharded {on['left']}"
            assert on["now"] == 0 and off["now"] == 0, f"step {step}: unsharded bytes still allocated"
            assert off["gathers"]["async"] == 0
            total_on = on["gathers"]["sync"] + on["gathers"]["async"]
            total_off = off["gathers"]["sync"]
            same_order = step > 0 and routes[step - 1] == route
            if step == 0:
                assert on["gathers"] == off["gathers"], "nothing is learned before the first pass"
            elif same_order:
                assert total_on == total_off, f"step {step}: prefetch added gathers {on['gathers']} vs {total_off}"
                # forward: every block after the first; backward: every block (root is first)
                assert on["gathers"]["async"] >= 2 * len(route) - 1, f"step {step}: prefetch idle {on['gathers']}"
                assert on["peak"] > off["peak"], "a prefetched unit is unsharded ahead of use"
            else:
                assert total_off <= total_on <= total_off + 2, f"step {step}: {on['gathers']} vs {total_off}"


def test_reduction_starts_after_reshard_and_is_done_when_backward_returns(rank_pool):
    """Fast mode at W = 2: each unit's gradients are taken and the unit resharded before its
    reduce-scatter starts (neither the unsharded parameters nor their gradients are alive while
    it runs); the reduce-scatter is left in flight, and when ``backward()`` returns none is and
    every parameter has its shard gradient ([Note: gradient reduction order])."""
    for rv in run(rank_pool, 2, cases.reduction_order, {}):
        assert len(rv["seen"]) == 5  # the root and four blocks
        for s in rv["seen"]:
            assert s["sharded"] and s["unsharded_grads"] == 0, rv["seen"]
            assert s["in_flight"], rv["seen"]
        assert rv["left_in_flight"] == 0 and all(rv["grads"]), rv


def test_forward_starts_the_roots_and_first_blocks_gathers_together(rank_pool):
    """[Note: two gathers at a pass's start] at W = 2: once the order is learned, the forward's
    first wait is the root's, with the first block's prefetch already in flight beside it (not
    a synchronous root gather followed by the prefetch). The first forward learns the order:
    it prefetches nothing."""
    for seen in run(rank_pool, 2, cases.forward_start_gathers, {}):
        assert seen[0] is None, seen
        for step in seen[1:]:
            assert step is not None, f"the forward gathered the root synchronously: {seen}"
            unit, gathering = step
            assert unit == 0 and gathering == [0, 1], seen


@pytest.mark.parametrize("mode", ["fast", "deterministic"])
def test_one_rank_gradients_skip_the_flat_buffer_and_stay_exact(rank_pool, mode):
    """[Note: one rank, nothing to reduce]: at W = 1 in fast mode each shard gradient is the
    tensor autograd accumulated (no parameter shares a flat gradient buffer), bitwise the
    reference's over two backward passes, with zero padding where a parameter has an alignment
    gap. Deterministic mode keeps its flat pairwise stack (one buffer per unit)."""
    rv, = run(rank_pool, 1, cases.one_rank_gradients, dict(det=mode == "deterministic"))
    assert all(rv["equal"].values()), rv["equal"]
    assert rv["pad_bad"] == [], rv["pad_bad"]
    assert any(rv["padded"].values()), "the zoo must have a parameter with an alignment gap"
    if mode == "fast":
        assert not any(rv["shared"].values()), rv["shared"]
    else:
        assert any(rv["shared"].values()), rv["shared"]

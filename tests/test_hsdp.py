"""HSDP: fully_shard on a 2-D (replicate, shard) mesh, through the session's rank pool.

Deterministic mode at (R, S) is bitwise the 1-D run at W = R*S and the single-process tree
reference; fast mode meets its tiers; state dicts, clipping, prefetch and checkpoints work on the
mesh, and checkpoints move between mesh shapes bitwise. Meshes are built inside a case with
``fsdp_core.hsdp_mesh`` after ``prepare_hsdp_groups`` ran on every pool rank."""
from __future__ import annotations

import pytest

import hsdp_cases as hc
from pool_run import run

pytestmark = pytest.mark.multigpu

FP32_TOL = 1e-5 + 1.3e-6      # torch.testing's float32 atol + rtol (parameters are O(1))


def run_mesh(pool, mesh, fn, payload, *, world=None):
    """Run ``fn`` on the ranks of ``mesh`` (R, S) (or ``world`` ranks, 1-D), after making sure
    every pool rank has the meshes' sub-groups (a no-op once done; redone after a pool restart)."""
    W = world if mesh is None else mesh[0] * mesh[1]
    if W not in pool.world_sizes:
        pytest.skip(f"world size {W} needs more ranks than {max(pool.world_sizes)}")
    run(pool, max(pool.world_sizes), hc.prepare, {})
    return run(pool, W, fn, dict(payload, mesh=mesh))


def check_train(values, *, vs_1d: bool, vs_ref: bool, tol=None, norms_bitwise=False):
    for v in values:
        assert v["names"] == v["ref_names"], "named_parameters() lost the original names"
        assert v["pad_init"] == [], f"padding non-zero after init: {v['pad_init']}"
        for rec in v["records"]:
            step = rec["step"]
            assert rec["pad_reduce"] == [] and rec["pad_step"] == [], (step, rec["pad_reduce"], rec["pad_step"])
            assert rec["reassembled"], f"step {step}: shards do not reassemble to the full parameters"
            if vs_1d:
                assert rec["vs_1d"] == [], f"step {step}: not bitwise the 1-D run at W = R*S: {rec['vs_1d']}"
            if vs_ref:
                assert rec["vs_ref"] == [], f"step {step}: not bitwise the reference: {rec['vs_ref']} (max |d| {rec['max_diff']:.3g})"
            if tol is not None:
                assert rec["max_diff"] <= tol, f"step {step}: max |d| {rec['max_diff']:.3g} > {tol:.3g}"
            if norms_bitwise and rec["norms"]:
                assert len(set(rec["norms"])) == 1, f"step {step}: clip norms (HSDP, 1-D, reference) differ: {rec['norms']}"
    first = values[0]
    for v in values[1:]:  # replicas (and shards) agree on everything gathered
        assert [r["max_diff"] for r in v["records"]] == [r["max_diff"] for r in first["records"]]


MESHES = [(2, 1), (1, 2), (2, 2), (2, 4), (4, 2)]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_deterministic_bitwise_to_1d_and_reference(rank_pool, mesh):
    values = run_mesh(rank_pool, mesh, hc.train, dict(det=True, opt="adamw", M=8, steps=2, clip=0.5))
    check_train(values, vs_1d=True, vs_ref=True, norms_bitwise=True)


@pytest.mark.parametrize("mesh,family,wrap", [((2, 2), "mlp", "per_block"), ((4, 2), "mlp", "root_only"),
                                              ((2, 4), "zoo", "every_leaf")])
def test_deterministic_other_models_and_wraps(rank_pool, mesh, family, wrap):
    values = run_mesh(rank_pool, mesh, hc.train, dict(det=True, family=family, wrap=wrap, opt="adam", M=8, steps=2))
    check_train(values, vs_1d=True, vs_ref=True)


def test_deterministic_bf16_mixed_precision(rank_pool):
    values = run_mesh(rank_pool, (2, 2), hc.train, dict(det=True, opt="adamw", M=4, steps=2, bf16=True))
    check_train(values, vs_1d=True, vs_ref=False)  # the reference here does not cast


@pytest.mark.parametrize("mesh", [(2, 1), (1, 2)], ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fast_two_ranks_bitwise_to_data_parallel_reference(rank_pool, mesh, opt):
    values = run_mesh(rank_pool, mesh, hc.train, dict(det=False, opt=opt, M=4, steps=2))
    check_train(values, vs_1d=True, vs_ref=True)


@pytest.mark.parametrize("mesh", [(2, 2), (4, 2)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_fast_sgd_within_tolerance_and_clip_norm_like_1d(rank_pool, mesh):
    values = run_mesh(rank_pool, mesh, hc.train, dict(det=False, opt="sgd", M=8, steps=2, clip=0.5))
    check_train(values, vs_1d=False, vs_ref=False, tol=FP32_TOL)
    for rec in values[0]["records"]:
        hsdp, flat, ref = rec["norms"]
        # One shard group's sum: a norm counted once per replica would be sqrt(R) times larger.
        assert abs(hsdp - flat) <= 1e-6 * flat and abs(hsdp - ref) <= 1e-5 * ref, rec["norms"]


def test_optimizer_state_sharded_over_shard_dim_only(rank_pool):
    """At (2, 2) every rank holds the shards (and Adam state) of a 2-way sharding: the 1-D run at
    W = 2 sizes, not W = 4's; replicas of one shard hold the same shard."""
    v22 = run_mesh(rank_pool, (2, 2), hc.train, dict(det=True, opt="adamw", M=4, steps=1))
    v12 = run_mesh(rank_pool, (1, 2), hc.train, dict(det=True, opt="adamw", M=4, steps=1))
    assert [v["shard_numels"] for v in v22] == [v12[0]["shard_numels"], v12[1]["shard_numels"]] * 2
    assert [v["optim_numel"] for v in v22] == [v12[0]["optim_numel"], v12[1]["optim_numel"]] * 2


def test_fast_gradient_accumulation(rank_pool):
    for v in run_mesh(rank_pool, (2, 2), hc.accumulation, dict(k=4, wrap="per_block")):
        assert v["keys_a"] == v["keys_b"] and v["max_diff"] < 1e-6, v


@pytest.mark.parametrize("det", [False, True])
def test_prefetch_is_bitwise_neutral(rank_pool, det):
    full, skip = [0, 1, 2, 3], [0, 2, 3]
    values = run_mesh(rank_pool, (2, 2), hc.prefetch, dict(routes=[full, full, skip, full], det=det))
    for v in values:
        for step, rec in enumerate(v["steps"]):
            assert rec["equal"] and rec["on"]["loss"] == rec["off"]["loss"], f"step {step}: prefetch changed results"
            assert rec["on"]["left"] == [] and rec["on"]["now"] == 0, f"step {step}: left unsharded {rec['on']}"
        assert v["steps"][1]["on"]["gathers"]["async"] > 0, "no prefetch happened on a repeated order"


@pytest.mark.parametrize("mesh,src", [((2, 2), 3), ((4, 2), 0), ((2, 1), 1)])
def test_state_dicts_scatter_load_and_meta_init(rank_pool, mesh, src):
    for v in run_mesh(rank_pool, mesh, hc.state_dicts, dict(wrap="per_block", src_rank=src)):
        for name, got in v.items():
            assert got == dict(keys=True, equal=True, buffers=True, pad=[]), (name, got)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def hsdp_checkpoint(rank_pool, tmp_path_factory):
    """Deterministic AdamW at (2, 2): 3 steps, saved, 3 more (the uninterrupted run)."""
    path = str(tmp_path_factory.mktemp("hsdp") / "ckpt")
    payload = dict(path=path, det=True, opt="adamw", M=8, s=3, t=3, wrap="per_block", lr_at_save=5e-3)
    values = run_mesh(rank_pool, (2, 2), hc.ckpt_train_save, payload)
    for v in values:
        assert v["pad"] == [], v["pad"]
    return payload, values[0]


def test_hsdp_checkpoint_is_written_by_one_replica_row(hsdp_checkpoint):
    _, v = hsdp_checkpoint
    assert v["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "fsdp_core.json"], v["files"]
    assert v["manifest_mesh"] == [2, 2] and v["manifest_world"] == 2


@pytest.mark.parametrize("mesh_b,world,wrap", [((1, 4), None, "per_block"), ((4, 1), None, "root_only"),
                                               ((2, 4), None, "every_leaf"), (None, 8, "per_block"),
                                               (None, 2, "per_block")])
def test_checkpoint_resume_across_mesh_shapes_is_bitwise(rank_pool, hsdp_checkpoint, mesh_b, world, wrap):
    payload, saved = hsdp_checkpoint
    W = world if mesh_b is None else mesh_b[0] * mesh_b[1]
    values = run_mesh(rank_pool, None, hc.ckpt_resume, dict(payload, mesh_b=mesh_b, wrap_b=wrap), world=W)
    for v in values:
        assert v["steps"] == [3.0] and v["lrs"] == [5e-3, 1e-2], (v["steps"], v["lrs"])
        assert v["pad_load"] == [] and v["pad_end"] == [], (v["pad_load"], v["pad_end"])
    for key in ("loaded", "final"):
        got, want = values[0][key], saved["saved" if key == "loaded" else "final"]
        assert got.keys() == want.keys()
        bad = [k for k in want if not (got[k].dtype == want[k].dtype and got[k].equal(want[k]))]
        assert bad == [], f"{key} at {mesh_b or world}: not bitwise {bad}"


# --------------------------------------------------------------------------------------- errors
def test_mesh_mistakes_are_clear_errors(rank_pool):
    got = run_mesh(rank_pool, None, hc.errors, {}, world=4)[0]
    expected = {
        "three_dims": ("ValueError", ["3-D", "(replicate, shard)"]),
        "sizes_do_not_multiply": ("ValueError", ["multiply", "hsdp_mesh"]),
        "helper_sizes": ("ValueError", ["3 x 2", "multiply"]),
        "groups_swapped": ("ValueError", ["does not match its process groups"]),
        "inner_on_other_mesh": ("ValueError", ["'blocks.0'", "already sharded on a (2, 2) mesh", "same mesh"]),
        "resharded_on_other_mesh": ("ValueError", ["already sharded (on a (2, 2) mesh"]),
    }
    for case, (etype, fragments) in expected.items():
        kind, msg = got[case]
        assert kind == etype, f"{case}: expected {etype}, got {kind}: {msg}"
        for frag in fragments:
            assert frag in msg, f"{case}: message lacks {frag!r}: {msg}"


def test_fsdp2_takes_the_same_mesh(rank_pool):
    """The harness's HSDP peer: FSDP2's fully_shard on the mesh hsdp_mesh builds."""
    for v in run_mesh(rank_pool, (2, 2), hc.fsdp2_peer_smoke, {}):
        assert "Replicate" in v["placements"] and "Shard" in v["placements"] and v["grad"], v

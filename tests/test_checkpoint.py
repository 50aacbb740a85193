"""fsdp_core.checkpoint: save at one world size, resume at another, lose nothing; atomic; clear
errors. Plus the pretrained-weights flow (load_full_state_dict from one rank) and the pure
flat-range -> chunk math."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import checkpoint_cases as cases
from pool_run import run
from fsdp_core.checkpoint._layout import flat_range_chunks

FP32 = dict(atol=1e-5, rtol=1.3e-6)


def assert_state_equal(got: dict, want: dict, what: str, *, bitwise: bool = True):
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got.keys() ^ want.keys())}"
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, (what, k)
        if bitwise:
            assert torch.equal(got[k], want[k]), \
                f"{what}: {k} not bitwise equal (max |d| {(got[k] - want[k]).abs().max():.3g})"
        else:
            torch.testing.assert_close(got[k], want[k], **FP32, msg=lambda m: f"{what}: {k}: {m}")


# ------------------------------------------------------------------------------ pure chunk math
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), data=st.data())
def test_flat_range_chunks_tile_the_range_in_order(shape, data):
    numel = math.prod(shape)
    start = data.draw(st.integers(0, numel))
    end = data.draw(st.integers(start, numel))
    chunks = flat_range_chunks(shape, start, end)
    full = torch.arange(numel).reshape(shape)
    cursor = start
    for c in chunks:
        assert c.flat_start == cursor and c.flat_end > c.flat_start
        box = full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
        assert torch.equal(box.reshape(-1), torch.arange(c.flat_start, c.flat_end))  # a contiguous run
        cursor = c.flat_end
    assert cursor == end if chunks else start == end
    assert len(chunks) <= max(1, 2 * len(shape) - 1)


def test_flat_range_chunks_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        flat_range_chunks((2, 3), 4, 7)


# ----------------------------------------------------------------------- resume across world size
@pytest.fixture(scope="module")
def det_checkpoint(rank_pool, tmp_path_factory):
    """Deterministic AdamW: 3 steps at W=4, saved, then 3 more (the uninterrupted run)."""
    path = str(tmp_path_factory.mktemp("det") / "ckpt")
    payload = dict(path=path, det=True, opt="adamw", M=8, s=3, t=3, wrap="per_block", lr_at_save=5e-3)
    values = run(rank_pool, 4, cases.train_save, payload)
    for v in values:
        assert v["pad"] == [], f"padding non-zero: {v['pad']}"
    return payload, values[0]


def test_checkpoint_layout_on_disk(det_checkpoint):
    payload, v = det_checkpoint
    assert v["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp",
                          "fsdp_core.json"]
    parent = os.path.dirname(payload["path"])
    assert sorted(os.listdir(parent)) == ["ckpt"], "temporary directories left behind"


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size,wrap", [(1, "per_block"), (2, "per_block"), (8, "every_leaf")])
def test_deterministic_resume_is_bitwise_at_other_world_sizes(rank_pool, det_checkpoint, world_size, wrap):
    payload, saved = det_checkpoint
    values = run(rank_pool, world_size, cases.resume, dict(payload, wrap_b=wrap))
    for v in values:
        assert v["steps"] == [3.0], f"optimizer step counts after load: {v['steps']}"
        assert v["lrs"] == [5e-3, 1e-2], f"hyperparameters not restored: {v['lrs']}"
        assert v["pad_load"] == [] and v["pad_end"] == [], (v["pad_load"], v["pad_end"])
    assert_state_equal(values[0]["loaded"], saved["saved"], f"W={world_size} right after load")
    assert_state_equal(values[0]["final"], saved["final"], f"W={world_size} after 3 more steps")


@pytest.mark.multigpu
def test_checkpoints_interoperate_with_standard_dcp_tools(rank_pool, det_checkpoint, tmp_path):
    """Our checkpoint -> an unsharded model and optimizer (DCP's get_state_dict / load /
    set_state_dict) that continues bitwise like the sharded run; and back: a checkpoint the
    unsharded model writes with dcp.save loads into a sharded model at W=2."""
    payload, saved = det_checkpoint
    plain_path = str(tmp_path / "plain")
    v = run(rank_pool, 1, cases.unsharded_resume, dict(payload, plain_path=plain_path))[0]
    assert v["lrs"] == [5e-3, 1e-2]
    assert_state_equal(v["loaded"], saved["saved"], "unsharded, right after load")
    assert_state_equal(v["final"], saved["final"], "unsharded, after 3 more steps")
    back = run(rank_pool, 2, cases.resume, dict(payload, path=plain_path, s=6, t=0))
    for w in back:
        assert w["steps"] == [6.0] and w["lrs"] == [5e-3, 1e-2] and w["pad_load"] == [], w
    assert_state_equal(back[0]["loaded"], saved["final"], "sharded W=2 from a plain DCP checkpoint")


@pytest.mark.multigpu
def test_fast_mode_resume_within_tolerance(rank_pool, tmp_path):
    payload = dict(path=str(tmp_path / "ckpt"), det=False, opt="sgd", M=8, s=3, t=3, wrap="per_block")
    saved = run(rank_pool, 4, cases.train_save, payload)[0]
    resumed = run(rank_pool, 2, cases.resume, dict(payload, wrap_b="root_only"))[0]
    assert_state_equal(resumed["loaded"], saved["saved"], "fast, right after load")
    assert_state_equal(resumed["final"], saved["final"], "fast, after 3 more steps", bitwise=False)


# ------------------------------------------------------------------------------------- atomicity
@pytest.mark.multigpu
def test_crash_mid_save_leaves_previous_checkpoint_loadable(rank_pool, tmp_path):
    payload = dict(path=str(tmp_path / "ckpt"), det=True, opt="adamw", M=4, wrap="per_block")
    values = run(rank_pool, 2, cases.crash, payload)
    for rank, v in enumerate(values):
        kind, msg = v["crash_error"]
        assert kind in ("RuntimeError", "CheckpointError"), (rank, kind, msg)
        assert "simulated crash" in msg and "rank 1" in msg, (rank, msg)
        assert v["after_crash"] == ["ckpt"], f"leftovers after a failed save: {v['after_crash']}"
        assert v["a_intact"] and v["stale_a_intact"], "previous checkpoint not loadable after the crash"
        assert v["mid_publish_listing"] == [".ckpt.old-deadbeef", ".ckpt.tmp-stale"]
        assert v["mid_publish_a_intact"], "load did not fall back to the checkpoint renamed aside"
        assert v["after_resave"] == ["ckpt"], f"next save did not recover and clean: {v['after_resave']}"
        assert v["b_loaded"]


# ---------------------------------------------------------------------------------------- errors
EXPECTED = {
    "missing_path": ("CheckpointNotFoundError", ["nope", "does not exist"]),
    "not_a_checkpoint": ("CheckpointNotFoundError", ["empty", "not a checkpoint"]),
    "truncated": ("CheckpointError", ["truncated/__1_0.distcp", "truncated"]),
    "corrupt": ("CheckpointError", ["corrupt/__1_0.distcp", "CRC-32"]),
    "bad_metadata": ("CheckpointError", ["bad_meta/.metadata"]),
    "bad_manifest": ("CheckpointError", ["bad_manifest/fsdp_core.json", "corrupt"]),
    "plain_dcp_truncated": ("CheckpointError", ["plain_truncated/__1_0.distcp", "truncated"]),
    "missing_file": ("CheckpointError", ["missing_file/__1_0.distcp", "missing"]),
    "other_shapes": ("CheckpointError", ["'blocks.1.tiny'", "(5,)", "(3,)"]),
    "missing_keys": ("CheckpointError", ["missing keys", "blocks.2."]),
    "unexpected_keys": ("CheckpointError", ["unexpected keys", "blocks.1."]),
    "other_param_groups": ("CheckpointError", ["2 optimizer param groups", "has 1"]),
    "no_optimizer_state": ("CheckpointError", ["no optimizer state", "optimizer=None"]),
    "meta_model": ("RuntimeError", ["meta", "to_empty"]),
    "replace_non_checkpoint": ("CheckpointError", ["refusing to replace"]),
}


@pytest.mark.multigpu
def test_broken_checkpoints_and_mismatched_models_are_clear_errors_on_every_rank(rank_pool, tmp_path):
    values = run(rank_pool, 2, cases.errors, dict(root=str(tmp_path), opt="adamw", M=4, wrap="per_block"))
    for rank, got in enumerate(values):
        assert got.pop("healthy"), "the good checkpoint no longer loads after the error cases"
        for case, (etype, fragments) in EXPECTED.items():
            kind, msg = got[case]
            assert kind != "no error", f"rank {rank}: {case}: no error raised"
            if rank == 0 or kind == etype:  # other ranks may report rank 0's failure instead
                assert kind == etype, f"rank {rank}: {case}: expected {etype}, got {kind}: {msg}"
                for frag in fragments:
                    assert frag in msg, f"rank {rank}: {case}: message lacks {frag!r}: {msg}"


# ---------------------------------------------------------------------------- pretrained weights
@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [1, 4])
def test_pretrained_weights_scattered_from_rank0(rank_pool, world_size):
    values = run(rank_pool, world_size, cases.pretrained, dict(wrap="per_block"))
    for rank, v in enumerate(values):
        assert v["equal"] and v["buffers"] and v["pad"] == [], (rank, v["equal"], v["buffers"], v["pad"])
        biggest_unit = max(v["padded_numels"])
        for kind, n in v["seen"]:
            if kind == "scatter_send":      # the source sends one unit's flat buffer at a time
                assert rank == 0 and n <= biggest_unit, (rank, kind, n)
            elif kind == "scatter_recv":    # every rank receives only its shard
                assert n in v["shard_numels"], (rank, kind, n)
            else:                           # buffers, one at a time
                assert n <= max(v["buffer_numels"]), (rank, kind, n)
        assert biggest_unit < v["model_numel"] or world_size == 1 or len(v["padded_numels"]) == 1
        for case, frag in (("src_passes_none", "must pass the full state dict"), ("wrong_shape", "blocks.0.fc.weight")):
            kind, msg = v["errors"][case]
            assert kind in ("TypeError", "RuntimeError") and (frag in msg or "failed on rank 0" in msg), (rank, case, kind, msg)


# ------------------------------------------------------------------------------- single process
def test_single_process_unsharded_model_and_the_two_rename_fallback(tmp_path, monkeypatch):
    """Without torch.distributed (a model no unit owns): same format; and where the kernel lacks
    renameat2(RENAME_EXCHANGE), replacing a checkpoint falls back to two renames."""
    import fsdp_core.checkpoint as ckpt
    import sharder_cases as sc
    from fsdp_core.checkpoint import _files as _ckpt_files
    import sharder_models as zm

    def trained(steps):
        m = zm.build_zoo(0)
        opt = sc._opt("adamw", list(m.named_parameters()))
        for step in range(steps):
            zm.loss_of(m, zm.batch(step, 0)).backward()
            opt.step()
            opt.zero_grad()
        return m, opt

    path = tmp_path / "ck"
    ckpt.save(path, *trained(1))
    monkeypatch.setattr(_ckpt_files, "exchange", lambda a, b: False)
    m, opt = trained(2)
    ckpt.save(path, m, opt)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    m2 = zm.build_zoo(9)
    opt2 = sc._opt("adamw", list(m2.named_parameters()))
    ckpt.load(path, m2, opt2)
    assert_state_equal(m2.state_dict(), m.state_dict(), "unsharded model")
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert_state_equal(b["state"][i], a["state"][i], f"optimizer state of parameter {i}")

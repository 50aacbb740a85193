"""Checkpoint resume and CPU offload through the adapter protocol, for every sharder that declares
them (issue 19): FSDP2's DCP recipe and DDP's full state dict resume across world sizes in their
tiers, offload cases pass for fsdp_core and FSDP2, planted resume bugs fail with a replay line,
and `run --preset fsdp2-integration` stands for the guide's recipe."""
from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest

from verify.campaign.run import draw_scenarios, run_one, skip_reason
from verify.campaign.resume import ResumeCase, run_resume
from verify.scenarios import Scenario
from verify.sharders import has_checkpointing, load
from verify.tools.plants import mlp_scenario

TIMEOUT = 240.0
PLANTS = "tests.resume_plants"

GPT = Scenario("gpt", (("n_embd", 8), ("n_head", 2), ("n_layer", 2), ("vocab_size", 13)), 2,
               optimizer="adamw", lr=1e-2, weight_decay=0.1, micro_batches=4, steps=3)


def _skip_unless(pool, *sizes):
    missing = [w for w in sizes if w not in pool.world_sizes]
    if missing:
        pytest.skip(f"world sizes {missing} need more ranks than {max(pool.world_sizes)}")


# -- parent side, no ranks ------------------------------------------------------------------------

def test_scenario_offload_round_trips_and_old_json_loads():
    s = dataclasses.replace(GPT, offload=True)
    assert '"offload":true' in s.to_json() and Scenario.from_json(s.to_json()) == s
    assert "offload" not in GPT.to_json()                      # replay lines as before
    old = json.loads(GPT.to_json())
    assert "offload" not in old and Scenario.from_json(json.dumps(old)).offload is False
    with pytest.raises(ValueError, match="offload=1: must be a bool"):
        dataclasses.replace(GPT, offload=1).validate()


def test_offload_is_drawn_only_when_asked():
    kw = dict(world_size=2, mode="fast", n=6, seed=7, profile="dev")
    plain = draw_scenarios(**kw)
    assert plain == draw_scenarios(**kw, offloads=(False,)) and not any(s.offload for s in plain)
    assert all(s.offload for s in draw_scenarios(**kw, offloads=(True,)))
    both = draw_scenarios(**dict(kw, n=12), offloads=(False, True))
    assert {s.offload for s in both} == {False, True}


def test_every_builtin_has_checkpoints_and_the_offload_it_declares():
    for spec in ("fsdp_core", "torch_fsdp2", "ddp"):
        assert has_checkpointing(load(spec)), spec
    off = dataclasses.replace(GPT, offload=True)
    assert skip_reason(off, load("fsdp_core")) is None
    assert skip_reason(off, load("torch_fsdp2")) is None
    assert "does not declare offload = True" in skip_reason(off, load("ddp"))


def test_runnable_drops_offload_no_sharder_declares():
    from verify.campaign.run import _runnable
    assert _runnable(["ddp"], ["fast"], ["fp32"], [False, True])[2:] == ([False], ["offload"])
    assert _runnable(["ddp", "torch_fsdp2"], ["fast"], ["fp32"], [True])[2] == [True]


def test_preset_expands_to_the_guide_s_recipe_and_flags_override(monkeypatch, tmp_path, capsys):
    from verify.cli import EXIT_OK, main
    calls = []
    fake = types.ModuleType("verify.campaign.run")
    fake.run_campaign = lambda **kw: calls.append(kw) or []
    monkeypatch.setitem(sys.modules, "verify.campaign.run", fake)
    assert main(["run", "--preset", "fsdp2-integration", "--out", str(tmp_path)]) == EXIT_OK
    kw = calls[-1]
    assert kw["sharders"] == ["torch_fsdp2"] and kw["families"] == ["hf_gpt2", "hf_llama"]
    assert kw["dtypes"] == ("bf16",) and kw["offloads"] == (True,) and kw["modes"] == ("fast",)
    assert kw["world_sizes"] == [1, 2, 4, 8] and kw["resume_cases"] == 6
    assert str(kw["out_dir"]) == str(tmp_path)
    assert "preset fsdp2-integration: python -m verify run --sharder torch_fsdp2" in \
        capsys.readouterr().out
    main(["run", "--examples", "1", "--preset", "fsdp2-integration", "--world-sizes", "1,2",
          "--offload", "both", "--sharder", "fsdp_core,torch_fsdp2"])
    kw = calls[-1]
    assert kw["examples"] == 1 and kw["world_sizes"] == [1, 2]
    assert kw["offloads"] == (False, True) and kw["sharders"] == ["fsdp_core", "torch_fsdp2"]
    assert "overridden by: --examples 1 --world-sizes 1,2" in capsys.readouterr().out
    main(["run", "--out", str(tmp_path)])                     # no preset, no offload: as before
    assert "offloads" not in calls[-1]


def test_reports_show_offload_and_resume_side_by_side(tmp_path):
    from verify.report import write_peers_report, write_reports
    from verify.results import CaseResult, StepRecord
    rows = []
    off = dataclasses.replace(GPT, offload=True)
    for sharder in ("fsdp_core", "torch_fsdp2"):
        step = StepRecord(step=0, loss=1.0, loss_ref=1.0, bitwise=True, state_bytes=[10, 10],
                          step_time_s=0.01)
        for s, resume in ((GPT, False), (off, False), (off, True)):
            rows.append(CaseResult(
                scenario_json=s.to_json(), sharder=sharder,
                family=("resume:" if resume else "") + "gpt", world_size=2, mode="fast",
                dtype="fp32", optimizer="adamw", tier="bitwise", verdict="pass", steps=[step],
                offload=s.offload, save_world_size=4 if resume else None,
                save_after=1 if resume else None))
    peers = write_peers_report(rows, tmp_path, title="t").read_text()
    header = next(line for line in peers.splitlines() if line.startswith("| #"))
    assert "| offload " in header and "| resume " in header
    assert "4 -> 2 after 1" in peers
    kinds = [line.split("|")[1].strip() for line in peers.splitlines()
             if line.startswith("| case") or line.startswith("| resume")]
    assert kinds == ["case", "case", "case + offload", "case + offload", "resume + offload",
                     "resume + offload"]
    text = next(p for p in write_reports(rows, tmp_path) if p.name == "equivalence.md").read_text()
    summary = text.split("## Summary")[1]
    assert "| offload " in summary.splitlines()[2]
    resume = text.split("## Checkpoint-resume cases")[1]
    assert "| sharder " in resume and "| offload " in resume


# -- through the rank pool -----------------------------------------------------------------------

@pytest.mark.multigpu
@pytest.mark.parametrize("sharder, w_a, w_b, optimizer, tier", [
    ("torch_fsdp2", 1, 2, "adamw", "bitwise"),     # fast at W <= 2: bitwise on both sides
    ("torch_fsdp2", 4, 2, "sgd", "tolerance"),     # after W=4: the looser tier carries over
    ("ddp", 2, 1, "adam", "bitwise"),
])
def test_peer_resumes_across_world_sizes_within_its_tier(rank_pool, sharder, w_a, w_b, optimizer,
                                                         tier):
    _skip_unless(rank_pool, w_a, w_b)
    s = dataclasses.replace(GPT, optimizer=optimizer).with_world_size(w_b)
    result = run_resume(rank_pool, ResumeCase(s, w_a, 1), sharder=sharder, timeout_s=TIMEOUT)
    assert result.verdict in ("pass", "reported"), f"{result.reason}\nreplay: {result.replay}"
    assert result.tier == tier and result.sharder == sharder and len(result.steps) == 3
    assert f"--sharder {sharder} --resume-from {w_a} --save-after 1" in result.replay
    loaded = [c for c in result.checks if c["check"] == "loaded"]
    assert [c["status"] for c in loaded] == ["pass"]
    if tier == "bitwise":
        assert all(st.bitwise and st.grads_ok for st in result.steps), result.first_divergence


@pytest.mark.multigpu
@pytest.mark.parametrize("sharder", ["fsdp_core", "torch_fsdp2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_offload_cases_pass_bitwise(rank_pool, sharder, dtype):
    """CPU offload changes where shards live, not a value: bitwise at W = 2 as without it."""
    _skip_unless(rank_pool, 2)
    s = dataclasses.replace(GPT, offload=True, dtype=dtype)
    case = run_one(rank_pool, s, sharder=sharder, timeout_s=TIMEOUT)
    assert case.verdict in ("pass", "reported"), f"{case.reason}\nreplay: {case.replay}"
    assert case.offload and case.tier == "bitwise" and '"offload":true' in case.replay
    assert all(st.bitwise and st.grads_ok for st in case.steps), case.first_divergence


@pytest.mark.multigpu
def test_offloaded_fsdp2_resume_passes(rank_pool):
    _skip_unless(rank_pool, 1, 2)
    s = dataclasses.replace(GPT, offload=True, dtype="bf16").with_world_size(1)
    result = run_resume(rank_pool, ResumeCase(s, 2, 2), sharder="torch_fsdp2", timeout_s=TIMEOUT)
    assert result.verdict in ("pass", "reported") and result.offload, f"{result.reason}\n{result.replay}"
    assert all(st.bitwise for st in result.steps)


@pytest.mark.multigpu
@pytest.mark.parametrize("plant, mode, w_a, w_b, expect", [
    ("CoreSkipOptimState", "deterministic", 4, 2, "not bitwise equal"),
    ("CoreSwapShards", "deterministic", 1, 2, "differ from the state saved"),
    ("FSDP2SkipOptimState", "fast", 1, 2, "not bitwise equal"),
    ("FSDP2SwapShards", "fast", 1, 2, "differ from the state saved"),
])
def test_a_planted_resume_bug_fails_with_a_replay_line(rank_pool, plant, mode, w_a, w_b, expect):
    _skip_unless(rank_pool, w_a, w_b)
    spec = f"{PLANTS}:{plant}"
    s = dataclasses.replace(GPT, mode=mode, micro_batches=max(4, w_a)).with_world_size(w_b)
    result = run_resume(rank_pool, ResumeCase(s, w_a, 1), sharder=spec, timeout_s=TIMEOUT)
    assert result.verdict == "fail", result.reason
    assert expect in result.reason and f"after resuming at W={w_b}" in result.reason
    assert result.replay.startswith(f"python -m verify replay --sharder {spec} --resume-from {w_a}")
    assert all(st.bitwise for st in result.steps[:1])          # before the checkpoint: fine


@pytest.mark.multigpu
def test_a_load_that_leaves_the_stepped_copies_stale_fails_at_the_load(rank_pool):
    """The module loads right (full_parameters reads the saved state) but the masters the
    optimizer steps keep another seed's values: the ``loaded`` check holds each rank's
    local_pieces to the loaded parameters and says what was not refreshed; the correct engine
    passes the same case."""
    _skip_unless(rank_pool, 2, 1)
    s = mlp_scenario(1, optimizer="sgd", steps=3)
    ok = run_resume(rank_pool, ResumeCase(s, 2, 1), sharder=f"{PLANTS}:DDPMasters", timeout_s=TIMEOUT)
    assert ok.verdict == "pass", ok.reason
    bad = run_resume(rank_pool, ResumeCase(s, 2, 1), sharder=f"{PLANTS}:DDPStaleMasters",
                     timeout_s=TIMEOUT)
    assert bad.verdict == "fail", bad.reason
    assert "local_pieces" in bad.reason and "did not refresh the shard (or fp32 master)" in bad.reason, \
        bad.reason

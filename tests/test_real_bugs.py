"""The bugs that shipped in torch (docs/real_bugs.md), reached on the pinned torch by the
scenarios and checks that catch them where they exist:

- a gradient W times too large (pytorch#162338: gloo's reduce-scatter AVG returned the sum in
  torch 2.8.0) hides from Adam's parameters in the reported tier, not from the gradients and
  optimizer-state checks (verify/case/state_check.py), held in every tier;
- a tie split across two wrap units (pytorch#176076: silently untied up to torch 2.11, refused
  since 2.12) is drawn for the families that tie; a sharder that refuses it is skipped where its
  adapter declares so and an error where not, never a pass;
- Stateful app state resumed twice (load -> train -> save -> load) is the uninterrupted run, and
  a save of the state as loaded (what `dcp.load` left behind in torch 2.4-2.5, pytorch#138575)
  fails the second load.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from verify import strategies
from verify.campaign.resume import ResumeCase, draw_resume_cases, run_resume
from verify.campaign.run import run_one
from verify.case.state_check import NORM_RTOL, norm_problems
from verify.scenarios import TIES, Scenario, build_model, split_ties, wrap_units
from verify.sharders.torch_fsdp2 import REFUSES_SPLIT_TIES
from verify.tools.mutants import failed_checks
from verify.tools.plants import FAST4_ADAM
from verify.tools.plants.fixed_scenarios import mlp_scenario

GPT_TIED = Scenario("gpt", (("tied", True),), 2, micro_batches=2, steps=2)


# -- the optimizer-state check -------------------------------------------------------------------

def test_a_scale_fails_the_norm_check_and_rounding_noise_does_not():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    noise = torch.full((3,), 1e-9)                 # a gradient of rounding noise (O(1) off)
    ok = {"w": (g * (1 + 1e-6), g), "b": (-noise, noise)}
    assert norm_problems(ok, "fp32", "all gradients") == []
    for c in (2.0, 4.0, 0.5):
        bad = norm_problems({"w": (g * c, g), "b": (noise, noise)}, "fp32", "all gradients")
        assert bad and f"{c:.4f}x the reference's norm" in bad[0], bad
        assert bad[1].startswith("w (") and f"{c:.4f}x" in bad[1]
    nan = norm_problems({"w": (torch.full((2,), float("nan")), torch.ones(2))}, "bf16", "x")
    assert nan and "not finite" in nan[0]
    assert all(0 < r <= 0.5 for r in NORM_RTOL.values())   # W = 2 (off by 1.0) always caught


def test_a_scaled_gradient_cannot_hide_behind_adams_scale_invariance(rank_pool):
    """The sum not divided by W (what gloo's AVG did in torch 2.8.0) at W = 4 with Adam: the
    parameters stay inside the reported tier's bound, the gradients (4x) and the moments
    (exp_avg 4x, exp_avg_sq 16x) do not."""
    s = FAST4_ADAM
    clean = run_one(rank_pool, s, backend_check=False)
    assert clean.tier == "reported" and clean.verdict == "reported", clean.reason
    status = {(c["check"], c["step"]): c["status"] for c in clean.checks}
    assert all(status[("optimizer_state", i)] == "pass" for i in range(s.steps))
    assert all(status[("gradients", i)] == "pass" for i in range(s.steps))
    case = run_one(rank_pool, s, plant="no_divide_by_world", backend_check=False)
    assert case.verdict == "fail", case.reason
    assert failed_checks(case) == ("gradients", "optimizer_state"), case.reason
    assert "4.0000x the reference's norm" in case.reason          # the gradients, exp_avg
    assert "16.0000x the reference's norm" in case.reason         # exp_avg_sq
    assert "optimizer state not within the reported tier" in case.reason


@pytest.mark.parametrize("sharder", ["torch_fsdp2", "ddp"])
def test_peers_give_their_optimizer_state(rank_pool, sharder):
    s = mlp_scenario(2, optimizer="sgd_momentum")
    case = run_one(rank_pool, s, sharder=sharder)
    assert case.verdict == "pass", case.reason
    assert {c["status"] for c in case.checks if c["check"] == "optimizer_state"} == {"pass"}


# -- split ties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["per_block", "root_only", "every_leaf"])
def test_split_ties_put_the_embedding_and_its_tied_head_in_two_units(wrap):
    kept = dataclasses.replace(GPT_TIED, wrap=wrap)
    assert split_ties(kept) == []
    for ties in ("split", "split_retie"):
        s = dataclasses.replace(kept, ties=ties)
        assert split_ties(s) == ["wte.weight"]
        model = build_model(s)
        assert model.wte in wrap_units(s, model) and model.lm_head not in wrap_units(s, model)
        assert Scenario.from_json(s.to_json()) == s and f'"ties":"{ties}"' in s.to_json()
    assert "ties" not in kept.to_json()           # replay lines of kept ties print as before
    untied = dataclasses.replace(kept, model=(("tied", False),), ties="split")
    model = build_model(untied)
    assert split_ties(untied) == [] and wrap_units(untied, model) == \
        wrap_units(dataclasses.replace(untied, ties="kept"), model)


@settings(max_examples=60, deadline=None, database=None)
@given(strategies.scenarios(world_sizes=(2,), families=("gpt", "mlp")))
def test_split_ties_are_drawn_only_for_models_that_tie(s):
    if s.ties != "kept":
        assert s.family == "gpt" and dict(s.model)["tied"]
        assert s.ties in TIES and split_ties(s)


def test_split_ties_are_drawn():
    drawn = st.lists(strategies.scenarios(world_sizes=(2,), families=("gpt",)), min_size=40)
    seen = set()

    @settings(max_examples=5, deadline=None, database=None)
    @given(drawn)
    def collect(xs):
        seen.update(s.ties for s in xs)
    collect()
    assert {"kept", "split", "split_retie"} <= seen


def test_a_sharder_that_refuses_split_ties_is_skipped_where_it_declares_it(rank_pool):
    s = dataclasses.replace(GPT_TIED, ties="split")
    core = run_one(rank_pool, s)
    assert core.verdict == "skipped" and "tied across two units (wte.weight)" in core.reason
    fsdp2 = run_one(rank_pool, s, sharder="torch_fsdp2")
    if REFUSES_SPLIT_TIES:      # torch >= 2.12
        assert fsdp2.verdict == "skipped" and "pytorch#176076" in fsdp2.reason, fsdp2.reason
    else:                       # torch <= 2.11 unties the pair: caught, never a pass
        assert fsdp2.verdict == "fail", fsdp2.reason
    assert run_one(rank_pool, s, sharder="ddp").verdict == "pass"   # the wrap plan is not DDP's


@pytest.mark.skipif(not REFUSES_SPLIT_TIES, reason="torch <= 2.11 does not refuse a split tie")
def test_a_refusal_the_adapter_does_not_declare_is_an_error_naming_it(rank_pool):
    s = dataclasses.replace(GPT_TIED, ties="split_retie")
    case = run_one(rank_pool, s, sharder="tests.foreign_sharders:FSDP2Undeclared")
    assert case.verdict == "error", case.reason
    assert "already managed by another FSDP group" in case.reason


# -- Stateful app state, resumed twice -----------------------------------------------------------

# fast fp32 Adam at W = 2 (bitwise tier): saved after step 1 at W = 2, loaded at W = 2, trained to
# step 3, saved again through the same adapter instance, loaded by a third run, finished.
DOUBLE = ResumeCase(Scenario("gpt", (("tied", False),), 2, optimizer="adam", steps=4,
                             micro_batches=2), save_world_size=2, save_after=1, resume_again_after=3)
STATEFUL = "verify.sharders.torch_fsdp2:TorchFSDP2Stateful"


@pytest.mark.parametrize("sharder", [STATEFUL, "fsdp_core", "ddp"])
def test_a_double_resume_is_the_uninterrupted_run(rank_pool, sharder):
    result = run_resume(rank_pool, DOUBLE, sharder=sharder, timeout_s=240.0)
    assert result.verdict == "pass", result.reason
    assert len(result.steps) == 4 and all(st.bitwise for st in result.steps)
    loaded = [c for c in result.checks if c["check"] == "loaded"]
    assert [(c["step"], c["status"]) for c in loaded] == [(1, "pass"), (3, "pass")]
    assert "--resume-again-after 3" in result.replay


def test_a_save_of_the_state_as_loaded_rolls_training_back_and_fails(rank_pool):
    """pytorch#138575, planted: a single resume passes, the second load finds the state of the
    first load instead of the trained one."""
    single = dataclasses.replace(DOUBLE, resume_again_after=None)
    plant = "tests.resume_plants:FSDP2StaleAppState"
    assert run_resume(rank_pool, single, sharder=plant, timeout_s=240.0).verdict == "pass"
    result = run_resume(rank_pool, DOUBLE, sharder=plant, timeout_s=240.0)
    assert result.verdict == "fail", result.reason
    assert "differ from the state saved after step 2" in result.reason
    assert result.first_divergence is not None and result.first_divergence[0] == 3


def test_every_second_drawn_resume_case_resumes_twice():
    cases = draw_resume_cases(n=6, seed=5, world_sizes=[1, 2, 4], profile="dev")
    assert [c.resume_again_after is not None for c in cases] == [False, True] * 3
    for c in cases[1::2]:
        assert c.save_after < c.resume_again_after < c.scenario.steps

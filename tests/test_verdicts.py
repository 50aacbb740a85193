"""Verdicts a sharder's author can act on (issue 25): bitwise means the sharding, not the memory
layout (MKL_CBWR strict, verify/blas.py; the locator's kernel-difference line), failures
graded by severity and diagnosed worst first, draws that run, honest headlines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from verify.ranks.torchrun import is_torchrun

# each rank would run its own campaign in a subprocess; the pool run covers it
NOT_UNDER_TORCHRUN = pytest.mark.skipif(is_torchrun(), reason="each rank would run its own campaign in a subprocess; the pool run covers it")

from verify import blas
from verify.campaign.run import draw_scenarios, run_one
from verify.diagnosis.locate import locate_divergence
from verify.scenarios import Scenario

ROOT = Path(__file__).resolve().parents[1]
V = "tests.verdict_sharders:"


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k != blas.VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    env.update(kw)
    return env


def _skip_unless(pool, w):
    if w not in pool.world_sizes:
        pytest.skip(f"world size {w} needs more ranks than {max(pool.world_sizes)}")


# -- strict BLAS reproducibility ------------------------------------------------------------------

@pytest.mark.parametrize("given, seen", [(None, "AUTO,STRICT"), ("AUTO", "AUTO"), ("", "")])
def test_importing_verify_sets_strict_blas_unless_the_user_did(given, seen):
    code = ("import os, verify.blas as b; print(repr(os.environ.get('MKL_CBWR'))); "
            "print(b.state()['set_by_verify'])")
    env = _env() if given is None else _env(MKL_CBWR=given)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    value, by_us = out.stdout.split("\n")[:2]
    assert value == repr(seen) and by_us == str(given is None)


def test_the_report_header_line_says_what_was_set(monkeypatch):
    monkeypatch.setitem(blas._state, "set_by_verify", True)
    monkeypatch.setitem(blas._state, "torch_was_loaded", False)
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    assert "MKL_CBWR='AUTO,STRICT' (set by verify)" in blas.describe(mkl=True)
    assert "independent of alignment" in blas.describe(mkl=True)
    monkeypatch.setitem(blas._state, "set_by_verify", False)
    monkeypatch.setenv("MKL_CBWR", "")
    line = blas.describe(mkl=True)
    assert "the user's explicit value" in line and "not strict" in line
    monkeypatch.delenv("MKL_CBWR")
    assert "unset" in blas.describe(mkl=True)
    assert "no MKL" in blas.describe(mkl=False)


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_correct_sharder_with_misaligned_parameter_views_passes(rank_pool, world_size):
    """Parameters as views into a flat buffer at odd storage offsets: every drawn fast fp32
    case passes bitwise, over several seeds (before MKL_CBWR was strict, some failed)."""
    _skip_unless(rank_pool, world_size)
    assert os.environ.get("MKL_CBWR") == blas.STRICT   # this test process, through the plugin
    ran = 0
    for seed in (0, 1, 2):
        for s in draw_scenarios(world_size=world_size, mode="fast", n=4, seed=seed, dtypes=("fp32",)):
            case = run_one(rank_pool, s, sharder=V + "Misaligned", timeout_s=120.0)
            assert case.verdict == "pass" and case.tier == "bitwise", \
                f"{case.reason}\nreplay: {case.replay}"
            ran += 1
    assert ran == 12


# A case that failed bitwise through the Misaligned adapter with MKL_CBWR unset on this
# machine's CPU (AMD EPYC, the pinned torch's MKL): 'blocks.0.shared.bias' not bitwise equal.
_UNALIGNED_CASE = ('{"family":"special","model":{"n_blocks":1,"n_out":2,"width":7},"world_size":1,'
                   '"mode":"fast","optimizer":"sgd","lr":0.01,"weight_decay":0.0,"steps":1,'
                   '"micro_batches":1,"micro_batch_size":1,"dtype":"fp32","wrap":"per_block",'
                   '"reshard_after_forward":false,"seed":0}')


@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_without_the_strict_setting_the_misaligned_sharder_fails_where_the_cpu_shows_it():
    argv = [sys.executable, "-m", "verify", "replay", "--sharder", V + "Misaligned",
            _UNALIGNED_CASE]
    strict = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode == 0, strict.stdout + strict.stderr
    loose = subprocess.run(argv, cwd=ROOT, env=_env(MKL_CBWR=""), capture_output=True,
                           text=True, timeout=300)
    if loose.returncode == 0:
        pytest.skip("this CPU's MKL rounds alike at every alignment: nothing to show")
    assert loose.returncode == 1 and "not bitwise equal" in loose.stdout, loose.stdout + loose.stderr


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_locator_names_a_kernel_difference_not_the_unit(rank_pool, world_size):
    """A unit whose inputs and parameters equal the reference's but whose output does not:
    another kernel (fp64 accumulation), not the sharding."""
    _skip_unless(rank_pool, world_size)
    s = Scenario("mlp", tuple(sorted(dict(d_in=16, width=32, depth=2, d_out=5).items())),
                 world_size, micro_batches=2, micro_batch_size=3, wrap="every_leaf")
    case = run_one(rank_pool, s, sharder=V + "OtherKernel", timeout_s=120.0)
    assert case.verdict == "fail"
    line = locate_divergence(rank_pool, s, case, sharder=V + "OtherKernel")
    assert "blocks.0.fc forward: same inputs, different outputs: a kernel difference, not the " \
           "sharding" in line, line


# -- severity, signatures, the worst first ------------------------------------------------------

def _ulps_off(t, n: int):
    import torch
    out = t.clone().reshape(-1)
    for _ in range(n):
        out[0] = torch.nextafter(out[0], torch.tensor(float("inf")))
    return out.reshape(t.shape)


_ADAMW_W4 = ('{"family":"gpt","model":{"bias":false,"block_size":6,"n_embd":28,"n_head":4,"n_layer":1,'
             '"tied":false,"vocab_size":7},"world_size":4,"mode":"fast","optimizer":"adamw","lr":0.01,'
             '"weight_decay":0.0,"steps":1,"micro_batches":8,"micro_batch_size":1,"dtype":"fp32",'
             '"wrap":"per_block","reshard_after_forward":false,"seed":18425}')


@pytest.mark.multigpu
def test_a_wrong_learning_rate_within_the_reported_bound_fails_against_the_replayed_step(rank_pool):
    """Fast AdamW at W = 4 is held to what Adam can do from any gradients (2 lr per step), which
    a 1.5x learning rate stays within; the first step replayed from the adapter's own reduced
    gradients is not, so the case fails, in the optimizer phase. The correct adapter on the
    same case stays reported."""
    _skip_unless(rank_pool, 4)
    s = Scenario.from_json(_ADAMW_W4)
    ok = run_one(rank_pool, s, sharder="ddp", timeout_s=120.0)
    assert ok.verdict == "reported", f"{ok.reason}\nreplay: {ok.replay}"
    bad = run_one(rank_pool, s, sharder=V + "FastLr", timeout_s=120.0)
    assert bad.verdict == "fail", bad.reason
    assert "not what adamw computes from the initial parameters and this sharder's own reduced " \
           "gradients" in bad.reason, bad.reason
    from verify.diagnosis.shrink import first_phase
    assert first_phase(bad) == "optimizer" and bad.severity == "beyond tolerance"
    line = locate_divergence(rank_pool, s, bad, sharder=V + "FastLr")
    assert line.startswith("first divergence: step 0, ") and " optimizer: the reduced gradients " \
        "are within the reported tier, and the parameters after the step are not what adamw " \
        "computes from them" in line, line
    # without the replay (the physical bound alone) the same parameters pass: what it adds
    from verify.compare import bounds_for
    assert 1.5 * s.lr - s.lr < bounds_for(s, "reported").params.atol


@pytest.mark.multigpu
def test_adam_state_dropped_after_each_step_fails_against_the_replayed_steps(rank_pool):
    """Every step after the first is a fresh Adam's (its state dropped on every rank): within
    the reported bound, and caught by the replay of the later steps from the adapter's own
    reduced gradients, at step 1, in the optimizer phase."""
    _skip_unless(rank_pool, 4)
    import dataclasses
    s = dataclasses.replace(Scenario.from_json(_ADAMW_W4), steps=3)
    ok = run_one(rank_pool, s, sharder="ddp", timeout_s=120.0)
    assert ok.verdict == "reported", f"{ok.reason}\nreplay: {ok.replay}"
    bad = run_one(rank_pool, s, sharder=V + "ResetsAdam", timeout_s=120.0)
    assert bad.verdict == "fail", bad.reason
    assert "step 1: the parameters after step 1 are not what adamw computes" in bad.reason, bad.reason
    from verify.diagnosis.shrink import first_phase
    assert first_phase(bad) == "optimizer"
    # the located divergence follows the tier's checks, not the first last-bit difference
    line = locate_divergence(rank_pool, s, bad, sharder=V + "ResetsAdam")
    assert line.startswith("first divergence: step 0, optimizer: the reduced gradients are within "
                           "the reported tier, and the optimizer state after the step is not"), line


@pytest.mark.multigpu
def test_optimizer_state_lost_in_a_checkpoint_fails_after_the_load(rank_pool):
    """A resume case (fast AdamW, saved at W = 4, loaded at W = 2) whose checkpoint loses the
    optimizer state: the parameters load right, the next step is within Adam's reported bound,
    and the replay carried through the checkpoint fails it at the first step after the load."""
    _skip_unless(rank_pool, 4)
    import dataclasses
    from verify.campaign.resume import ResumeCase, run_resume
    s = dataclasses.replace(Scenario.from_json(_ADAMW_W4), world_size=2, steps=3)
    case = ResumeCase(scenario=s, save_world_size=4, save_after=1)
    ok = run_resume(rank_pool, case, sharder="ddp")
    assert ok.verdict == "reported", ok.reason
    bad = run_resume(rank_pool, case, sharder=V + "SavesNoOptimizerState")
    assert bad.verdict == "fail", bad.reason
    assert "first step after the load" in bad.reason, bad.reason
    assert not [c for c in bad.checks if c["check"] == "loaded" and c["status"] == "fail"]
    assert "the parameters as loaded equal the saved ones" in bad.reason, bad.reason


@pytest.mark.multigpu
def test_a_gradient_fault_in_the_reported_tier_is_located_in_backward(rank_pool):
    """No divide by W under fast AdamW at W = 4: Adam's update ignores the scale (the replayed
    step agrees), the gradients check does not; the located divergence names backward from the
    tier's own check, not the first last-bit difference of a bitwise re-run."""
    _skip_unless(rank_pool, 4)
    s = Scenario.from_json(_ADAMW_W4)
    bad = run_one(rank_pool, s, plant="no_divide_by_world", timeout_s=120.0)
    assert bad.verdict == "fail", bad.reason
    line = locate_divergence(rank_pool, s, bad, sharder="fsdp_core", plant="no_divide_by_world")
    assert line.startswith("first divergence: step 0, backward (reported tier): "), line
    assert "4.0000x" in line, line


@pytest.mark.multigpu
def test_a_forward_fault_in_the_tolerance_tier_is_located_in_forward(rank_pool):
    """A unit's output skewed (by up to 1) under fast SGD at W = 4: the loss is the first number
    off, so the located divergence says forward, as the headline's phase does, not backward
    (whose check fails too). At step 0 the parameters are the initial ones bit for bit, so the
    bitwise re-run names the unit; from step 1 on the tier's own checks say forward."""
    _skip_unless(rank_pool, 4)
    import dataclasses
    from verify.diagnosis.shrink import first_phase
    s = dataclasses.replace(Scenario.from_json(_ADAMW_W4), steps=2, optimizer="sgd")
    for cls, step in (("SkewsForward", 0), ("SkewsForwardLater", 1)):
        bad = run_one(rank_pool, s, sharder=V + cls, timeout_s=120.0)
        assert bad.verdict == "fail" and bad.tier == "tolerance", bad.reason
        assert first_phase(bad) == "forward", bad.checks
        line = locate_divergence(rank_pool, s, bad, sharder=V + cls)
        if step == 0:
            assert line.startswith("first divergence: step 0, blocks.0 forward: "), line
        else:
            assert line.startswith("first divergence: step 1, forward (tolerance tier): the loss "
                                   "is beyond the tier while the parameters after step 0 were "
                                   "within it"), line


@pytest.mark.multigpu
def test_halved_gradients_without_a_gradient_probe_fail_on_the_update(rank_pool):
    """Fast bf16 SGD at W = 4, lr 1e-3: a sharder that halves its gradients, with no
    reduced_gradients probe, moves every parameter by half the reference's update, within the
    widened bf16 atol element by element; the update check (the step's update against the
    reference's, by relative norm) fails it at step 0. fsdp_core itself passes the case."""
    _skip_unless(rank_pool, 4)
    import dataclasses
    s = dataclasses.replace(Scenario.from_json(_ADAMW_W4), optimizer="sgd", lr=0.001,
                            dtype="bf16", steps=2)
    ok = run_one(rank_pool, s, timeout_s=120.0)
    assert ok.passed and ok.tier == "tolerance", ok.reason
    bad = run_one(rank_pool, s, sharder=V + "HalvesGradientsUnseen", timeout_s=120.0)
    assert bad.verdict == "fail" and bad.severity == "beyond tolerance", bad.reason
    assert bad.reason.startswith("step 0: the update (the parameters after the step minus "
                                 "before): relative norm error 0.5 > 0.01 (0.5000x"), bad.reason


def test_a_failing_check_says_last_bit_or_beyond_tolerance_by_how_much():
    import torch
    from verify.case.severity import BEYOND, LAST_BIT, step_severity
    s = Scenario("mlp", tuple(sorted(dict(d_in=2, width=2, depth=1, d_out=2).items())), 2)
    p = {"w": torch.linspace(-1, 1, 6)}
    loss = torch.tensor(0.75)
    near = step_severity(s, "bitwise", loss=loss, loss_ref=loss, params={"w": _ulps_off(p["w"], 3)},
                         params_ref=p)
    assert near.cls == LAST_BIT and near.ulp == 3 and 0 < near.excess <= 1
    assert "last-bit, 3 ulp at most, within the fp32 torch.testing tolerance" in near.line
    far = step_severity(s, "bitwise", loss=loss, loss_ref=loss, params={"w": p["w"] + 0.5},
                        params_ref=p)
    assert far.cls == BEYOND and far.excess > 1e4 and "beyond tolerance" in far.line
    loss_off = step_severity(s, "bitwise", loss=loss + 1e-3, loss_ref=loss, params=p, params_ref=p)
    assert loss_off.cls == BEYOND     # the loss counts as much as any parameter
    s4 = Scenario("mlp", s.model, 4, mode="fast", optimizer="sgd", micro_batches=4)
    held = step_severity(s4, "tolerance", loss=loss, loss_ref=loss, params={"w": _ulps_off(p["w"], 1)},
                         params_ref=p)
    assert held.cls == BEYOND and "the tolerance tier's bound" in held.line  # a looser tier's failure


def test_pieces_that_cannot_be_compared_do_not_hide_the_measured_excess():
    """Overlapping pieces leave the gradients check an infinite excess: the case's excess is the
    measured one of the other checks, and the label says "not comparable" only when nothing
    was measured (never "infx")."""
    from verify.case.severity import BEYOND, case_severity
    from verify.results import severity_label
    numbers = {"check": "tolerance", "status": "fail", "severity": BEYOND, "excess": 1.2e5, "step": 0}
    pieces = {"check": "gradients", "status": "fail", "severity": BEYOND, "excess": float("inf"),
              "step": 0}
    assert case_severity([numbers, pieces], "fail") == (BEYOND, 1.2e5)
    assert case_severity([pieces, numbers], "fail") == (BEYOND, 1.2e5)
    assert case_severity([pieces], "fail") == (BEYOND, float("inf"))
    label = severity_label({"verdict": "fail", "severity": BEYOND, "excess": float("inf"),
                            "checks": [pieces]})
    assert label == "beyond tolerance, pieces not comparable element by element", label
    assert severity_label({"verdict": "fail", "severity": BEYOND, "excess": 1.2e5,
                           "checks": [numbers]}) == "beyond tolerance, 1.2e+05x"


def test_a_scaled_gradient_is_beyond_tolerance_even_below_atol():
    """A gradient 2x the reference's whose elements are all below the fp32 atol is within the
    torch.testing tolerance element by element, yet no last-bit difference: the relative-norm
    bound over all gradients classes it beyond tolerance; a 1-ulp difference stays last-bit."""
    import torch
    from verify.case.severity import BEYOND, LAST_BIT, state_severity
    from verify.case.state_check import gradient_problems
    ref = {"a": torch.linspace(1e-7, 2e-6, 8), "b": torch.linspace(-3e-7, 3e-7, 5)}

    def judged(grads):
        values = [{"records": [{"grads": {n: (0, g) for n, g in grads.items()}}]}]
        out: list = []
        bad = gradient_problems(values, 0, ref, "bitwise", "fp32", out)
        return bad, state_severity("bitwise", "fp32", out)

    bad, scaled = judged({n: 2 * g for n, g in ref.items()})
    assert bad and scaled.cls == BEYOND and scaled.excess > 50 and "relative-norm bound" in scaled.line
    bad, near = judged({"a": _ulps_off(ref["a"], 1), "b": ref["b"]})
    assert bad and near.cls == LAST_BIT and near.ulp == 1
    # fp32 gradients of a bf16 scenario (reduce dtype fp32): the line names the tolerance used
    out: list = []
    gradient_problems([{"records": [{"grads": {"a": (0, _ulps_off(ref["a"], 1)), "b": (0, ref["b"])}}]}],
                      0, ref, "bitwise", "bf16", out)
    line = state_severity("bitwise", "bf16", out).line
    assert "the fp32 torch.testing tolerance" in line and "bf16" not in line, line


def test_a_last_bit_label_between_values_near_zero_gives_the_tolerance_fraction_not_ulps():
    from verify.results import severity_label
    near = dict(verdict="fail", severity="last-bit", excess=0.31,
                checks=[dict(status="fail", ulp=1617829889)])
    assert severity_label(near) == "last-bit, 0.31 of the tolerance (values near 0, 1617829889 ulp apart)"
    assert severity_label(dict(near, checks=[dict(status="fail", ulp=3)])) == "last-bit, 3 ulp"


def test_the_headline_counts_every_verdict_exactly():
    from verify.results import headline
    rows = ([dict(verdict="pass", tier="bitwise")] * 2 + [dict(verdict="pass", tier="tolerance")]
            + [dict(verdict="reported", tier="reported")] * 5
            + [dict(verdict="fail", severity="last-bit")] * 2
            + [dict(verdict="fail", severity="beyond tolerance")] * 4
            + [dict(verdict="skipped")] * 10)
    assert headline(rows) == ("3 passed (2 bitwise, 1 tolerance), 5 reported, 6 failed "
                              "(2 last-bit, 4 beyond tolerance), 10 skipped")
    assert headline(rows[:2] + [dict(verdict="error")]) == "2 passed (2 bitwise), 1 failed (1 error)"


def test_an_error_line_always_carries_its_first_reason_line():
    from verify.diagnosis.shrink import first_line
    reason = ("W=2 -> 4 after 1/2 steps: the load phase (W=4, steps 1..1) did not complete:\n"
              "rank 0 raised in load_phase at world size 4:\nTraceback (most recent call last):\n  File \"x\"\n"
              "ValueError: FSDP2 refuses 0-d parameters")
    line = first_line(reason)
    assert line.startswith("W=2 -> 4") and "ValueError: FSDP2 refuses 0-d parameters" in line


@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_a_campaign_with_a_last_bit_and_a_gross_failure_diagnoses_the_gross_one_first(tmp_path):
    import json
    argv = [sys.executable, "-m", "verify", "run", "--sharder", V + "TwoFaults", "--world-sizes",
            "1", "--mode", "fast", "--dtype", "fp32", "--families", "mlp,special", "--examples",
            "4", "--seed", "0", "--shrink-budget", "30", "--out", str(tmp_path)]
    out = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    classes = [r["severity"] for r in results]
    assert set(classes) == {"last-bit", "beyond tolerance"}, classes
    blocks = [ln for ln in out.stdout.splitlines() if ln.startswith("DIAGNOSIS ")]
    assert len(blocks) == 2, out.stdout[-3000:]
    assert "beyond tolerance" in blocks[0] and "last-bit" in blocks[1]
    failed = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED (")]
    assert "beyond tolerance" in failed[0] and "last-bit, 1 ulp" in failed[-1]
    n_last, n_gross = classes.count("last-bit"), classes.count("beyond tolerance")
    want = f"0 passed, {len(results)} failed ({n_last} last-bit, {n_gross} beyond tolerance)"
    assert want in out.stdout
    md = (tmp_path / "equivalence.md").read_text()
    assert f"**FAIL**: {len(results)} cases: {want}." in md and "MKL_CBWR='AUTO,STRICT'" in md
    sections = md.split("## Diagnosis", 1)[1]
    assert sections.index("beyond tolerance") < sections.index("last-bit")
    # each signature got a minimal case of its own, of its own class
    minimal = {r["signature"]: r["minimal_reason"] for r in results}
    assert len(minimal) == 2 and all(minimal.values())


# -- draws that run -------------------------------------------------------------------------------

def _model(s) -> dict:
    return dict(s.model)


def test_draws_consult_the_adapter_and_count_what_it_declined():
    from collections import Counter
    kw = dict(world_size=2, mode="fast", n=6, dtypes=("fp32",))
    plain = [s for seed in range(4) for s in draw_scenarios(seed=seed, **kw)]
    assert any(s.weight_decay for s in plain)          # the plain draw asks for weight decay
    declined = Counter()
    drawn = [s for seed in range(4)
             for s in draw_scenarios(seed=seed, sharders=[V + "DeclinesDecay"], declined=declined, **kw)]
    assert len(drawn) == 24 and not any(s.weight_decay for s in drawn)
    assert set(declined) == {"no weight decay (declined by name)"} and declined.total() > 0
    # an adapter that declines nothing draws exactly the plain cases
    assert [s for seed in range(4) for s in draw_scenarios(seed=seed, sharders=["ddp"], **kw)] == plain


def test_the_special_family_draws_with_and_without_its_0d_parameter():
    kw = dict(world_size=2, mode="fast", n=6, dtypes=("fp32",), families=["special"])
    plain = [s for seed in range(3) for s in draw_scenarios(seed=seed, **kw)]
    assert {_model(s)["scalar"] for s in plain} == {True, False}
    for_them = [s for seed in range(3) for s in draw_scenarios(seed=seed, sharders=[V + "NoScalars"], **kw)]
    assert len(for_them) == 18 and not any(_model(s)["scalar"] for s in for_them)
    from verify.scenarios import build_model
    model = build_model(for_them[0], device="meta")
    assert not any(p.dim() == 0 for p in model.parameters())
    assert {"frozen", "shared", "tie_a", "tie_b"} <= {n.split(".")[2] for n, _ in model.named_parameters(remove_duplicate=False)
                                                      if n.startswith("blocks.")}


def test_resume_cases_consult_unsupported_at_both_world_sizes():
    from verify.campaign.resume import ResumeCase, draw_resume_cases, run_resume
    kw = dict(n=6, seed=0, world_sizes=[1, 2], modes=("fast",), dtypes=("fp32",), families=["special"])
    assert any(_model(c.scenario)["scalar"] for c in draw_resume_cases(**kw))
    cases = draw_resume_cases(sharders=[V + "NoScalars"], **kw)
    assert len(cases) == 6 and not any(_model(c.scenario)["scalar"] for c in cases)
    zero_d = ResumeCase(Scenario("special", (), 2, steps=2, micro_batches=2), 1, 1)
    case = run_resume(None, zero_d, sharder=V + "NoScalars")   # skipped before any rank runs
    assert case.verdict == "skipped" and "refuses 0-d parameters (logit_scale)" in case.reason


def test_the_plugin_draws_only_what_the_chosen_sharder_runs():
    from verify.pytest_plugin import Equivalence

    class Config:
        def getoption(self, name):
            return {"verify_timeout": 60.0, "sharder": "ddp", "verify_seed": 0}[name]
    eq = Equivalence(None, Config())
    assert any(s.dtype == "bf16" for s in eq.draw(2, "fast", 8, sharder="fsdp_core"))
    assert {s.dtype for s in eq.draw(2, "fast", 8)} == {"fp32"}      # ddp declares fp32 only
    assert not any(s.weight_decay for s in eq.draw(2, "fast", 4, sharder=V + "DeclinesDecay"))


@pytest.mark.multigpu
@NOT_UNDER_TORCHRUN
def test_a_campaign_of_an_adapter_that_declines_some_draws_skips_at_most_a_tenth(tmp_path):
    import json
    argv = [sys.executable, "-m", "verify", "run", "--sharder", V + "DeclinesDecay",
            "--world-sizes", "1,2", "--mode", "fast", "--dtype", "fp32", "--families",
            "mlp,special", "--examples", "3", "--seed", "0", "--shrink-budget", "0",
            "--resume-cases", "2", "--out", str(tmp_path)]
    out = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["results"]
    assert len(rows) == 8 and sum(r["verdict"] == "skipped" for r in rows) <= len(rows) // 10
    assert data["declined"] and set(data["declined"]) <= {"no weight decay (declined by name)",
                                                          "no weight decay (declined by name) (W=1)",
                                                          "no weight decay (declined by name) (W=2)"}
    assert "candidate draws declined by the adapter, set aside" in out.stdout
    assert "Declined while drawing" in (tmp_path / "equivalence.md").read_text()


@pytest.mark.slow
def test_the_textbook_fsdp_passes_its_drawn_cases_through_the_plugin_at_w_1_2_4(tmp_path):
    """12 drawn cases; before MKL_CBWR was strict one of them (W=1 gpt, 3 ulp) failed."""
    env = _env(VERIFY_MAX_WORLD_SIZE="4")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
            "--sharder", "examples.textbook_fsdp.adapter:Textbook", "--verify-world-sizes", "1,2,4",
            "--verify-examples", "4"]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "12 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]

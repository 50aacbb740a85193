"""Checkpoint-resume cases of the harness (verify/campaign/resume.py): train at W_a, save, load at W_b,
finish; every step against the uninterrupted run. Plus the pool-memory record of a campaign
(verify/tools/soak.py) and its report section."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import resume_cases
from verify.reference import run_reference
from verify.campaign.resume import ResumeCase, draw_resume_cases, resume_reference, run_resume
from verify.case.train import run_case
from verify.scenarios import Scenario

TIMEOUT = 240.0

# The done-when: deterministic AdamW, 3 steps at W=4, saved, 3 more steps.
DET_ADAMW = Scenario(family="gpt", model=(), world_size=4, mode="deterministic",
                     optimizer="adamw", lr=1e-2, weight_decay=0.1, steps=6, micro_batches=8)


def _skip_unless(pool, *sizes):
    missing = [w for w in sizes if w not in pool.world_sizes]
    if missing:
        pytest.skip(f"world sizes {missing} need more ranks than {max(pool.world_sizes)}")


@pytest.fixture(scope="module")
def uninterrupted(rank_pool):
    """The uninterrupted sharded run at W=4: rank 0's full parameters after every step."""
    _skip_unless(rank_pool, 4)
    res = rank_pool.run(4, run_case, {"scenario": DET_ADAMW.to_json()}, timeout_s=TIMEOUT)
    assert res.ok, res.error
    return [rec["params"] for rec in res.values[0]["records"]]


@pytest.mark.multigpu
@pytest.mark.parametrize("w_b", [2, 8])
def test_save_at_4_resume_at_w_b_is_bitwise_the_uninterrupted_run(rank_pool, uninterrupted, w_b):
    _skip_unless(rank_pool, 4, w_b)
    case = ResumeCase(DET_ADAMW.with_world_size(w_b), save_world_size=4, save_after=3)
    result, res_a, res_b = run_resume(rank_pool, case, timeout_s=TIMEOUT, keep_values=True)
    # Through the harness: every step bitwise equal to the reference, every invariant held.
    assert result.passed, f"{result.reason}\nreplay: {result.replay}"
    assert result.tier == "bitwise" and result.family == "resume:gpt"
    assert (result.world_size, result.save_world_size, result.save_after) == (w_b, 4, 3)
    assert [st.step for st in result.steps] == list(range(6))
    assert all(st.bitwise and st.padding_ok and st.reassembly_ok and st.grads_ok
               and st.collectives_ok for st in result.steps)
    # And directly: the resumed run's parameters are the uninterrupted W=4 run's, bit for bit.
    resumed = [rec["params"] for rec in res_a.values[0]["records"]] + \
              [rec["params"] for rec in res_b.values[0]["records"]]
    assert len(resumed) == len(uninterrupted) == 6
    for step, (got, want) in enumerate(zip(resumed, uninterrupted)):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"step {step}: {name} differs"


@pytest.mark.multigpu
@pytest.mark.parametrize("w_a, w_b, optimizer, tier", [
    (2, 1, "sgd", "bitwise"),          # fast mode at W <= 2 is bitwise on both sides
    (8, 2, "sgd", "tolerance"),        # after W=8: the looser tier carries over
    (1, 4, "adamw", "reported"),
])
def test_fast_mode_resume_is_within_its_tier(rank_pool, w_a, w_b, optimizer, tier):
    _skip_unless(rank_pool, w_a, w_b)
    s = Scenario(family="mlp", model=(), world_size=w_b, mode="fast", optimizer=optimizer,
                 steps=3, micro_batches=8)
    result = run_resume(rank_pool, ResumeCase(s, w_a, 2), timeout_s=TIMEOUT)
    assert result.passed, f"{result.reason}\nreplay: {result.replay}"
    assert result.tier == tier and len(result.steps) == 3
    if tier == "bitwise":
        assert all(st.bitwise for st in result.steps)


@pytest.mark.multigpu
@pytest.mark.parametrize("load_fn, expect", [
    (resume_cases.load_phase_without_load, "differ from the state saved"),
    (resume_cases.load_phase_model_only, "not bitwise equal"),
])
def test_a_broken_resume_fails(rank_pool, load_fn, expect):
    """A load that reads nothing (the decoy initialisation trains on) or forgets the optimizer
    (Adam's moments and step count start over) is caught."""
    _skip_unless(rank_pool, 2, 4)
    case = ResumeCase(DET_ADAMW.with_world_size(2), save_world_size=4, save_after=3)
    result = run_resume(rank_pool, case, timeout_s=TIMEOUT, load_fn=load_fn)
    assert result.verdict == "fail", result.reason
    assert expect in result.reason
    assert "after resuming at W=2" in result.reason
    from verify.results import reason_line   # the one line leads with what the load got wrong
    line = reason_line(result.reason)
    assert line.startswith(f"{case.label}: after resuming at W=2: ") and expect in line, line
    assert all(st.bitwise for st in result.steps[:3])           # before the checkpoint: fine
    assert not all(st.bitwise for st in result.steps[3:])
    assert result.first_divergence is not None and result.first_divergence[0] >= 3


def test_a_failing_phase_is_an_error_naming_it():
    class Failing:  # a pool whose save phase fails: the load phase must not run
        calls = 0

        def run(self, world_size, fn, payload, timeout_s=None):
            from verify.ranks.rank import PoolResult
            Failing.calls += 1
            return PoolResult(False, None, "rank 1 raised: boom", 0.0)

    s = Scenario(family="mlp", model=(), world_size=1, mode="fast", steps=2, micro_batches=2)
    result = run_resume(Failing(), ResumeCase(s, 2, 1))
    assert result.verdict == "error" and Failing.calls == 1
    assert "the save phase (W=2, steps 0..0)" in result.reason and "boom" in result.reason


# -- parent side, no ranks ------------------------------------------------------------------------

def test_resume_case_validates():
    s = Scenario(family="mlp", model=(), world_size=2, steps=3, micro_batches=2)
    with pytest.raises(ValueError, match="save_after"):
        ResumeCase(s, 2, 3)
    with pytest.raises(ValueError, match="save_after"):
        ResumeCase(s, 2, 0)
    with pytest.raises(ValueError, match="micro_batches=2 is smaller than save_world_size=4"):
        ResumeCase(s, 4, 1)
    with pytest.raises(ValueError, match="save_world_size"):
        ResumeCase(s, 3, 1)
    assert ResumeCase(s, 1, 2).scenario_a.world_size == 1


def test_drawn_resume_cases_are_valid_reproducible_and_varied():
    kw = dict(n=12, seed=5, world_sizes=[1, 2, 4, 8], modes=("fast", "deterministic"), profile="dev")
    cases = draw_resume_cases(**kw)
    assert cases == draw_resume_cases(**kw) and len(cases) == 12
    for c in cases:
        s = c.scenario
        assert c.save_world_size != s.world_size
        assert s.micro_batches >= max(c.save_world_size, s.world_size)
        assert 1 <= c.save_after < s.steps
    assert {c.scenario.mode for c in cases} == {"fast", "deterministic"}
    assert len({(c.save_world_size, c.scenario.world_size) for c in cases}) > 3
    assert draw_resume_cases(**dict(kw, n=0)) == []


def test_every_resume_draw_of_two_or_more_has_a_case_with_optimizer_state():
    """[Note: a resume draw with optimizer state]: a checkpoint that drops Adam's state must be
    exercised whatever the seed; the draws that had one are left as they were."""
    from verify.case.draw import with_stateful_optimizer as _with_stateful_optimizer
    for seed in range(12):
        kw = dict(n=3, seed=seed, world_sizes=[1, 2, 4], modes=("fast",), profile="dev")
        cases = draw_resume_cases(**kw)
        assert any(c.scenario.optimizer in ("adam", "adamw") for c in cases), (seed, cases)
        for c in cases:
            assert 1 <= c.save_after < c.scenario.steps
    sgd = Scenario(family="mlp", model=(), world_size=2, mode="fast", optimizer="sgd", steps=3,
                   micro_batches=4)
    two = [ResumeCase(sgd, 4, 1), ResumeCase(sgd, 1, 1, 2)]
    out = _with_stateful_optimizer(two, None)
    assert [c.scenario.optimizer for c in out] == ["sgd", "adamw"]   # the double resume
    assert out[1].resume_again_after == 2 and out[0] == two[0]
    assert _with_stateful_optimizer(two, lambda c, s: s.optimizer != "adamw") == two
    assert _with_stateful_optimizer(two[:1], None) == two[:1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_deterministic_reference_does_not_depend_on_the_world_size(dtype):
    """[Note: the reference of a resumed run]: tree(grad(loss_m / k)) / W is the same bits for
    every W, so the uninterrupted reference serves both phases."""
    s = dataclasses.replace(DET_ADAMW, steps=3, dtype=dtype, family="cs336", wrap="every_leaf")
    refs = [run_reference(s.with_world_size(w)) for w in (1, 2, 4, 8)]
    for other in refs[1:]:
        for a, b in zip(refs[0], other):
            assert torch.equal(a.loss, b.loss)
            assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)


def test_fast_reference_switches_world_size_at_the_checkpoint():
    s = Scenario(family="mlp", model=(), world_size=8, mode="fast", optimizer="sgd", steps=3,
                 micro_batches=8)
    case = ResumeCase(s, 1, 1)
    hybrid = resume_reference(case)
    at1, at8 = run_reference(s.with_world_size(1)), run_reference(s)
    assert torch.equal(hybrid[0].loss, at1[0].loss)                 # step 0 at W=1
    assert all(torch.equal(hybrid[0].params[n], at1[0].params[n]) for n in at1[0].params)
    with pytest.raises(ValueError, match="needs more than micro_batches"):
        run_reference(Scenario(family="mlp", model=(), world_size=1, micro_batches=2, steps=2),
                      world_size_at=lambda step: 4)
    assert len(hybrid) == len(at8) == 3


# -- pool memory ----------------------------------------------------------------------------------

def _samples(n: int, start_kib: int, end_kib: int, ranks: int = 2) -> list[dict]:
    out = []
    for i in range(1, n + 1):
        v = start_kib + (end_kib - start_kib) * max(0, i - 50) // max(1, n - 50)
        out.append({"case": i, "rss_kib": [v] + [v // 2] * (ranks - 1), "parent_kib": 1000,
                    "restarts": 0})
    return out


def test_rss_sample_reads_proc():
    from verify.tools.soak import rss_kib, sample

    class Pool:
        pids, restarts = [os.getpid()], 0

    if not os.path.exists(f"/proc/{os.getpid()}/status"):
        pytest.skip("no /proc")
    got = sample(Pool(), 3)
    assert got["case"] == 3 and got["rss_kib"][0] > 10_000 and got["parent_kib"] > 10_000
    assert rss_kib(2**31 - 1) is None


@pytest.mark.parametrize("end, held", [(104_000, True), (111_000, False), (90_000, True)])
def test_soak_check_from_case_50_to_the_end(tmp_path, end, held):
    from verify.report import write_reports
    from verify.tools.soak import check, summarize
    samples = _samples(120, 100_000, end)
    summary = summarize(samples)
    assert summary["baseline_case"] == 50 and summary["end_case"] == 120
    assert summary["within_limit"] is held
    assert summary["change_pct"] == pytest.approx(100 * (end - 100_000) / 100_000)
    write_reports([], tmp_path, pool_memory=samples)
    ok, line = check(tmp_path / "results.json")
    assert ok is held and ("held" if held else "GREW") in line


def test_pool_memory_across_a_restart_is_not_judged(tmp_path):
    """After a restart the end's processes are not the baseline's: a fresh rank sampled while
    it imports is a few MiB, so a change is no leak (and no 'held' either)."""
    from verify.report import write_reports
    from verify.tools.soak import check, summarize
    samples = _samples(120, 8_000, 300_000)
    for smp in samples[60:]:
        smp["restarts"] = 1
    assert summarize(samples)["within_limit"] is None
    write_reports([], tmp_path, pool_memory=samples)
    ok, line = check(tmp_path / "results.json")
    assert ok is False and "not judged" in line and "GREW" not in line, line
    text = (tmp_path / "equivalence.md").read_text()
    assert "**not judged**" in text and "**GREW**" not in text


def test_soak_check_needs_enough_cases(tmp_path):
    from verify.report import write_reports
    from verify.tools.soak import check
    write_reports([], tmp_path, pool_memory=_samples(20, 100_000, 100_000))
    ok, line = check(tmp_path / "results.json")
    assert not ok and "only 20 cases" in line
    write_reports([], tmp_path)
    assert check(tmp_path / "results.json")[0] is False


def test_pool_memory_section_survives_report_rerender(tmp_path):
    from verify.cli import main
    from verify.report import write_reports
    samples = _samples(60, 200_000, 204_000, ranks=4)
    write_reports([], tmp_path, title="t", pool_memory=samples)
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "equivalence.md").read_text()
    assert "## Pool memory" in text and "**held**" in text and "after case 50" in text
    assert json.loads((tmp_path / "results.json").read_text())["pool_memory"] == samples


# -- CLI --------------------------------------------------------------------------------------------

def test_cli_resume_cases_and_soak_options(monkeypatch, tmp_path, capsys):
    import sys
    import types
    from verify.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
    from verify.tools.soak import SOAK_ENV
    for k in SOAK_ENV:  # --soak sets them when unset; keep this session's environment as it was
        monkeypatch.setenv(k, "7")
    calls = []
    fake = types.ModuleType("verify.campaign.run")
    fake.run_campaign = lambda **kw: calls.append(kw) or []
    monkeypatch.setitem(sys.modules, "verify.campaign.run", fake)
    assert main(["run", "--out", str(tmp_path), "--resume-cases", "3"]) == EXIT_OK
    assert calls[-1]["resume_cases"] == 3
    main(["run", "--out", str(tmp_path)])
    assert "resume_cases" not in calls[-1]                   # default 0: not passed at all
    with pytest.raises(SystemExit) as exc:
        main(["run", "--resume-cases", "-1"])
    assert exc.value.code == EXIT_USAGE and "must be >= 0" in capsys.readouterr().err
    # --soak reads the campaign's results.json: no samples there -> exit 1 with the reason
    from verify.report import write_reports
    write_reports([], tmp_path)
    assert main(["run", "--out", str(tmp_path), "--soak"]) == EXIT_FAILED
    assert "no pool memory samples" in capsys.readouterr().out
    write_reports([], tmp_path, pool_memory=_samples(80, 1000, 1050))
    assert main(["run", "--out", str(tmp_path), "--soak"]) == EXIT_OK
    assert calls[-1]["interleave"] is True and os.environ[next(iter(SOAK_ENV))] == "7"


def test_cli_replay_resume_needs_both_options(capsys):
    from verify.cli import EXIT_USAGE, main
    for argv in (["replay", "--resume-from", "4", "{}"], ["replay", "--save-after", "2", "{}"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == EXIT_USAGE
        assert "--resume-from and --save-after go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--resume-from", "3", "--save-after", "1", "{}"])
    assert exc.value.code == EXIT_USAGE and "world size 3" in capsys.readouterr().err


def test_round_robin_deals_one_from_each_group():
    from verify.tools.soak import round_robin
    got = round_robin([(1, "a"), (1, "b"), (1, "c"), (2, "a"), (4, "a"), (4, "b")], key=lambda x: x[0])
    assert got == [(1, "a"), (2, "a"), (4, "a"), (1, "b"), (4, "b"), (1, "c")]


def test_pool_memory_record_with_cache_settings(tmp_path):
    from verify.report import write_reports
    from verify.tools.soak import check
    record = {"samples": _samples(60, 100_000, 101_000), "cache_env": {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": None}}
    write_reports([], tmp_path, pool_memory=record)
    text = (tmp_path / "equivalence.md").read_text()
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=16" in text and "LRU_CACHE_CAPACITY=default (1024)" in text
    assert check(tmp_path / "results.json")[0] is True


def test_cli_replay_rejects_a_case_that_is_not_a_resume_case(capsys):
    from verify.cli import EXIT_USAGE, main
    s = Scenario(family="mlp", model=(), world_size=2, steps=2, micro_batches=2)
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--resume-from", "4", "--save-after", "1", s.to_json()])
    assert exc.value.code == EXIT_USAGE
    assert "micro_batches=2 is smaller than save_world_size=4" in capsys.readouterr().err


@pytest.mark.slow
def test_the_printed_replay_line_reruns_the_case(capsys):
    """What a failing resume case prints (`resume_replay_command`) runs as it reads."""
    import shlex
    from verify.cli import main
    from verify.campaign.resume import resume_replay_command
    s = Scenario(family="mlp", model=(), world_size=1, mode="deterministic", optimizer="adam",
                 steps=2, micro_batches=2)
    argv = shlex.split(resume_replay_command(ResumeCase(s, 2, 1)))
    assert argv[:3] == ["python", "-m", "verify"]
    assert main(argv[3:]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS: fsdp_core resume W=2 -> 1 after 1/2 steps") and "step 1:" in out

"""Diagnosis (verify/diagnosis/diagnose.py, shrink.py, collective_log.py, hangs.py, locate.py):
planted bugs and the textbook FSDP's mistakes shrink to minimal failing scenarios whose first
divergence names the right phase; sharders that hang on purpose (tests/hang_sharders.py) are
explained by the first divergent collective, within the timeout + 15 s, and the campaign goes on.

The bugs run on a 2-rank pool of this module's own (the hang tests restart it; the textbook
sharder uses the default group, so it runs on the 2-rank pool as its main pool).
"""
from __future__ import annotations

import dataclasses
import time

import pytest

import verify.campaign.run as campaign
from verify.campaign.run import run_one
from verify.campaign.run import diagnose as diagnose_failures
from verify.diagnosis.diagnose import console_lines, first_line
from verify.diagnosis.collective_log import CollectiveLog
from verify.diagnosis.hangs import explain
from verify.ranks.pool import RankPool
from verify.scenarios import Scenario
from verify.diagnosis.shrink import candidates, n_units

BUDGET_S = 120.0
HANG_TIMEOUT_S = 8.0

# A case larger than it needs to be: 3 blocks, odd widths, 3 steps, M=8 x 3, Adam.
BIG = Scenario(family="mlp", model=(("d_in", 9), ("depth", 3), ("width", 13), ("d_out", 5)),
               world_size=2, mode="fast", optimizer="adam", steps=3, micro_batches=8,
               micro_batch_size=3, weight_decay=0.1)
BIG = dataclasses.replace(BIG, model=tuple(sorted(BIG.model)))
# ... with an odd-sized first block (8*13 + 13 = 117 elements: padded at W=2) that reduces after
# a larger one, so that a stale gradient bucket shows in its padding.
BIG_ODD = dataclasses.replace(BIG, model=tuple(sorted({**dict(BIG.model), "d_in": 8}.items())))
BIG_SPECIAL = Scenario(family="special", model=(("n_blocks", 3), ("n_out", 5), ("width", 9)),
                       world_size=2, mode="fast", optimizer="sgd_momentum", steps=3,
                       micro_batches=4, micro_batch_size=3)


@pytest.fixture(scope="module")
def pool():
    with RankPool(2, timeout_s=60.0) as p:
        yield p


def _minimal_ok(case) -> Scenario:
    s = Scenario.from_json(case.minimal_scenario_json)
    ints = [v for v in s.model_kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
    assert n_units(s) <= 2 and max(ints) <= 8 and s.steps <= 2, case.minimal_scenario_json
    assert case.minimal_replay.startswith("python -m verify replay") and case.flaky is False
    return s


@pytest.mark.parametrize("plant, start, phase", [
    ("allgather_one_ulp", BIG, " forward: its parameters "),
    ("drop_rank_grad", BIG, " backward: reduced gradient of "),
    ("dist_reduce_one_ulp", BIG, " backward: reduced gradient of "),
    ("update_one_ulp", BIG, " optimizer: the reduced gradients are equal, parameter "),
    ("padding_written_after_step", BIG, "optimizer (padding after the step)"),
])
def test_planted_bug_shrinks_and_names_its_phase(pool, plant, start, phase):
    case = run_one(pool, start, plant=plant)
    assert not case.passed
    groups = diagnose_failures(pool, [case], plant=plant, budget_s=BUDGET_S, log=lambda _: None)
    assert len(groups) == 1
    s = _minimal_ok(case)
    assert f"--plant {plant}" in case.minimal_replay and s.world_size == 2
    assert case.divergence.startswith("first divergence: step ") and phase in case.divergence, \
        case.divergence
    text = "\n".join(console_lines(groups))
    assert "original:" in text and "minimal:" in text and case.replay in text


@pytest.mark.parametrize("mistake, start, phase", [
    ("NoDivide", BIG, " backward: reduced gradient of "),
    ("StaleGather", BIG, " forward: output of "),
    ("FrozenHookCount", BIG_SPECIAL, " backward: reduced gradient of "),
    ("StalePadding", BIG_ODD, "(padding after the"),
])
def test_textbook_mistake_shrinks_and_names_its_phase(pool, mistake, start, phase):
    sharder = f"examples.textbook_fsdp.adapter:{mistake}"
    case = run_one(pool, start, sharder=sharder)
    assert not case.passed, case.reason
    diagnose_failures(pool, [case], budget_s=BUDGET_S, log=lambda _: None)
    s = _minimal_ok(case)
    assert sharder in case.minimal_replay and s.family == start.family
    assert phase in case.divergence, case.divergence


def test_a_wrong_root_parameter_is_named_not_the_first_block_whose_output_shows_it(pool):
    s = Scenario("gpt", (("n_embd", 8), ("n_head", 2), ("n_layer", 2), ("vocab_size", 13)), 2,
                 optimizer="sgd", micro_batches=2, steps=1)
    case = run_one(pool, s, sharder="tests.foreign_sharders:RootEmbeddingOff")
    assert not case.passed, case.reason
    diagnose_failures(pool, [case], budget_s=BUDGET_S, log=lambda _: None)
    assert "step 0, <root> forward: its parameters ['wpe.weight']" in case.divergence, case.divergence
    assert "the initial parameters as the sharder gathered them" in case.divergence


# -- the shrinker's pieces, no ranks ------------------------------------------------------------

def test_a_failure_shrinks_only_to_candidates_of_its_own_severity():
    """An invariant-only failure (padding wrong, every number right) does not shrink to a case
    whose numbers are wrong as well; numerical failures keep their class as before."""
    from verify.diagnosis.shrink import same_failure
    from verify.results import CaseResult

    def case(severity, *checks):
        return CaseResult(scenario_json="{}", sharder="s", family="mlp", world_size=2, mode="fast",
                          dtype="fp32", optimizer="sgd", tier="bitwise", verdict="fail",
                          severity=severity, checks=[{"check": c, "status": "fail"} for c in checks])
    padding = case("invariant", "padding")
    assert same_failure(padding, case("invariant", "padding"))
    assert not same_failure(padding, case("beyond tolerance", "numerics", "padding"))
    assert not same_failure(padding, case("invariant", "collectives"))
    gross = case("beyond tolerance", "numerics")
    assert same_failure(gross, case("beyond tolerance", "gradients", "padding"))
    assert not same_failure(gross, case("last-bit", "numerics"))


def test_an_error_shrinks_only_to_candidates_raising_the_same_thing():
    """A case that raised shrinks to smaller cases that raise the same exception (its numbers
    may change with the shapes), not to one that raises something else."""
    from verify.diagnosis.shrink import same_failure
    from verify.results import CaseResult

    def error(last):
        return CaseResult(scenario_json="{}", sharder="s", family="mlp", world_size=2,
                          mode="fast", dtype="fp32", optimizer="sgd", tier="bitwise",
                          verdict="error", severity="error",
                          reason=f"rank 0 raised in run_case:\nTraceback (most recent call last):\n"
                                 f"  File \"x.py\", line 3, in f\n{last}")
    size = error("RuntimeError: size mismatch, got input (4), mat (4x6), vec (6)")
    assert same_failure(size, error("RuntimeError: size mismatch, got input (2), mat (2x3), vec (3)"))
    assert not same_failure(size, error("RuntimeError: Expected floating point type for target "
                                        "with class probabilities, got Long"))
    assert not same_failure(size, error("ValueError: size mismatch, got input (2), mat (2x3), vec (3)"))


def test_a_signature_names_what_failed_first_not_what_followed():
    """A wrong update at step 0 makes step 1's gradients differ too: the signature names the
    step-0 failure only, so the group reads as the optimizer bug it is; a check failing at init
    (step None) comes first."""
    from verify.diagnosis.shrink import signature
    from verify.results import CaseResult

    def case(*checks):
        return CaseResult(scenario_json="{}", sharder="s", family="mlp", world_size=2, mode="fast",
                          dtype="fp32", optimizer="sgd", tier="bitwise", verdict="fail",
                          severity="beyond tolerance",
                          checks=[{"check": c, "status": st, "step": step} for c, st, step in checks])
    later = case(("bitwise", "fail", 0), ("gradients", "pass", 0), ("gradients", "fail", 1),
                 ("bitwise", "fail", 1))
    assert signature(later) == "s fail numerics beyond tolerance optimizer"
    init = case(("padding", "fail", None), ("bitwise", "fail", 0))
    assert signature(init).startswith("s fail padding ")


def test_candidates_are_valid_and_simpler():
    cands = list(candidates(BIG))
    assert cands and len(set(cands)) == len(cands) and BIG not in cands
    for c in cands:
        c.validate()
        assert c.world_size >= 2 and c.steps <= BIG.steps
    assert dataclasses.replace(BIG, steps=1) == cands[0]      # fewer steps first
    narrow = [c for c in cands if c.model != BIG.model]
    assert all(min(v for v in c.model_kwargs.values() if isinstance(v, int)
                   and not isinstance(v, bool)) >= 1 for c in narrow)
    # a width goes below 2 only where that removes units; removing a block comes first
    assert narrow[0].model_kwargs["depth"] < 3


def test_first_line_of_a_hang_is_the_timeout_line():
    reason = ("timed out after 8 s running verify.case.train.run_case at world size 2: ranks "
              "[0, 1] did not finish\n\nrank 0 was stuck here:\n  File \"<string>\", line 1 in <module>")
    assert first_line(reason).startswith("timed out after 8 s")
    from verify.report.tables import _reason_line
    assert _reason_line(reason).startswith("timed out after 8 s")
    assert _reason_line("Traceback\n  File x\nRuntimeError: boom") == "RuntimeError: boom"


def test_the_line_of_an_error_names_the_sharders_frame_not_the_harnesss_wrapper():
    import os
    from verify.results import reason_line
    here = os.path.dirname(os.path.abspath(__file__))
    harness = os.path.join(os.path.dirname(here), "verify")
    reason = (
        "rank 0 raised in verify.case.train.run_case at world size 2:\n"
        "Traceback (most recent call last):\n"
        f'  File "{harness}/case/train.py", line 300, in run_case\n    trainer.step(i)\n'
        '  File "/home/u/mysharder/fsdp.py", line 71, in gather\n    dist.all_reduce(t)\n'
        f'  File "{harness}/diagnosis/collective_log.py", line 218, in logged\n    return fn()\n'
        '  File "/x/site-packages/torch/distributed/c10d_logger.py", line 83, in wrapper\n'
        "    return func()\n"
        "RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo\n")
    assert reason_line(reason) == ("rank 0 raised RuntimeError: Cannot use ReduceOp.PREMUL_SUM "
                                   "with Gloo (at /home/u/mysharder/fsdp.py:71 in gather)")
    no_user = reason.replace('  File "/home/u/mysharder/fsdp.py", line 71, in gather\n    dist.all_reduce(t)\n', "")
    assert "(at verify/diagnosis/collective_log.py:218 in logged)" in reason_line(no_user)


_RAISED_THEN_STALLED = (
    "rank 1 raised in verify.case.train.run_case at world size 2:\n"
    "Traceback (most recent call last):\n"
    '  File "/work/main/verify/ranks/rank.py", line 244, in serve\n'
    "    ok, value = True, fn(payload, contexts[world_size])\n"
    "                      ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/tmp/x/mysharder/edge.py", line 74, in shard\n'
    '    raise RuntimeError("planted: shard() failed")\n'
    "RuntimeError: planted: shard() failed on rank 1\n\n\n"
    "ranks [0] did not finish within 2 s of the first error (likely waiting in a collective the "
    "failed rank never joined); the pool restarts\n\n"
    "rank 0 was stuck here:\n"
    '  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 4394 in all_gather_single\n')


def test_the_line_of_a_rank_that_raised_names_its_exception_and_line_before_the_stall():
    # The stalled peers are a consequence: the line leads with what rank 1 raised and where.
    line = first_line(_RAISED_THEN_STALLED)
    assert line.startswith("rank 1 raised RuntimeError: planted: shard() failed on rank 1 "
                           "(at /tmp/x/mysharder/edge.py:74 in shard)"), line
    assert "then ranks [0] did not finish within 2 s" in line, line
    from verify.report.tables import _reason_line
    assert _reason_line(_RAISED_THEN_STALLED) == line


def test_the_line_of_an_adapter_import_error_names_the_adapters_line():
    """The harness's error about an adapter's import, raised from the adapter's own exception:
    the line points at the adapter's line, not at the harness's re-raise (nor at importlib)."""
    import os
    from verify.results import reason_line
    harness = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "verify")
    reason = (
        "rank 0 raised in verify.ranks.poolset.import_adapter at world size 2:\n"
        "Traceback (most recent call last):\n"
        f'  File "{harness}/sharders/__init__.py", line 66, in load_class\n    mod = import_module(m)\n'
        '  File "<frozen importlib._bootstrap>", line 1204, in _gcd_import\n'
        '  File "/tmp/p/probe_c/adapter_importfail.py", line 4, in <module>\n    raise ImportError("no")\n'
        "ImportError: no\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        f'  File "{harness}/ranks/rank.py", line 244, in serve\n    fn(payload)\n'
        f'  File "{harness}/sharders/__init__.py", line 72, in load_class\n    raise SharderSpecError(x)\n'
        "verify.sharders.SharderSpecError: --sharder probe_c.adapter_importfail:Mine6: cannot import\n")
    line = reason_line(reason)
    assert line == ("rank 0 raised verify.sharders.SharderSpecError: --sharder "
                    "probe_c.adapter_importfail:Mine6: cannot import (at "
                    "/tmp/p/probe_c/adapter_importfail.py:4 in <module>)"), line


def test_the_line_of_a_death_names_the_rank_that_died_not_the_peer_that_lost_it():
    """A rank dies in backward; its peer raises gloo's "Connection closed by peer" before the
    pool sees the death: the line names the dead rank. A rank that raised on its own still leads."""
    died = ("rank 1 (pid 4242) exited with code 1 while running verify.case.train.run_case at "
            "world size 2; the pool restarts")
    lost = ("rank 0 raised in verify.case.train.run_case at world size 2:\n"
            "Traceback (most recent call last):\n"
            '  File "/tmp/x/mysharder/ddp.py", line 83, in sync\n    dist.all_reduce(g)\n'
            "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
            "by peer [127.0.0.1]:36139\n")
    line = first_line(lost + "\n\n" + died)
    assert line.startswith("rank 1 exited with code 1 (then ranks 0 raised: the peer was gone)"), line
    own = lost.replace("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                       "by peer [127.0.0.1]:36139", "planted: shard() failed")
    line = first_line(own + "\n\n" + died)
    assert line.startswith("rank 0 raised RuntimeError: planted: shard() failed"), line
    assert first_line(died).startswith("rank 1 (pid 4242) exited with code 1"), first_line(died)


def test_the_line_of_an_error_inside_torch_points_at_the_caller_and_follows_chained_errors():
    reason = ("rank 0 raised in verify.case.train.run_case at world size 1:\n"
              "Traceback (most recent call last):\n"
              '  File "/repo/verify/scenarios/special.py", line 45, in tie_weights\n'
              "    self.head.weight = self.emb.weight\n"
              '  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1962, in __getattr__\n'
              "    raise AttributeError(\n"
              "KeyError: 'weight'\n\n"
              "During handling of the above exception, another exception occurred:\n\n"
              "Traceback (most recent call last):\n"
              '  File "/repo/verify/scenarios/special.py", line 45, in tie_weights\n'
              "    self.head.weight = self.emb.weight\n"
              '  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1964, in __getattr__\n'
              "    raise AttributeError(\n"
              "AttributeError: 'Linear' object has no attribute 'weight'\n")
    assert first_line(reason) == ("rank 0 raised AttributeError: 'Linear' object has no attribute "
                                  "'weight' (at /repo/verify/scenarios/special.py:45 in tie_weights)")
    parent = ("the adapter m:A's parent side raised:\nTraceback (most recent call last):\n"
              '  File "/repo/verify/campaign/run.py", line 76, in run_one\n    why = adapter.unsupported(s)\n'
              '  File "/tmp/m.py", line 9, in unsupported\n    raise KeyError(\"n_embd\")\n'
              "KeyError: 'n_embd'\n")
    assert first_line(parent) == ("the adapter m:A's parent side raised: KeyError: 'n_embd' "
                                  "(at /tmp/m.py:9 in unsupported)")


def test_explain_names_the_first_divergent_collective(tmp_path):
    def log(rank, lines):
        (tmp_path / f"collectives.{rank}").write_text("".join(lines))
    a = "B\t1\tall_reduce\t0,1\t64\tfp32\tstep 0 <- x.py:1:f\nE\t1\n"
    log(0, [a, "B\t2\treduce_scatter_tensor\t0,1\t2048\tfp32\tstep 0 backward blocks.0 <- x.py:2:g\n"])
    log(1, [a, "B\t2\tall_gather_into_tensor\t0,1\t1024\tfp32\tstep 0 forward blocks.0 <- x.py:3:h\n"])
    text = explain(str(tmp_path), 2)
    assert ("rank 1's 2nd collective on group [0, 1] is all_gather_into_tensor 1.0 KiB fp32"
            in text and "rank 0's is reduce_scatter_tensor 2.0 KiB" in text), text
    log(1, [a])                                   # rank 1 never issued the 2nd
    text = explain(str(tmp_path), 2)
    assert "rank 1 issued only 1 collective on group [0, 1]; rank 0's 2nd is reduce_scatter" in text
    log(1, [a, "B\t2\treduce_scatter_tensor\t0,1\t2048\tfp32\tsomewhere\nE\t2\n"])
    text = explain(str(tmp_path), 2)              # same sequences: who is inside the last one
    assert "entered by ranks [0] and not by rank 1" in text, text


def test_a_collective_on_a_group_wider_than_the_case_says_which_group_it_was(tmp_path):
    """A sharder that uses the default process group while its adapter says world = "group":
    at W = 1 its broadcast waits for ranks that do not run the case."""
    (tmp_path / "collectives.0").write_text("B\t1\tbroadcast\t0,1,2,3\t64\tfp32\tshard <- m.py:7:wrap\n")
    text = explain(str(tmp_path), 1)
    assert "on a group with ranks 1, 2, 3, which do not run this case (its ranks: [0])" in text, text
    assert 'declares world = "default"' in text and "backend stall" not in text, text


def test_collective_log_is_a_noop_without_a_path(monkeypatch):
    import torch.distributed as dist
    monkeypatch.delenv("VERIFY_COLLECTIVE_LOG", raising=False)
    before = dist.all_reduce
    with CollectiveLog() as log:
        log.install()
        assert dist.all_reduce is before
    assert dist.all_reduce is before


def test_a_wrapper_a_sharder_puts_over_the_log_stays_after_the_case(tmp_path):
    import torch.distributed as dist
    plain = dist.all_reduce
    try:
        with CollectiveLog(str(tmp_path / "collectives.0")) as log:
            log.install()
            logged = dist.all_reduce

            def sharders(*a, **kw):
                return logged(*a, **kw)
            dist.all_reduce = sharders
        assert dist.all_reduce is sharders   # the sharder's stays; the log under it is inert
        with CollectiveLog(str(tmp_path / "collectives.0")) as log:
            log.install()
        assert dist.all_reduce is sharders
    finally:
        dist.all_reduce = plain


def test_the_frames_the_log_skips_are_files_that_exist():
    """``where`` skips the harness's own collective wrappers by path; a path left stale by a
    move would silently name a wrapper instead of the sharder's line."""
    import os
    from pathlib import Path
    from verify.diagnosis import collective_log
    root = Path(__file__).resolve().parents[1]
    harness = [p for p in collective_log._SKIP_FILES if p.startswith("verify")]
    assert len(harness) == 3, harness
    for p in harness:
        assert (root / p.rstrip(os.sep)).exists(), p


# -- flaky, the campaign -------------------------------------------------------------------------

def test_a_failure_that_does_not_reproduce_is_flaky(pool):
    case = run_one(pool, BIG, sharder="tests.hang_sharders:FlakyOnce")
    assert case.verdict == "fail"
    diagnose_failures(pool, [case], budget_s=BUDGET_S, log=lambda _: None)
    assert case.flaky is True and "did not reproduce" in case.shrink_note
    assert not case.minimal_scenario_json
    assert "FLAKY" in "\n".join(console_lines([[case]]))


def test_campaign_shrinks_each_signature_once_and_reports_it(tmp_path, capsys):
    results = campaign.run_campaign(world_sizes=[2], examples=3, seed=7, sharders=["fsdp_core"],
                                    modes=("fast",), profile="ci", out_dir=tmp_path,
                                    plant="drop_rank_grad", dtypes=("fp32",),
                                    shrink_budget_s=BUDGET_S)
    out = capsys.readouterr().out
    failed = [c for c in results if not c.passed]
    sigs = {c.signature for c in failed}
    assert failed and all(c.minimal_scenario_json for c in failed)
    assert out.count("\nDIAGNOSIS ") == len(sigs)
    assert "minimal:" in out and "first divergence: step " in out
    report = (tmp_path / "equivalence.md").read_text()
    assert "## Diagnosis" in report and "# minimal" in report


def test_shrink_budget_zero_runs_no_diagnosis(pool):
    case = run_one(pool, BIG, plant="drop_rank_grad")
    t0 = time.monotonic()
    groups = diagnose_failures(pool, [case], plant="drop_rank_grad", budget_s=0)
    assert time.monotonic() - t0 < 1.0 and len(groups) == 1 and case.signature
    assert not case.minimal_scenario_json and not case.divergence and case.flaky is None


# -- hangs (they restart the pool: last) ----------------------------------------------------------

@pytest.mark.parametrize("sharder, says", [
    ("SkipOnRank1", "rank 1's 2nd collective on group [0, 1] is all_reduce"),
    ("Mismatch", "rank 1's 2nd collective on group [0, 1] is all_gather_into_tensor"),
])
def test_a_rank_divergent_sharder_is_explained_and_the_campaign_goes_on(pool, sharder, says):
    s = dataclasses.replace(BIG, steps=1, optimizer="sgd")
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # warm
    t0 = time.monotonic()
    case = run_one(pool, s, sharder=f"tests.hang_sharders:{sharder}", timeout_s=HANG_TIMEOUT_S)
    assert time.monotonic() - t0 < HANG_TIMEOUT_S + 15
    assert case.verdict == "error"
    assert case.hang.startswith("collective sequences") and says in case.hang, case.hang
    assert "rank 0's is all_reduce" in case.hang and "hang_sharders.py" in case.hang
    # every rank's stack: a stuck rank's through SIGUSR1, the traceback of a rank gloo's
    # mismatch check raised in, the last words (faulthandler's dump) of one it aborted
    for r in (0, 1):
        assert (f"rank {r} was stuck here:" in case.reason or f"rank {r} raised in" in case.reason
                or (f"rank {r} (pid " in case.reason and "Fatal Python error" in case.reason)), r
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # goes on


def test_a_group_made_on_one_rank_does_not_hang_the_next_case(pool):
    """Rank 0 alone makes a process group in one case (its group counter runs ahead); the next
    case, which makes a group on every rank, must not wait forever on a name the ranks disagree
    on ([Note: group names inside a case] in verify/ranks/global_state.py)."""
    s = dataclasses.replace(BIG, steps=1, optimizer="sgd")
    assert run_one(pool, s, sharder="tests.hang_sharders:NewGroupOnRank0").passed
    case = run_one(pool, s, sharder="tests.hang_sharders:NewGroupEveryRank", timeout_s=HANG_TIMEOUT_S)
    assert case.passed, case.reason[:600]


def test_an_adapter_import_that_hangs_on_the_ranks_is_waited_out_once_per_run(pool, monkeypatch):
    """The ranks' import of an adapter never ends: the first case is an error after the import
    limit, later cases of the adapter are errors at once (not another wait each), and the pool
    serves other sharders after it."""
    from verify.ranks import poolset
    monkeypatch.setattr(poolset, "IMPORT_TIMEOUT_S", 3.0)
    s = dataclasses.replace(BIG, steps=1, optimizer="sgd")
    spec = "tests.import_hang_adapter:SlowImport"
    first = run_one(pool, s, sharder=spec)
    assert first.verdict == "error" and "timed out after 3 s" in first.reason, first.reason[:400]
    t0 = time.monotonic()
    again = run_one(pool, dataclasses.replace(s, seed=1), sharder=spec)
    assert time.monotonic() - t0 < 2.0
    assert again.verdict == "error" and "not tried again" in again.reason, again.reason[:400]
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed


def test_a_hang_in_a_resume_cases_save_is_explained_from_that_phase(pool):
    """A save phase that hangs: the collective log is the phase's own (not the previous case's,
    whose collectives would be read as where the ranks stopped), it names the adapter's save,
    and the result carries the hang summary the console prints."""
    from verify.campaign.resume import ResumeCase, run_resume
    s = dataclasses.replace(BIG, steps=2, optimizer="sgd")
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # a log to go stale
    case = run_resume(pool, ResumeCase(s, 2, 1), sharder="tests.hang_sharders:SaveHangsOnRank1",
                      timeout_s=HANG_TIMEOUT_S)
    assert case.verdict == "error" and "the save phase" in case.reason, case.reason[:400]
    assert case.hang and "the adapter's save" in case.hang, case.hang
    assert "rank 1 issued only 7 collectives on group [0, 1]; rank 0's 8th is all_reduce 4 B " \
        "fp32 on group [0, 1] (the adapter's save <- tests/hang_sharders.py" in case.hang, case.hang
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # goes on


def test_a_hang_on_the_default_group_is_explained_at_once_and_its_replay_hangs_too(
        pool, monkeypatch, capsys):
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_FLOOR_S", 4.0)
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_SLACK_S", 0.0)
    s = dataclasses.replace(BIG, world_size=1, micro_batches=4, steps=1, optimizer="sgd")
    case = run_one(pool, s, sharder="tests.hang_sharders:UsesDefaultGroup")
    assert case.verdict == "error", case.reason[:300]
    assert f"--ranks {pool.max_world_size} '" in case.replay, case.replay
    campaign._progress(1, 1, case, time.perf_counter() - 1.0, False)
    out = capsys.readouterr().out
    assert "not run this case" in out.splitlines()[1], out
    # the replay line, as printed, runs it in as many ranks: it hangs there too
    monkeypatch.setattr(campaign, "print_case", lambda case, label: 0 if case.passed else 1)
    t0 = time.monotonic()   # the replay's default timeout is the campaign's, not 120 s
    assert campaign.replay(s.to_json(), sharder="tests.hang_sharders:UsesDefaultGroup",
                           ranks=pool.max_world_size) == 1
    assert time.monotonic() - t0 < 60.0
    assert campaign.replay(s.to_json(), sharder="tests.hang_sharders:UsesDefaultGroup",
                           timeout_s=8.0) == 0   # alone, the default group is the case's


def test_a_reference_slowed_by_a_busy_machine_does_not_stretch_a_hangs_timeout(pool, monkeypatch):
    """The reference's wall time grows when fresh ranks import beside it; its CPU time does not:
    the timeout follows the CPU time (and is at least twice the wall time)."""
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_FLOOR_S", 4.0)
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_SLACK_S", 0.0)
    plain = campaign.run_reference

    def waits_then_runs(s):
        time.sleep(3.0)   # wall time without CPU time, as under a busy machine
        return plain(s)
    monkeypatch.setattr(campaign, "run_reference", waits_then_runs)
    s = dataclasses.replace(BIG, steps=1, optimizer="sgd")
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # warm
    case = run_one(pool, s, sharder="tests.hang_sharders:Mismatch")
    assert case.verdict == "error", case.reason[:300]
    took = float(case.reason.split("timed out after ")[1].split(" s")[0])
    assert 6.0 <= took < 20.0, case.reason[:200]   # 20 x 3 s + 0 before


def test_a_hang_costs_the_automatic_timeout_not_120_s(pool, monkeypatch):
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_FLOOR_S", 4.0)
    monkeypatch.setattr(campaign, "AUTO_TIMEOUT_SLACK_S", 0.0)
    s = dataclasses.replace(BIG, steps=1, optimizer="sgd")
    assert run_one(pool, s, sharder="tests.hang_sharders:Replicated").passed   # warm
    t0 = time.monotonic()
    case = run_one(pool, s, sharder="tests.hang_sharders:Mismatch")         # pool: 60 s
    assert time.monotonic() - t0 < 4.0 + 15
    assert case.verdict == "error" and "timed out after 4 s" in case.reason, case.reason[:300]
    assert "first divergent collective" in case.hang


def test_a_replayed_failure_prints_its_first_divergence_unless_told_not_to(capsys):
    """The replay line a failure prints leads to the step, phase and unit, as the campaign's
    diagnosis does: a wrong learning rate is an optimizer-phase divergence at step 0."""
    s = Scenario.from_json('{"family":"mlp","model":{"bias":false,"d_in":2,"d_out":1,"depth":1,'
                           '"nested":false,"width":2},"world_size":2,"mode":"fast",'
                           '"optimizer":"sgd","lr":0.001,"weight_decay":0.0,"steps":1,'
                           '"micro_batches":2,"micro_batch_size":1,"dtype":"fp32",'
                           '"wrap":"root_only","reshard_after_forward":true,"seed":230}')
    assert campaign.replay(s.to_json(), sharder="tests.verdict_sharders:FastLr") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("first divergence: step 0, <root> optimizer: the reduced "
                                "gradients are equal, parameter blocks.0.fc.weight"), lines[-3:]
    assert campaign.replay(s.to_json(), sharder="tests.verdict_sharders:FastLr",
                           locate=False) == 1
    assert "first divergence" not in capsys.readouterr().out


def test_a_case_timed_out_under_a_given_timeout_replays_with_it(pool):
    """A slow case killed by `--timeout 3` passes under replay's automatic timeout: its replay
    line carries the timeout it was killed under, so that the line reproduces the error."""
    s = dataclasses.replace(BIG, world_size=2, steps=1, optimizer="sgd")
    case = run_one(pool, s, sharder="tests.hang_sharders:SlowShard", timeout_s=3.0)
    assert case.verdict == "error" and "timed out after 3 s" in case.reason, case.reason[:300]
    assert " --timeout 3 '" in case.replay, case.replay
    ok = run_one(pool, s, sharder="tests.hang_sharders:Replicated", timeout_s=3.0)
    assert ok.passed and "--timeout" not in ok.replay, ok.replay


def test_gradients_are_compared_in_the_order_backward_reduces_them():
    """Where every gradient is wrong (a missing division by W), the located divergence names
    the unit backward reduces first (the last block), not the root's first parameter, which is
    reduced last."""
    from verify.diagnosis.tiered import backward_order
    grads = dict.fromkeys(["emb.weight", "blocks.0.fc.weight", "blocks.0.fc.bias",
                           "blocks.1.fc.weight", "head.weight"], 0)
    got = [n for n, _ in backward_order(grads, ["blocks.0", "blocks.1", ""])]
    assert got == ["blocks.1.fc.weight", "blocks.0.fc.bias", "blocks.0.fc.weight", "head.weight",
                   "emb.weight"]

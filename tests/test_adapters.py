"""The adapter protocol (DESIGN section 6) from a user's side: a sharder named by import path
(the textbook FSDP of examples/textbook_fsdp/, which uses the default process group and its own
optimizer wrapper) runs through the same cases and checks as the built-ins; its four classic
mistakes fail with replay commands; foreign code that raises or hands over an incomplete
optimizer costs a verdict or a figure, never the run; bad paths are usage errors; no code
outside verify/sharders/ branches on a sharder's name; families come by import path too; the
pytest plugin runs the drawn cases of a named sharder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dataclasses

import pytest

from verify.campaign.run import draw_scenarios, run_one
from verify.ranks.torchrun import is_torchrun
from verify.tools.plants import mlp_scenario
from verify.scenarios import Scenario
from verify.sharders import load_class

ROOT = Path(__file__).resolve().parents[1]
TB = "examples.textbook_fsdp.adapter:"
GPT = (("n_embd", 8), ("n_head", 2), ("n_layer", 2), ("vocab_size", 13))


def _failed(case) -> set[str]:
    return {c["check"] for c in case.checks if c["status"] == "fail"}


def _skip_unless(pool, w, sharder=None):
    """Skip a case the ranks cannot run: a world size past them, or, for a sharder on the
    default process group under torchrun, any W but the launched one (the harness's case is
    ``skipped`` there, so the test has no verdict to assert; in the pool, W gets its own pool)."""
    if w not in pool.world_sizes:
        pytest.skip(f"world size {w} needs more ranks than {max(pool.world_sizes)}")
    if sharder is not None:
        ranks, why = pool.for_world(load_class(sharder).world, w)
        if ranks is None:
            pytest.skip(why)


# -- the textbook FSDP ---------------------------------------------------------------------------

@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_the_textbook_fsdp_passes_at_every_world_size(rank_pool, world_size):
    _skip_unless(rank_pool, world_size, TB + "Textbook")
    M = max(2, world_size)
    for s in (mlp_scenario(world_size, optimizer="sgd_momentum"),
              Scenario("special", (("n_blocks", 1),), world_size, micro_batches=M),
              Scenario("gpt", GPT, world_size, optimizer="adamw", weight_decay=0.1, micro_batches=M)):
        case = run_one(rank_pool, s, sharder=TB + "Textbook", timeout_s=120.0)
        assert case.verdict in ("pass", "reported"), f"{case.reason}\nreplay: {case.replay}"
        assert case.sharder == "textbook_fsdp" and len(case.steps) == s.steps
        status = {c["check"]: c["status"] for c in case.checks if c["step"] == 0}
        # its adapter gives padding views, local pieces and reduced gradients; no formula
        assert status["padding"] == "pass" and status["reassembly"] == "pass"
        assert status["gradients"] == "pass"   # held in every tier (verify/case/state_check.py)
        assert status["collectives"] == "n/a" and status["resharded"] == "n/a"
        assert all(st.state_bytes == [] for st in case.steps)   # its optimizer has no .state


# Each mistake on a case that shows it, with the check that must catch it; and, where one exists,
# a case it cannot show (so the test proves the check, not the case, fails).
MISTAKES = [
    ("NoDivide", mlp_scenario(2), {"bitwise", "gradients"}, mlp_scenario(1)),
    # 1x9 then 9x9 weights: the second unit's 81 gradients sit in the shared bucket when the
    # first unit (9 elements, padded to 10 at W=2) reduces, so its padding slot is stale
    ("StalePadding", Scenario("mlp", (("bias", False), ("d_in", 1), ("d_out", 9), ("width", 9)), 2,
                              micro_batches=2), {"padding"}, mlp_scenario(1)),
    ("FrozenHookCount", Scenario("special", (("n_blocks", 1),), 2, micro_batches=2),
     {"bitwise", "gradients"}, mlp_scenario(2)),
    ("StaleGather", mlp_scenario(1), {"bitwise", "gradients"}, None),
]


@pytest.mark.multigpu
@pytest.mark.parametrize("mistake, s, checks, blind", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_textbook_mistake_fails_with_a_replay_command(rank_pool, mistake, s, checks, blind):
    _skip_unless(rank_pool, s.world_size, TB + mistake)
    case = run_one(rank_pool, s, sharder=TB + mistake, timeout_s=120.0)
    assert case.verdict == "fail", case.reason
    assert _failed(case) == checks, case.reason
    assert case.replay.startswith(f"python -m verify replay --sharder {TB}{mistake} '")
    if mistake == "StaleGather":   # the first step gathers afresh; the second reuses it
        assert case.first_divergence[0] == 1


@pytest.mark.multigpu
@pytest.mark.parametrize("mistake, blind", [(m[0], m[3]) for m in MISTAKES if m[3] is not None],
                         ids=[m[0] for m in MISTAKES if m[3] is not None])
def test_each_textbook_mistake_passes_a_case_that_cannot_show_it(rank_pool, mistake, blind):
    """The other half of the test above: the check fails because of the mistake, not the case."""
    _skip_unless(rank_pool, blind.world_size, TB + mistake)
    case = run_one(rank_pool, blind, sharder=TB + mistake, timeout_s=120.0)
    assert case.verdict in ("pass", "reported"), case.reason


# -- foreign code ----------------------------------------------------------------------------------

@pytest.mark.multigpu
def test_a_raising_adapter_is_an_error_case_with_every_ranks_traceback(rank_pool):
    case = run_one(rank_pool, mlp_scenario(2), sharder="tests.foreign_sharders:RaisesInShard")
    assert case.verdict == "error" and not case.passed
    assert "rank 0 raised" in case.reason and "rank 1 raised" in case.reason
    assert "boom: this sharder cannot shard" in case.reason
    after = run_one(rank_pool, mlp_scenario(2))   # and the pool goes on
    assert after.verdict in ("pass", "reported")


@pytest.mark.multigpu
@pytest.mark.skipif(is_torchrun(), reason="the raising rank's torchrun peers would stay in DDP's "
                    "collective (launched processes are not restarted); the pool run covers it")
def test_one_rank_raising_leads_the_line_with_its_exception_not_the_peers_wait(rank_pool):
    """The peers left waiting in a collective are a consequence: the console's and the report's
    line for the case names the rank that raised, its exception and its line first."""
    from verify.results import reason_line
    case = run_one(rank_pool, mlp_scenario(2), sharder="tests.foreign_sharders:RaisesOnLastRank",
                   timeout_s=60.0)
    assert case.verdict == "error"
    line = reason_line(case.reason)
    assert line.startswith("rank 1 raised RuntimeError: boom: the last rank cannot shard (at "), line
    assert "foreign_sharders.py:" in line and " in shard)" in line, line
    if "did not finish" in case.reason:   # rank 0 was still waiting in DDP's first collective
        assert "then ranks [0] did not finish within" in line, line


@pytest.mark.multigpu
def test_full_parameters_that_differ_between_ranks_fail_and_a_rank0_only_dict_passes(rank_pool):
    """Rank 0's full parameters are compared with the reference; every other rank's must be
    the same tensors (fingerprints), where it gives any."""
    bad = run_one(rank_pool, mlp_scenario(2), sharder="tests.foreign_sharders:FullDiffersOnRank1")
    assert bad.verdict == "fail" and _failed(bad) == {"structure"}, bad.reason
    assert "rank 1's full parameters differ from rank 0's" in bad.reason, bad.reason
    ok = run_one(rank_pool, mlp_scenario(2), sharder="tests.foreign_sharders:FullOnRank0Only")
    assert ok.verdict in ("pass", "reported"), ok.reason


@pytest.mark.multigpu
def test_per_rank_buffers_and_live_tensors_from_the_probes_are_no_failure(rank_pool):
    """A state dict's buffers may differ between ranks (running statistics); probes may hand
    back live tensors that later steps overwrite: the harness copies what they return."""
    s = Scenario("special", (("n_blocks", 1),), 2, micro_batches=2, steps=3)
    case = run_one(rank_pool, s, sharder="tests.foreign_sharders:BuffersPerRank")
    assert case.verdict in ("pass", "reported"), case.reason
    case = run_one(rank_pool, dataclasses.replace(s, optimizer="sgd_momentum"),
                   sharder="tests.foreign_sharders:LiveFullParameters")
    assert case.verdict == "pass" and case.tier == "bitwise", case.reason
    assert all(st.reassembly_ok for st in case.steps)


@pytest.mark.multigpu
def test_a_retie_the_sharded_model_does_not_allow_is_an_error_that_says_what_was_done(rank_pool):
    s = Scenario.from_json('{"family":"gpt","model":{"tied":true},"world_size":1,"mode":"fast",'
                           '"optimizer":"sgd","steps":1,"micro_batches":1,"ties":"split_retie"}')
    case = run_one(rank_pool, s, sharder="tests.foreign_sharders:TakesEmbeddingWeight")
    assert case.verdict == "error"
    from verify.results import reason_line
    line = reason_line(case.reason)
    assert "re-ties the model's tied parameters after shard() (ties='split_retie'" in line, line
    assert "decline these cases in unsupported()" in line, line


def test_a_raising_parent_side_is_an_error_case():
    case = run_one(None, mlp_scenario(2), sharder="tests.foreign_sharders:RaisesInUnsupported")
    assert case.verdict == "error" and "looked for something" in case.reason
    assert "--sharder tests.foreign_sharders:RaisesInUnsupported" in case.replay


@pytest.mark.multigpu
def test_an_incomplete_optimizer_costs_only_its_figures(rank_pool):
    s = mlp_scenario(2, optimizer="adam")
    case = run_one(rank_pool, s, sharder="tests.foreign_sharders:BareOptimizer")
    assert case.verdict in ("pass", "reported"), case.reason
    assert all(st.state_bytes == [] for st in case.steps)   # n/a: no .state, no param_groups
    assert all(st.padding_ok and st.bitwise and st.collectives_ok for st in case.steps)


def test_adapter_declarations_are_checked():
    from verify.sharders import SharderSpecError, load_class, resolve
    for spec, message in (("tests.foreign_sharders:NotASharder", "not a subclass of verify.Sharder"),
                          ("tests.foreign_sharders:not_even_a_class", "is a int, not a subclass"),
                          ("tests.foreign_sharders:Missing", "has no attribute 'Missing'"),
                          ("tests.no_such_module:X", "cannot import 'tests.no_such_module'")):
        with pytest.raises(SharderSpecError, match=re.escape(message)):
            load_class(spec)
    with pytest.raises(SharderSpecError, match="pkg.module:Name"):
        resolve("just-a-name")


@pytest.mark.parametrize("argv", [
    ["run", "--sharder", "tests.foreign_sharders:NotASharder"],
    ["run", "--sharder", "fsdp_core,tests.no_such_module:X"],
    ["replay", "--sharder", "tests.foreign_sharders:Missing", mlp_scenario(2).to_json()],
    ["bench", "--sharder", "tests.foreign_sharders:NotASharder"],
])
def test_a_bad_sharder_path_exits_2_before_any_rank_starts(argv, monkeypatch, capsys):
    import types
    from verify.cli import EXIT_USAGE, main
    started = []
    # the bench first: importing it imports the real campaign, which the fake then replaces
    monkeypatch.setattr("verify.tools.bench.run_bench", lambda **kw: started.append(kw))
    fake = types.ModuleType("verify.campaign.run")
    fake.run_campaign = fake.replay = lambda *a, **kw: started.append(a) or 0
    monkeypatch.setitem(sys.modules, "verify.campaign.run", fake)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE and not started
    assert argv[2].split(",")[-1] in capsys.readouterr().err


def test_no_code_outside_the_adapters_branches_on_a_sharder_name():
    """A comparison with a built-in's name outside verify/sharders/ would give that sharder a
    path a user's sharder does not take (the bench and the timing check compare ours with FSDP2
    by design: their variant labels are data, not branches)."""
    names = r"(fsdp_core|torch_fsdp2|fsdp2|ddp)"
    pattern = re.compile(rf"""([=!]=\s*["']{names}["'])|(["']{names}["']\s*[=!]=)|"""
                         rf"""(\bin\s*\(\s*["']{names}["'])""")
    offenders = []
    for path in (ROOT / "verify").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("verify/sharders/") or rel in ("verify/tools/bench.py", "verify/tools/timing_check.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_name_check_sees_a_branch():
    line = 'if sharder == "fsdp_core":'
    assert re.search(r"""[=!]=\s*["'](fsdp_core|torch_fsdp2|fsdp2|ddp)["']""", line)


def test_a_replay_line_sets_the_pythonpath_a_users_adapter_was_found_through(tmp_path, monkeypatch):
    """An adapter imported through PYTHONPATH gets it in its replay line (pasted into a new
    shell, the line works), even when that directory is also the working directory; one found
    through the working directory alone, an installed package or a built-in does not."""
    from verify.campaign.resume import ResumeCase, resume_replay_command
    from verify.campaign.run import replay_command
    src = tmp_path / "src"
    (src / "mine").mkdir(parents=True)
    (src / "mine" / "__init__.py").write_text("")
    (src / "mine" / "adapters.py").write_text(
        "from verify.sharders.fsdp_core import FsdpCore\nclass Mine(FsdpCore):\n    name = 'mine'\n")
    (tmp_path / "solo.py").write_text(
        "from verify.sharders.fsdp_core import FsdpCore\nclass Solo(FsdpCore):\n    name = 'solo'\n")
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{src}{os.pathsep}elsewhere")
    monkeypatch.chdir(tmp_path)
    load_class("mine.adapters:Mine")
    load_class("solo:Solo")
    s = mlp_scenario(2)
    want = (f"PYTHONPATH={src}{os.pathsep}{tmp_path / 'elsewhere'} python -m verify replay "
            "--sharder mine.adapters:Mine ")
    assert replay_command(s, "mine.adapters:Mine").startswith(want + "'")
    assert resume_replay_command(ResumeCase(s, 2, 1), "mine.adapters:Mine").startswith(
        want + "--resume-from 2")
    # the working directory's module: `python -m` finds it there; the built-ins: installed
    assert replay_command(s, "solo:Solo").startswith("python -m verify replay --sharder solo:Solo '")
    assert replay_command(s, "torch_fsdp2").startswith("python -m verify replay --sharder torch_fsdp2 '")
    assert replay_command(s, TB + "Textbook").startswith("python -m verify replay --sharder")
    # the working directory named on PYTHONPATH too (as "."): the line names it absolutely
    monkeypatch.setenv("PYTHONPATH", ".")
    assert replay_command(s, "solo:Solo").startswith(f"PYTHONPATH={tmp_path} python -m verify replay")
    monkeypatch.delenv("PYTHONPATH")
    assert replay_command(s, "mine.adapters:Mine").startswith("python -m verify replay")


def test_a_replay_line_sets_the_pythonpath_a_users_family_was_found_through(tmp_path, monkeypatch):
    """A model family imported through PYTHONPATH gets it in the replay line of a built-in
    sharder's case (without it, the pasted line cannot import the family)."""
    from verify.campaign.resume import ResumeCase, resume_replay_command
    from verify.campaign.run import replay_command
    (tmp_path / "fams").mkdir()
    (tmp_path / "fams" / "__init__.py").write_text("")
    (tmp_path / "fams" / "mine.py").write_text("from tests.user_family import *\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    s = Scenario("fams.mine", (("n_blocks", 2), ("width", 5)), 2)
    s.validate()   # imports it, as drawing or a --families flag does
    want = f"PYTHONPATH={tmp_path} python -m verify replay '"
    assert replay_command(s, "fsdp_core").startswith(want), replay_command(s, "fsdp_core")
    assert resume_replay_command(ResumeCase(s, 2, 1)).startswith(
        f"PYTHONPATH={tmp_path} python -m verify replay --resume-from 2")
    assert replay_command(mlp_scenario(2), "fsdp_core").startswith("python -m verify replay '")


# -- your own model --------------------------------------------------------------------------------

def test_a_family_by_import_path_is_drawn_validated_and_replayable():
    drawn = draw_scenarios(world_size=2, mode="fast", n=4, seed=1, families=["tests.user_family"])
    assert {s.family for s in drawn} == {"tests.user_family"}
    assert len({s.model for s in drawn}) > 1      # its strategy() was used
    for s in drawn:
        assert Scenario.from_json(s.to_json()) == s
    with pytest.raises(ValueError, match="cannot import"):
        Scenario("tests.no_such_family", (), 2).validate()
    with pytest.raises(ValueError, match="lacks DEFAULTS"):
        Scenario("tests.foreign_sharders", (), 2).validate()
    from verify._args import families as _families
    import argparse
    assert _families("mlp,tests.user_family") == ["mlp", "tests.user_family"]
    with pytest.raises(argparse.ArgumentTypeError, match="cannot import"):
        _families("tests.nope_family")


@pytest.mark.multigpu
@pytest.mark.parametrize("sharder", ["fsdp_core", TB + "Textbook"])
def test_a_family_by_import_path_runs_through_both_sharders(rank_pool, equivalence, sharder):
    s = Scenario("tests.user_family", (("n_blocks", 2), ("width", 5)), 2, micro_batches=2)
    _skip_unless(rank_pool, s.world_size, sharder)
    case = equivalence.check(s, sharder=sharder)
    assert case.verdict in ("pass", "reported"), case.reason
    assert case.family == "tests.user_family" and all(st.bitwise for st in case.steps)


# -- the pytest plugin -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_pytest_plugin_runs_a_named_sharders_drawn_cases(tmp_path):
    env = dict(os.environ, VERIFY_MAX_WORLD_SIZE="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), "-m",
            "multigpu", "--verify-world-sizes", "1", "--verify-examples", "2", "--verify-seed", "3"]
    out = subprocess.run(base + ["--sharder", f"{TB}Textbook,{TB}StaleGather"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    counts = re.search(r"\b(\d+) failed, (\d+) passed\b", text)
    assert out.returncode == 1 and counts, text
    assert int(counts.group(1)) >= 1 and int(counts.group(2)) >= 2, text   # the clean one passes
    assert f"replay: PYTHONPATH={ROOT} python -m verify replay --sharder {TB}StaleGather '" in text
    bad = subprocess.run(base + ["--sharder", "tests.foreign_sharders:NotASharder"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 4 and "not a subclass of verify.Sharder" in bad.stderr + bad.stdout


@pytest.mark.multigpu
def test_an_adapters_probes_are_not_counted_as_the_steps_collectives(rank_pool):
    case = run_one(rank_pool, mlp_scenario(2), sharder="tests.foreign_sharders:ChattyProbes")
    assert case.verdict == "pass", case.reason
    assert all(st.collectives_ok and "all_reduce" not in st.collectives for st in case.steps)


@pytest.mark.multigpu
def test_missing_and_unexpected_parameter_names_fail_the_structure_check(rank_pool):
    case = run_one(rank_pool, mlp_scenario(1), sharder="tests.foreign_sharders:DropsAName")
    assert case.verdict == "fail" and _failed(case) == {"structure", "reassembly"}, case.reason
    assert "missing parameters" in case.reason and "not.in.the.model" in case.reason


def test_fingerprints_cover_readable_tensors_and_skip_the_rest():
    import torch
    from verify.case.train import digests
    d = digests({"w": torch.ones(3), "m": torch.empty(2, device="meta"), "n": 1.0})
    assert set(d) == {"w"} and d["w"].startswith("torch.float32 (3,) ")
    assert digests({"w": torch.ones(3)}) == d and digests({"w": torch.zeros(3)}) != d
    assert digests(None) is None


def _stateful(variant: str, world_size: int, **kw) -> Scenario:
    return Scenario("tests.stateful_family", (("variant", variant),), world_size,
                    micro_batches=4, steps=3, **kw)


@pytest.mark.multigpu
@pytest.mark.parametrize("variant", ["counter", "running", "branch", "unused"])
def test_models_with_rank_state_branches_and_unused_parameters_pass_under_ddp(rank_pool, variant):
    """DDP (real processes, each with its own buffers; unused parameters found) is the witness
    of the reference: each simulated rank keeps its own buffers, a parameter with a gradient on
    some ranks only sums zeros for the others, one with none anywhere keeps none. All of these
    failed or crashed the campaign before."""
    case = run_one(rank_pool, _stateful(variant, 2), sharder="ddp")
    assert case.verdict == "pass" and case.tier == "bitwise", case.reason


@pytest.mark.multigpu
def test_fsdp_cores_formula_and_plan_allow_a_unit_without_gradients(rank_pool):
    """A unit whose only own parameter is never used reduces nothing: the formula counts what
    got a gradient (StepTrace.with_grad) and the plan check, which models every parameter with
    one, is n/a."""
    s = dataclasses.replace(_stateful("unused", 2), wrap="every_leaf")
    case = run_one(rank_pool, s)
    assert case.verdict == "pass", case.reason
    checks = {c["check"]: c for c in case.checks if c["step"] in (None, 0)}
    assert checks["collectives"]["status"] == "pass"
    assert checks["plan"]["status"] == "n/a" and "never" in checks["plan"]["detail"]


@pytest.mark.multigpu
@pytest.mark.skipif(is_torchrun(), reason="under torchrun the reference runs in a rank, inside "
                    "the process group this model needs")
def test_a_model_the_reference_cannot_train_is_that_cases_error(rank_pool):
    case = run_one(rank_pool, _stateful("parent_only", 2), sharder="ddp")
    assert case.verdict == "error" and "the reference" in case.reason, case.reason
    assert "this model runs inside a process group only" in case.reason


@pytest.mark.multigpu
def test_the_plan_check_does_not_model_a_branch_the_traced_micro_batch_skips(rank_pool):
    """Seed 5: the planner's one traced micro-batch takes no branch while the step's others do,
    so its gradient bytes would be short of the measured ones: n/a, not an invariant failure
    (this case failed the plan check before)."""
    s = dataclasses.replace(_stateful("branch", 1, mode="deterministic"), seed=5)
    case = run_one(rank_pool, s)
    assert case.verdict == "pass", case.reason
    plan = next(c for c in case.checks if c["check"] == "plan")
    assert plan["status"] == "n/a" and "traces one micro-batch" in plan["detail"], plan


def test_a_replay_line_made_before_the_adapter_was_imported_still_gets_the_prefix(tmp_path, monkeypatch):
    """`equivalence.check` in a user's test names an adapter no one imported yet: the line is
    made before the case runs, and must still carry the PYTHONPATH it is found through."""
    from verify.campaign.run import replay_command
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "__init__.py").write_text("")
    (tmp_path / "late" / "adapters.py").write_text(
        "from verify.sharders.fsdp_core import FsdpCore\nclass Late(FsdpCore):\n    name = 'late'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delitem(sys.modules, "late.adapters", raising=False)
    line = replay_command(mlp_scenario(2), "late.adapters:Late")
    assert line.startswith(f"PYTHONPATH={tmp_path} python -m verify replay --sharder late.adapters:Late '")

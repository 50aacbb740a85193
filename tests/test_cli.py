"""`python -m verify`: argument validation, exit codes, what reaches verify.campaign.run."""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from verify.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from verify.report import write_reports
from verify.results import CaseResult

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_campaign(monkeypatch):
    calls = []
    mod = types.ModuleType("verify.campaign.run")

    def run_campaign(**kwargs):
        calls.append(("run", kwargs))
        return mod.outcome

    def replay(scenario_json, **kwargs):
        calls.append(("replay", scenario_json, kwargs))
        return mod.outcome

    mod.run_campaign, mod.replay, mod.outcome, mod.calls = run_campaign, replay, 0, calls
    monkeypatch.setitem(sys.modules, "verify.campaign.run", mod)
    return mod


def test_help_works_without_the_campaign():
    out = subprocess.run([sys.executable, "-m", "verify", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "exit codes:" in out.stdout and "usage error" in out.stdout
    for cmd in ("run", "replay", "report"):
        assert cmd in out.stdout
        sub = subprocess.run([sys.executable, "-m", "verify", cmd, "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and "exit codes:" in sub.stdout


@pytest.mark.parametrize("entry", [
    "from verify.cli import build_parser; build_parser()",
    "import verify.pytest_plugin",
])
def test_the_light_entry_points_import_nothing_heavy(entry):
    """`--help` stays instant: verify/cli.py and the subcommands' argument modules it imports
    (verify/_args.py, campaign/cli.py, tools/cli.py, plan/cli.py) import no torch, pandas,
    Hypothesis or matplotlib; a command imports them when it runs. Likewise the pytest plugin,
    which the pytest11 entry point loads into every pytest run of the environment: its fixtures
    import the pool and the campaign when a test uses them."""
    code = (f"import sys; {entry}; "
            "print([m for m in ('torch', 'pandas', 'hypothesis', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("argv, message", [
    (["run", "--world-sizes", "1,3"], "world size 3 is not supported; allowed: 1, 2, 4, 8"),
    (["run", "--world-sizes", "1,x"], "'x' is not an integer"),
    (["run", "--world-sizes", "16"], "world size 16"),
    (["run", "--examples", "0"], "--examples: must be at least 1"),
    (["run", "--seed", "-1"], "--seed: must be >= 0"),
    (["run", "--timeout", "0"], "--timeout: must be a positive number"),
    (["run", "--mode", "slow"], "invalid choice: 'slow'"),
    (["run", "--sharder", "megatron"], "unknown sharder 'megatron'"),
    (["run", "--profile", "huge"], "invalid choice: 'huge'"),
    (["replay", "{not json"], "not valid JSON"),
    (["replay", "[1, 2]"], "must be a JSON object"),
    (["report", "/nonexistent-dir"], "results.json not found"),
    ([], "required: COMMAND"),
])
def test_usage_errors_exit_2_with_a_clear_message(argv, message, capsys, fake_campaign):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert fake_campaign.calls == []


def test_out_must_be_a_directory(tmp_path, capsys, fake_campaign):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(f)])
    assert exc.value.code == EXIT_USAGE and "not a directory" in capsys.readouterr().err


def test_run_passes_validated_arguments(tmp_path, fake_campaign):
    assert main(["run", "--world-sizes", "4,1,2,4", "--examples", "3", "--seed", "7",
                 "--sharder", "fsdp_core,fsdp2", "--mode", "deterministic",
                 "--profile", "ci", "--out", str(tmp_path), "--timeout", "30"]) == EXIT_OK
    (kind, kwargs), = fake_campaign.calls
    assert kind == "run"
    assert kwargs == dict(world_sizes=[1, 2, 4], examples=3, seed=7,
                          sharders=["fsdp_core", "torch_fsdp2"], modes=("deterministic",),
                          profile="ci", out_dir=tmp_path, timeout_s=30.0)


def test_run_defaults(fake_campaign):
    main(["run"])
    kwargs = fake_campaign.calls[0][1]
    assert kwargs["world_sizes"] == [1, 2, 4, 8] and kwargs["modes"] == ("fast", "deterministic")
    assert kwargs["sharders"] == ["fsdp_core"] and kwargs["profile"] is None


@pytest.mark.parametrize("outcome, code", [(0, EXIT_OK), (1, EXIT_FAILED), (True, EXIT_OK),
                                           (False, EXIT_FAILED),
                                           ([{"passed": True}], EXIT_OK),
                                           ([{"passed": True}, {"passed": False}], EXIT_FAILED)])
def test_exit_code_follows_the_verdicts(outcome, code, fake_campaign):
    fake_campaign.outcome = outcome
    assert main(["run"]) == code
    assert main(["replay", '{"family": "mlp", "model": {}, "world_size": 2}']) == code
    assert fake_campaign.calls[-1] == ("replay", '{"family": "mlp", "model": {}, "world_size": 2}',
                                       {"timeout_s": None, "sharder": "fsdp_core", "locate": True})


def test_replay_no_locate_reaches_the_campaign(fake_campaign):
    scenario = '{"family": "mlp", "model": {}, "world_size": 2}'
    assert main(["replay", "--no-locate", scenario]) == EXIT_OK
    assert fake_campaign.calls[-1][2]["locate"] is False


def test_replay_ranks_reaches_the_campaign(fake_campaign):
    fake_campaign.outcome = 0
    scenario = '{"family": "mlp", "model": {}, "world_size": 2}'
    assert main(["replay", "--ranks", "4", scenario]) == EXIT_OK
    assert fake_campaign.calls[-1] == ("replay", scenario,
                                       {"timeout_s": None, "sharder": "fsdp_core", "locate": True,
                                        "ranks": 4})


def _case(verdict):
    return CaseResult(scenario_json="{}", sharder="fsdp_core", family="mlp", world_size=2,
                      mode="fast", dtype="fp32", optimizer="sgd", tier="tolerance",
                      verdict=verdict)


def test_report_rerenders_from_results_json(tmp_path, capsys):
    write_reports([_case("pass"), _case("pass")], tmp_path, title="Saved")
    (tmp_path / "equivalence.md").unlink()
    assert main(["report", str(tmp_path)]) == EXIT_OK
    assert (tmp_path / "equivalence.md").read_text().startswith("# Saved")
    assert "equivalence.md" in capsys.readouterr().out
    write_reports([_case("pass"), _case("fail")], tmp_path)
    assert main(["report", str(tmp_path), "--title", "Again"]) == EXIT_FAILED
    assert (tmp_path / "equivalence.md").read_text().startswith("# Again")


def test_report_rerenders_peers_md_for_several_sharders(tmp_path, capsys):
    """A campaign of several sharders wrote peers.md; `report` re-renders it too (it was left
    as the run wrote it, disagreeing with a re-rendered equivalence.md), with a reported count."""
    other = dataclasses.replace(_case("reported"), sharder="torch_fsdp2", sharder_spec="torch_fsdp2")
    write_reports([_case("pass"), other], tmp_path, title="Saved")
    assert not (tmp_path / "peers.md").exists()
    assert main(["report", str(tmp_path), "--title", "Again"]) == EXIT_OK
    text = (tmp_path / "peers.md").read_text()
    assert text.startswith("# Peers: Again") and "| reported   |" in text, text
    assert "peers.md" in capsys.readouterr().out
    write_reports([_case("pass")], tmp_path / "one")
    main(["report", str(tmp_path / "one")])
    assert not (tmp_path / "one" / "peers.md").exists()


def test_resume_cases_not_run_are_said_on_the_console_and_in_the_report(tmp_path):
    """--resume-cases on an adapter without save()/load(), or with a planted bug, runs none:
    the campaign says so, and equivalence.md (also when re-rendered) says so too."""
    from verify.campaign.run import _resume_notes
    notes = _resume_notes(2, ["fsdp_core", "ddp"], ["fsdp_core"], None)
    assert notes == ["no checkpoint-resume cases for ddp: its adapter has no save() and load() "
                     "(DESIGN section 6, optional checkpointing)"]
    assert _resume_notes(0, ["ddp"], [], None) == []
    assert _resume_notes(2, ["fsdp_core"], ["fsdp_core"], None) == []
    assert "planted bug" in _resume_notes(2, ["fsdp_core"], ["fsdp_core"], "no_average")[0]
    write_reports([_case("pass")], tmp_path, notes=notes)
    assert f"Not run: {notes[0]}." in (tmp_path / "equivalence.md").read_text()
    (tmp_path / "equivalence.md").unlink()
    assert main(["report", str(tmp_path)]) == EXIT_OK
    assert f"Not run: {notes[0]}." in (tmp_path / "equivalence.md").read_text()


def test_report_rejects_a_broken_results_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"title": "x"}))
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == EXIT_USAGE and "not a results file" in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ('{"family":"mlp","model":{},"world_size":16}', "world_size=16"),
    ('{"family":"nope","model":{},"world_size":2}', "nope"),
    ('{"family":"mlp","model":{},"world_size":2,"bogus":1}', "bogus"),
])
def test_replay_refuses_an_invalid_scenario_naming_the_field(text, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", text])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid scenario" in err and says in err, err

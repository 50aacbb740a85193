"""Rendering of case results into frames, markdown tables, CSV, JSON and plots."""
from __future__ import annotations

import re

import json
import math

import pandas as pd
import pytest

from verify.report import (
    failures_table,
    load_results,
    results_frame,
    steps_frame,
    steps_table,
    invariants_table,
    summary_table,
    write_reports,
)
from verify.results import CaseResult, StepRecord


def step(i, *, diff=0.0, ulp=0, padding_ok=True, reassembly_ok=True, bad=()):
    bitwise = diff == 0.0
    return StepRecord(step=i, loss=2.5 - 0.1 * i, loss_ref=2.5 - 0.1 * i + diff,
                      loss_bitwise=bitwise, loss_abs_diff=diff, max_abs=diff * 10,
                      max_rel=diff * 100, max_ulp=ulp, bitwise=bitwise,
                      n_params_differ=0 if bitwise else 2,
                      worst_param="" if bitwise else "fc.weight",
                      padding_ok=padding_ok, padding_bad=list(bad), reassembly_ok=reassembly_ok,
                      collectives={"all_gather": [4, 1000 + i], "reduce_scatter": [2, 500]},
                      collectives_expected={"all_gather": [4, 1000], "reduce_scatter": [2, 500]},
                      collectives_ok=i == 0, state_bytes=[4096, 4096 - 64 * i],
                      state_bytes_model=2048, step_time_s=0.01 + 0.001 * i)


def case(family="mlp", w=2, mode="deterministic", *, verdict="pass", steps=None, reason="",
         sharder="fsdp_core", first_divergence=None):
    return CaseResult(
        scenario_json=json.dumps({"family": family, "world_size": w, "mode": mode}),
        sharder=sharder, family=family, world_size=w, mode=mode, dtype="fp32",
        optimizer="adamw", tier="bitwise" if mode == "deterministic" else "reported",
        verdict=verdict, reason=reason,
        steps=[step(i) for i in range(3)] if steps is None else steps,
        first_divergence=first_divergence,
        replay=f"python -m verify replay '{json.dumps({'family': family, 'world_size': w})}'",
        wall_time_s=0.5)


@pytest.fixture
def results():
    return [
        case("mlp", 1).to_dict(),
        case("mlp", 2).to_dict(),
        case("mlp", 2, "fast", steps=[step(0, diff=1e-7, ulp=3), step(1, diff=2e-7, ulp=5)])
        .to_dict(),
        case("gpt", 4, verdict="fail", first_divergence=(1, "blocks.0.attn.weight"),
             reason="step 1: blocks.0.attn.weight differs in 3 elements (max ulp 1)",
             steps=[step(0), step(1, diff=3e-8, ulp=1, padding_ok=False,
                                  bad=["param:blocks.0|pad"])]).to_dict(),
        case("gpt", 8, "fast", verdict="error", steps=[],
             reason="Traceback (most recent call last):\n ...\nRuntimeError: rank 3 died")
        .to_dict(),
        case("conv", 2, "fast", verdict="skipped", steps=[], reason="0-d parameter").to_dict(),
    ]


def test_results_frame_one_row_per_case_with_step_maxima(results):
    df = results_frame(results)
    assert len(df) == 6
    assert "steps" not in df
    row = df.iloc[2]
    assert row["n_steps"] == 2 and not row["bitwise"] and row["bitwise_steps"] == 0
    assert row["max_loss_diff"] == pytest.approx(2e-7)
    assert row["max_abs"] == pytest.approx(2e-6)
    assert row["max_ulp"] == 5
    assert row["coll_count"] == 6 and row["coll_bytes"] == pytest.approx(1500.5)
    assert row["coll_bytes_expected"] == 1500 and not row["collectives_ok"]
    assert row["state_bytes"] == 4096 and row["state_bytes_model"] == 2048
    assert df.iloc[0]["bitwise"] and df.iloc[0]["padding_ok"]
    assert not df.iloc[3]["padding_ok"] and df.iloc[3]["first_divergence"] == \
        "step 1: blocks.0.attn.weight"
    empty = df.iloc[4]                       # an errored case has no step figures, not zeros
    assert empty["n_steps"] == 0 and not empty["bitwise"]
    assert math.isnan(empty["max_abs"]) and pd.isna(empty["padding_ok"])
    assert pd.isna(empty["max_ulp"])
    assert list(df["passed"]) == [True, True, True, False, False, True]


def test_results_frame_accepts_records_and_keeps_extra_fields(results):
    extra = dict(results[0], coll_bytes_formula=1500.0)
    df = results_frame([case("mlp", 1), extra])
    assert len(df) == 2 and df.iloc[1]["coll_bytes_formula"] == 1500.0
    assert results_frame([]).empty


def test_steps_frame_is_long_form(results):
    steps = steps_frame(results)
    assert len(steps) == 3 + 3 + 2 + 2
    assert {"case", "family", "world_size", "mode", "step", "max_abs", "state_bytes"} <= \
        set(steps.columns)
    assert steps[steps["case"] == 2]["max_abs"].tolist() == pytest.approx([1e-6, 2e-6])


def test_summary_table_rows_are_family_world_size_mode(results):
    text = summary_table(results_frame(results))
    lines = text.splitlines()
    header = [c.strip() for c in re.split(r"(?<!\\)\|", lines[0].strip("|"))]
    assert header == ["family", "W", "mode", "pass", "reported", "fail", "error", "skipped",
                      "max ULP", "max \\|Δ param\\|"]            # one vocabulary, <= 10 columns
    body = [ln for ln in lines[2:]]
    assert len(body) == 6                     # every (family, W, mode) group is distinct here
    gpt4 = next(ln for ln in body if ln.startswith("| gpt") and "| 4 " in ln)
    cells = [c.strip() for c in gpt4.strip("|").split("|")]
    # the failure counted by severity (a record without one: unclassified)
    assert cells[:8] == ["gpt", "4", "deterministic", "0", "0", "1 (1 unclassified)", "0", "0"]
    inv = invariants_table(results_frame(results))
    assert "padding held" in inv.splitlines()[0] and "max \\|Δ loss\\|" in inv.splitlines()[0]
    gpt4 = next(ln for ln in inv.splitlines()[2:] if ln.startswith("| gpt") and "| 4 " in ln)
    assert "0/1" in [c.strip() for c in gpt4.strip("|").split("|")]   # padding held in 0 of 1
    mlp1 = next(ln for ln in inv.splitlines()[2:] if ln.startswith("| mlp") and "| 1 " in ln)
    assert "| 1/1 " in mlp1 and "3.00e-" not in mlp1


def test_summary_says_which_tier_a_pass_is_in_and_counts_reported_apart(results):
    rows = [dict(results[0], verdict="pass", tier="bitwise"),
            dict(results[0], verdict="pass", tier="tolerance"),
            dict(results[0], verdict="reported", tier="reported", passed=True)]
    body = summary_table(results_frame(rows)).splitlines()[2]
    cells = [c.strip() for c in body.strip("|").split("|")]
    assert cells[3] == "2 (1 bitwise, 1 tolerance)" and cells[4] == "1"


def test_summary_table_against_the_formulas(results):
    header = invariants_table(results_frame(results)).splitlines()[0]
    assert "coll vs formula" in header and "coll held" in header and "state vs model" in header
    text = invariants_table(results_frame(results))
    assert "2.00x" in text                    # 4096 bytes per rank against a model of 2048
    # records without the formula fields (older producers) drop those columns
    bare = [dict(r, steps=[{k: v for k, v in st.items()
                            if k not in ("collectives_expected", "collectives_ok",
                                         "state_bytes_model")} for st in r["steps"]])
            for r in results]
    header = invariants_table(results_frame(bare)).splitlines()[0]
    assert "coll vs formula" not in header and "state vs model" not in header


def test_summary_table_groups_by_sharder(results):
    rows = results + [dict(results[0], sharder="fsdp2")]
    text = summary_table(results_frame(rows))
    assert text.splitlines()[0].startswith("| sharder")
    assert "| fsdp2 " in text
    assert summary_table(results_frame([])) == "No cases."


def test_failures_table_lists_replays(results):
    text = failures_table(results_frame(results))
    assert "| 1 " in text and "| 2 " in text and "| 3 " not in text
    assert "step 1: blocks.0.attn.weight" in text
    assert "RuntimeError: rank 3 died" in text   # a traceback's last line
    assert "```sh" in text
    assert "python -m verify replay '{\"family\": \"gpt\", \"world_size\": 8}'" in text
    ok = [r for r in results if r["verdict"] == "pass"]
    assert failures_table(results_frame(ok)) == "No failing cases."


def test_steps_table(results):
    text = steps_table(results[3])
    assert len(text.splitlines()) == 4
    assert "BAD: param:blocks.0\\|pad" in text
    assert "No steps recorded (error" in steps_table(results[4])


def test_write_reports_and_rerender(tmp_path, results):
    paths = write_reports(results, tmp_path, title="Synthetic")
    names = {p.name for p in paths}
    assert {"equivalence.md", "results.csv", "results.json"} <= names
    md = (tmp_path / "equivalence.md").read_text()
    assert md.startswith("# Synthetic")
    # every count exact: a skipped case is not a pass, a failure without a severity (a results
    # file from before severities) is unclassified
    assert ("**FAIL**: 6 cases: 3 passed (2 bitwise, 1 reported), 2 failed (1 error, "
            "1 unclassified), 1 skipped.") in md
    assert "## Summary" in md and "## Failing cases" in md and "## Per-step detail" in md
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 6 and "max_abs" in csv
    title, again = load_results(tmp_path / "results.json")
    assert title == "Synthetic" and again[3]["first_divergence"] == [1, "blocks.0.attn.weight"]
    assert results_frame(again).drop(columns="first_divergence").equals(
        results_frame(results).drop(columns="first_divergence"))
    pytest.importorskip("matplotlib")
    for name in ("param_diff.png", "loss_diff.png", "state_memory.png"):
        assert name in names and (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in md


def test_write_reports_all_pass(tmp_path):
    write_reports([case("mlp", w) for w in (1, 2, 4, 8)], tmp_path)
    md = (tmp_path / "equivalence.md").read_text()
    assert "**PASS**: 4 cases: 4 passed (4 bitwise), 0 failed." in md
    assert "No failing cases." in md


def test_offload_placement_is_checked_only_where_it_can_be_seen():
    """An offloaded case on a CPU-only run cannot show where its shards are: n/a, never pass;
    on an accelerator run a tensor the optimizer holds off the CPU fails."""
    from verify.case.placement import offload_status
    cpu = {"compute": "cpu", "held": ["cpu"]}
    assert offload_status([cpu, cpu])[0] == "n/a"
    on_gpu = {"compute": "cuda:0", "held": ["cpu"]}
    assert offload_status([on_gpu, on_gpu])[0] == "pass"
    status, _, rank, detail = offload_status([on_gpu, {"compute": "cuda:1", "held": ["cpu", "cuda:1"]}])
    assert status == "fail" and rank == 1 and "cuda:1" in detail
    assert offload_status([None, on_gpu])[0] == "n/a"

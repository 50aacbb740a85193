"""`python -m verify bench` end to end on a tiny GPT: the table is written, and what the bench
checks structurally (state memory, collectives against the formula) holds. Timings are printed
by the bench itself, never asserted here."""
from __future__ import annotations

import pytest

from verify.bench import run_bench


@pytest.mark.slow
def test_bench_writes_the_tables_and_structural_targets_hold(tmp_path):
    report = run_bench(world_sizes=(1, 2), steps=1, warmup=1, width=32, layers=2, vocab=64, seq=8,
                       batch=2, out_dir=tmp_path, harness_cases=2, spawn_cases=1, timeout_s=300)
    text = (tmp_path / "performance.md").read_text()
    for heading in ("## Step time", "## Memory per rank", "## Collectives of one step", "## Harness"):
        assert heading in text
    rows = {r["world_size"]: r for r in report["rows"]}
    assert set(rows) == {1, 2}
    for r in rows.values():
        assert r["collectives_ok"], (r["collectives"], r["expected"])
        assert abs(r["state_over_fsdp2"] - 1) < 0.05 and abs(r["state_over_zero3"] - 1) < 0.05
        assert all(v > 0 for v in r["ms"].values())
    assert rows[1]["collectives"] == {} and rows[1]["peak_unsharded"]["fsdp_core"] == 0  # W=1 aliases
    two = rows[2]
    assert two["collectives"]["all_gather_into_tensor"][0] == 2 * 3   # 3 units, re-gathered in backward
    assert two["peak_unsharded"]["fsdp_core"] > two["peak_unsharded"]["fsdp_core_noprefetch"] > 0
    assert two["peak_unsharded"]["fsdp2"] > 0 and two["peak_allocated"]["fsdp2"] > 0
    ov = report["overhead"]
    assert ov["spawn_cases"] == 1 and ov["spawn_case_s"] > ov["pool_same_cases_s"] > 0


@pytest.mark.slow
def test_independent_timing_check_runs_and_its_exit_code_follows_the_ratio(capsys):
    from verify.timing_check import main
    rc = main(["--world-size", "2", "--width", "32", "--layers", "2", "--vocab", "64", "--seq", "8",
               "--batch", "2", "--steps", "1", "--rounds", "2", "--foreach", "true"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("W=2: fsdp_core ") and "ours/FSDP2" in line and "foreach=true" in line
    ratio = float(line.split("ours/FSDP2 ")[1].split()[0])
    assert rc == (0 if ratio <= 1.0 else 1)

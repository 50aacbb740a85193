"""`python -m verify bench` end to end on a tiny GPT: the table is written, and what the bench
checks structurally (state memory, collectives against the formula) holds. Timings are printed
by the bench itself, never asserted here."""
from __future__ import annotations

import math

import pytest

from fsdp_core._collectives import GATHER_KIND
from verify.tools.bench import median_interval, paired_ratio, run_bench
from verify.tools.bench_report import fmt_paired


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n independent draws: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n


@pytest.mark.parametrize("n,k", [(6, 1), (10, 2), (20, 6), (50, 18)])
def test_median_interval_takes_the_narrowest_order_statistics_that_reach_95_percent(n, k):
    """Known order-statistic intervals for the median at 95 %: n = 10 -> (2nd, 9th), n = 20 ->
    (6th, 15th), n = 50 -> (18th, 33rd); one step narrower would fall under 95 %."""
    xs = [float(i) for i in reversed(range(1, n + 1))]   # x_(i) = i, given unsorted
    med, lo, hi, cov = median_interval(xs)
    assert (lo, hi) == (k, n + 1 - k) and med == (n + 1) / 2
    assert cov == pytest.approx(_coverage(n, k)) and cov >= 0.95 > _coverage(n, k + 1)


def test_median_interval_with_too_few_steps_says_its_coverage_is_short():
    med, lo, hi, cov = median_interval([3.0, 1.0, 2.0])
    assert (med, lo, hi) == (2.0, 1.0, 3.0) and cov == pytest.approx(0.75)
    assert median_interval([5.0])[1:] == (5.0, 5.0, 0.0)
    with pytest.raises(ValueError):
        median_interval([])


def test_paired_ratio_pairs_steps_of_the_same_round():
    """Each step is divided by the other sharder's step of the same round, not by its median:
    a slow round slows both and cancels out."""
    ours = [1.0, 2.0, 1.0, 4.0, 1.0, 2.0]
    theirs = [1.25, 2.5, 1.25, 5.0, 1.25, 2.5]
    p = paired_ratio(ours, theirs)
    assert p["median"] == p["lo"] == p["hi"] == pytest.approx(0.8) and p["n"] == 6
    assert fmt_paired(p) == "0.80 [0.80, 0.80] (97 %)"
    # pairing matters: the ratio of medians (2 / 2) and a sorted pairing both say 1.0 here
    p = paired_ratio([1.0, 2.0, 10.0, 1.0, 2.0, 10.0], [2.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    assert p["median"] == 2.0 and (p["lo"], p["hi"]) == (0.5, pytest.approx(10 / 3))
    with pytest.raises(ValueError):
        paired_ratio(ours, theirs[:-1])


@pytest.mark.slow
def test_bench_writes_the_tables_and_structural_targets_hold(tmp_path):
    report = run_bench(world_sizes=(1, 2), steps=1, warmup=1, width=32, layers=2, vocab=64, seq=8,
                       batch=2, out_dir=tmp_path, harness_cases=2, spawn_cases=1, timeout_s=300)
    text = (tmp_path / "performance.md").read_text()
    assert "least ours/FSDP2" in text
    for heading in ("## Step time", "## Distance to the limit", "## Memory per rank",
                    "## Collectives of one step", "## Harness"):
        assert heading in text
    assert "per step: median [interval]" in text and "(0 %)" in text   # one timed step: no interval
    rows = {r["world_size"]: r for r in report["rows"]}
    assert set(rows) == {1, 2}
    for r in rows.values():
        assert r["collectives_ok"], (r["collectives"], r["expected"])
        assert abs(r["state_over_fsdp2"] - 1) < 0.05 and abs(r["state_over_zero3"] - 1) < 0.05
        assert all(v > 0 for v in r["ms"].values())
        assert r["ours_over_floor"] == r["ms"]["fsdp_core"] / r["ms"]["floor"]
        assert r["floor_peak_over_fsdp2"] > 0 and len(r["load"]) == 2
        assert r["paired"]["n"] == 1 and r["paired"]["lo"] == r["paired"]["median"] == r["paired"]["hi"]
        # CPU per rank: the main thread's is part of the process's (every step, so every median);
        # the CPU-bound limit is at least the main thread's share and no more than the ratio
        # measured (a step cannot take less wall time than its CPU allows; generous for noise).
        assert r["cores"] >= 1 and set(r["cpu_ms"]) == set(r["ms"])
        for k in r["ms"]:
            assert 0 < r["cpu_main_ms"][k] <= r["cpu_ms"][k] + 0.5, (k, r["cpu_main_ms"], r["cpu_ms"])
        least = r["least_ours_over_fsdp2"]
        assert r["cpu_main_ms"]["fsdp_core"] / r["ms"]["fsdp2"] <= least <= 2 * r["ours_over_fsdp2"]
    assert rows[1]["collectives"] == {} and rows[1]["peak_unsharded"]["fsdp_core"] == 0  # W=1 aliases
    two = rows[2]
    assert two["collectives"][GATHER_KIND][0] == 2 * 3   # 3 units, re-gathered in backward
    assert two["peak_unsharded"]["fsdp_core"] > two["peak_unsharded"]["fsdp_core_noprefetch"] > 0
    assert two["peak_unsharded"]["fsdp2"] > 0 and two["peak_allocated"]["fsdp2"] > 0
    ov = report["overhead"]
    assert ov["spawn_cases"] == 1 and ov["spawn_case_s"] > ov["pool_same_cases_s"] > 0


@pytest.mark.slow
def test_independent_timing_check_runs_and_its_exit_code_follows_the_ratio(capsys):
    from verify.tools.timing_check import main
    rc = main(["--world-size", "2", "--width", "32", "--layers", "2", "--vocab", "64", "--seq", "8",
               "--batch", "2", "--steps", "1", "--rounds", "2", "--foreach", "true"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("W=2: fsdp_core ") and "ours/FSDP2" in line and "foreach=true" in line
    ratio = float(line.split("ours/FSDP2 ")[1].split()[0])
    assert rc == (0 if ratio <= 1.0 else 1)


@pytest.mark.multigpu
@pytest.mark.parametrize("mesh", [(2, 4), (4, 2)])
def test_bench_hsdp_variants_on_one_mesh_and_the_formula_holds(rank_pool, mesh):
    """HSDP in the bench: fsdp_core and FSDP2 on the same 2-D mesh at W = 8; ours matches the
    collective formula with the replicate-group all-reduce, and holds the same state as FSDP2."""
    import dataclasses
    from verify.tools.bench import HSDP_VARIANTS, _hsdp_row, bench_case, bench_scenario
    if 8 not in rank_pool.world_sizes:
        pytest.skip("needs 8 ranks")
    s = dataclasses.replace(bench_scenario(8, width=32, layers=2, vocab=64, seq=8, batch=2), mesh=mesh)
    rank_pool.prepare_hsdp(rank_pool.main)
    res = rank_pool.run(8, bench_case, {"scenario": s.to_json(), "steps": 1, "warmup": 1,
                                        "variants": HSDP_VARIANTS}, timeout_s=300)
    assert res.ok, res.error
    row = _hsdp_row(mesh, res.values)
    assert row["collectives_ok"], (row["collectives"], row["expected"])
    assert row["collectives"]["all_reduce"][0] == 3          # one per unit with gradients
    assert abs(row["state_over_fsdp2"] - 1) < 0.05 and row["ms"] > 0 and row["fsdp2_ms"] > 0
    for k in HSDP_VARIANTS:   # [Note: the CPU-bound limit], as in the 1-D rows
        assert 0 < row["cpu_main_ms"][k] <= row["cpu_ms"][k] + 0.5, (k, row["cpu_main_ms"], row["cpu_ms"])
    assert row["cpu_main_ms"]["fsdp_core_hsdp"] / row["fsdp2_ms"] <= row["least_over_fsdp2"] <= 2 * row["over_fsdp2"]


@pytest.mark.multigpu
def test_bench_times_a_named_sharder_against_fsdp2(rank_pool):
    from verify.tools.bench import VARIANTS, _extra_row, bench_case, bench_scenario
    s = bench_scenario(2, width=32, layers=2, vocab=64, seq=8, batch=2)
    label = "textbook_fsdp"
    variants = {label: ("examples.textbook_fsdp.adapter:Textbook", "fast"), "fsdp2": VARIANTS["fsdp2"]}
    ranks, why = rank_pool.for_world("default", 2)
    if ranks is None:   # under torchrun: the textbook FSDP needs a launched world of 2
        pytest.skip(why)
    res = ranks.run(2, bench_case, {"scenario": s.to_json(), "steps": 1, "warmup": 1,
                                    "variants": variants}, timeout_s=300)
    assert res.ok, res.error
    row = _extra_row(2, label, res.values)
    assert row["ms"] > 0 and row["over_fsdp2"] > 0 and row["state"] is None   # its optimizer has no .state


def _raises_on_ranks(payload, ctx):
    if ctx.rank in payload:
        raise ValueError("planted: this rank dies before sending its value")
    return ctx.rank


@pytest.mark.parametrize("dying", [[0, 1], [1]])
def test_spawned_ranks_that_die_end_the_measurement_with_an_error_not_a_hang(dying):
    """The bench's fresh-spawn measurement (verify/ranks/spawn.py): a spawned rank that dies
    without sending its value is an error naming it, not a parent waiting forever on its pipe."""
    import threading
    from verify.ranks.spawn import spawn_run
    box: dict = {}

    def measure():
        try:
            box["value"] = spawn_run(2, _raises_on_ranks, dying)
        except RuntimeError as exc:
            box["error"] = str(exc)

    t = threading.Thread(target=measure, daemon=True)
    t.start()
    t.join(180)
    assert not t.is_alive(), "spawn_run still waits on a rank that died"
    assert "fresh-spawn measurement failed" in box.get("error", ""), box
    assert all(f"({r}, " in box["error"] for r in dying), box["error"]


class _Drawn(Exception):
    pass


def test_harness_cost_draws_only_cases_fsdp_core_runs(monkeypatch):
    """The harness section draws as a campaign of fsdp_core does: a draw the adapter declines
    (a parameter tied across two units, which fully_shard refuses) is set aside, and never
    reaches the spawned ranks (where it raised on every rank)."""
    from verify.case.draw import declined_by, draw_scenarios
    from verify.tools import bench_overhead
    seen: dict = {}

    def drawn(**kw):
        seen.update(kw)
        raise _Drawn

    monkeypatch.setattr(bench_overhead, "draw_scenarios", drawn)
    with pytest.raises(_Drawn):
        bench_overhead.harness_cost(None, 4, 2, 1)
    assert tuple(seen.get("sharders", ())) == ("fsdp_core",), seen
    decline = declined_by(["fsdp_core"])
    kw = {k: v for k, v in seen.items() if k != "n"}
    cases = draw_scenarios(n=40, **kw)
    assert cases and all(decline(s) is None for s in cases)


def test_a_draw_only_some_sharders_decline_runs_for_the_others():
    """Several sharders: a bf16 candidate that ddp (fp32 only) declines is still drawn for
    fsdp_core, which declares bf16; one that every sharder declines is set aside."""
    from verify.case.draw import declined_by, draw_scenarios
    both = declined_by(["fsdp_core", "ddp"])
    cases = draw_scenarios(world_size=2, mode="fast", n=12, seed=0, dtypes=("fp32", "bf16"),
                           sharders=["fsdp_core", "ddp"])
    assert any(s.dtype == "bf16" for s in cases), [s.dtype for s in cases]
    assert all(both(s) is None for s in cases)
    det = draw_scenarios(world_size=2, mode="deterministic", n=4, seed=0, sharders=["ddp", "fsdp1"])
    assert det and declined_by(["ddp"])(det[0]) is not None   # neither runs it: made up, skipped


def test_every_family_named_is_drawn_when_there_are_cases_enough():
    """Two families named, two cases per W and mode: each family gets one (by chance alone one
    of them was missing half the time); one family or the default draw as before."""
    from verify.case.draw import draw_scenarios
    for seed in range(6):
        for sharders in ((), ("fsdp_core",)):
            got = draw_scenarios(world_size=2, mode="fast", n=2, seed=seed,
                                 families=["tests.user_family", "mlp"], sharders=sharders)
            assert {s.family for s in got} == {"tests.user_family", "mlp"}, (seed, got)

"""verify.strategies: every draw is valid, and the edges are actually reached."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from verify.scenarios import FAMILIES, Scenario, build_model, wrap_units
from verify.strategies import (cs336_models, convnet_models, gpt_models, micro_batches, mlp_models,
                               model_shapes, scenarios, sizes, special_models)

FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SEARCH = settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))


def params(s: Scenario):
    return list(build_model(s).parameters())


def nesting_depth(s: Scenario) -> int:
    """How many units the innermost unit sits inside (root-only: 0)."""
    model = build_model(s)
    units = wrap_units(s, model)
    inside = lambda u, o: o is not u and any(m is u for m in o.modules())
    return max(sum(inside(u, o) for o in units) for u in units)


@FAST
@given(scenarios())
def test_every_drawn_scenario_is_valid_and_replayable(s):
    s.validate()
    assert Scenario.from_json(s.to_json()) == s
    assert s.micro_batches >= s.world_size and s.micro_batches & (s.micro_batches - 1) == 0
    assert wrap_units(s, build_model(s))[-1] is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_strategy_builds(family):
    @FAST
    @given(model_shapes(family))
    def check(model):
        s = Scenario(family, model, 1)
        s.validate()
        assert params(s)
    check()


@FAST
@given(st.sampled_from([1, 2, 4, 8]).flatmap(lambda w: st.tuples(st.just(w), micro_batches(world_size=w))))
def test_micro_batches_are_powers_of_two_at_least_w(wm):
    w, m = wm
    assert m >= w and m & (m - 1) == 0 and m <= 16


def test_scenarios_respects_its_arguments():
    @FAST
    @given(scenarios(world_sizes=(4,), modes=("deterministic",), families=("gpt",),
                     optimizers=("adam",), dtypes=("bf16",), max_steps=1))
    def check(s):
        assert (s.world_size, s.mode, s.family, s.optimizer, s.dtype, s.steps) == (
            4, "deterministic", "gpt", "adam", "bf16", 1)
    check()


@pytest.mark.parametrize("kwargs", [dict(world_sizes=(3,)), dict(modes=()), dict(families=("resnet",)),
                                    dict(optimizers=("lion",)), dict(dtypes=("fp16",)),
                                    dict(max_steps=0)])
def test_scenarios_rejects_bad_arguments_eagerly(kwargs):
    with pytest.raises(ValueError):
        scenarios(**kwargs)


def test_model_shapes_rejects_unknown_family():
    with pytest.raises(ValueError, match="family"):
        model_shapes("resnet")


def test_sizes_stay_in_bounds():
    @FAST
    @given(sizes(min_value=3, max_value=9))
    def check(n):
        assert 3 <= n <= 9
    check()


# -- the edges are reached ----------------------------------------------------------------------

def test_reaches_a_parameter_smaller_than_the_world_size():
    s = find(scenarios(world_sizes=(8,)), lambda s: any(0 < p.numel() < 8 for p in params(s)),
             settings=SEARCH)
    assert any(p.numel() < s.world_size for p in params(s))


def test_reaches_sizes_not_divisible_by_w():
    find(scenarios(world_sizes=(4,)), lambda s: any(p.numel() % 4 and p.numel() > 4 for p in params(s)),
         settings=SEARCH)


def test_reaches_0d_parameters():
    find(scenarios(), lambda s: any(p.dim() == 0 for p in params(s)), settings=SEARCH)


def test_reaches_one_unit_models():
    s = find(scenarios(families=("mlp",)), lambda s: dict(s.model)["depth"] == 1
             and len(wrap_units(s, build_model(s))) == 1, settings=SEARCH)
    assert s.wrap == "root_only"


def test_reaches_deep_nesting():
    s = find(scenarios(families=("mlp",)), lambda s: nesting_depth(s) >= 4, settings=SEARCH)
    assert s.wrap in ("per_block", "every_leaf")


@pytest.mark.parametrize("predicate", [
    lambda s: s.micro_batches > s.world_size == 8,
    lambda s: s.mode == "deterministic" and s.dtype == "bf16" and s.world_size > 1,
    lambda s: s.family == "gpt" and dict(s.model)["tied"] and dict(s.model)["vocab_size"] % 2,
    lambda s: s.family == "mlp" and 1 in (dict(s.model)["width"], dict(s.model)["d_in"]),
    lambda s: s.family == "cs336" and dict(s.model)["d_ff"] in (3, 5, 7, 13, 17, 31),
], ids=["m_gt_w8", "det_bf16", "tied_odd_vocab", "width_1", "prime_d_ff"])
def test_reaches_other_edges(predicate):
    find(scenarios(), predicate, settings=SEARCH)


@pytest.mark.parametrize("strategy, family, maxima", [
    (mlp_models(max_width=4, max_depth=1, max_nested_depth=2), "mlp",
     {"width": 4, "d_in": 4, "d_out": 4, "depth": 2}),
    (gpt_models(max_vocab=5, max_layers=1, max_seq=2), "gpt",
     {"vocab_size": 5, "n_layer": 1, "block_size": 2}),
    (cs336_models(max_vocab=5, max_layers=1, max_seq=2), "cs336",
     {"vocab_size": 5, "num_layers": 1, "context_length": 2}),
    (convnet_models(max_channels=2, max_stages=1, max_image=2), "convnet",
     {"channels": 2, "n_stages": 1, "image_size": 2}),
    (special_models(max_width=2, max_blocks=1), "special", {"width": 2, "n_blocks": 1}),
], ids=lambda x: x if isinstance(x, str) else "")
def test_family_bounds_are_respected(strategy, family, maxima):
    @FAST
    @given(strategy)
    def check(model):
        s = Scenario(family, model, 1)
        s.validate()
        assert set(dict(model)) == set(FAMILIES[family].DEFAULTS)  # complete: replays never depend on defaults
        assert all(dict(model)[k] <= v for k, v in maxima.items()), model
    check()


def test_gpt_widths_are_never_one_and_reach_two():
    """n_embd = 1 makes every LayerNorm output its bias: a constant loss, zero gradients."""
    @FAST
    @given(gpt_models())
    def check(model):
        assert dict(model)["n_embd"] >= 2, model
    check()
    find(gpt_models(), lambda m: dict(m)["n_embd"] == 2, settings=SEARCH)


def test_a_seeds_draw_does_not_depend_on_what_the_process_imported(tmp_path):
    """[Note: a draw independent of what the process imported]: Hypothesis takes some of its
    choices from the literal constants of the local modules imported; a user's adapter module
    full of literals, imported before the draw, leaves a seed's cases as they are."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    # a few literals of the kind a sharder's code holds (these changed seed 0's draw before)
    (tmp_path / "adapter_literals.py").write_text(
        "LIMIT = 2**63 - 1\nCEILING = 2.0**63 - 1024\nSIZES = (1, 8, 1024, 63)\n")
    draw = ("from verify.case.draw import draw_scenarios\n"
            "for w, mode in ((4, 'deterministic'), (2, 'fast')):\n"
            "    for seed in range(3):\n"
            "        print([s.to_json() for s in draw_scenarios(world_size=w, mode=mode, n=3, seed=seed)])\n")
    outs = []
    for before in ("", "import adapter_literals\n"):
        proc = subprocess.run([sys.executable, "-c", before + draw], cwd=root, capture_output=True,
                              text=True, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{root}"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout)
    assert outs[0] == outs[1]

"""verify.compare: every check passes on equal data and fails on each planted difference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verify.compare import (TOLERANCES, ULP_NAN, Tolerance, adam_step_bound, bounds_for,
                            compare_params, compare_step, diff_stats, format_diff, int_view,
                            is_bitwise_zero, tier_for, ulp_distance, verdict)
from verify.scenarios import Scenario

FP32 = TOLERANCES[torch.float32]
INF = float("inf")


def up(x: torch.Tensor) -> torch.Tensor:
    """One ulp towards +inf, elementwise."""
    return torch.nextafter(x, torch.full_like(x, INF))


def planted(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of x (>= 2 elements, first element positive) with one planted difference each."""
    one_ulp = x.clone().flatten()
    one_ulp[1] = up(one_ulp[1])
    neg_zero = x.clone().flatten()
    neg_zero[0] = 0.0
    nan = x.clone().flatten()
    nan[-1] = math.nan
    n = x.numel() // 2
    swapped = torch.cat([x.flatten()[n:2 * n], x.flatten()[:n], x.flatten()[2 * n:]])
    return {
        "one_ulp": one_ulp.view_as(x), "nan": nan.view_as(x), "swapped_halves": swapped.view_as(x),
        "scaled_1p2m20": x * (1 + 2.0**-20), "neg_zero": (-neg_zero).view_as(x),
    }


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(4, 6) + 3.0  # all positive, away from zero


# -- integer views ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_is_bitwise_zero_catches_negative_zero(dtype):
    z = torch.zeros(5, dtype=dtype)
    assert is_bitwise_zero(z) and is_bitwise_zero(z[1:4:2]) and is_bitwise_zero(z[:0])
    z[3] = -0.0
    assert not is_bitwise_zero(z) and bool((z == 0).all())  # == cannot see it
    assert not is_bitwise_zero(torch.tensor(-0.0, dtype=dtype))  # 0-d
    z[3] = 1e-30 if dtype != torch.float16 else 1e-7
    assert not is_bitwise_zero(z)


def test_int_view_shapes_and_types():
    assert int_view(torch.zeros(2, 3)).dtype == torch.int32
    assert int_view(torch.zeros((), dtype=torch.bfloat16)).shape == ()
    assert int_view(torch.zeros(3, dtype=torch.bool)).dtype == torch.int8
    assert int_view(torch.zeros(4, 4)[:, 1]).shape == (4,)  # non-contiguous
    with pytest.raises(TypeError):
        int_view(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ulp_distance_counts_representable_steps(dtype):
    x = torch.tensor([1.0, -1.0, 0.0, 1e-3, -2.5, 3.0], dtype=dtype)
    assert ulp_distance(up(x), x).tolist() == [1] * 6
    assert ulp_distance(up(up(up(x))), x).tolist() == [3] * 6
    assert ulp_distance(x, up(up(x))).tolist() == [2] * 6  # symmetric
    assert int(ulp_distance(torch.tensor(-0.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))) == 1
    tiny = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    assert int(ulp_distance(-tiny, tiny)) == 3  # -tiny, -0, +0, +tiny
    nan = torch.tensor(math.nan, dtype=dtype)
    assert int(ulp_distance(nan, torch.tensor(1.0, dtype=dtype))) == ULP_NAN
    assert int(ulp_distance(nan, nan)) == 0  # same bits


# -- diff_stats ---------------------------------------------------------------------------------

def test_equal_tensors_are_bitwise(x):
    d = diff_stats(x, x.clone())
    assert d.bitwise and d.n_diff == d.n_bad == 0 and d.max_ulp == 0 and d.worst_index is None
    assert d.numel == x.numel()


@pytest.mark.parametrize("bug", ["one_ulp", "neg_zero", "nan", "scaled_1p2m20", "swapped_halves"])
def test_bitwise_check_fails_on_every_planted_difference(x, bug):
    bad = planted(x)[bug]
    d = diff_stats(bad, x)
    assert not d.bitwise and d.n_diff >= 1 and d.max_ulp >= 1 and d.worst_index is not None
    assert not verdict("bitwise", loss=diff_stats(x[0, 0], x[0, 0]),
                       params=compare_params({"w": bad}, {"w": x})).ok


@pytest.mark.parametrize("bug, caught", [("one_ulp", False), ("scaled_1p2m20", False),
                                         ("nan", True), ("swapped_halves", True)])
def test_tolerance_check_sees_only_what_tolerances_can(x, bug, caught):
    """One ulp and 1 + 2^-20 are invisible to fp32 tolerances (deterministic mode catches them)."""
    bad = planted(x)[bug]
    d = diff_stats(bad, x, tol=FP32)
    assert (d.n_bad > 0) == caught
    try:
        torch.testing.assert_close(bad, x, rtol=FP32.rtol, atol=FP32.atol)
        agrees = not caught
    except AssertionError:
        agrees = caught
    assert agrees


def test_negative_zero_passes_tolerance_but_not_bitwise():
    a, b = torch.tensor([-0.0, 1.0]), torch.tensor([0.0, 1.0])
    d = diff_stats(a, b, tol=FP32)
    assert not d.bitwise and d.n_diff == 1 and d.n_bad == 0 and d.max_abs == 0.0
    assert d.worst_index == (0,) and d.max_ulp == 1


def test_worst_index_and_values(x):
    y = x.clone()
    y[2, 5] += 0.5
    y[1, 1] += 0.25
    d = diff_stats(y, x)
    assert d.worst_index == (2, 5) and d.n_diff == 2
    assert d.max_abs == pytest.approx(0.5, rel=1e-6)
    assert d.max_rel == pytest.approx(max(0.5 / float(x[2, 5]), 0.25 / float(x[1, 1])), rel=1e-5)


def test_nan_is_reported_as_worst_and_non_finite(x):
    d = diff_stats(planted(x)["nan"], x)
    assert math.isnan(d.max_abs) and d.max_ulp == ULP_NAN and d.n_nonfinite == 1
    assert d.worst_index == (3, 5)


def test_zero_dim_and_relative_difference_at_zero():
    d = diff_stats(torch.tensor(1e-6), torch.tensor(0.0), tol=FP32)
    assert d.worst_index == () and d.max_rel == INF and d.n_bad == 0  # atol covers it
    assert diff_stats(torch.tensor(2.0), torch.tensor(2.0)).bitwise


def test_bf16_and_fp64_pairs():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    d = diff_stats(up(a), a, tol=TOLERANCES[torch.bfloat16])
    assert d.max_ulp == 1 and d.n_bad == 0 and not d.bitwise
    big = torch.tensor([1e300, -1e300], dtype=torch.float64)
    assert diff_stats(big, -big).max_ulp > 2**62  # saturating, not overflowing


def test_mismatched_pairs_raise():
    with pytest.raises(ValueError, match="shape"):
        diff_stats(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        diff_stats(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8),
       st.lists(st.floats(-1e-4, 1e-4), min_size=8, max_size=8))
def test_tolerance_agrees_with_torch_testing(values, noise):
    expected = torch.tensor(values, dtype=torch.float32)
    actual = expected + torch.tensor(noise[: len(values)]) * torch.tensor(values).abs().clamp(min=1)
    d = diff_stats(actual, expected, tol=FP32)
    try:
        torch.testing.assert_close(actual, expected, rtol=FP32.rtol, atol=FP32.atol)
        assert d.n_bad == 0
    except AssertionError:
        assert d.n_bad > 0


# -- compare_params -----------------------------------------------------------------------------

def test_compare_params_flags_structure_and_aggregates(x):
    ref = {"a": x, "t": torch.tensor(0.5), "b": x[0].clone(), "gone": x[1].clone()}
    sharded = {"a": planted(x)["one_ulp"], "t": torch.tensor(0.5), "b": x[0, :3].clone(),
               "extra": torch.zeros(1)}
    pd = compare_params(sharded, ref)
    assert pd.missing == ("gone",) and pd.unexpected == ("extra",)
    assert pd.mismatched[0][0] == "b" and "shape (3,)" in pd.mismatched[0][1]
    assert not pd.structural_ok and not pd.bitwise
    assert pd.per_param["t"].bitwise and pd.per_param["t"].worst_index is None  # 0-d compared
    assert pd.first_differing == "a" and pd.worst_param == "a" and pd.n_params_differ == 1
    v = verdict("bitwise", loss=diff_stats(torch.tensor(1.0), torch.tensor(1.0)), params=pd, where="step 3")
    assert not v.ok
    for text in ("missing parameters", "'gone'", "unexpected", "'extra'", "'b'", "step 3",
                 "Mismatched elements: 1 / 24", "at index (0, 1)", "Greatest ULP difference: 1"):
        assert text in v.reason


def test_compare_params_dtype_mismatch_is_flagged(x):
    pd = compare_params({"w": x.double()}, {"w": x})
    assert pd.mismatched and "dtype" in pd.mismatched[0][1]


def test_verdict_passes_equal_steps_in_every_tier(x):
    for tier, tol in (("bitwise", None), ("tolerance", FP32), ("reported", Tolerance(0.0, 0.1))):
        v = verdict(tier, loss=diff_stats(x[0, 0], x[0, 0].clone(), tol=tol),
                    params=compare_params({"w": x.clone()}, {"w": x}, tol=tol))
        assert v.ok and v.reason == ""


def test_verdict_fails_non_finite_even_when_bitwise_equal():
    nan = torch.tensor([math.nan, 1.0])
    v = verdict("bitwise", loss=diff_stats(torch.tensor(1.0), torch.tensor(1.0)),
                params=compare_params({"w": nan}, {"w": nan.clone()}))
    assert not v.ok and "non-finite" in v.reason


def test_verdict_needs_bounds_outside_the_bitwise_tier(x):
    with pytest.raises(ValueError, match="bounds_for"):
        verdict("tolerance", loss=diff_stats(x, x), params=compare_params({}, {}))
    with pytest.raises(ValueError, match="tier"):
        verdict("close-enough", loss=diff_stats(x, x), params=compare_params({}, {}))


def test_loss_divergence_fails_and_is_labelled():
    v = verdict("tolerance", loss=diff_stats(torch.tensor(2.0), torch.tensor(1.0), tol=FP32),
                params=compare_params({}, {}, tol=FP32))
    assert not v.ok and v.reason.startswith("loss: not within the tolerance bounds")
    assert "(up to 1e-05 allowed)" in v.reason


def test_format_diff_of_bitwise_equal():
    assert format_diff("loss", diff_stats(torch.tensor(1.0), torch.tensor(1.0)), "bitwise") == "loss: bitwise equal"


# -- tiers and bounds ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode, w, opt, tier", [
    ("deterministic", 8, "adam", "bitwise"), ("deterministic", 2, "sgd", "bitwise"),
    ("fast", 1, "adamw", "bitwise"), ("fast", 1, "sgd", "bitwise"),
    ("fast", 2, "sgd", "bitwise"), ("fast", 2, "adamw", "bitwise"),
    ("fast", 4, "sgd", "tolerance"), ("fast", 8, "sgd_momentum", "tolerance"),
    ("fast", 4, "adam", "reported"), ("fast", 8, "adamw", "reported"),
])
def test_tier_for(mode, w, opt, tier):
    s = Scenario("mlp", (), w, mode=mode, optimizer=opt, micro_batches=8)
    assert tier_for(s) == tier
    assert (bounds_for(s) is None) == (tier == "bitwise")


def test_bounds_follow_the_compute_dtype():
    fp32 = bounds_for(Scenario("mlp", (), 4, optimizer="sgd", micro_batches=4))
    assert fp32.loss == fp32.params == TOLERANCES[torch.float32]
    bf16 = bounds_for(Scenario("mlp", (), 4, optimizer="sgd", dtype="bf16", lr=0.01, steps=2, micro_batches=4))
    assert bf16.loss == TOLERANCES[torch.bfloat16]
    assert bf16.params.rtol == TOLERANCES[torch.bfloat16].rtol and bf16.params.atol > 1e-3
    adam = bounds_for(Scenario("mlp", (), 4, optimizer="adam", lr=0.01, steps=1, micro_batches=4))
    assert adam.params.atol == pytest.approx(2 * 0.01 + FP32.atol)


def test_adam_step_bound_holds_for_torch_adam():
    """R(t) bounds |update| / lr for any gradients, including the worst (a sign flip after tiny steps)."""
    assert adam_step_bound(1) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    for scale_seq in ([1e-8, 1.0, -1.0], [1.0, 1e-6, 1e-6], [-1.0, 1.0, 1.0, 1.0, 1.0]):
        p = torch.nn.Parameter(torch.zeros(256))
        opt = torch.optim.Adam([p], lr=1.0, foreach=False, eps=0.0)
        for t, scale in enumerate(scale_seq, start=1):
            before = p.detach().clone()
            p.grad = torch.randn(256, generator=gen).abs() * scale
            opt.step()
            assert float((p.detach() - before).abs().max()) <= adam_step_bound(t) * (1 + 1e-6)


def test_compare_step_applies_the_scenarios_tier(x):
    ref = {"w": x, "t": torch.tensor(2.0)}
    off = {"w": planted(x)["one_ulp"], "t": torch.tensor(2.0)}
    loss = torch.tensor(1.5)
    det = Scenario("mlp", (), 2, mode="deterministic")
    fast = Scenario("mlp", (), 4, mode="fast", optimizer="sgd", micro_batches=4)
    step = compare_step(det, loss=loss, loss_ref=loss, params=off, params_ref=ref, where="step 0")
    assert not step.verdict.ok and step.params.first_differing == "w"
    assert step.verdict.reason.startswith("step 0: parameter 'w': not bitwise equal")
    assert compare_step(fast, loss=loss, loss_ref=loss, params=off, params_ref=ref).verdict.ok
    assert compare_step(det, loss=loss, loss_ref=loss, params=ref, params_ref=ref).verdict.ok

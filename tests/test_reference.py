"""verify.reference: plain single-process training, checked against hand-written loops, and the
tiers checked against an in-process emulation of what ranks compute (clean and with planted bugs)."""
from __future__ import annotations

import pytest
import torch

from verify.compare import compare_params, compare_step, diff_stats, tier_for
from verify.reference import RefStep, run_reference
from verify.scenarios import (FAMILIES, Scenario, build_model, cat_batches, loss_fn, make_batch,
                              make_optimizer, param_names, step_loss, tree)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same_steps(a: list[RefStep], b: list[RefStep]) -> bool:
    return len(a) == len(b) and all(
        diff_stats(x.loss, y.loss).bitwise and compare_params(x.params, y.params).bitwise
        for x, y in zip(a, b))


# -- shape of the result ------------------------------------------------------------------------

def test_ref_steps_hold_fp32_state_dict_named_params():
    s = Scenario("special", (), 2, steps=3, dtype="bf16")
    steps = run_reference(s)
    model = build_model(s)
    assert len(steps) == 3
    for st in steps:
        assert st.loss.shape == () and st.loss.dtype == torch.float32
        assert list(st.params) == param_names(model)
        assert all(t.dtype == torch.float32 for t in st.params.values())
    last = steps[-1].params
    assert last["logit_scale"].dim() == 0
    assert torch.equal(last["blocks.0.tie_a.weight"], last["blocks.0.tie_b.weight"])  # stays tied
    assert torch.equal(last["blocks.0.frozen.weight"], model.blocks[0].frozen.weight)  # frozen
    assert not torch.equal(last["blocks.0.shared.weight"], model.blocks[0].shared.weight)  # trained


# -- fast mode ----------------------------------------------------------------------------------

def hand_loop(s: Scenario) -> list[RefStep]:
    """Plain training on the concatenated global batch, SGD written out by hand."""
    model = build_model(s)
    out = []
    for step in range(s.steps):
        batch = cat_batches([make_batch(s, step, m) for m in range(s.micro_batches)])
        loss = loss_fn(s, model, batch)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-s.lr)
                    p.grad = None
        out.append(RefStep(loss.detach(), {n: p.detach().clone()
                                           for n, p in model.named_parameters(remove_duplicate=False)}))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_reference_is_the_plain_loop_bitwise(family):
    s = Scenario(family, (), 1, micro_batches=4, steps=2, lr=0.05)
    assert same_steps(run_reference(s), hand_loop(s))


def test_fast_reference_with_adamw_matches_torch_loop():
    s = Scenario("gpt", (), 1, optimizer="adamw", weight_decay=0.1, micro_batches=2, steps=2)
    model = build_model(s)
    opt = make_optimizer(s, model.named_parameters())
    ref = run_reference(s)
    for step in range(s.steps):
        loss = loss_fn(s, model, cat_batches([make_batch(s, step, m) for m in range(2)]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(loss.detach(), ref[step].loss)
        assert all(torch.equal(p, ref[step].params[n]) for n, p in model.named_parameters())


# -- deterministic mode -------------------------------------------------------------------------

@pytest.mark.parametrize("w", [1, 2, 4])
def test_deterministic_gradient_is_the_balanced_tree_over_w(w):
    """One SGD step with M = 4, written out: p - lr * ((g0 + g1) + (g2 + g3)) / W, g_m = grad(loss_m / k)."""
    s = Scenario("mlp", (("width", 7),), w, mode="deterministic", micro_batches=4, steps=1, lr=0.1)
    k = 4 // w
    model = build_model(s)
    params = list(model.parameters())
    g, losses = [], []
    for m in range(4):
        loss_m = loss_fn(s, model, make_batch(s, 0, m))
        losses.append(loss_m.detach())
        g.append(torch.autograd.grad(loss_m / k, params))
    expected = {n: p.detach().add(((g[0][i] + g[1][i]) + (g[2][i] + g[3][i])) / w, alpha=-s.lr)
                for i, (n, p) in enumerate(model.named_parameters())}  # SGD's own update form
    ref = run_reference(s)[0]
    assert torch.equal(ref.loss, ((losses[0] + losses[1]) + (losses[2] + losses[3])) / 4)
    assert compare_params(ref.params, expected).bitwise


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_reference_is_the_same_at_every_world_size(family, dtype):
    base = Scenario(family, (), 1, mode="deterministic", micro_batches=8, steps=2,
                    optimizer="adam", dtype=dtype)
    first = run_reference(base)
    for w in (2, 4, 8):
        assert same_steps(run_reference(base.with_world_size(w)), first), w


def emulate_deterministic_ranks(s: Scenario) -> list[RefStep]:
    """What DESIGN section 3 asks of the ranks: each rank sums its k micro-batch gradients as a
    subtree, the W subtrees are combined by a tree in rank order, then divided by W (fp32 only)."""
    model = build_model(s)
    opt = make_optimizer(s, model.named_parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for step in range(s.steps):
        per_rank, losses = [], []
        for r in range(s.world_size):
            local = []
            for m in range(r * s.k, (r + 1) * s.k):
                loss_m = loss_fn(s, model, make_batch(s, step, m))
                losses.append(loss_m.detach())
                grads = torch.autograd.grad(loss_m / s.k, [dict(model.named_parameters())[n] for n in names])
                local.append(grads)
            per_rank.append([tree([g[i] for g in local]) for i in range(len(names))])
        for i, n in enumerate(names):
            dict(model.named_parameters())[n].grad = tree([sub[i] for sub in per_rank]) / s.world_size
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(RefStep(step_loss(losses), {n: p.detach().clone() for n, p in
                                               model.named_parameters(remove_duplicate=False)}))
    return out


@pytest.mark.parametrize("family", ["special", "cs336"])
def test_rank_subtrees_combined_by_tree_equal_the_reference(family):
    s = Scenario(family, (), 4, mode="deterministic", micro_batches=8, steps=2, optimizer="sgd_momentum")
    assert same_steps(emulate_deterministic_ranks(s), run_reference(s))


# -- bf16 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "deterministic"])
def test_bf16_reference_is_reproducible_and_really_bf16(mode):
    s = Scenario("cs336", (), 2, mode=mode, dtype="bf16", micro_batches=4, steps=2, optimizer="adamw")
    a, b = run_reference(s), run_reference(s)
    assert same_steps(a, b)
    fp32 = run_reference(Scenario("cs336", (), 2, mode=mode, micro_batches=4, steps=2, optimizer="adamw"))
    assert not diff_stats(a[0].loss, fp32[0].loss).bitwise  # the compute really ran in bf16
    assert all(t.dtype == torch.float32 for t in a[-1].params.values())


def test_bf16_compute_copy_casts_inputs_at_every_unit():
    from verify.reference import _bf16_copy
    s = Scenario("mlp", (("depth", 3), ("width", 8), ("d_in", 4)), 1, dtype="bf16", wrap="every_leaf")
    compute = _bf16_copy(s, build_model(s))
    assert all(p.dtype == torch.bfloat16 for p in compute.parameters())
    # Every unit accepts fp32 input (its pre-hook casts it), as under the sharder's policy.
    assert compute.blocks[1].fc(torch.randn(2, 8)).dtype == torch.bfloat16
    assert compute(torch.randn(2, 4)).dtype == torch.bfloat16
    plain = _bf16_copy(Scenario("mlp", (("depth", 3), ("width", 8)), 1, dtype="bf16", wrap="root_only"),
                       build_model(s))
    with pytest.raises(RuntimeError):  # without a unit hook, fp32 meets bf16 weights
        plain.blocks[1].fc(torch.randn(2, 8))


# -- the tiers against an emulation of fast-mode ranks ------------------------------------------

def emulate_fast_ranks(s: Scenario, bug: str | None = None) -> list[RefStep]:
    """Fast-mode ZeRO math in one process (fp32): rank r's mean loss over its k micro-batches,
    gradients summed over ranks then divided by W. `bug` plants one sharder mistake."""
    model = build_model(s)
    opt = make_optimizer(s, model.named_parameters())
    out = []
    for step in range(s.steps):
        batches = [make_batch(s, step, m) for m in range(s.micro_batches)]
        grads, losses = [], []
        for r in range(s.world_size):
            loss = loss_fn(s, model, cat_batches(batches[r * s.k:(r + 1) * s.k]))
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for i, p in enumerate(trainable):
            contributions = [g[i] for g in grads]
            if bug == "drop_rank":
                contributions = contributions[1:]
            total = sum(contributions[1:], contributions[0])
            p.grad = total if bug == "no_divide" else total / s.world_size
            if bug == "scale_1p2m20":
                p.grad = p.grad * (1 + 2.0**-20)
        opt.step()
        opt.zero_grad(set_to_none=True)
        params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
        if bug == "swap_shards":  # two ranks' shards of the first matrix swapped in the result
            name = next(n for n, t in params.items() if t.dim() == 2)
            flat = params[name].flatten()
            half = flat.numel() // 2
            params[name] = torch.cat([flat[half:2 * half], flat[:half], flat[2 * half:]]).view_as(params[name])
        out.append(RefStep(sum(losses[1:], losses[0]) / s.world_size, params))
    return out


def judge(s: Scenario, got: list[RefStep], ref: list[RefStep]) -> bool:
    return all(compare_step(s, loss=a.loss, loss_ref=b.loss, params=a.params, params_ref=b.params).verdict.ok
               for a, b in zip(got, ref))


CASES = [Scenario("gpt", (("vocab_size", 31),), 2, micro_batches=4, steps=2, lr=0.05),
         Scenario("special", (("width", 5),), 4, micro_batches=4, steps=2, lr=0.05,
                  optimizer="sgd_momentum")]


@pytest.mark.parametrize("s", CASES, ids=["gpt_w2_sgd", "special_w4_momentum"])
def test_fast_emulation_passes_its_tier_and_planted_bugs_fail(s):
    ref = run_reference(s)
    assert judge(s, emulate_fast_ranks(s), ref)
    for bug in ("drop_rank", "no_divide", "swap_shards"):
        assert not judge(s, emulate_fast_ranks(s, bug), ref), bug
    # Invisible to tolerances (W >= 4), caught by the bitwise tier (deterministic mode, W <= 2).
    scaled_caught = not judge(s, emulate_fast_ranks(s, "scale_1p2m20"), ref)
    assert scaled_caught == (tier_for(s) == "bitwise")
    w1 = s.with_world_size(1)
    assert judge(w1, emulate_fast_ranks(w1), run_reference(w1))
    assert not judge(w1, emulate_fast_ranks(w1, "scale_1p2m20"), run_reference(w1))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fast_adam_emulation_is_reported_and_gross_bugs_still_fail(optimizer):
    s = Scenario("cs336", (), 4, micro_batches=4, steps=3, optimizer=optimizer, weight_decay=0.1, lr=1e-3)
    assert tier_for(s) == "reported"
    ref = run_reference(s)
    assert judge(s, emulate_fast_ranks(s), ref)
    assert not judge(s, emulate_fast_ranks(s, "swap_shards"), ref)

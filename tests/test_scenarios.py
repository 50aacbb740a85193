"""verify.scenarios: the data, the models, the plan and the optimizer every process rebuilds."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from verify.scenarios import (DTYPES, FAMILIES, WRAPS, Scenario, build_model, cat_batches,
                              init_weights, loss_fn, make_batch, make_optimizer, param_names,
                              step_loss, tree, wrap_units)


def tensors(model):
    """Every parameter and buffer (non-persistent too), by name."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))


# -- the Scenario record ------------------------------------------------------------------------

def test_json_round_trip_is_one_compact_line():
    s = Scenario("gpt", (("tied", False), ("vocab_size", 31)), 4, mode="deterministic",
                 optimizer="adamw", lr=3e-3, weight_decay=0.1, micro_batches=8, dtype="bf16")
    text = s.to_json()
    assert "\n" not in text and ", " not in text
    assert Scenario.from_json(text) == s
    assert pickle.loads(pickle.dumps(s)) == s and hash(s) == hash(Scenario.from_json(text))


def test_model_kwargs_fill_in_family_defaults():
    s = Scenario("mlp", (("width", 13),), 1)
    kw = s.model_kwargs
    assert kw["width"] == 13 and set(kw) == set(FAMILIES["mlp"].DEFAULTS)


@pytest.mark.parametrize("change, field", [
    (dict(family="resnet"), "family"),
    (dict(world_size=3), "world_size"),
    (dict(mode="fastest"), "mode"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(lr=0.0), "lr"),
    (dict(lr=math.nan), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(steps=0), "steps"),
    (dict(micro_batches=3), "micro_batches"),
    (dict(world_size=4, micro_batches=2), "micro_batches"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(dtype="fp16"), "dtype"),
    (dict(wrap="per_layer"), "wrap"),
    (dict(reshard_after_forward=1), "reshard_after_forward"),
    (dict(seed=-1), "seed"),
    (dict(model=(("width", 0),)), "model.width"),
    (dict(model=(("widht", 3),)), "model.widht"),
    (dict(model=(("width", 3.0),)), "model.width"),
    (dict(model=(("width", 3), ("depth", 2))), "sorted"),
])
def test_validate_names_the_bad_field(change, field):
    s = Scenario(**{**dict(family="mlp", model=(), world_size=2), **change})
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        s.validate()


def test_family_checks_dependent_shapes():
    with pytest.raises(ValueError, match="n_head"):
        Scenario("gpt", (("n_embd", 6), ("n_head", 4)), 1).validate()
    with pytest.raises(ValueError, match="even head size"):
        Scenario("cs336", (("d_model", 6), ("num_heads", 2)), 1).validate()
    with pytest.raises(ValueError, match="norm_groups"):
        Scenario("convnet", (("channels", 6), ("norm_groups", 4)), 1).validate()


def test_from_json_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="unknown scenario field"):
        Scenario.from_json('{"family":"mlp","model":{},"world_size":1,"colour":"red"}')
    with pytest.raises(ValueError, match="world_size"):
        Scenario.from_json('{"family":"mlp","model":{},"world_size":5}')


def test_with_world_size_keeps_m_unless_too_small():
    s = Scenario("mlp", (), 2, micro_batches=4)
    assert s.with_world_size(1).micro_batches == 4
    assert s.with_world_size(4).micro_batches == 4 and s.with_world_size(4).k == 1
    assert s.with_world_size(8).micro_batches == 8
    with pytest.raises(ValueError):
        s.with_world_size(3)


# -- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_one_step(family, dtype):
    s = Scenario(family, (), 2, dtype=dtype)
    model = build_model(s)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    loss = loss_fn(s, model, cat_batches([make_batch(s, 0, m) for m in range(2)]))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_build_is_deterministic_and_seeded(family):
    s = Scenario(family, (), 1)
    a, b = tensors(build_model(s)), tensors(build_model(s))
    assert all(bits_equal(a[n], b[n]) for n in a)
    c = tensors(build_model(Scenario(family, (), 1, seed=1)))
    assert any(not bits_equal(a[n], c[n]) for n in a if n.endswith("weight"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_build_then_init_weights_equals_eager_bitwise(family):
    s = Scenario(family, (), 1, seed=3)
    eager = tensors(build_model(s))
    meta = build_model(s, device="meta")
    assert all(t.is_meta for t in tensors(meta).values())
    meta.to_empty(device="cpu")
    init_weights(meta, s)
    got = tensors(meta)
    assert got.keys() == eager.keys()
    assert all(bits_equal(got[n], eager[n]) for n in eager), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_weights_rewrites_every_parameter_and_buffer(family):
    s = Scenario(family, (), 1)
    model = build_model(s)
    expected = {n: t.clone() for n, t in tensors(model).items()}
    with torch.no_grad():
        for t in tensors(model).values():
            t.fill_(math.nan if t.is_floating_point() else 7)
    init_weights(model, s)
    assert all(bits_equal(t, expected[n]) for n, t in tensors(model).items())


def test_build_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(Scenario("gpt", (), 1, seed=9))
    assert torch.equal(torch.rand(3), expected)


def test_special_model_has_every_parameter_kind():
    model = build_model(Scenario("special", (("width", 3),), 1))
    params = dict(model.named_parameters())
    assert any(p.dim() == 0 for p in params.values())                      # 0-d
    assert any(p.numel() < 8 for p in params.values() if p.dim())         # smaller than W
    assert any(not p.requires_grad for p in params.values())              # frozen ...
    assert any(p.requires_grad for n, p in params.items() if n.startswith("blocks.0."))  # ... next to trainable
    block = model.blocks[0]
    assert block.tie_a.weight is block.tie_b.weight                       # tied inside one block
    assert "blocks.0.tie_b.weight" in model.state_dict()
    assert "blocks.0.scale" in model.state_dict() and "blocks.0.ramp" not in model.state_dict()
    calls = []
    block.shared.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(2, 3))
    assert len(calls) == 2                                                # used twice


def test_cs336_rope_tables_are_non_persistent_buffers():
    model = build_model(Scenario("cs336", (), 1))
    buffers = dict(model.named_buffers())
    assert "layers.0.attn.rope.cos" in buffers and "layers.0.attn.rope.cos" not in model.state_dict()
    assert torch.equal(buffers["layers.0.attn.rope.cos"][0], torch.ones_like(buffers["layers.0.attn.rope.cos"][0]))


def test_param_names_match_state_dict_including_tied_aliases():
    model = build_model(Scenario("gpt", (("tied", True),), 1))
    names = param_names(model)
    assert "wte.weight" in names and "lm_head.weight" in names
    assert names == [n for n in model.state_dict() if n in set(names)]


# -- data ---------------------------------------------------------------------------------------

def test_make_batch_depends_only_on_seed_step_micro():
    s = Scenario("cs336", (), 2, micro_batch_size=3)
    x, y = make_batch(s, 1, 2)
    assert x.shape == (3, 4) and y.shape == (3, 4) and x.device.type == "cpu"
    x2, y2 = make_batch(s.with_world_size(1), 1, 2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    others = [make_batch(s, 1, 3), make_batch(s, 2, 2), make_batch(Scenario("cs336", (), 2, seed=1,
                                                                                 micro_batch_size=3), 1, 2)]
    assert all(not torch.equal(x, o[0]) for o in others)


def test_cat_batches_keeps_order():
    s = Scenario("mlp", (), 1)
    parts = [make_batch(s, 0, m) for m in range(3)]
    x, y = cat_batches(parts)
    assert torch.equal(x[2:4], parts[1][0]) and torch.equal(y[4:], parts[2][1])


# -- the sharding plan --------------------------------------------------------------------------

def _descendants(module):
    return {id(m) for m in module.modules()}


def _check_plan(s, model):
    units = wrap_units(s, model)
    assert units[-1] is model and sum(u is model for u in units) == 1
    assert len({id(u) for u in units}) == len(units)
    for i, inner in enumerate(units):
        for outer in units[:i]:
            assert id(inner) not in _descendants(outer), "an outer unit came before an inner one"
    # Each parameter is owned by the first unit containing it; every module using a tied
    # parameter must lie inside that unit.
    owner = {}
    for u in units:
        for p in u.parameters():
            owner.setdefault(id(p), u)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            assert id(m) in _descendants(owner[id(p)])
    return units


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrap_units_inner_first_root_last(family, wrap):
    s = Scenario(family, (("tied", True),) if family == "gpt" else (), 1, wrap=wrap)
    model = build_model(s)
    units = _check_plan(s, model)
    if wrap == "root_only":
        assert units == [model]
    if wrap == "per_block":
        assert len(units) == len(FAMILIES[family].blocks(model)) + 1


def test_every_leaf_takes_each_parameter_owner_but_not_tied_ones():
    s = Scenario("special", (("n_blocks", 1),), 1, wrap="every_leaf")
    model = build_model(s)
    units = _check_plan(s, model)
    block = model.blocks[0]
    ids = {id(u) for u in units}
    assert {id(block.frozen), id(block.shared), id(block), id(model.head)} <= ids
    assert id(block.tie_a) not in ids and id(block.tie_b) not in ids


def test_nested_mlp_gives_deeply_nested_units_innermost_first():
    s = Scenario("mlp", (("depth", 5), ("nested", True)), 1)
    model = build_model(s)
    units = _check_plan(s, model)
    assert len(units) == 6
    depths = [sum(id(u) in _descendants(o) for o in units if o is not u) for u in units]
    assert depths == [5, 4, 3, 2, 1, 0]


# -- optimizer and summation order --------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam", "adamw"])
def test_make_optimizer_groups_by_name(optimizer):
    s = Scenario("gpt", (("bias", True),), 1, optimizer=optimizer, weight_decay=0.1, lr=3e-3)
    model = build_model(s)
    opt = make_optimizer(s, model.named_parameters())
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(not (names[id(p)].endswith("bias") or ".ln_" in "." + names[id(p)])
               for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"ln_f.weight", "blocks.0.ln_1.weight",
                                                          "blocks.0.attn.c_attn.bias"}
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["foreach"] is False and g.get("fused") in (False, None)
    if optimizer.startswith("sgd"):
        assert decay["momentum"] == (0.9 if optimizer == "sgd_momentum" else 0.0)
    assert type(opt).__name__ == {"sgd": "SGD", "sgd_momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}[optimizer]


def test_make_optimizer_omits_empty_groups():
    s = Scenario("cs336", (), 1)  # no biases; norms are no-decay
    model = build_model(s)
    only_decay = [(n, p) for n, p in model.named_parameters() if "ln" not in n]
    assert len(make_optimizer(s, only_decay).param_groups) == 1


def test_tree_is_balanced_and_in_order():
    a, b, c, d = (torch.tensor(v, dtype=torch.float32) for v in (1.0, 2.0**-24, 2.0**-24, -1.0))
    assert torch.equal(tree([a, b, c, d]), (a + b) + (c + d))
    assert not torch.equal(tree([a, b, c, d]), ((a + b) + c) + d)  # the order matters, and is fixed
    assert tree([a]) is a
    assert torch.equal(tree([a, b, c]), a + (b + c))
    with pytest.raises(ValueError):
        tree([])


def test_step_loss_is_tree_over_count():
    losses = [torch.tensor(x) for x in (0.5, 1.25, 2.0, 4.0)]
    assert torch.equal(step_loss(losses), ((losses[0] + losses[1]) + (losses[2] + losses[3])) / 4)

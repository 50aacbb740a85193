"""Real model architectures through fsdp_core: HuggingFace GPT-2 and Llama (tiny configs, no
download, wrapped per decoder layer through `model._no_split_modules` as the FSDP2 guide does),
next to the CS336-style LM and the nanoGPT-style GPT. Each passes fast-mode parity and
deterministic bitwise equality at W = 1, 2, 4, 8. The HuggingFace cases skip cleanly without
transformers (`pip install -e '.[hf]'`)."""
from __future__ import annotations

import pytest
import torch

from verify.campaign.run import run_one
from verify.scenarios import Scenario, build_model, init_weights, wrap_units

HF = ("hf_gpt2", "hf_llama")
MODELS = HF + ("cs336", "gpt")
LAYER_CLASS = {"hf_gpt2": "GPT2Block", "hf_llama": "LlamaDecoderLayer"}


def _need(family):
    if family.startswith("hf_"):
        pytest.importorskip("transformers")


def _skip_unless(rank_pool, world_size):
    if world_size not in rank_pool.world_sizes:
        pytest.skip(f"world size {world_size} needs more ranks than {max(rank_pool.world_sizes)}")


# -- the families --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", HF)
def test_units_are_the_decoder_layers_then_the_root(family):
    _need(family)
    s = Scenario(family, (("n_layer", 3),), 1)
    model = build_model(s)
    units = wrap_units(s, model)
    assert [type(u).__name__ for u in units[:-1]] == [LAYER_CLASS[family]] * 3
    assert units[-1] is model and LAYER_CLASS[family] in model._no_split_modules


def test_gpt2_head_stays_tied_through_a_meta_build():
    _need("hf_gpt2")
    s = Scenario("hf_gpt2", (("tied", True),), 1)
    model = build_model(s, device="meta")
    model.to_empty(device="cpu")
    init_weights(model, s)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, build_model(s).lm_head.weight)


def test_llama_rotary_tables_are_the_config_s_not_noise():
    _need("hf_llama")
    s = Scenario("hf_llama", (("hidden_size", 16), ("n_head", 2)), 1)
    rope = build_model(s).model.rotary_emb
    head_dim = 8
    want = 1.0 / (rope.config.rope_parameters["rope_theta"]
                  ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    assert torch.equal(rope.inv_freq, want) and torch.equal(rope.original_inv_freq, want)


# -- through the sharder -------------------------------------------------------------------------

pytestmark_multi = pytest.mark.multigpu


@pytestmark_multi
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("family", MODELS)
def test_fast_mode_parity(rank_pool, family, world_size):
    """SGD with momentum: bitwise at W <= 2, torch.testing tolerance at W >= 4."""
    _need(family)
    _skip_unless(rank_pool, world_size)
    s = Scenario(family, (), world_size, mode="fast", optimizer="sgd_momentum", lr=0.05,
                 micro_batches=max(2, world_size), steps=2)
    case = run_one(rank_pool, s, timeout_s=180.0)
    assert case.passed and case.verdict in ("pass", "reported"), f"{case.reason}\nreplay: {case.replay}"
    assert case.tier == ("bitwise" if world_size <= 2 else "tolerance")
    if case.tier == "bitwise":
        assert all(st.bitwise and st.grads_ok for st in case.steps), case.first_divergence


@pytestmark_multi
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("family", MODELS)
def test_deterministic_mode_is_bitwise(rank_pool, family, world_size):
    """AdamW, M = 8 at every W: every step's loss, gradient and parameters bitwise equal to the
    one tree-summed reference (which does not depend on W)."""
    _need(family)
    _skip_unless(rank_pool, world_size)
    s = Scenario(family, (), world_size, mode="deterministic", optimizer="adamw",
                 weight_decay=0.1, micro_batches=8, micro_batch_size=1, steps=2)
    case = run_one(rank_pool, s, timeout_s=180.0)
    assert case.verdict in ("pass", "reported"), f"{case.reason}\nreplay: {case.replay}"
    assert all(st.bitwise and st.grads_ok and st.padding_ok and st.reassembly_ok
               and st.collectives_ok for st in case.steps), case.first_divergence


@pytestmark_multi
@pytest.mark.parametrize("family", HF)
def test_bf16_deterministic_mode_is_bitwise_at_w8(rank_pool, family):
    _need(family)
    _skip_unless(rank_pool, 8)
    s = Scenario(family, (), 8, mode="deterministic", dtype="bf16", optimizer="adamw",
                 micro_batches=8, micro_batch_size=1, steps=2, wrap="per_block")
    case = run_one(rank_pool, s, timeout_s=180.0)
    assert case.verdict in ("pass", "reported") and all(st.bitwise for st in case.steps), case.reason

"""The scale planner (verify/plan/units.py, plan_scale.py, plan_cli.py): its figures equal what the
harness measures, exactly, and a layout bug in the planner shows as a difference."""
from __future__ import annotations

import dataclasses
import json

import pytest

from verify.plan.units import plan_problems, plan_scenario
from verify.scenarios import HF_FAMILIES, Scenario


def _s(family: str, world_size: int, **kw) -> Scenario:
    model = tuple(sorted(kw.pop("model", {}).items()))
    s = Scenario(family=family, model=model, world_size=world_size, **kw)
    s.validate()
    return s


# Cheap cases at W = 1, 2, 4 that reach every rule: alignment gaps and padding (gpt's biases and
# norms, sizes not divisible by W), tied weights (gpt), frozen parameters, a module called twice
# and a 0-d parameter (special, every_leaf), nested units (mlp), bf16 gathers, deterministic mode
# (k > 1 micro-batches per rank: one all-to-all, k gathers), no resharding after forward, every
# optimizer (state from step 1 only; none for plain SGD).
CASES = [
    _s("gpt", 1, optimizer="adamw"),
    _s("gpt", 2, optimizer="adam", model=dict(vocab_size=19, n_embd=12, n_head=3)),
    _s("special", 4, micro_batches=4, optimizer="sgd_momentum", wrap="every_leaf"),
    _s("mlp", 4, mode="deterministic", micro_batches=8, optimizer="adam", dtype="bf16",
       model=dict(nested=True, width=5)),
    _s("cs336", 2, optimizer="sgd", reshard_after_forward=False, wrap="every_leaf"),
    _s("convnet", 4, micro_batches=4, optimizer="adamw", steps=1, wrap="root_only"),
]
if "hf_llama" in HF_FAMILIES:
    CASES.append(_s("hf_llama", 2, optimizer="adamw", steps=1))


@pytest.mark.parametrize("s", CASES, ids=lambda s: f"{s.family}-W{s.world_size}-{s.optimizer}-{s.mode}-{s.wrap}")
def test_plan_equals_measured_state_bytes_and_collectives(rank_pool, s):
    from verify.campaign.run import run_one
    case = run_one(rank_pool, s)
    assert case.verdict in ("pass", "reported"), case.reason
    fig = plan_scenario(s)
    assert len(case.steps) == s.steps
    assert plan_problems(s, case, fig) == []
    for st in case.steps:  # what plan_problems compares, spelled out
        assert st.state_bytes == list(fig.state_bytes[st.step])
        assert st.collectives == fig.collectives == st.collectives_expected


def _planted(monkeypatch, **how):
    """A layout bug in the planner only (this process): the ranks keep fsdp_core's layout."""
    import fsdp_core._layout as L
    real = L.make_layout

    def wrong(numels, world_size, *, align=L.DEFAULT_ALIGN):
        lay = real(numels, world_size, align=how.get("align", align))
        if how.get("no_tail_padding"):
            import dataclasses
            lay = dataclasses.replace(lay, shard_numel=max(1, lay.used_numel // world_size))
        return lay
    monkeypatch.setattr(L, "make_layout", wrong)


@pytest.mark.parametrize("bug,s", [
    (dict(align=1), _s("gpt", 2, optimizer="adamw", model=dict(vocab_size=19, n_embd=12, n_head=3))),
    # the MLP's last parameter (a 3-element bias) leaves an odd used length: a tail pad at W = 2
    (dict(no_tail_padding=True), _s("mlp", 2, optimizer="sgd", model=dict(d_in=5, width=7, d_out=3))),
], ids=["no-alignment", "no-tail-padding"])
def test_a_planted_layout_bug_fails_plan_equals_measured(rank_pool, monkeypatch, bug, s):
    from verify.campaign.run import run_one
    case = run_one(rank_pool, s)
    assert plan_problems(s, case) == []
    _planted(monkeypatch, **bug)
    problems = plan_problems(s, case)
    assert problems and any("state bytes" in p for p in problems) and any("collectives" in p for p in problems)


@pytest.mark.parametrize("world_size", [2, 4])
def test_plan_peak_unsharded_equals_the_bench_measurement(rank_pool, world_size):
    """On the bench GPT (verify/tools/bench.py), fsdp_core's peak of unsharded buffers alive at once
    (fsdp_core._flat_param.UNSHARDED_BYTES, with and without prefetch) is the planner's, on every rank."""
    from verify.tools.bench import bench_case, bench_scenario
    s = bench_scenario(world_size, width=64, layers=3, vocab=97, seq=8, batch=2)
    res = rank_pool.run(world_size, bench_case, {"scenario": s.to_json(), "steps": 1, "warmup": 1,
                                                 "variants": ("fsdp_core", "fsdp_core_noprefetch")})
    assert res.ok, res.error
    fig = plan_scenario(dataclasses.replace(s, steps=2))  # the bench measures after AdamW has stepped
    for v in res.values:
        got = v["variants"]
        assert got["fsdp_core"]["peak_unsharded"] == fig.peak_unsharded
        assert got["fsdp_core_noprefetch"]["peak_unsharded"] == fig.peak_unsharded_no_prefetch
        assert got["fsdp_core"]["state_bytes"] == fig.state_bytes[1][v["rank"]]
    # the root stays gathered; without prefetch one block beside it, with prefetch two
    root, block = fig.units[-1].layout(world_size).padded_numel * 4, fig.units[0].layout(world_size).padded_numel * 4
    assert fig.peak_unsharded_no_prefetch == root + block and fig.peak_unsharded == root + 2 * block


def test_cli_plan_writes_table_json_and_plot(tmp_path, capsys):
    from verify.cli import main
    rc = main(["plan", "--model", "gpt2", "--world-sizes", "8,64", "--mesh", "2x4", "--dtype", "bf16",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# Scale plan: gpt2" in out and "| 2x4 |" in out and "all_reduce | replicate" in out
    assert (tmp_path / "plan.md").read_text() in out and (tmp_path / "plan.png").stat().st_size > 0
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert [(r["replicate"], r["shard"]) for r in rows] == [(1, 8), (1, 64), (2, 4)]
    # gpt2: 124,439,808 parameters, the tied head counted once
    assert json.loads((tmp_path / "plan.json").read_text())["n_params"] == 124_439_808
    r8 = rows[0]
    assert r8["optim"] == 2 * r8["grads"] and r8["params"] == r8["grads"]  # AdamW, all trainable
    assert r8["params"] >= r8["unpadded_state"] // 4  # padding only adds


def test_cli_plan_scenario_family_and_bad_model(tmp_path, capsys):
    from verify.cli import main
    assert main(["plan", "--model", "gpt:n_embd=64,n_layer=3,vocab_size=101", "--world-sizes", "1,3",
                 "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "none (one rank)" in out
    assert main(["plan", "--model", "nope", "--world-sizes", "8"]) == 2
    cfg = tmp_path / "config.json"  # a HuggingFace config.json, Llama-shaped
    cfg.write_text(json.dumps(dict(model_type="llama", vocab_size=1000, hidden_size=64,
                                   intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)))
    assert main(["plan", "--model", str(cfg), "--world-sizes", "16", "--offload", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "plan.json").read_text())["rows"][0]
    assert row["state"] == 0 and row["offloaded"] == row["params"] + row["grads"] + row["optim"] > 0


def test_plan_scale_matches_plan_scenario_on_the_same_model():
    """The CLI's per-rank figures are plan_scenario's for a scenario model at its W."""
    from verify.plan.models import load_model
    from verify.plan.scale import PlanOptions, plan_scale
    s = _s("gpt", 4, optimizer="adamw", micro_batches=4, model=dict(vocab_size=19, n_embd=12, n_head=3))
    fig = plan_scenario(s)
    row = plan_scale(load_model("gpt:n_embd=12,n_head=3,vocab_size=19"), [4], (), PlanOptions())["rows"][0]
    assert row.params + row.grads + row.optim == max(fig.state_bytes[1])
    got = {c["kind"]: [c["calls"], c["bytes"]] for c in row.collectives}
    assert got == fig.collectives


@pytest.mark.skipif("hf_llama" not in HF_FAMILIES, reason="needs transformers")
def test_builtin_trees_have_transformers_parameter_names_shapes_and_order():
    import torch
    import transformers
    from verify.plan.models import _from_config
    cfgs = [dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
            dict(model_type="gpt2", vocab_size=50, n_positions=7, n_embd=16, n_layer=2, n_head=2)]
    for c in cfgs:
        with torch.device("meta"):
            ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**c))
        mine = _from_config("t", c).model
        assert [(n, tuple(p.shape)) for n, p in mine.named_parameters()] == \
               [(n, tuple(p.shape)) for n, p in ref.named_parameters()]

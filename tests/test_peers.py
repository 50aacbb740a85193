"""The built-in peers (verify/sharders/): FSDP2 and DDP run the same cases as fsdp_core through
the adapter protocol, a case a peer does not run is "skipped" (never a failure), and each peer
is held to the tier it owes."""
from __future__ import annotations

import dataclasses

import pytest

from verify.campaign.run import run_one, skip_reason
from verify.sharders import expand_checked
from verify.case.judge import case_tier
from verify.report import write_peers_report
from verify.scenarios import Scenario
from verify.sharders import SharderSpecError, load, resolve
from verify.sharders.torch_fsdp2 import shared_unit_inputs


def unsupported_reason(s, sharder):
    return skip_reason(s, load(sharder))


def peer_tier(s, sharder):
    return case_tier(s, load(sharder))

GPT = Scenario("gpt", (("n_embd", 8), ("n_head", 2), ("n_layer", 2), ("vocab_size", 13)), 2,
               optimizer="sgd", lr=0.05, micro_batches=4, steps=2)


# -- names and up-front decisions (one process) --------------------------------------------------

def test_names_and_all():
    assert resolve("fsdp2") == resolve("torch_fsdp2") == "torch_fsdp2"
    assert expand_checked(["all"])[:3] == ["fsdp_core", "torch_fsdp2", "ddp"]
    assert expand_checked(["ddp", "fsdp2", "torch_fsdp2"]) == ["ddp", "torch_fsdp2"]
    with pytest.raises(SharderSpecError, match="unknown sharder 'megatron'"):
        resolve("megatron")


@pytest.mark.parametrize("sharder", ["torch_fsdp2", "ddp"])
def test_no_peer_has_deterministic_mode(sharder):
    s = dataclasses.replace(GPT, mode="deterministic")
    assert unsupported_reason(s, sharder).startswith(f"{sharder} declares modes ('fast',)")
    assert unsupported_reason(s, "fsdp_core") is None


def test_fsdp2_refuses_0d_parameters_and_ddp_bf16():
    special = Scenario("special", (), 2)
    assert "0-d parameters (logit_scale)" in unsupported_reason(special, "torch_fsdp2")
    assert unsupported_reason(special, "ddp") is None
    assert "declares dtypes ('fp32',)" in unsupported_reason(
        dataclasses.replace(GPT, dtype="bf16"), "ddp")
    assert unsupported_reason(dataclasses.replace(GPT, dtype="bf16"), "torch_fsdp2") is None


def test_fsdp2_owes_bitwise_only_without_shared_unit_inputs():
    """q/k/v as separate units (every_leaf) share one input: FSDP2's autograd function on unit
    inputs reorders the gradient sum, so it is held to the tolerance tier even at W <= 2."""
    cs336 = Scenario("cs336", (), 2, wrap="every_leaf")
    assert {"layers.0.attn.q_proj", "layers.0.attn.k_proj"} <= set(shared_unit_inputs(cs336))
    assert peer_tier(cs336, "torch_fsdp2") == "tolerance"
    assert peer_tier(dataclasses.replace(cs336, optimizer="adam"), "fsdp2") == "reported"
    assert peer_tier(cs336, "ddp") == "bitwise"
    per_block = dataclasses.replace(cs336, wrap="per_block")
    assert shared_unit_inputs(per_block) == [] and peer_tier(per_block, "torch_fsdp2") == "bitwise"


# The helper-shrunk case where FSDP2 without its tier() differs in the last bits at W = 1:
# q, k and v wrapped one by one read one tensor, and FSDP2's autograd function on each unit's
# inputs regroups its gradient sum (k_proj.weight 24 ULP).
REGROUPED = Scenario("cs336", (("context_length", 2), ("d_ff", 2), ("d_model", 2),
                               ("num_heads", 1), ("num_layers", 1), ("rope_theta", 10000.0),
                               ("vocab_size", 2)), 1, optimizer="sgd", lr=0.01, steps=1,
                     micro_batches=1, micro_batch_size=1, wrap="every_leaf", seed=10)


def test_a_regrouped_sum_loosens_only_a_last_bit_fast_failure_with_shared_unit_inputs():
    """[Note: a regrouped gradient sum]: which failed cases are judged again at the looser tier."""
    from verify.case.judge import regrouping_tier
    from verify.results import CaseResult

    def case(severity="last-bit", tier="bitwise", verdict="fail"):
        return CaseResult(scenario_json="{}", sharder="x", family="cs336", world_size=1,
                          mode="fast", dtype="fp32", optimizer="sgd", tier=tier, verdict=verdict,
                          severity=severity)
    foreign = load("tests.foreign_sharders:FSDP2AsWritten")
    tier, why = regrouping_tier(REGROUPED, foreign, case())
    assert tier == "tolerance" and "layers.0.attn.k_proj" in why and "regroups_shared_inputs" in why
    adam = dataclasses.replace(REGROUPED, optimizer="adam")
    # Adam turns a last-bit gradient difference into a large one: any numerical failure
    big = case(severity="beyond tolerance")
    big.checks = [{"check": "bitwise", "status": "fail"}, {"check": "gradients", "status": "fail"}]
    assert regrouping_tier(adam, foreign, case())[0] == regrouping_tier(adam, foreign, big)[0] \
        == "reported"
    broken = case(severity="beyond tolerance")
    broken.checks = big.checks + [{"check": "padding", "status": "fail"}]   # not numbers only
    assert regrouping_tier(adam, foreign, broken) == (None, "")
    for not_it in (big, case(severity="invariant"), case(tier="tolerance"),
                   case(verdict="pass", severity="")):
        assert regrouping_tier(REGROUPED, foreign, not_it) == (None, "")
    assert regrouping_tier(dataclasses.replace(REGROUPED, mode="deterministic"), foreign,
                           case()) == (None, "")
    assert regrouping_tier(dataclasses.replace(REGROUPED, wrap="per_block"), foreign,
                           case()) == (None, "")   # no tensor feeds two units
    for exact in ("fsdp_core", "ddp", "tests.foreign_sharders:FSDP2SaysExact"):
        assert regrouping_tier(REGROUPED, load(exact), case()) == (None, "")


# -- through the rank pool -----------------------------------------------------------------------

pytestmark_multi = pytest.mark.multigpu


@pytestmark_multi
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("sharder", ["torch_fsdp2", "ddp"])
def test_peer_trains_like_the_reference(rank_pool, sharder, world_size):
    if world_size not in rank_pool.world_sizes:
        pytest.skip(f"world size {world_size} needs more ranks")
    s = GPT.with_world_size(world_size)
    case = run_one(rank_pool, s, sharder=sharder, timeout_s=120.0)
    assert case.verdict in ("pass", "reported"), f"{case.reason}\nreplay: {case.replay}"
    assert case.sharder == sharder and len(case.steps) == s.steps
    for st in case.steps:  # the probes the adapters have run; the others are n/a
        assert st.padding_ok is None and st.collectives_ok is None and st.resharded_ok is None
        assert st.reassembly_ok is (True if sharder == "torch_fsdp2" else None)
        assert st.state_bytes and st.step_time_s > 0
    statuses = {(c["check"], c["status"]) for c in case.checks}
    assert ("padding", "n/a") in statuses and ("collectives", "n/a") in statuses
    if world_size <= 2:  # bitwise against the data-parallel reference, gradients included
        assert case.tier == "bitwise"
        assert all(st.bitwise and st.grads_ok for st in case.steps), case.first_divergence


@pytestmark_multi
def test_skipped_is_decided_before_anything_runs(rank_pool):
    s = Scenario("special", (), 2)
    before = rank_pool.spawned_count if hasattr(rank_pool, "spawned_count") else None
    case = run_one(rank_pool, s, sharder="fsdp2")
    assert case.verdict == "skipped" and case.passed and not case.steps
    assert case.reason.startswith("FSDP2 shards every parameter") and "--sharder torch_fsdp2" in case.replay
    if before is not None:
        assert rank_pool.spawned_count == before


def test_peers_report_has_one_column_group_per_sharder(tmp_path):
    from verify.results import CaseResult, StepRecord
    rows = []
    for sharder, verdict in (("fsdp_core", "pass"), ("torch_fsdp2", "pass"), ("ddp", "skipped")):
        steps = [] if verdict == "skipped" else [StepRecord(
            step=0, loss=1.0, loss_ref=1.0, bitwise=True, state_bytes=[100, 100],
            step_time_s=0.01, padding_ok=None if sharder != "fsdp_core" else True)]
        rows.append(CaseResult(scenario_json=GPT.to_json(), sharder=sharder, family="gpt",
                               world_size=2, mode="fast", dtype="fp32", optimizer="sgd",
                               tier="bitwise", verdict=verdict, steps=steps,
                               reason="skipped: because" if verdict != "pass" else ""))
    text = write_peers_report(rows, tmp_path, title="t").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| #"))
    for sharder in ("fsdp_core", "torch_fsdp2", "ddp"):
        assert f"{sharder}: verdict" in header
    assert "skipped: because" in text and "**PASS**" in text


@pytestmark_multi
def test_fsdp2_as_a_user_writes_it_passes_where_it_regroups_a_sum(rank_pool, tmp_path):
    """FSDP2 with no tier() of its own (an adapter written against DESIGN section 6 alone)
    passes the case where it regroups a gradient sum, at the tolerance tier and saying why; the
    same adapter saying it never regroups fails it in the last bits; fsdp_core stays bitwise."""
    from verify.report import write_reports
    as_written = run_one(rank_pool, REGROUPED, sharder="tests.foreign_sharders:FSDP2AsWritten")
    assert as_written.verdict == "pass" and as_written.tier == "tolerance", as_written.reason
    assert "layers.0.attn.k_proj" in as_written.tier_note
    exact = run_one(rank_pool, REGROUPED, sharder="tests.foreign_sharders:FSDP2SaysExact")
    assert exact.verdict == "fail" and exact.severity == "last-bit" and not exact.tier_note, \
        exact.reason
    ours = run_one(rank_pool, REGROUPED, sharder="fsdp_core")
    assert ours.verdict == "pass" and ours.tier == "bitwise" and not ours.tier_note, ours.reason
    write_reports([as_written, ours], tmp_path)
    assert "Judged at a looser tier after the run (1 case: fsdp2_as_written W=1 cs336)" in \
        (tmp_path / "equivalence.md").read_text()


@pytestmark_multi
def test_a_resume_case_of_fsdp2_as_written_is_judged_the_same_way(rank_pool):
    """The same rule for a checkpoint-resume case (W = 1 saves, W = 2 loads): passed at the
    tolerance tier with its note, failed in the last bits by the adapter that says it is exact."""
    from verify.campaign.resume import ResumeCase, run_resume
    if 2 not in rank_pool.world_sizes:
        pytest.skip("world size 2 needs a pool of 2 ranks")
    case = ResumeCase(dataclasses.replace(REGROUPED, world_size=2, steps=2, micro_batches=2), 1, 1)
    as_written = run_resume(rank_pool, case, sharder="tests.foreign_sharders:FSDP2AsWritten")
    assert as_written.verdict == "pass" and as_written.tier == "tolerance", as_written.reason
    assert "layers.0.attn.k_proj" in as_written.tier_note
    exact = run_resume(rank_pool, case, sharder="tests.foreign_sharders:FSDP2SaysExact")
    assert exact.verdict == "fail" and exact.severity == "last-bit", exact.reason


def test_state_bytes_counts_a_modules_replicas_the_optimizer_does_not_hold():
    """A ZeRO-1/2 engine steps flat fp32 shards while the module keeps whole parameters: both
    are this rank's memory. Where the optimizer steps the module's own parameters (or views of
    the same memory) nothing is counted twice."""
    import torch
    from verify.case.probes import state_bytes
    model = torch.nn.Linear(4, 4)                       # 20 fp32 elements: 80 B
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                    # and 80 B of gradients
    shard = torch.nn.Parameter(torch.zeros(10))         # a flat fp32 shard: 40 B
    opt = torch.optim.SGD([shard], lr=0.1)
    assert state_bytes(opt) == 40
    assert state_bytes(opt, model) == 40 + 80 + 80
    same = torch.optim.SGD(model.parameters(), lr=0.1)
    assert state_bytes(same, model) == state_bytes(same) == 160
    flat = torch.zeros(20)                              # the module's parameters as views of it
    views = torch.nn.Linear(4, 4)
    views.weight.data, views.bias.data = flat[:16].view(4, 4), flat[16:]
    over_flat = torch.optim.SGD([torch.nn.Parameter(flat)], lr=0.1)
    over_flat.param_groups[0]["params"][0].data = flat
    assert state_bytes(over_flat, views) == 80

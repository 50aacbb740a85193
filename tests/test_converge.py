"""`python -m verify converge`: the stdlib byte corpus, its batches, and a short sharded vs
unsharded run (deterministic mode must agree bit for bit at every step)."""
from __future__ import annotations

import json

import pytest
import torch

from verify.cli import EXIT_USAGE, main
from verify.tools.converge import converge_scenario, corpus_batch, load_corpus, run_converge


def test_corpus_is_the_stdlib_sources_and_the_same_every_time():
    a, info = load_corpus(100_000)
    b, _ = load_corpus(100_000)
    assert a == b and len(a) == info["bytes"] == 100_000 and info["files"] >= 1
    assert b"def " in a and b"import " in a


def test_batches_depend_on_step_and_micro_batch_only():
    data = torch.frombuffer(bytearray(load_corpus(50_000)[0]), dtype=torch.uint8)
    s = converge_scenario(mode="fast", world_size=2, steps=1, width=16, layers=1, seq=8,
                          micro_batches=2, micro_batch_size=3, lr=1e-3, seed=0)
    x, y = corpus_batch(data, s, 0, 1)
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, corpus_batch(data, s, 0, 1)[0])
    assert not torch.equal(x, corpus_batch(data, s, 1, 1)[0])


def test_micro_batches_must_cover_the_ranks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["converge", "--world-size", "4", "--micro-batches", "2"])
    assert exc.value.code == EXIT_USAGE and "power of two >= the world size 4" in capsys.readouterr().err


@pytest.mark.multigpu
def test_short_run_writes_the_report_and_deterministic_is_bitwise(rank_pool, tmp_path):
    if 2 not in rank_pool.world_sizes:
        pytest.skip("needs 2 ranks")
    paths = run_converge(world_size=2, steps=4, width=16, layers=1, seq=8, micro_batches=4,
                         micro_batch_size=2, corpus_bytes=60_000, out_dir=tmp_path,
                         pool=rank_pool)
    assert {p.name for p in paths} >= {"convergence.md", "convergence.json"}
    runs = {r["mode"]: r for r in json.loads((tmp_path / "convergence.json").read_text())["runs"]}
    det, fast = runs["deterministic"], runs["fast"]
    assert det["bitwise_steps"] == 4 and det["final_params_bitwise"]
    assert det["held_out_sharded"] == det["held_out_unsharded"]
    assert fast["max_abs_loss_diff"] < 1e-5 and fast["sharded"][-1] < fast["sharded"][0]
    assert "| deterministic |" in (tmp_path / "convergence.md").read_text()

"""`python -m verify run` under torchrun: every launched process is a rank, across (simulated)
nodes; world sizes past 8 (through torchrun and through the pool); a rank that raises becomes an
error case on every rank and the campaign goes on. Each test launches real processes, so they
are few and small."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CAMPAIGN = ["--examples", "1", "--seed", "7", "--mode", "fast", "--dtype", "fp32"]


def _env(**extra) -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)     # pytest itself may run under torchrun
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, nproc: int, args: list[str], timeout: float = 480) -> list:
    """Launch ``nnodes`` torchrun agents on this machine (a c10d rendezvous on 127.0.0.1), each
    with ``nproc`` processes running ``python -m verify run ARGS``; their (rc, output)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-id", f"t{port}",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0"]
    procs = [subprocess.Popen(cmd + ["--node-rank", str(k), "-m", "verify", "run"] + args, cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(nnodes)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n[the launcher timed out]"
        out.append((p.returncode, text))
    return out


def _verdicts(out_dir: Path) -> list[tuple[str, str]]:
    data = json.loads((out_dir / "results.json").read_text())
    results = data["results"] if isinstance(data, dict) else data
    return [(r["scenario_json"], r["verdict"]) for r in results]


def test_two_simulated_nodes_run_a_campaign_like_the_pool(tmp_path):
    out = tmp_path / "torchrun"
    runs = _torchrun(2, 4, ["--world-sizes", "2,4,8", "--out", str(out)] + CAMPAIGN)
    for rc, text in runs:
        assert rc == 0, text[-3000:]
    printed = [text for _, text in runs if "cases run in" in text]
    assert len(printed) == 1, "exactly one rank (global rank 0) prints the summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchrun"]   # one set of reports
    pool = tmp_path / "pool"
    res = subprocess.run([sys.executable, "-m", "verify", "run", "--world-sizes", "2,4,8",
                          "--out", str(pool)] + CAMPAIGN, cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _verdicts(out) == _verdicts(pool) and len(_verdicts(out)) == 3


def test_world_size_16_through_torchrun_across_two_nodes(tmp_path):
    runs = _torchrun(2, 8, ["--world-sizes", "16", "--families", "mlp", "--out", str(tmp_path)]
                     + CAMPAIGN)
    for rc, text in runs:
        assert rc == 0, text[-3000:]
    assert [v in ("pass", "reported") for _, v in _verdicts(tmp_path)] == [True]
    assert json.loads(_verdicts(tmp_path)[0][0])["world_size"] == 16


def test_world_size_16_through_the_pool(tmp_path):
    res = subprocess.run([sys.executable, "-m", "verify", "run", "--world-sizes", "16", "--families",
                          "mlp", "--out", str(tmp_path)] + CAMPAIGN, cwd=ROOT,
                         env=_env(VERIFY_MAX_WORLD_SIZE="16"), capture_output=True, text=True,
                         timeout=480)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [v in ("pass", "reported") for _, v in _verdicts(tmp_path)] == [True]
    bad = subprocess.run([sys.executable, "-m", "verify", "run", "--world-sizes", "16"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "VERIFY_MAX_WORLD_SIZE" in bad.stderr


def test_a_rank_that_raises_under_torchrun_is_an_error_case_and_the_campaign_goes_on(tmp_path):
    (rc, text), = _torchrun(1, 2, ["--world-sizes", "2", "--timeout", "15", "--out", str(tmp_path),
                                   "--sharder", "tests.foreign_sharders:RaisesOnRank1,fsdp_core"]
                            + CAMPAIGN, timeout=300)
    assert rc == 1, text[-3000:]      # a verdict failed: an exit, not a hang
    verdicts = [v for _, v in _verdicts(tmp_path)]
    assert verdicts[0] == "error" and verdicts[1] in ("pass", "reported"), text[-3000:]  # went on
    assert "boom on rank 1 only" in (tmp_path / "results.json").read_text()
    # rank 1 exits 1 too, but only once rank 0 has written and printed everything (torchrun
    # stops the other workers when one fails first)
    assert (tmp_path / "equivalence.md").exists(), text[-3000:]
    assert "FAILED (error)" in text and "  replay: " in text, text[-3000:]

"""Ctrl-C in the middle of a campaign ends it without leaving any rank process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_mid_campaign_leaves_no_rank_behind(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "verify", "run", "--world-sizes", "2", "--examples", "200",
         "--seed", "3", "--out", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks: set[int] = set()
    deadline = time.time() + 180
    for line in proc.stdout:                       # wait until cases are running
        ranks |= _children(proc.pid)
        if "1/" in line and "W=2" in line or time.time() > deadline:
            break
    ranks |= _children(proc.pid)
    assert len(ranks) >= 2, f"rank processes were not seen: {ranks}"  # 2 ranks (+ helpers)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=150)   # generous: a loaded 2-core machine is slow to wind down
    assert proc.returncode != 0
    deadline = time.time() + 30
    while any(_alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in ranks if _alive(p)], f"rank processes left behind after Ctrl-C:\n{out[-2000:]}"

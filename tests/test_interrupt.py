"""Ctrl-C in the middle of a campaign ends it without leaving any rank process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from verify.campaign.run import CtrlC   # re-exported from verify.campaign.interrupt

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
    assert proc.returncode == 130, f"exit {proc.returncode} after Ctrl-C; its output:\n{out[-3000:]}"
    deadline = time.time() + 30
    while any(_alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in ranks if _alive(p)], f"rank processes left behind after Ctrl-C:\n{out[-2000:]}"
    # the cases run before it are reported, and the report says the campaign was cut short
    report = (tmp_path / "equivalence.md").read_text()
    assert "interrupted (Ctrl-C) after " in report and " of 400 cases" in report, out[-2000:]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers are set from the main thread only")
def test_a_ctrl_c_dropped_in_a_finalizer_still_ends_the_campaign():
    """[Note: a Ctrl-C that is not lost]: a KeyboardInterrupt raised inside a __del__ is
    printed and dropped by Python; the campaign's flag still says a Ctrl-C came, and the check
    it makes after every case raises it. Outside a campaign the handler is the default again."""
    class Finalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    with CtrlC() as ctrl_c:
        Finalizer()   # collected at once: SIGINT inside its __del__, the exception dropped
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""The persistent rank pool: results in rank order, failures as results, recovery, no orphans.

Functions sent to ranks live at module level (they are pickled by reference). The 8-rank tests
use the session's `rank_pool`; the failure tests use a 4-rank pool of their own, so that their
restarts are cheap and cannot disturb other modules.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from verify.ranks.pool import RankPool
from verify.ranks.rank import PoolResult, pool_world_sizes
from verify.ranks.spawn import measure_overhead
from verify.ranks.torchrun import TorchrunContext, current_rank_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = 20.0          # timeout for runs that should finish at once


# -- functions the ranks run -----------------------------------------------------------------

def whoami(payload, ctx):
    return (ctx.rank, ctx.world_size, os.getpid(), str(ctx.device))


def sum_of_ranks(payload, ctx):
    import torch
    import torch.distributed as dist
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t, group=ctx.group)
    return t.item()


def raise_on(payload, ctx):
    if ctx.rank in payload:
        raise ValueError(f"planted failure on rank {ctx.rank}")
    return ctx.rank


def raise_then_peers_wait(payload, ctx):
    import torch
    import torch.distributed as dist
    if ctx.rank == 0:
        raise RuntimeError("rank 0 fails before the collective")
    dist.all_reduce(torch.ones(1), group=ctx.group)


def exit_on_rank_1(payload, ctx):
    import torch
    import torch.distributed as dist
    if ctx.rank == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(1), group=ctx.group)


def kill_rank_1(payload, ctx):
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def abort_rank_1(payload, ctx):
    import torch
    import torch.distributed as dist
    if ctx.rank == 1:
        sys.stderr.write("rank 1 about to abort\n")
        os.abort()              # what a C++ enforce failure in the backend ends in
    dist.all_reduce(torch.ones(1), group=ctx.group)


def skip_collective_on_rank_0(payload, ctx):
    import torch
    import torch.distributed as dist
    if ctx.rank != 0:
        dist.all_reduce(torch.ones(1), group=ctx.group)
    return ctx.rank


def leak_global_state(payload, ctx):
    import torch
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)


def global_state(payload, ctx):
    import torch
    return (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads())


def unpicklable_return(payload, ctx):
    return lambda: None


def context_from_default_group(payload, ctx):
    rc = current_rank_context()
    return (rc.rank, rc.world_size)


def torchrun_style(payload, ctx):
    # Inside a pool rank at the pool's full size, the default group stands in for torchrun's.
    tc = TorchrunContext()
    res = tc.run(2, raise_on if payload else whoami, (1,) if payload else None)
    return (res.ok, None if res.values is None else [v[:2] for v in res.values],
            res.error is not None and "planted failure on rank 1" in res.error)


# -- helpers ---------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    """True when process `pid` has exited (a zombie not yet reaped counts as exited)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
        except FileNotFoundError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pids, within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def _assert_recovers(pool: RankPool, world_size: int) -> None:
    res = pool.run(world_size, sum_of_ranks, None, timeout_s=SHORT)
    assert res.ok, res.error
    assert res.values == [world_size * (world_size + 1) / 2] * world_size


@pytest.fixture(scope="module")
def small_pool():
    with RankPool(4, timeout_s=SHORT) as pool:
        yield pool


# -- the session pool: results and collectives ------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_values_come_back_in_rank_order(rank_pool, world_size):
    res = rank_pool.run(world_size, whoami, None)
    assert isinstance(res, PoolResult)
    assert res.ok, res.error
    assert [v[0] for v in res.values] == list(range(world_size))
    assert {v[1] for v in res.values} == {world_size}
    assert len({v[2] for v in res.values}) == world_size       # one process per rank
    assert res.wall_time_s < SHORT


def sleep_then_rank(payload, ctx):
    time.sleep(payload)
    return ctx.rank


def test_submit_returns_at_once_and_result_waits(small_pool):
    """The parent works while the ranks do (the campaign computes the reference meanwhile)."""
    assert small_pool.run(2, whoami, None).ok  # the ranks are up
    t0 = time.perf_counter()
    pending = small_pool.submit(2, sleep_then_rank, 1.0)
    sent_in = time.perf_counter() - t0
    with pytest.raises(RuntimeError, match="in flight"):
        small_pool.submit(2, whoami, None)  # one task at a time
    time.sleep(1.0)                          # the parent's own work overlaps the ranks' sleep
    res = pending.result()
    assert res.ok and res.values == [0, 1]
    assert sent_in < 0.5 and time.perf_counter() - t0 < 1.9
    assert pending.result() is res           # idempotent
    assert small_pool.run(2, sum_of_ranks, None).values == [3.0, 3.0]  # free again


def test_collective_on_sub_group(rank_pool):
    for world_size in (8, 2, 4, 1, 2):                # sub-groups in any order, reused
        res = rank_pool.run(world_size, sum_of_ranks, None)
        assert res.ok, res.error
        assert res.values == [world_size * (world_size + 1) / 2] * world_size


def test_world_sizes_served():
    assert pool_world_sizes(8) == (1, 2, 4, 8)
    assert pool_world_sizes(1) == (1,)
    assert pool_world_sizes(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="max_world_size"):
        pool_world_sizes(0)


# -- failures become results, and the pool recovers -------------------------------------------

def test_invalid_arguments(small_pool):
    for bad in (0, 3, 8, -1):
        with pytest.raises(ValueError, match=rf"world_size {bad}.*allowed: 1, 2, 4"):
            small_pool.run(bad, whoami, None)
    with pytest.raises(TypeError, match="module-level function"):
        small_pool.run(2, lambda payload, ctx: None, None)
    with pytest.raises(ValueError, match="timeout_s"):
        small_pool.run(2, whoami, None, timeout_s=0)


def test_raising_rank_returns_its_traceback(small_pool):
    restarts = small_pool.restarts
    res = small_pool.run(2, raise_on, (1,))
    assert not res.ok and res.values is None
    assert "rank 1 raised in test_pool.raise_on at world size 2" in res.error
    assert "Traceback" in res.error and "ValueError: planted failure on rank 1" in res.error
    assert "rank 0 raised" not in res.error
    res = small_pool.run(4, raise_on, (0, 3))                 # every failing rank is reported
    assert "planted failure on rank 0" in res.error and "planted failure on rank 3" in res.error
    _assert_recovers(small_pool, 4)
    assert small_pool.restarts == restarts                    # no restart was needed


def test_raise_while_peers_wait_in_a_collective(small_pool):
    restarts = small_pool.restarts
    res = small_pool.run(4, raise_then_peers_wait, None)
    assert not res.ok
    assert "rank 0 fails before the collective" in res.error
    assert "ranks [1, 2, 3] did not finish" in res.error
    assert res.wall_time_s < 10
    assert small_pool.restarts == restarts + 1
    _assert_recovers(small_pool, 4)


@pytest.mark.parametrize("fn, expect, last_words", [
    (exit_on_rank_1, "exited with code 7", None),
    (kill_rank_1, "was killed by SIGKILL", None),
    (abort_rank_1, "was killed by SIGABRT", ["rank 1 about to abort", "Fatal Python error",
                                            "in abort_rank_1"]),
])
def test_dead_rank_fails_the_run_and_the_pool_restarts(small_pool, fn, expect, last_words):
    restarts, old_pids = small_pool.restarts, small_pool.pids
    res = small_pool.run(2, fn, None)
    assert not res.ok
    assert f"rank 1 (pid {old_pids[1]}) {expect} while running test_pool.{fn.__name__}" \
        in res.error
    for words in last_words or []:          # its stderr and Python stack come back with it
        assert words in res.error
    assert res.wall_time_s < 10
    assert small_pool.restarts == restarts + 1
    assert not set(small_pool.pids) & set(old_pids)
    assert _wait_gone(old_pids, 5) == []
    _assert_recovers(small_pool, 2)


def test_hang_times_out_and_the_pool_restarts(small_pool):
    restarts = small_pool.restarts
    t0 = time.perf_counter()
    res = small_pool.run(2, skip_collective_on_rank_0, None, timeout_s=5)
    elapsed = time.perf_counter() - t0
    assert not res.ok
    assert "timed out after 5 s running test_pool.skip_collective_on_rank_0 at world size 2" \
        in res.error
    assert "ranks [1] did not finish" in res.error
    # the hung rank's Python stack says where it hung (faulthandler, on our signal)
    assert "rank 1 was stuck here" in res.error
    assert "in all_reduce" in res.error and "in skip_collective_on_rank_0" in res.error
    assert "_parent_watch_loop" not in res.error
    assert 5 <= res.wall_time_s < 8 and elapsed < 15
    assert small_pool.restarts == restarts + 1
    _assert_recovers(small_pool, 4)


def test_unpicklable_return_value_is_an_error(small_pool):
    res = small_pool.run(2, unpicklable_return, None)
    assert not res.ok and "cannot be pickled" in res.error
    _assert_recovers(small_pool, 2)


def test_global_torch_state_does_not_leak_between_runs(small_pool):
    assert small_pool.run(2, leak_global_state, None).ok
    res = small_pool.run(2, global_state, None)
    assert res.ok, res.error
    import torch
    assert res.values == [(torch.float32, True, 1)] * 2


# -- the torchrun helpers, exercised inside pool ranks ----------------------------------------

def test_current_rank_context_uses_the_default_group(small_pool):
    res = small_pool.run(4, context_from_default_group, None)
    assert res.ok, res.error
    assert res.values == [(r, 4) for r in range(4)]


@pytest.mark.parametrize("planted", [False, True])
def test_torchrun_context_shares_the_verdict(small_pool, planted):
    res = small_pool.run(4, torchrun_style, planted)
    assert res.ok, res.error
    if planted:           # rank 1 raised: all four ranks (idle 2 and 3 too) see the failure
        assert res.values == [(False, None, True)] * 4
    else:
        assert res.values == [(True, [(0, 2), (1, 2)], False)] * 4


# -- lifecycle: no process outlives the pool ---------------------------------------------------

def test_close_leaves_no_rank_behind():
    with RankPool(2, timeout_s=SHORT) as pool:
        _assert_recovers(pool, 2)
        pids = pool.pids
        assert pool.spawned_count == 2 and pool.restarts == 0
    assert _wait_gone(pids, 5) == []
    pool.close()                                              # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        pool.run(2, whoami, None)


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_a_crashed_parent_leaves_no_rank_behind(how):
    end = {"sigkill": "os.kill(os.getpid(), signal.SIGKILL)", "exit": "os._exit(1)"}[how]
    script = textwrap.dedent(f"""
        import os, signal
        from verify.ranks.pool import RankPool
        from verify.ranks.spawn import _trivial_collective
        pool = RankPool(2)
        assert pool.run(2, _trivial_collective, None).ok
        print(" ".join(map(str, pool.pids)), flush=True)
        {end}
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    assert _wait_gone(pids, 10) == []


def test_overhead_is_far_below_spawning(small_pool):
    m = measure_overhead(small_pool, 2, n=10)
    assert m.pool_s > 0 and m.spawn_s > 0
    assert m.ratio == pytest.approx(m.spawn_s / m.pool_s)
    assert m.ratio >= 20, m


def test_the_stderr_pump_forwards_a_warning_once_over_ranks_and_keeps_the_rest():
    """[Note: a warning once]: the second rank's copy of a warning (and its source line) is not
    forwarded again; other lines, and output that is not whole lines, are."""
    from verify.ranks.stderr import StderrPump
    pump = StderrPump(2)
    warn = (b"/v/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed."
            b"all_gather_into_tensor` is deprecated.\n  return func(*args, **kwargs)\n")
    assert pump._once(0, warn) == warn
    assert pump._once(1, warn) == b""
    assert pump._once(1, b"  File \"x\", line 1\nrank 1 about to abort\n") == \
        b"  File \"x\", line 1\nrank 1 about to abort\n"
    assert pump._once(0, warn + b"progress\n") == b"progress\n"
    other = warn.replace(b"FutureWarning", b"UserWarning")
    assert pump._once(1, other) == other
    assert pump._once(0, warn[:40]) == warn[:40]          # a partial line goes through as it is
    c10 = (b"[rank%d]:[W1206 05:52:33.21414374%d reducer.cpp:1529] Warning: find_unused_parameters="
           b"True was specified in DDP constructor, but did not find any unused parameters\n")
    assert pump._once(0, c10 % (0, 1)) == c10 % (0, 1)    # torch's C++ warnings: rank and time
    assert pump._once(1, c10 % (1, 7) + b"next\n") == b"next\n"   # are not part of what repeats
    note = b"verify: sharder x left process-global state changed; undone for other sharders'\n"
    assert pump._once(0, note) == note and pump._once(1, note) == b""   # the ranks' own notes


def test_a_case_larger_than_the_pool_is_skipped_with_the_reason_not_raised():
    """`equivalence.check` (and run_one) on a world size the ranks cannot hold: skipped, why."""
    from verify.campaign.run import run_one
    from verify.ranks.poolset import PoolSet
    from verify.scenarios import Scenario

    class TwoRanks:   # never asked to run anything: the case is decided before it is sent
        world_sizes, max_world_size, timeout_s = [1, 2], 2, 60.0

        def close(self):
            pass
    case = run_one(PoolSet(TwoRanks()), Scenario("mlp", (), 4, micro_batches=4))
    assert case.verdict == "skipped" and "world size 4 needs more ranks than 2" in case.reason, \
        case.reason

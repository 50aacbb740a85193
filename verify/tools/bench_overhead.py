"""The harness's own cost, measured by the bench: drawn cases through the rank pool vs the same
cases each on freshly spawned ranks (the "Harness" section of performance.md)."""
from __future__ import annotations

import threading
import time
from typing import Optional

from verify.campaign.run import replay_command, run_one
from verify.case.draw import draw_scenarios
from verify.case.judge import evaluate
from verify.case.train import run_case
from verify.ranks.rank import PoolResult
from verify.ranks.spawn import measure_overhead, spawn_run
from verify.reference import run_reference
from verify.sharders import load

__all__ = ["harness_cost"]


def harness_cost(pool, world_size: int, n: int, n_spawn: Optional[int] = None) -> dict:
    """Drawn cases through the pool vs the same cases each on freshly spawned ranks (what a
    harness without a pool pays: spawn, import, group init, a cold case, teardown), both with
    the reference and the comparison, measured now. The pool first runs one other case, so
    its ranks have imported the harness (a campaign pays that once)."""
    # drawn as a campaign of fsdp_core draws them: a draw the adapter declines (e.g. a parameter
    # tied across two units, which fully_shard refuses) is set aside, not run
    cases = draw_scenarios(world_size=world_size, mode="deterministic", n=n + 1, seed=0,
                           sharders=("fsdp_core",))
    run_one(pool, cases[0])
    pool_times = []
    for s in cases[1:]:
        t0 = time.perf_counter()
        case = run_one(pool, s)
        pool_times.append(time.perf_counter() - t0)
        if not case.passed:
            raise RuntimeError(f"harness cost: a drawn case did not pass through the pool: {case.replay}")
    n_spawn = n if n_spawn is None else min(n_spawn, n)  # default: every case both ways
    picked = sorted({round(i * (n - 1) / max(n_spawn - 1, 1)) for i in range(n_spawn)})
    spawn_times = []
    for i, s in enumerate(cases[1 + j] for j in picked):
        t0 = time.perf_counter()
        box: dict = {}
        ranks = threading.Thread(target=lambda: box.update(out=spawn_run(
            world_size, run_case, {"scenario": s.to_json(), "sharder": "fsdp_core"}, i)))
        ranks.start()  # the reference meanwhile, as run_one does with the pool
        ref = run_reference(s)
        ranks.join()
        wall, values = box["out"]
        case = evaluate(s, load("fsdp_core"), "fsdp_core", PoolResult(True, values, None, wall), ref,
                        wall, replay=replay_command(s))
        spawn_times.append(time.perf_counter() - t0)
        if not case.passed:
            raise RuntimeError(f"harness cost: a drawn case did not pass on spawned ranks: {case.replay}")
    trivial = measure_overhead(pool, world_size, n=10)
    per_case = sum(pool_times) / len(pool_times)
    same = sum(pool_times[j] for j in picked) / len(picked)
    spawn_case = sum(spawn_times) / len(spawn_times)
    # What spawning adds to a case (spawn, imports, group init, cold start, teardown), measured
    # on the picked cases, added to every drawn case's pool time: the ratio over the whole draw.
    spawn_extra = spawn_case - same
    return dict(world_size=world_size, cases=len(pool_times), pool_case_s=per_case,
                spawn_cases=len(spawn_times), spawn_case_s=spawn_case, pool_same_cases_s=same,
                case_ratio=spawn_case / same, pool_times=pool_times, picked=picked,
                spawn_extra_s=spawn_extra, draw_ratio=(per_case + spawn_extra) / per_case, spawn_s=trivial.spawn_s, pool_trivial_s=trivial.pool_s,
                trivial_ratio=trivial.ratio, cases_per_min=60.0 / per_case,
                spawn_cases_per_min=60.0 / spawn_case)

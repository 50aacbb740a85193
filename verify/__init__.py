"""verify: the harness that proves a sharded run trains exactly like the unsharded one.

A case, in the order it runs (each step's module):

    scenarios/   a case as frozen data; the model families      strategies  Hypothesis draws
    case/draw    the drawn list of cases for a seed             sharders/   the adapter protocol
    case/train   the one training protocol a sharder runs       case/probes what it measures
    ranks/       the persistent ranks: pool, rank, poolset (one pool per W for default-group
                 sharders), torchrun (the same under torchrun), backend_check
    blas         MKL_CBWR=AUTO,STRICT, set on import (bitwise means the sharding, not alignment)
    reference    the unsharded run                              compare     bitwise / ULP / tiers
    case/judge   the records against the reference: structured checks, one verdict
                 (case/state_check: the gradients and the optimizer state, in every tier)
    results      the records that cross processes               report/     tables and plots
    campaign/    draw -> run -> judge -> report (resume: checkpoint-resume cases; console: replay)
    diagnosis/   after a failure: shrink (smallest failing case), locate (first divergent phase
                 and unit), collective_log + hangs (every rank's collectives when one hangs)
    cli          `python -m verify run|replay|report|bench|plan|converge|mutants`; each
                 subcommand's arguments beside its work (campaign/cli, tools/cli, plan/cli)
    pytest_plugin `pytest --sharder pkg.module:Name` (pytest_cases: the drawn cases as tests)
    plan/        the scale planner (`python -m verify plan`)
    tools/       bench, timing_check (ours vs FSDP2), converge (real text), soak (the leak
                 check), plants/ + mutants (the planted bugs)

`from verify import Sharder, WrapPlan` is the public surface for a sharder of your own (DESIGN
section 6). This package imports nothing heavy on import; import the submodules you need.
"""
from verify import blas as _blas

_blas.apply()   # before any verify module imports torch: MKL_CBWR=AUTO,STRICT (verify/blas.py)

from verify.sharders.base import Sharder, StepTrace, WrapPlan  # noqa: E402  (after the BLAS setting)

__all__ = ["Sharder", "WrapPlan", "StepTrace", "hsdp_mesh"]


def hsdp_mesh(group, replicate: int, shard: int, *, device_type=None):
    """The 2-D (replicate, shard) ``DeviceMesh`` over a case's group for ``WrapPlan.mesh``, for
    an adapter with ``hsdp = True``: row-major, group rank ``r * shard + s`` at (r, s); FSDP2's
    ``fully_shard(mesh=...)`` takes it. Its sub-groups are the ones the rank pool created in
    advance on every rank: creating process groups inside a case (``dist.new_group``,
    ``init_device_mesh``) needs every rank of the default group, which a case at a smaller
    world size does not have, and hangs."""
    # heavy (torch.distributed); only HSDP adapters call this, at shard() time
    from fsdp_core import hsdp_mesh as mesh
    return mesh(group, replicate, shard, device_type=device_type)

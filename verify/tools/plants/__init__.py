"""Planted bugs: named, documented mistakes a sharder (or the layer below it) can make, installed
inside a rank process so that the harness can prove it catches them.

A plant is a function ``install(ctx) -> undo``: it monkeypatches ``torch.distributed`` (below the
sharder, where an unseen bug would be injected) or fsdp_core internals (``_collectives``,
``_flat_param.FlatUnit``, ``_grad_reduce.GradReduction``, ``_hooks``), and returns a callable that restores every patched attribute.
``verify.case.train.run_case`` installs ``payload["plant"]`` before it builds the model and undoes
it when the case ends (ranks are reused across cases, so an undo must be exact).

`BUGS` are silent numerical or bookkeeping bugs: each names the fixed small scenarios it must
fail (``catch``) and, where the harness is blind to it by design, scenarios it passes
(``blind``, e.g. last-bit bugs under the tolerance tier). `FAULTS` are rank failures (raise,
exit, hang on rank 1) that must become one 'error' case. docs/planted_bugs.md is the table of
what each breaks and which check catches it; ``python -m verify mutants`` (verify/tools/mutants.py)
runs them all. The ``--plant NAME`` option of ``run``/``replay`` installs one for a demo.

This module is the registry; the plants live by where they are planted:

    torch_distributed  below the sharder, in torch.distributed's collectives
    collectives        the sharder's collectives (fsdp_core._collectives)
    unit               the unit (FlatUnit, GradReduction) and its shard after the optimizer step
    hooks              the module hooks (fsdp_core._hooks)
    faults             rank 1 raises, exits or hangs
    fixed_scenarios    the small scenarios each plant must fail; patching: the patch/undo tools
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from verify.scenarios import Scenario
from verify.tools.plants.collectives import (no_divide_by_world, reduce_scale_2pow20,
                                             sequential_cross_rank_sum)
from verify.tools.plants.faults import rank_exits, rank_hangs, rank_raises
from verify.tools.plants.fixed_scenarios import (DET2, DET2_BF16, DET4, DET4_BF16, FAST2,
                                                 FAST2_BF16, FAST4, FAST4_ADAM, mlp_scenario)
from verify.tools.plants.hooks import (callback_units_not_reduced, no_reshard_after_forward,
                                       prefetch_across_step)
from verify.tools.plants.patching import Undo
from verify.tools.plants.torch_distributed import (dist_reduce_one_ulp, drop_rank_grad,
                                                   swap_shards_allgather)
from verify.tools.plants.unit import (allgather_one_ulp, grad_reduced_in_bf16,
                                      master_grad_rounded_to_bf16, padding_negative_zero,
                                      padding_written_after_step, sequential_local_accumulation,
                                      stale_grad_accumulation, update_one_ulp,
                                      view_offset_off_by_one)

__all__ = ["Plant", "BUGS", "FAULTS", "PLANTS", "install", "planted", "check_name",
           "mlp_scenario"]


@dataclass(frozen=True)
class Plant:
    name: str
    install: Callable[..., Undo]         # install(ctx) -> undo, inside a rank
    breaks: str                          # one line: what goes wrong
    catch: tuple[Scenario, ...]          # scenarios whose planted run must not pass
    blind: tuple[Scenario, ...] = ()     # scenarios that, by design, cannot see it
    kind: str = "bug"                    # "bug" | "fault"

    @property
    def doc(self) -> str:
        return (self.install.__doc__ or "").strip()


def _bug(install, breaks, catch, blind=()) -> Plant:
    return Plant(install.__name__, install, breaks, tuple(catch), tuple(blind))


BUGS: dict[str, Plant] = {p.name: p for p in [
    _bug(drop_rank_grad, "gradient = sum over all ranks but one, / W",
         [FAST2, FAST4, DET4]),
    _bug(allgather_one_ulp, "one parameter element one ulp off in compute, on one rank",
         [DET2, DET4, FAST2], blind=[FAST4]),
    _bug(reduce_scale_2pow20, "every reduced gradient x (1 + 2^-20)",
         [DET2, DET4, FAST2], blind=[FAST4]),
    _bug(dist_reduce_one_ulp, "one reduced gradient element one ulp off",
         [DET4, FAST2], blind=[FAST4]),
    _bug(no_divide_by_world, "gradient W times too large",
         [FAST2, FAST4, DET4, FAST4_ADAM], blind=[mlp_scenario(1, optimizer="adam")]),
    _bug(swap_shards_allgather, "ranks 0 and 1 see each other's shards in every all-gather",
         [FAST2, FAST4, DET4]),
    _bug(sequential_cross_rank_sum, "deterministic cross-rank sum in the wrong order",
         [DET4], blind=[DET2]),
    _bug(sequential_local_accumulation, "deterministic local sum over k micro-batches in the "
         "wrong order", [mlp_scenario(2, "deterministic", micro_batches=8)], blind=[DET2]),
    _bug(stale_grad_accumulation, "a micro-batch's gradient counted again in the next one",
         [DET2, mlp_scenario(4, "deterministic", micro_batches=8)], blind=[FAST2]),
    _bug(view_offset_off_by_one, "a parameter read one element late in forward",
         [FAST2, FAST4, DET2]),
    _bug(grad_reduced_in_bf16, "bf16 cases: gradients summed in bf16",
         [FAST2_BF16, DET4_BF16], blind=[FAST2]),
    _bug(master_grad_rounded_to_bf16, "bf16 cases: the master's gradient rounded to bf16",
         [FAST2_BF16, DET2_BF16], blind=[FAST2]),
    _bug(update_one_ulp, "one parameter element one ulp off after every optimizer step",
         [FAST2, DET2], blind=[FAST4]),
    _bug(padding_written_after_step, "non-zero padding after every step",
         [FAST2, FAST4, DET2]),
    _bug(padding_negative_zero, "-0.0 in the padding after every step",
         [FAST2, DET4]),
    _bug(no_reshard_after_forward, "units stay unsharded between forward and backward",
         [FAST2, DET4]),
    _bug(callback_units_not_reduced, "units reduced only by the end-of-backward callback get "
         "no gradient", [FAST2, FAST4, DET2]),
    _bug(prefetch_across_step, "the next forward's first unit gathered before the optimizer step",
         [FAST2, FAST4, DET2]),
]}

FAULTS: dict[str, Plant] = {p.name: dataclasses.replace(p, kind="fault") for p in [
    _bug(rank_raises, "rank 1 raises mid-case", [FAST2]),
    _bug(rank_exits, "rank 1 exits mid-case", [FAST2]),
    _bug(rank_hangs, "rank 1 hangs mid-case", [FAST2]),
]}

PLANTS: dict[str, Plant] = {**BUGS, **FAULTS}


def check_name(name: str) -> str:
    """``name`` if it is a plant, else ValueError listing the names."""
    if name not in PLANTS:
        raise ValueError(f"unknown planted bug {name!r}; known: {', '.join(PLANTS)}")
    return name


def install(name: str, ctx) -> Undo:
    """Install plant ``name`` in this (rank) process; returns the undo."""
    return PLANTS[check_name(name)].install(ctx)


@contextlib.contextmanager
def planted(name: Optional[str], ctx) -> Iterator[None]:
    """Plant ``name`` (nothing when None) for the duration of the block, undone on any exit."""
    if name is None:
        yield
        return
    undo = install(name, ctx)
    try:
        yield
    finally:
        undo()

"""Bugs in the module hooks (fsdp_core._hooks): resharding after forward, the end-of-backward
callback, and prefetch across the optimizer step."""
from __future__ import annotations

import fsdp_core._hooks as M
from fsdp_core._flat_param import ShardState
from verify.tools.plants.patching import Undo, patch, undo_all

__all__ = ["no_reshard_after_forward", "callback_units_not_reduced", "prefetch_across_step"]


def no_reshard_after_forward(ctx) -> Undo:
    """``reshard_after_forward=True`` is ignored: units stay unsharded after forward, so
    backward skips its re-gather. Numerics are right; memory and the all-gather count are not."""
    orig = M._post_forward

    def _post_forward(module, args, kwargs, output):
        unit = module._fsdp_unit
        if unit is None:
            return orig(module, args, kwargs, output)
        keep = unit.reshard_after_forward
        unit.reshard_after_forward = False
        try:
            return orig(module, args, kwargs, output)
        finally:
            unit.reshard_after_forward = keep

    return patch(M, "_post_forward", _post_forward)


def callback_units_not_reduced(ctx) -> Undo:
    """The end-of-backward callback reshards, but does not reduce, the units that no input
    hook reduced (units whose inputs carry no grad, e.g. the first block fed raw data): their
    gradients are dropped and their parameters never train."""
    orig = M._final_callback

    def _final_callback(task):
        for ref in M._task_units.get(task, []):
            unit = ref()
            if unit is not None and not unit.post_backward_done:
                unit.post_backward_done = True
                unit._acc.clear()
                if unit.unsharded_params is not None:
                    unit._clear_unsharded_grads()
                unit.reshard()
        return orig(task)

    return patch(M, "_final_callback", _final_callback)


def prefetch_across_step(ctx) -> Undo:
    """Prefetch runs past the end of its iteration: when a backward ends, the first unit of the
    learned forward order starts its all-gather for the next forward, from the shards as they
    are *before* the optimizer step, and the next forward computes with the old parameters. The
    gather only moved, so each step's collective count is unchanged. No gathers at W = 1."""
    roots: list = []
    orig_observe, orig_final = M._observe_backward, M._final_callback

    def _observe_backward(module, unit):
        root = M._root_of(module)
        if not any(r is root for r in roots):
            roots.append(root)
        return orig_observe(module, unit)

    def _final_callback(task):
        try:
            return orig_final(task)
        finally:
            for root in roots:
                learned = root.__dict__["_fsdp_fwd_order"].learned
                first = learned[0]() if learned else None
                if first is not None and first.state is ShardState.SHARDED:
                    first.unshard(async_op=True)

    return undo_all([patch(M, "_observe_backward", _observe_backward),
                     patch(M, "_final_callback", _final_callback)])

"""Bugs in the unit (fsdp_core's FlatUnit and its gradient side, GradReduction): the gathered
parameters and their views, gradient accumulation and its dtypes, and the shard after the
optimizer step (its padding, its update)."""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fsdp_core._flat_param import FlatUnit
# GradReduction defines a unit's gradient methods (FlatUnit inherits them): those are patched there.
from fsdp_core._grad_reduce import GradReduction
from verify.compare import int_view
from verify.tools.plants.patching import Undo, patch

__all__ = ["allgather_one_ulp", "view_offset_off_by_one", "stale_grad_accumulation",
           "sequential_local_accumulation", "grad_reduced_in_bf16", "master_grad_rounded_to_bf16",
           "padding_written_after_step", "padding_negative_zero", "update_one_ulp"]


def allgather_one_ulp(ctx) -> Undo:
    """After the all-gather of an unshard, on rank 0, the first element of the unit's unsharded
    buffer is one ulp off (say, from a cast or a copy that rounds differently on one rank).
    Forward and backward then use it; the sharded master copy stays right. A last-bit bug."""
    orig = FlatUnit._finish_unshard  # every gather ends here, prefetched or not

    def _finish_unshard(self):
        orig(self)
        if ctx.rank == 0 and self.unsharded_flat is not None:
            flat = self.unsharded_flat
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(flat):
                int_view(flat)[self.layout.offsets[0]] += 1

    return patch(FlatUnit, "_finish_unshard", _finish_unshard)


def view_offset_off_by_one(ctx) -> Undo:
    """Off-by-one in the flat layout: the last parameter of every unit is viewed one element
    late in the unsharded buffer (``flat[off + 1 : off + 1 + n]``), so forward reads its
    neighbour's element and one padding element. Gradients are flattened at the right offset."""
    orig = FlatUnit._alloc_unsharded

    def _alloc_unsharded(self):
        orig(self)
        flat, layout = self.unsharded_flat, self.layout
        i = layout.num_params - 1
        off, n = layout.offsets[i], layout.numels[i]
        if n and off + 1 + n <= flat.numel():
            p = self.unsharded_params[i]
            p.data = flat[off + 1: off + 1 + n].view(self.shapes[i])

    return patch(FlatUnit, "_alloc_unsharded", _alloc_unsharded)


def stale_grad_accumulation(ctx) -> Undo:
    """Under gradient accumulation (``set_requires_gradient_sync(False)``, deterministic mode)
    the unsharded gradients are not cleared after a micro-batch is pushed, so the next
    micro-batch's gradient arrives with the previous one still in it (a stale gradient)."""
    orig = GradReduction._clear_unsharded_grads

    def _clear_unsharded_grads(self):
        if self.deterministic and not self.requires_gradient_sync:
            return
        orig(self)

    return patch(GradReduction, "_clear_unsharded_grads", _clear_unsharded_grads)


def sequential_local_accumulation(ctx) -> Undo:
    """Deterministic mode accumulates a rank's k micro-batch gradients into one running sum,
    ((g0 + g1) + g2) + g3, instead of the streaming pairwise tree. The same for k <= 2;
    differs in the last bits from k = 4."""

    def _push_microbatch(self, flat):
        if self._acc:
            n, acc = self._acc.pop()
            self._acc.append((n + 1, acc.add_(flat)))
        else:
            self._acc.append((1, flat))

    return patch(GradReduction, "_push_microbatch", _push_microbatch)


def grad_reduced_in_bf16(ctx) -> Undo:
    """Mixed precision ignores ``reduce_dtype``: gradients are reduced (and, in deterministic
    mode, accumulated) in the bf16 param dtype instead of fp32. A no-op for fp32 cases."""
    return patch(FlatUnit, "reduce_dtype", property(lambda self: self.param_dtype))


def master_grad_rounded_to_bf16(ctx) -> Undo:
    """Wrong mixed-precision cast: the reduced fp32 gradient is cast through the param dtype
    (bf16) before it is handed to the fp32 master shard. A no-op for fp32 cases."""
    orig = GradReduction._assign_sharded_grads

    def _assign_sharded_grads(self, reduced, had_grad):
        return orig(self, reduced.to(self.param_dtype).to(reduced.dtype), had_grad)

    return patch(GradReduction, "_assign_sharded_grads", _assign_sharded_grads)


def padding_written_after_step(ctx) -> Undo:
    """After every optimizer step, the padding of every local shard holds non-zero values (as
    when a sharder writes the whole flat shard back from a buffer whose padding is garbage).
    Compute never reads padding, so losses and parameters stay right."""
    return _padding_hook(2.0**-10)


def padding_negative_zero(ctx) -> Undo:
    """After every optimizer step, the padding of every local shard holds -0.0: equal to zero
    for ``==``, not bitwise zero. Only an integer-view check sees it."""
    return _padding_hook(-0.0)


def update_one_ulp(ctx) -> Undo:
    """On rank 0, after every optimizer step, the first element of its first non-empty local
    shard is moved one ulp up (as when an optimizer kernel rounds one lane differently): the
    reduced gradients are right, the update is not."""
    if ctx.rank != 0:
        return lambda: None

    def hook(optimizer, args, kwargs):
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    unit = getattr(p, "_fsdp_unit", None)
                    if unit is not None and unit.pieces[p._fsdp_index].real_numel > 0:
                        x = p.view(-1)[:1]
                        x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))
                        return

    return register_optimizer_step_post_hook(hook).remove


def _padding_hook(value: float) -> Undo:
    def hook(optimizer, args, kwargs):
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    unit = getattr(p, "_fsdp_unit", None)
                    if unit is not None:
                        p[unit.pieces[p._fsdp_index].real_numel:].fill_(value)

    return register_optimizer_step_post_hook(hook).remove

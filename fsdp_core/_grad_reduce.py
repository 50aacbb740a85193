"""The gradient side of a unit: when its gradients are ready, and how they are reduced.

``GradReduction`` is the half of ``FlatUnit`` that runs in backward (``FlatUnit`` in
``_flat_param`` inherits it; the storage, views and unshard/reshard are there):

  unsharded grads  --flatten, cast to the reduce dtype-->  1-D padded flat gradient  -->
  fast: reduce-scatter / W;  deterministic: push onto the local pairwise accumulator (one per
  micro-batch), and when syncing, pop the local subtree and reduce it across ranks in rank order
  (all-to-all + ``tree_sum``; on a 2-D mesh then over the replicate group, see [Note: HSDP
  reduction order] in ``_collectives``)  -->  shard gradient (master dtype, padding zero).

[Note: pairwise accumulation]
Deterministic mode keeps a stack of (count, flat) pairs: each micro-batch pushes (1, g), and
while the top two have the same count they merge as left + right, so after k = 2^j pushes the
stack holds the balanced tree over the k micro-batches in order, with O(log k) buffers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _collectives as C

__all__ = ["GradReduction", "finish_reductions"]

# [Note: gradient reduction order]
# A unit's post-backward takes its unsharded gradients into one flat buffer, drops them and
# reshards (frees the unsharded parameters) *before* it starts the reduction, so neither is
# alive while the collective runs. In fast mode the reduce-scatter is started asynchronously
# ([Note: in-flight reductions] in ``_collectives``) and overlaps the backward of the units
# before it; it is waited on, and the shard gradient assigned, when the next reduction is
# started (at most one in flight: its buffers are bounded by one unit; on a 2-D mesh the wait
# starts its replicate-group all-reduce, which stays in flight until the next reduction) or at
# the end of the backward pass (``finish_reductions``, called by the end-of-backward callback),
# so gradients are complete when ``backward()`` returns. Every rank starts and waits in the
# same order.
_in_flight: list = []  # (unit, Pending, had_grad), in start order


def finish_reductions(one_stage: bool = False) -> None:
    """Wait for every reduction in flight in this process and assign its shard gradients, in
    start order. With ``one_stage``, a reduction of several collectives (HSDP: reduce-scatter,
    then all-reduce) only moves on to its next one, which stays in flight."""
    for _ in range(len(_in_flight)):
        unit, pending, had_grad = _in_flight.pop(0)
        result = pending.wait()
        while isinstance(result, C.Pending) and not one_stage:
            result = result.wait()
        if isinstance(result, C.Pending):
            _in_flight.append((unit, result, had_grad))
        else:
            unit._assign_sharded_grads(result, had_grad)


class GradReduction:
    """Backward bookkeeping and gradient reduction of a ``FlatUnit`` (a mixin: it uses the
    unit's ``layout``, ``pieces``, ``padding_ranges``, ``unsharded_params``, ``sharded_params``,
    ``shard``, dtypes, groups and ``reshard``)."""

    def reset_backward_state(self) -> None:
        self.calls_with_hook = 0       # forward calls whose inputs carry the post-backward hook
        self.calls_without_hook = 0    # forward calls with no input requiring grad
        self.hooks_fired = 0
        self.post_backward_done = False
        self.backward_task: Optional[int] = None  # autograd graph task of the running backward
        self.enlisted_task: Optional[int] = None  # the task whose final callback processes us

    def abandon_backward(self) -> None:
        """A backward through this unit raised midway: its partial gradients are garbage."""
        finish_reductions()  # started on every rank before the error: complete them
        self._acc.clear()
        if self.unsharded_params is not None:
            self._clear_unsharded_grads()
        self.reshard()
        self.reset_backward_state()

    def input_hook_fired(self) -> None:
        self.hooks_fired += 1
        if self.calls_without_hook == 0 and self.hooks_fired == self.calls_with_hook:
            self.post_backward()

    @torch.no_grad()
    def post_backward(self) -> None:
        """Once per backward: take this unit's gradients, reshard, then reduce them (if
        syncing). See [Note: gradient reduction order]."""
        if self.post_backward_done:
            return
        self.post_backward_done = True
        flat, had_grad = self._take_grads()
        self.reshard()
        if flat is not None:
            self._reduce(flat, had_grad)

    def _take_grads(self) -> tuple[Optional[torch.Tensor], Optional[list[bool]]]:
        """The unsharded gradients as one flat buffer to reduce (None: nothing to reduce now),
        and which parameters had one. The unsharded gradients are dropped, except in fast mode
        without gradient sync: there autograd keeps accumulating into them."""
        if self.unsharded_params is None:
            return None, None
        grads = [p.grad for p in self.unsharded_params]
        had_grad = [g is not None for g in grads]
        if not any(had_grad) or (not self.deterministic and not self.requires_gradient_sync):
            return None, None
        flat = self._flatten_grads(grads)
        del grads
        self._clear_unsharded_grads()
        if self.deterministic:
            # Each backward is one micro-batch: push its gradient onto the pairwise stack.
            self._push_microbatch(flat)
            if not self.requires_gradient_sync:
                return None, None
            flat = self._pop_local_tree()
        return flat, had_grad

    def _flatten_grads(self, grads: list[Optional[torch.Tensor]]) -> torch.Tensor:
        layout = self.layout
        flat = torch.empty(layout.padded_numel, dtype=self.reduce_dtype, device=self.compute_device)
        end = 0
        for off, n, g in zip(layout.offsets, layout.numels, grads):
            if off > end:
                flat[end:off].zero_()  # alignment gap: padding is zero
            if g is not None:
                flat[off: off + n].copy_(g.reshape(-1))  # exact cast to the reduce dtype
            else:
                flat[off: off + n].zero_()
            end = off + n
        if layout.padded_numel > end:
            flat[end:].zero_()
        return flat

    def _reduce(self, flat: torch.Tensor, had_grad: list[bool]) -> None:
        if self.deterministic:
            if self.replicate_group is not None:  # HSDP: see [Note: HSDP reduction order]
                reduced = C.hsdp_tree_reduce_mean(flat, self.group, self.replicate_group, self.dp_world)
            else:
                reduced = flat if self.world_size == 1 else C.tree_reduce_mean(flat, self.group)
        elif self.replicate_group is not None:  # HSDP: reduce-scatter, all-reduce, / W
            reduced = C.hsdp_reduce_scatter_mean(flat, self.group, self.replicate_group, self.dp_world,
                                                 async_op=True)
        else:
            # One rank: the sum over ranks is the gradient itself and / 1 is exact.
            reduced = flat if self.world_size == 1 else C.reduce_scatter_mean(flat, self.group, async_op=True)
        if isinstance(reduced, C.Pending):
            finish_reductions(one_stage=True)  # at most one collective per reduction in flight
            _in_flight.append((self, reduced, had_grad))
        else:
            self._assign_sharded_grads(reduced, had_grad)

    def _clear_unsharded_grads(self) -> None:
        for p in self.unsharded_params:
            p.grad = None

    def _push_microbatch(self, flat: torch.Tensor) -> None:
        self._acc.append((1, flat))
        while len(self._acc) >= 2 and self._acc[-1][0] == self._acc[-2][0]:
            n, right = self._acc.pop()
            _, left = self._acc.pop()
            self._acc.append((2 * n, left.add_(right)))  # left + right, in micro-batch order

    def _pop_local_tree(self) -> torch.Tensor:
        if len(self._acc) != 1:
            counts = [n for n, _ in self._acc]
            self._acc.clear()
            raise RuntimeError(
                f"deterministic fully_shard unit {self.module_name!r}: the number of micro-batches "
                f"accumulated on this rank ({sum(counts)}) is not a power of two; deterministic mode "
                "needs k = M / W micro-batches per rank with k a power of two"
            )
        return self._acc.pop()[1]

    def _assign_sharded_grads(self, reduced: torch.Tensor, had_grad: list[bool]) -> None:
        grad = reduced.to(device=self.shard.device, dtype=self.master_dtype)  # 1-D padded shard
        for start, end in self.padding_ranges:
            grad[start:end].zero_()
        for piece, p, has in zip(self.pieces, self.sharded_params, had_grad):
            if not has:
                continue
            g = grad[piece.shard_start: piece.shard_end]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

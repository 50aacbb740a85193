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

__all__ = ["GradReduction", "finish_reductions", "guard_shard_grad", "raise_missing_grads"]

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


# [Note: a shard used outside its unit]
# Outside its unit's forward a sharded parameter is this rank's 1-D local shard, not the
# parameter: a use of it there (an L2 penalty over ``model.parameters()`` in the loss) computes
# something else on every rank and silently trains wrong. Forward and backward use the unsharded
# parameters and shard gradients are assigned (``p.grad = ...``, which fires no hook), so the only
# way autograd reaches a sharded parameter is such a use: a post-accumulate-grad hook on each one
# (registered once, at sharding; it never fires in normal training) records it. The error is
# raised at the end of the backward pass, after the end-of-backward callback (the hook queues a
# callback that queues itself once more, so it runs after every callback queued during the pass):
# every rank has then issued every collective of the pass, so a use on some ranks only cannot
# leave the others waiting in one.
_used_outside: dict[int, list[str]] = {}  # graph task -> names of shards autograd reached


def guard_shard_grad(param: torch.Tensor) -> None:
    """Install the hook of [Note: a shard used outside its unit] on a sharded parameter (once)."""
    if param.requires_grad and not getattr(param, "_fsdp_guarded", False):
        param.register_post_accumulate_grad_hook(_shard_reached_by_autograd)
        param._fsdp_guarded = True  # type: ignore[attr-defined]


def _shard_reached_by_autograd(param: torch.Tensor) -> None:
    name = param._fsdp_unit.describe_param(param._fsdp_index)
    task = torch._C._current_graph_task_id()  # unique per pass: a stale entry never matches
    names = _used_outside.get(task)
    if names is None:
        names = _used_outside[task] = []
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _raise_used_outside(task, True))
    if name not in names:
        names.append(name)


def _raise_used_outside(task: int, again: bool) -> None:
    if again:  # run once more, after the callbacks queued during the pass
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _raise_used_outside(task, False))
        return
    names = _used_outside.pop(task, [])
    raise RuntimeError(
        f"fully_shard: parameter(s) {', '.join(names)} received a gradient from "
        "autograd as sharded parameters: they were used outside the forward of their fully_shard "
        "unit, where each is only this rank's 1-D local shard (e.g. a penalty over "
        "model.parameters() in the loss). Use them inside the forward of their unit (e.g. compute "
        "the penalty there), or unshard their unit first (module.unshard() after the forward and "
        "before the use: the use then sees the full parameters, whose gradients are reduced with "
        "the forward's); an L2 penalty is also the optimizer's weight_decay"
    )


# [Note: gradients on some ranks only]
# Whether a parameter has a gradient is decided on each rank from its local backward: a rank
# that saw none assigns no shard gradient, because telling "no rank had one" from "another rank
# had one" needs a collective. A parameter used on some ranks only (a data-dependent branch)
# would then never be updated on the ranks that own it but did not use it. A rank that saw no
# gradient for a parameter checks the reduced piece it owns (only then: free when every
# parameter has a gradient): not all zeros means another rank produced one, and the backward
# pass ends with an error (recorded here and raised by the end-of-backward callback once every
# reduction is done, so no peer is left waiting). An all-zero reduced piece cannot be told from
# "no rank had a gradient" and stays without a gradient. Every rank must produce gradients for
# the same parameters in a backward pass, as FSDP2 requires.
_missing_grads: list[str] = []


def raise_missing_grads() -> None:
    """Raise the error of [Note: gradients on some ranks only] for this pass, if any."""
    if not _missing_grads:
        return
    names = ", ".join(dict.fromkeys(_missing_grads))
    _missing_grads.clear()
    raise RuntimeError(
        f"fully_shard: parameter(s) {names} got no gradient in this rank's backward, but other ranks "
        "produced one (the reduced gradient of this rank's shard is not zero): every rank must "
        "produce gradients for the same parameters in a backward pass (as FSDP2 requires). Make a "
        "branch taken on some ranks only contribute on every rank, e.g. add `0 * branch(x)` where "
        "it is not taken"
    )


class GradReduction:
    """Backward bookkeeping and gradient reduction of a ``FlatUnit`` (a mixin: it uses the
    unit's ``layout``, ``pieces``, ``padding_ranges``, ``unsharded_params``, ``sharded_params``,
    ``shard``, dtypes, groups, ``reshard`` and ``describe_param``)."""

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
        _missing_grads.clear()  # of the pass that raised: its gradients are dropped anyway
        self._acc.clear()
        self._acc_had_grad = None
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
        if self._take_grads_unreduced():
            self.reshard()
            return
        flat, had_grad = self._take_grads()
        self.reshard()
        if flat is not None:
            self._reduce(flat, had_grad)

    # [Note: one rank, nothing to reduce]
    # On one rank in fast mode, with no replicate group and the gradient in the master dtype and
    # device, the reduction is the identity (the sum over one rank, / 1, is exact): each
    # parameter's unsharded gradient becomes its shard gradient as it is (a 1-D view of the
    # tensor autograd accumulated), with no flat buffer and no copy. A parameter whose local view
    # has padding (an alignment gap) gets a zero-padded copy, so every padding element of a
    # gradient is zero as always. The values are those the flat path assigns, bit for bit.
    def _take_grads_unreduced(self) -> bool:
        """Assign the shard gradients of [Note: one rank, nothing to reduce]; False where it
        does not apply (the flat path then runs)."""
        if (self.unsharded_params is None or self.world_size != 1 or self.replicate_group is not None
                or self.deterministic or not self.requires_gradient_sync or not self.aliased
                or self.reduce_dtype != self.master_dtype):
            return False
        for piece, p, u in zip(self.pieces, self.sharded_params, self.unsharded_params):
            g = u.grad
            if g is None:
                continue
            if piece.pad_numel == 0 and g.is_contiguous():
                g = g.view(-1)
            else:
                padded = g.new_zeros(piece.numel)
                padded[: piece.real_numel].copy_(g.reshape(-1))
                g = padded
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        self._clear_unsharded_grads()
        return True

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
            # Each backward is one micro-batch: push its gradient onto the pairwise stack. A
            # parameter has a gradient if it had one in any micro-batch of the step.
            self._push_microbatch(flat)
            if self._acc_had_grad is not None and not all(had_grad):
                had_grad = [a or b for a, b in zip(had_grad, self._acc_had_grad)]
            if not self.requires_gradient_sync:
                self._acc_had_grad = had_grad
                return None, None
            self._acc_had_grad = None
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
            self._acc_had_grad = None
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
        for i, (piece, p, has) in enumerate(zip(self.pieces, self.sharded_params, had_grad)):
            g = grad[piece.shard_start: piece.shard_end]
            if not has:
                if g.any():  # see [Note: gradients on some ranks only]
                    _missing_grads.append(self.describe_param(i))
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

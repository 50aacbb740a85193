"""The hooks of the data path: pre-/post-forward (unshard, reshard, casts), pre-/post-backward
(unshard again, reduce), the end-of-backward callback, the prefetch order, and the
process-global bookkeeping of backward passes. ``_module`` installs them on a sharded module.

[Note: when a unit's gradients are ready]
Pre-forward registers a multi-grad hook on the unit's input tensors that require grad; it fires
once their gradients are computed, which is after the whole unit's backward. A unit called c
times with hooked inputs reduces when the c-th of those hooks has fired. The hook is a tensor
hook, not an autograd node: an extra node (an identity function on the inputs, as FSDP2 uses)
changes the order in which autograd sums the gradient of a tensor used by several units, and
with it the last bits of that gradient. Units whose inputs carry no
grad (the first unit, fed token ids) or that are only partly reached are reduced by the
end-of-backward callback, queued by the first pre-backward hook of each backward pass. Reduction
order is the same on every rank because every rank runs the same graph.

Only non-leaf inputs are hooked. A non-leaf input's hook runs when autograd executes the node
that produced it, and autograd runs the ready node created last first, so the unit's own nodes
(created after its inputs) run before it even where the input's gradient is ready early. A leaf
input's hook runs in its AccumulateGrad node, which autograd runs as soon as it is ready: a
parameter of another unit passed in and used only at the end of this unit's forward (``x +
alpha * f(x)``) has its gradient before this unit's weights have theirs, and the unit would
reduce (and reshard) before its backward is done. A unit whose inputs needing grad are all
leaves is reduced by the end-of-backward callback instead.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._flat_param import FlatUnit, ShardState
from ._grad_reduce import finish_reductions, raise_missing_grads

__all__ = ["new_orders"]  # and the hooks _module installs: _pre_forward, _post_forward

# [Note: prefetch order]
# The outermost fully_shard module (the root) keeps two orders: the units in the order they
# unshard in a forward pass (from the root's pre-forward to its post-forward) and in a backward
# pass (one autograd graph task), consecutive repeats merged. A pass that repeats the previous
# pass's order so far prefetches: when the unit at position i unshards, the unit at i + 1 (if
# sharded) starts its all-gather asynchronously, so it overlaps the compute of unit i. A pass
# that departs from the learned order stops prefetching and becomes the order learned for the
# next pass. Prefetched units not used by the end of their pass are resharded there (a wasted
# gather, never a stale buffer): the root's post-forward ends a forward pass, the end-of-backward
# callback a backward pass, so no unsharded copy outlives its pass into an optimizer step. Every
# rank runs the same passes, so every rank issues the same collectives in the same order.


# [Note: prefetch at the activation peak]
# Activation memory peaks where backward begins: every saved activation is alive while the first
# block's gradients are computed. A gather in flight holds the unit's buffer *and* the backend's
# staging copy of it (gloo gathers into a temporary and copies out), so the first non-root unit
# of a backward pass starts no prefetch: its successor is gathered at its own pre-backward, once
# this unit's activations, gradients and unsharded parameters are freed (its reduce-scatter in
# flight meanwhile). Every later prefetch overlaps compute (activations have been freed by
# then), and forward prefetches overlap compute from the first.


# [Note: two gathers at a pass's start]
# A forward pass's first unit (the root) has no predecessor to prefetch it: its gather would run
# alone, and its successor's prefetch start only once it is done. So in forward a unit that
# prefetches starts its own gather first and waits for it after issuing the prefetch: both are in
# flight together (the same collectives in the same order on every rank; only the waits move).
# Forward is not the step's memory peak (that is where backward begins, see below); backward
# keeps gather-then-prefetch.


class _Order:
    __slots__ = ("learned", "seen", "follows", "pending", "active", "peak_done")

    def __init__(self) -> None:
        self.learned: list["weakref.ref[FlatUnit]"] = []
        self.seen: list["weakref.ref[FlatUnit]"] = []
        self.follows = True
        self.pending: list["weakref.ref[FlatUnit]"] = []  # prefetched by this order in this pass
        self.active: Any = None  # forward: True inside a pass; backward: the graph task observed
        self.peak_done = False   # see [Note: prefetch at the activation peak]

    def start(self, active: Any) -> None:
        self.finish()
        self.active = active

    def finish(self) -> None:
        for ref in self.pending:
            unit = ref()
            if unit is not None and unit.prefetched:
                unit.reshard()
        self.pending.clear()
        if self.seen:
            self.learned, self.seen = self.seen, []
        self.follows = True
        self.active = None
        self.peak_done = False

    def observe(self, unit: FlatUnit, prefetch: bool, own_first: bool = False) -> None:
        """``unit`` is used now; prefetch its successor in the learned order. With
        ``own_first``, ``unit``'s own gather (if it has none in flight) is started before that
        prefetch, so the two are in flight together (see [Note: two gathers at a pass's start])."""
        if self.seen and self.seen[-1]() is unit:
            return
        i = len(self.seen)
        self.seen.append(weakref.ref(unit))
        if not self.follows:
            return
        if i >= len(self.learned) or self.learned[i]() is not unit:
            self.follows = False
            return
        nxt = self.learned[i + 1]() if i + 1 < len(self.learned) else None
        if prefetch and nxt is not None and nxt.state is ShardState.SHARDED:
            if own_first:
                unit.unshard(async_op=True)
            nxt.unshard(async_op=True)
            self.pending.append(weakref.ref(nxt))


def _root_of(module: nn.Module) -> nn.Module:
    while True:
        outer = module.__dict__.get("_fsdp_outer")
        if outer is None or outer() is None:
            return module
        module = outer()


# Backward passes whose orders the end-of-backward callback finishes, by graph task.
_task_orders: dict[int, list[_Order]] = {}

# [Note: backward bookkeeping]
# Units reached by a backward pass (a pre- or post-backward hook fired) are enlisted under that
# pass's autograd graph task; the pass's end-of-backward callback processes exactly those. A pass
# that raised never runs its callback: its units notice at their next forward (their
# ``backward_task`` is stale) and drop the partial state. ``_generation`` counts completed
# passes, so a unit can tell a new iteration (reset its counters) from a second forward before
# one backward (keep counting). Weak references: a model dropped midway is neither kept alive
# nor processed.
_generation = 0
_task_units: dict[int, list["weakref.ref[FlatUnit]"]] = {}
# Units forwarded with grad enabled in the current generation: the final callback reshards the
# ones backward never reached (a frozen unit kept unsharded by reshard_after_forward=False).
_forwarded: list["weakref.ref[FlatUnit]"] = []


def _enlist(unit: FlatUnit) -> None:
    """Called from backward hooks: make sure this pass's final callback processes ``unit``."""
    task = torch._C._current_graph_task_id()
    unit.backward_task = task
    units = _task_units.get(task)
    if units is None:
        units = _task_units[task] = []
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _final_callback(task))
    if unit.enlisted_task != task:
        unit.enlisted_task = task
        units.append(weakref.ref(unit))


def _final_callback(task: int) -> None:
    global _generation
    _generation += 1
    units = [u for u in (ref() for ref in _task_units.pop(task, [])) if u is not None]
    for stale in [t for t, refs in _task_units.items() if all(r() is None for r in refs)]:
        del _task_units[stale]
    error = None
    for unit in reversed(units):  # reverse of first-reached order; the same on every rank
        try:
            unit.post_backward()
        except Exception as e:  # finish every unit's bookkeeping, then report the first error
            error = error or e
    try:
        finish_reductions()  # every shard gradient is assigned when backward() returns
    except Exception as e:
        error = error or e
    try:
        raise_missing_grads()  # see [Note: gradients on some ranks only] in _grad_reduce
    except Exception as e:
        error = error or e
    for unit in units:
        unit.reset_backward_state()
    for order in _task_orders.pop(task, []):
        if order.active == task:
            order.finish()  # reshards what this pass prefetched and never used
    for stale in [t for t, orders in _task_orders.items() if all(o.active != t for o in orders)]:
        del _task_orders[stale]  # passes that raised before their end
    others = [u for u in (ref() for ref in _forwarded) if u is not None and u not in units]
    _forwarded.clear()
    for unit in others:
        if unit.backward_task is None:  # not inside another, still running backward
            unit.reshard()
    if error is not None:
        raise error


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _observe_forward(module: nn.Module, unit: Optional[FlatUnit]) -> None:
    if _in_backward():
        return  # an activation-checkpoint recompute is not a forward pass
    root = _root_of(module)
    order: _Order = root.__dict__["_fsdp_fwd_order"]
    if root is module:
        order.start(True)
        backward: _Order = root.__dict__["_fsdp_bwd_order"]
        if backward.active is not None:
            backward.finish()  # a backward that raised before its end left prefetches behind
    if unit is not None and order.active:
        order.observe(unit, root.__dict__["_fsdp_prefetch"], own_first=True)


def _observe_backward(module: nn.Module, unit: FlatUnit) -> None:
    task = torch._C._current_graph_task_id()
    root = _root_of(module)
    order: _Order = root.__dict__["_fsdp_bwd_order"]
    if order.active != task:
        order.start(task)
        _task_orders.setdefault(task, []).append(order)
    at_peak = root is not module and not order.peak_done
    if at_peak:
        order.peak_done = True
    order.observe(unit, root.__dict__["_fsdp_prefetch"] and not at_peak)


def _cast_floating(flat: list, dtype: torch.dtype) -> list:
    return [x.to(dtype) if _floating(x) else x for x in flat]


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    unit: Optional[FlatUnit] = module._fsdp_unit
    _observe_forward(module, unit)
    mp = module.__dict__["_fsdp_mp_policy"]  # also for a unit of no parameters (unit None)
    cast = mp.param_dtype is not None and mp.cast_forward_inputs
    if unit is None:
        if not cast:
            return args, kwargs
        flat, spec = tree_flatten((args, kwargs))
        return tree_unflatten(_cast_floating(flat, mp.param_dtype), spec)
    unit.unshard()  # waits for its gather (started by a prefetch or by _observe_forward)
    flat, spec = tree_flatten((args, kwargs))
    if cast:
        flat = _cast_floating(flat, mp.param_dtype)
    if torch.is_grad_enabled() and _in_backward():
        # activation-checkpoint recompute inside backward: the bookkeeping is done already,
        # unless its last forward ran without grad (a reentrant checkpoint): then no hook would
        # ever reduce this unit, and its gradients would be lost without a word
        if not unit.last_forward_grad:
            raise RuntimeError(
                f"fsdp_core: the unit {unit.module_name!r} is run inside backward without having "
                "run forward with grad enabled in this iteration: activation checkpointing with "
                "use_reentrant=True around a fully_shard module is not supported (its gradients "
                "would never be reduced); use torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False), or checkpoint inside the module")
    elif torch.is_grad_enabled():
        unit.last_forward_grad = True
        task = torch._C._current_graph_task_id()
        if unit.backward_task is not None and unit.backward_task != task:
            # The last backward through this unit raised before its end: drop its leftovers.
            unit.abandon_backward()
        elif unit.generation != _generation:  # a backward completed since its last forward
            unit.reset_backward_state()
        if unit.generation != _generation:
            _forwarded.append(weakref.ref(unit))
        unit.generation = _generation
        # non-leaf inputs only: see [Note: when a unit's gradients are ready]
        needs_grad = [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad
                      and x.grad_fn is not None]
        if needs_grad:
            unit.calls_with_hook += 1
            handle: list = []
            handle.append(torch.autograd.graph.register_multi_grad_hook(
                needs_grad, _make_post_backward(unit, handle), mode="all"))
        else:
            unit.calls_without_hook += 1
    elif not _in_backward() and unit.generation != _generation:
        unit.last_forward_grad = False   # no grad forward since the last backward: an eval, or
        # a reentrant checkpoint's forward
    args, kwargs = tree_unflatten(flat, spec)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    unit: Optional[FlatUnit] = module._fsdp_unit
    if _in_backward():
        return output  # a recompute (activation checkpointing): backward needs the parameters
    if _root_of(module) is module:
        module.__dict__["_fsdp_fwd_order"].finish()  # the end of a forward pass
    out_dtype = module.__dict__["_fsdp_mp_policy"].output_dtype
    if unit is None:
        if out_dtype is None:
            return output
        flat, spec = tree_flatten(output)
        return tree_unflatten(_cast_floating(flat, out_dtype), spec)
    if unit.reshard_after_forward:
        unit.reshard()
    flat, spec = tree_flatten(output)
    if out_dtype is not None:
        flat = _cast_floating(flat, out_dtype)
    if torch.is_grad_enabled():
        for x in flat:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                # A prehook on the node that produced x runs after x's tensor hooks, among them
                # the next unit's post-backward (a multi-grad hook on the same tensor): so the
                # next unit reshards before this one unshards, and at most one block is
                # unsharded at a time in backward.
                hook = _make_pre_backward(module, unit)
                if x.grad_fn is not None:
                    x.grad_fn.register_prehook(lambda grad_outputs, hook=hook: hook(None))
                else:
                    x.register_hook(hook)
    return tree_unflatten(flat, spec)


def _make_post_backward(unit: FlatUnit, handle: list):
    def hook(grads) -> None:
        handle[0].remove()  # once: the input tensor may outlive this iteration
        _enlist(unit)
        unit.input_hook_fired()

    return hook


def _make_pre_backward(module: nn.Module, unit: FlatUnit):
    def hook(grad: torch.Tensor):
        if torch.is_grad_enabled() and not unit.aliased:   # backward records a graph (and
            # reads a gathered copy; one rank in the shards' dtype uses the shard itself)
            raise RuntimeError(
                f"fsdp_core: a backward with create_graph=True (a gradient penalty, double "
                f"backward) through the unit {unit.module_name!r} is not supported: the graph it "
                "records reads the unit's gathered parameters, which are freed when this backward "
                "ends. Compute the penalty without create_graph, or outside the sharded modules")
        _enlist(unit)
        unit.unshard()
        _observe_backward(module, unit)
        return grad

    return hook


def new_orders() -> dict:
    """The root's prefetch state: learned forward and backward orders, prefetch on."""
    return {"_fsdp_fwd_order": _Order(), "_fsdp_bwd_order": _Order(), "_fsdp_prefetch": True}


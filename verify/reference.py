"""The reference: the scenario trained by plain single-process PyTorch, no sharding.

The caller pins `torch.set_num_threads(1)` first (the CLI entry and every rank do), since the
intra-op thread count changes CPU reduction orders; this module does not touch global settings.

fast mode: the data-parallel reference. For each rank r (in order), one forward/backward on the
    concatenation of its micro-batches [r*k, (r+1)*k) with the mean loss, gradients g_r cast to
    the reduce dtype; the step gradient is tree(g_0, ..., g_{W-1}) / W and the step loss
    tree(loss_r) / W. At W = 1 this is the full-batch reference (one forward/backward on all M
    micro-batches). At W = 2 it is still what any correct sharder computes bit for bit, since a
    two-term sum does not depend on the backend's order; at W >= 4 the backend's reduction
    order is its own, so the comparison is by tolerance (it differs from the full-batch
    gradient by rounding only).
deterministic mode: g_m = grad(loss_m / k) for each micro-batch, k = M / W, cast to the reduce
    dtype (fp32); the step gradient is tree(g_0, ..., g_{M-1}) / W (DESIGN section 3); the step
    loss is step_loss of the unscaled per-micro-batch losses.
bf16: an fp32 master model is trained; each step's forward/backward runs on a compute copy whose
    parameters are cast to bf16 (buffers keep their dtype, tied parameters stay tied), with a
    forward pre-hook on every wrap unit casting floating inputs to bf16 (as the sharder's
    MixedPrecisionPolicy does on every unit). Gradients are cast to fp32 before they are summed
    or handed to the master.
"""
from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from verify.scenarios import (Scenario, build_model, cat_batches, loss_fn, make_batch,
                              make_optimizer, step_loss, tree, wrap_units)

__all__ = ["RefStep", "RankBuffers", "Replayer", "guarded", "run_reference", "param_state", "replay_first_step"]

REDUCE_DTYPE = torch.float32


class RefStep(NamedTuple):
    loss: torch.Tensor               # 0-d fp32: the step's loss (computed before the update)
    params: dict[str, torch.Tensor]  # fp32 copies after the step, named as in state_dict()
    # The step's gradient (reduce dtype) by parameter name, frozen parameters absent: what the
    # sharder must hand the optimizer, bit for bit in the bitwise tier.
    grads: Optional[dict[str, torch.Tensor]] = None
    # The optimizer's per-parameter state after the step, by parameter name and key (exp_avg,
    # exp_avg_sq, momentum_buffer, ...): the tensors shaped like the parameter (`param_state`).
    optim: Optional[dict[str, dict[str, torch.Tensor]]] = None


def run_reference(s: Scenario, *, world_size_at: Optional[Callable[[int], int]] = None
                  ) -> list[RefStep]:
    """``world_size_at(step)``: the world size whose protocol step ``step`` follows (default:
    ``s.world_size`` throughout), for a run that is checkpointed at one world size and resumed
    at another (verify/campaign/resume.py). Every world size must divide ``s.micro_batches``."""
    s.validate()
    master = build_model(s)
    opt = make_optimizer(s, master.named_parameters())
    buffers = RankBuffers()
    out = []
    for step in range(s.steps):
        at = s if world_size_at is None else s.with_world_size(world_size_at(step))
        if at.micro_batches != s.micro_batches:
            raise ValueError(f"world size {at.world_size} at step {step} needs more than "
                             f"micro_batches={s.micro_batches}")
        compute = master if s.dtype == "fp32" else _bf16_copy(s, master)
        batches = [make_batch(s, step, m) for m in range(s.micro_batches)]
        if s.mode == "fast":
            loss, grads = _fast_step(at, compute, batches, buffers)
        else:
            loss, grads = _deterministic_step(at, compute, batches, buffers)
        buffers.settle(compute)
        for name, p in master.named_parameters():
            p.grad = grads[name]
        opt.step()
        opt.zero_grad(set_to_none=True)
        params = {n: p.detach().clone() for n, p in master.named_parameters(remove_duplicate=False)}
        step_grads = {n: g.detach().clone() for n, g in grads.items() if g is not None}
        out.append(RefStep(loss.detach().to(torch.float32), params, step_grads,
                           param_state(opt, master.named_parameters())))
    return out


class Replayer:
    """The scenario's optimizer replayed in the parent from the initial parameters (the
    reference's fp32 master ones, bf16 cases too: their optimizer steps fp32 masters with fp32
    reduced gradients) and a sharder's own reduced gradients, one step at a time: what a sharder
    whose reduced gradients were those holds after each step, up to its optimizer
    implementation's rounding (verify/case/judge.py, [Note: the replayed steps]). ``alive`` turns
    False when a step's gradients are not known, since the steps after it cannot be replayed."""

    def __init__(self, s: Scenario, own: bool = True):
        self.model = build_model(s)
        self.optimizer = make_optimizer(s, self.model.named_parameters())
        self.alive = True
        self.off = ""   # why the replay was turned off, where it was (`follows`)
        self._s, self._checks, self._own = s, own, None   # the reference's own replay: on first use

    def follows(self, ref_grads: Mapping[str, torch.Tensor], ref_params: Mapping[str, torch.Tensor]
                ) -> bool:
        """Whether the optimizer replayed from the reference's own gradients gives the
        reference's own parameters after this step (within the fp32 torch.testing tolerance).
        A model that changes its parameters outside the optimizer (in place in its forward, an
        nn.Embedding with max_norm) does not: then nothing can be replayed, and this replay is
        turned off, saying why."""
        if not self._checks:
            return True
        if self._own is None:   # first called at the replay's first step
            self._own = Replayer(self._s, own=False)
        if not self._own.alive:
            return True
        for name, want in self._own.step(ref_grads).items():
            got = ref_params.get(name)
            if got is not None and got.shape == want.shape and not torch.allclose(
                    got.float(), want.float(), rtol=1.3e-6, atol=1e-5, equal_nan=True):
                self._own.alive = self.alive = False
                self.off = (f"the replayed-step check is off for this case: the reference's own "
                            f"parameter {name} after a step is not what {type(self.optimizer).__name__} "
                            "computes from its gradients (the model changes its parameters "
                            "outside the optimizer, e.g. in place in its forward)")
                return False
        return True

    def step(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step from ``grads`` (by parameter name; a parameter without one is frozen this
        step); the parameters after it, named as `RefStep.params`."""
        for name, p in self.model.named_parameters():
            g = grads.get(name)
            p.grad = None if g is None else g.detach().reshape(p.shape).to(p.dtype).clone()
        self.optimizer.step()
        return {n: p.detach().clone() for n, p in self.model.named_parameters(remove_duplicate=False)}


def replay_first_step(s: Scenario, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters after step 0 that the scenario's optimizer computes from the initial
    parameters and ``grads``: `Replayer`'s first step."""
    return Replayer(s).step(grads)


def param_state(optimizer, named_params, piece=None) -> Optional[dict[str, dict]]:
    """The optimizer state shaped like each parameter, by name and key: every tensor entry
    with as many elements as the parameter (Adam's step count and SGD's ``momentum_buffer=None``
    are left out; a 0-d parameter's moments are kept, as one element). ``piece(param, tensor)``: what to record of it (default: a CPU copy); an
    adapter's ``optimizer_state`` passes one that gives its (start, elements) piece. None (the
    check is n/a) for an optimizer without a ``state`` mapping (a wrapper)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, Mapping):
        return None
    out = {}
    for name, p in named_params:
        entries = state.get(p) or {}
        kept = {k: v for k, v in entries.items()
                if k != "step" and isinstance(v, torch.Tensor) and v.numel() == p.numel()}
        if kept:
            out[name] = {k: (piece(p, v) if piece else v.detach().cpu().clone())
                         for k, v in sorted(kept.items())}
    return out


def guarded(fn: Callable[..., list[RefStep]], *args, **kwargs) -> tuple[Optional[list[RefStep]], str]:
    """``fn(*args, **kwargs)`` (a reference run), or None and, as a case's error reason, what it
    raised: a model the harness cannot train unsharded (a buffer whose dtype the bf16 policy
    breaks, ...) is one case's error, not the end of the campaign."""
    try:
        return fn(*args, **kwargs), ""
    except Exception:
        return None, ("the reference (the model trained unsharded in this process, DESIGN section 3) "
                      "raised, so the case has nothing to be compared with:\n" + traceback.format_exc())


class RankBuffers:
    """Each simulated rank's own buffers. The reference runs every rank's forward on one model,
    but in data-parallel training each rank keeps its buffers (a running statistic, a step
    counter) and updates them from its own batches only: before a rank's forward its buffers are
    loaded into the model, after it they are kept. When the world size changes (a resumed run)
    every rank starts from rank 0's, as a checkpoint carries them. The bf16 compute copy, made
    afresh each step, gets them the same way."""

    def __init__(self):
        self.sets: Optional[list[dict[str, torch.Tensor]]] = None
        self.current: Optional[int] = None

    def use(self, model: nn.Module, rank: int, world: int) -> None:
        if self.current == rank:
            return
        self.settle(model)
        if self.sets is None or len(self.sets) != world:
            base = self.sets[0] if self.sets else dict(model.named_buffers())
            if not base:   # a model without buffers
                return
            self.sets = [{n: t.detach().clone() for n, t in base.items()} for _ in range(world)]
        with torch.no_grad():
            for name, saved in self.sets[rank].items():
                model.get_buffer(name).copy_(saved)
        self.current = rank

    def settle(self, model: nn.Module) -> None:
        """The model's buffers kept as the current rank's."""
        if self.current is not None and self.sets is not None:
            self.sets[self.current] = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.current = None


def _fast_step(s: Scenario, model: nn.Module, batches, buffers: RankBuffers):
    losses, grads_r = [], []
    for r in range(s.world_size):  # rank r's local batch: its k micro-batches, concatenated
        buffers.use(model, r, s.world_size)
        loss_r = loss_fn(s, model, cat_batches(batches[r * s.k:(r + 1) * s.k]))
        loss_r.backward()
        losses.append(loss_r.detach().to(torch.float32))
        grads_r.append(_take_grads(model))
    grads = {name: _tree_or_none([g[name] for g in grads_r], s.world_size) for name in grads_r[0]}
    return tree(losses) / s.world_size, grads


def _deterministic_step(s: Scenario, model: nn.Module, batches, buffers: RankBuffers):
    losses, grads_m = [], []
    for m, batch in enumerate(batches):  # global micro-batch order m = 0..M-1
        buffers.use(model, m // s.k, s.world_size)   # rank r runs micro-batches r*k..(r+1)*k-1
        loss_m = loss_fn(s, model, batch)
        (loss_m / s.k).backward()
        losses.append(loss_m.detach().to(torch.float32))
        grads_m.append(_take_grads(model))
    grads = {name: _tree_or_none([g[name] for g in grads_m], s.world_size) for name in grads_m[0]}
    return step_loss(losses), grads


def _tree_or_none(gs: list[Optional[torch.Tensor]], world_size: int) -> Optional[torch.Tensor]:
    """The step's gradient of one parameter from its per-rank (per-micro-batch) ones: None where
    none has one (frozen, or unused this step); where only some have one (a branch some batches
    take), the others count as zeros, as a data-parallel sum over ranks has it."""
    if all(g is None for g in gs):
        return None
    like = next(g for g in gs if g is not None)
    return tree([torch.zeros_like(like) if g is None else g for g in gs]) / world_size


def _take_grads(model: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    """The model's gradients by name, cast to the reduce dtype; the model's .grad are cleared."""
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = None if p.grad is None else p.grad.to(REDUCE_DTYPE)
        p.grad = None
    return grads


def _bf16_copy(s: Scenario, master: nn.Module) -> nn.Module:
    """A compute copy with bf16 parameters (leaves of their own), the master's buffers, and
    input-casting pre-hooks. Built afresh from the scenario, not deep-copied: deepcopy shares
    functions, so a closure a model keeps over itself (``lambda: self.alpha``) would go on
    reading the master's fp32 parameter."""
    compute = build_model(s)   # ties as the family makes them
    params = dict(master.named_parameters(remove_duplicate=False))
    buffers = dict(master.named_buffers(remove_duplicate=False))
    for name, p in compute.named_parameters():   # each distinct Parameter once
        p.data = params[name].data.to(torch.bfloat16)
    for name, b in compute.named_buffers():
        b.data = buffers[name].data.clone()
    for unit in wrap_units(s, compute):
        unit.register_forward_pre_hook(_cast_inputs_to_bf16, with_kwargs=True)
    return compute


def _cast_inputs_to_bf16(module, args, kwargs):
    return _to_bf16(args), _to_bf16(kwargs)


def _to_bf16(x):
    """Floating tensors to bf16, through tuples, lists and dicts; everything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.bfloat16) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_bf16(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_bf16(v) for k, v in x.items()}
    return x

"""The one training protocol: every sharder, every case, the bench and the convergence run train
through `Trainer`, and a case's rank side is `run_case`.

[Note: the training protocol]
fast: rank r concatenates its k = M/W micro-batches [r*k, (r+1)*k) into one local batch; one
forward/backward with gradient sync. deterministic: k forward/backwards, loss_m / k each,
``set_gradient_sync(i == k - 1)`` before the i-th. Then ``optimizer.step()`` and
``optimizer.zero_grad(set_to_none=True)``. Both are what the reference (verify/reference.py)
mirrors. The adapter's optional hooks stand in where an engine owns a piece
(`verify.sharders.base`): ``shard_with_optimizer`` builds model and optimizer, ``backward(model,
loss)`` runs each backward, ``gradient_sync(model, flag)`` is the context around each
deterministic micro-batch, ``state_bytes(model, optimizer)`` measures the state. The step loss is gathered over the ranks: deterministic = step_loss over all M
micro-batch losses in global order; fast = tree over the ranks' local mean losses / W.

`Trainer.step(..., probes=True)` also records, per step, what the adapter's optional probes
return (None where it has none: the check is n/a): padding after the reduction and after the
step, units still unsharded after backward, the reduced gradient pieces, the local pieces,
the optimizer state's pieces after the step; and what the harness measures itself: collectives by kind, state bytes, step time (the probes'
time left out).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from verify.case.placement import placement
from verify.case.probes import CollectiveRecorder, nonzero_padding, watch_units
from verify.diagnosis.collective_log import CollectiveLog
from verify.ranks.backend_check import backend_problem
from verify.sharders import DEFAULT_SHARDER, Sharder, StepTrace, load, load_class, plan_for
from verify.scenarios import (Scenario, batch_to, build_model, cat_batches, loss_fn, make_batch, step_loss,
                              tie_weights, tree)
from verify.tools.plants import planted

# The pinned torch deprecates all_gather_into_tensor for all_gather_single; older torch lacks it.
_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

__all__ = ["Trainer", "run_case", "case_group", "launcher_env"]

# MASTER_PORT as a launcher would set it; nothing listens on it (see launcher_env).
LAUNCHER_PORT = 29500


def launcher_env(group) -> dict[str, str]:
    """Set (where unset) the variables a launcher (torchrun, the deepspeed launcher) gives each
    process, for the default group ``group`` this process is a rank of: RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE (every rank is on this machine), MASTER_ADDR (loopback) and
    MASTER_PORT. The default group exists already, so no library needs them to rendezvous and
    nothing is opened for them; one that rendezvoused through ``env://`` anyway would listen on
    loopback only (README "Security"). Under torchrun they are set already and kept."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    values = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": LAUNCHER_PORT}
    for key, value in values.items():
        os.environ.setdefault(key, str(value))
    return {k: os.environ[k] for k in values}


def case_group(sharder, ctx):
    """The process group a case's sharder gets: the case's group, or for a sharder that uses
    the default group (``world = "default"``) the default group, which must then be exactly
    the case's ranks (the harness runs such cases on a pool of W processes)."""
    if sharder.world == "group":
        return ctx.group
    if dist.get_world_size() != ctx.world_size:
        raise RuntimeError(
            f"{sharder.name} uses the default process group (world = 'default'), which has "
            f"{dist.get_world_size()} ranks, but the case runs on {ctx.world_size}: the harness "
            "must run it on a pool of exactly the case's world size")
    launcher_env(dist.group.WORLD)
    return dist.group.WORLD


def _zero_grad(optimizer, model) -> None:
    zero = getattr(optimizer, "zero_grad", None)
    if zero is None:    # a wrapper without one: what zero_grad(set_to_none=True) does
        for p in model.parameters():
            p.grad = None
        return
    try:
        zero(set_to_none=True)
    except TypeError:   # a wrapper whose zero_grad takes no arguments
        zero()


class Trainer:
    """One sharder training one scenario on this rank (see [Note: the training protocol]).

    ``batch_fn(step, micro) -> batch`` replaces the scenario's data (the convergence run trains
    on real text); ``spec`` is the sharder's import path or built-in name, or an adapter."""

    def __init__(self, spec: Any, s: Scenario, ctx, *, model: Optional[torch.nn.Module] = None,
                 batch_fn: Optional[Callable[[int, int], Any]] = None,
                 optimizer_kwargs: Optional[dict] = None):
        if s.world_size != ctx.world_size:
            raise ValueError(f"scenario world_size {s.world_size} sent to a group of "
                             f"{ctx.world_size} ranks")
        torch.set_num_threads(1)
        self.s, self.ctx = s, ctx
        self.sharder = load(spec) if isinstance(spec, str) else spec
        self.group = case_group(self.sharder, ctx)
        model = build_model(s) if model is None else model
        self.plan = plan_for(s, model)
        if optimizer_kwargs:  # the bench gives every sharder one optimizer implementation
            self.plan = dataclasses.replace(
                self.plan, optimizer_kwargs={**self.plan.optimizer_kwargs, **optimizer_kwargs})
        if s.ties == "split_retie" and (type(self.sharder).shard_with_optimizer
                                        is Sharder.shard_with_optimizer):
            # as transformers re-ties a wrapped model (docs/real_bugs.md): after the wrapping,
            # before the optimizer is built
            sharded = self.sharder.shard(model, self.plan, self.group)
            self.model = model if sharded is None else sharded
            _retie(self.model)
            self.optimizer = self.sharder.optimizer(self.model, self.plan)
        else:   # an engine that builds its optimizer with the model re-ties after both
            self.model, self.optimizer = self.sharder.shard_with_optimizer(model, self.plan,
                                                                           self.group)
            if s.ties == "split_retie":
                _retie(self.model)
        self.batch_fn = batch_fn or (lambda step, m: make_batch(s, step, m))
        self.recorder = CollectiveRecorder()

    def padding(self) -> Optional[list[str]]:
        return nonzero_padding(self.sharder.padding_views(self.model, self.optimizer))

    def _batches(self, step: int) -> list:
        r, k = self.ctx.rank, self.s.k
        mine = [self.batch_fn(step, m) for m in range(r * k, (r + 1) * k)]
        if self.ctx.device.type != "cpu":
            mine = [batch_to(b, self.ctx.device) for b in mine]
        return mine

    def _forward_backward(self, mine: Sequence) -> list[torch.Tensor]:
        s, k = self.s, self.s.k
        if s.mode == "deterministic":
            losses = []
            for i, batch in enumerate(mine):
                with self.sharder.gradient_sync(self.model, i == k - 1):
                    loss = loss_fn(s, self.model, batch)
                    self.sharder.backward(self.model, loss / k)
                losses.append(loss.detach().float())
            return losses
        loss = loss_fn(s, self.model, cat_batches(mine))
        self.sharder.backward(self.model, loss)
        return [loss.detach().float()]

    def step_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The step's loss over every rank (collective on the case's group)."""
        W = self.ctx.world_size
        local = torch.stack(losses).to(self.ctx.device)
        gathered = torch.empty(W * local.numel(), dtype=local.dtype, device=local.device)
        getattr(dist, _GATHER)(gathered, local, group=self.ctx.group)
        parts = list(gathered.cpu())
        return step_loss(parts) if self.s.mode == "deterministic" else tree(parts) / W

    def forward_backward(self, step: int) -> list[torch.Tensor]:
        """The step's forward and backward passes on this rank's batches; its local losses."""
        return self._forward_backward(self._batches(step))

    def zero_grad(self) -> None:
        _zero_grad(self.optimizer, self.model)

    def train_step(self, step: int) -> torch.Tensor:
        """One step, nothing measured; returns the step loss (collective)."""
        losses = self.forward_backward(step)
        self.optimizer.step()
        self.zero_grad()
        return self.step_loss(losses)

    def step(self, step: int) -> dict:
        """One step with every probe; the record of verify/case/judge.py."""
        sh, model, opt = self.sharder, self.model, self.optimizer
        mine = self._batches(step)
        calls, in_backward, handles = watch_units(self.plan.units)
        t0 = time.perf_counter()
        try:
            with self.recorder.recording():
                losses = self._forward_backward(mine)
                t_probe = time.perf_counter()
                with self.recorder.paused():   # an adapter's probes are not the step's traffic
                    pad_reduce = self.padding()
                    unsharded = sh.unsharded_units(model)
                    grads = sh.reduced_gradients(model)
                    with_grad = frozenset(n for n, p in model.named_parameters() if p.grad is not None)
                    nbytes = sh.state_bytes(model, opt)
                t_probe = time.perf_counter() - t_probe  # not the sharder's time: left out
                opt.step()
            step_time = time.perf_counter() - t0 - t_probe
        finally:
            for h in handles:
                h.remove()
        pad_step = self.padding()
        optim = sh.optimizer_state(model, opt)   # local: after the step, before zero_grad
        _zero_grad(opt, model)
        collectives = self.recorder.take()
        passes = len(mine) if self.s.mode == "deterministic" else 1
        trace = StepTrace(mode=self.s.mode, micro_batches=passes, forward_calls=dict(calls),
                          backward_units=set(in_backward), recorded=collectives,
                          with_grad=with_grad)
        expected = sh.expected_collectives(model, trace)
        loss = self.step_loss(losses)
        full = sh.full_parameters(model, opt)   # collective: every rank gathers
        return dict(step=step, loss=loss, params=snapshot(full) if self.ctx.rank == 0 else None,
                    digests=digests(full),
                    pieces=snapshot(sh.local_pieces(model)), grads=snapshot(grads),
                    pad_reduce=pad_reduce, pad_step=pad_step, unsharded=unsharded,
                    collectives=collectives, expected_collectives=expected, state_bytes=nbytes,
                    step_time_s=step_time, optim=snapshot(optim))


def _retie(model) -> None:
    """``tie_weights()`` on the sharded model (``ties`` "split_retie"), with what the harness was
    doing in the error if the model does not allow it."""
    try:
        tie_weights(model)
    except Exception as e:
        raise RuntimeError(
            "the case re-ties the model's tied parameters after shard() (ties='split_retie', as "
            "transformers does after wrapping: each module's tie_weights() assigns one module's "
            "parameter to another's attribute), and on the sharded model that raised "
            f"{type(e).__name__}: {e}; a sharder that removes or replaces module parameters "
            "can decline these cases in unsupported() (scenario.ties)") from e


def snapshot(obj: Any) -> Any:
    """A probe's answer with every tensor in it copied to the CPU as it is now: an adapter may
    hand back live tensors (``DTensor.full_tensor()`` at W = 1 is the parameter itself, a piece
    may be a view of the shard), and the records are sent to the parent only after the last
    step, which would have overwritten them."""
    if isinstance(obj, torch.Tensor):
        try:
            return obj.detach().cpu().clone()
        except Exception:   # a tensor that cannot be read here (meta): kept as it is
            return obj
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def digests(full: Any) -> Optional[dict[str, str]]:
    """A fingerprint of each full parameter a rank's ``full_parameters`` gave (its dtype, shape and
    bytes): the judge holds every rank's to rank 0's, whose tensors it compares (a rank that
    returns nothing, as a rank-0-only state dict does, is not compared)."""
    if not isinstance(full, dict):
        return None
    out = {}
    for name, t in full.items():
        if not isinstance(t, torch.Tensor):
            continue
        try:   # a tensor whose bytes cannot be read here (a DTensor, meta) is not fingerprinted
            flat = t.detach().cpu().reshape(-1).contiguous()
            raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        except Exception:
            continue
        out[name] = f"{t.dtype} {tuple(t.shape)} " + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return out


def run_case(payload: dict, ctx) -> dict:
    """Rank side of one case: payload {"scenario": json, "sharder": spec, "plant": name or
    absent, "backend_check": bool}. The backend is checked first (verify/ranks/backend_check.py)."""
    # imported before any wrapper goes on torch.distributed: the harness's wrappers then go over
    # the adapter's import-time ones ([Note: global state between cases], global_state.py)
    load_class(payload.get("sharder", DEFAULT_SHARDER))
    with planted(payload.get("plant"), ctx), CollectiveLog() as log:  # log: verify/diagnosis/collective_log.py
        s = Scenario.from_json(payload["scenario"])
        dtypes = (torch.float32, torch.bfloat16) if s.dtype == "bf16" else (torch.float32,)
        problem = (backend_problem(ctx.group, ctx.device, dtypes=dtypes)
                   if payload.get("backend_check", True) else None)
        log.install()
        trainer = Trainer(payload.get("sharder", DEFAULT_SHARDER), s, ctx)
        log.watch(trainer.plan.units, trainer.optimizer)
        pad_init = trainer.padding()
        records = log.run_steps(trainer, range(s.steps))
        return dict(rank=ctx.rank, pad_init=pad_init, records=records, backend_error=problem,
                    placement=placement(trainer.optimizer, ctx.device) if s.offload else None)


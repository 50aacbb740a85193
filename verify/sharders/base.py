"""The adapter protocol (DESIGN section 6): `Sharder`, the base class every sharder the harness
runs derives from, and `WrapPlan`, what a scenario asks the sharder to do.

A sharder is named by import path (``pkg.module:Name``) or by a built-in name; the harness
imports it in the parent (to decide what it skips, before any rank starts) and again in every
rank (to shard and train). One training protocol (`verify.case.train`) drives it; each invariant
check runs where the adapter provides its probe and is reported as ``n/a`` where it does not.

Beyond section 6, optional methods with defaults that change nothing (a user's adapter may
ignore them): `unsharded_units` (the ``resharded`` check: which units still hold a gathered copy
once backward is done), `optimizer_state` (the ``optimizer_state`` check: the optimizer's
moments and momentum buffers against the reference's), `planned` (the ``plan`` check: a planner's exact per-rank bytes and
collectives against the measured ones) and `tier` (a tier looser than section 3's for cases
where the sharder provably cannot owe it, with the reason in a [Note]; it can never tighten a
tier). For engines that own the training loop's pieces (DeepSpeed, FSDP1):
`shard_with_optimizer` (build the sharded model and its optimizer together: an engine that
needs the optimizer to wrap the model), `backward(model, loss)` (an engine's own backward),
`gradient_sync(model, flag)` (a context around one micro-batch's forward and backward, for a
sharder whose only switch is a ``no_sync()`` context) and `state_bytes(model, optimizer)` (the
per-rank state probe, for an optimizer whose state the harness cannot read). A sharder that
uses the default process group (``world = "default"``) finds ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set in its rank
processes as a launcher sets them (`verify.case.train.launcher_env`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["Sharder", "WrapPlan", "StepTrace"]


@dataclass(frozen=True, eq=False)
class WrapPlan:
    """What the scenario asks the sharder to do (DESIGN section 6)."""
    units: tuple[tuple[str, Any], ...]   # (name, module), inner first, the root "" last
    reshard_after_forward: bool
    param_dtype: Optional["torch.dtype"]  # None: fp32 throughout
    reduce_dtype: Optional["torch.dtype"]
    deterministic: bool
    offload: bool                        # keep shards and optimizer state on CPU
    optimizer_cls: type                  # the scenario's optimizer class ...
    optimizer_kwargs: dict = field(default_factory=dict)  # ... and its keyword arguments
    mesh: Optional[tuple[int, int]] = None   # HSDP: (R, S) over the case's group (row-major:
                                          #   group rank r * S + s at (r, s)); drawn only for
                                          #   adapters whose `hsdp = True`

    def make_optimizer(self, named_params: Iterable[tuple[str, Any]]):
        """The scenario's optimizer over ``named_params``, with parameter groups chosen by name:
        no weight decay for biases and norms (`verify.scenarios.no_decay`), the scenario's
        weight decay for the rest; empty groups omitted."""
        # lazy: verify.scenarios imports torch, and `from verify import Sharder` must not
        from verify.scenarios import grouped_optimizer
        return grouped_optimizer(self.optimizer_cls, self.optimizer_kwargs, named_params)

    @property
    def modules(self) -> dict[str, Any]:
        return dict(self.units)


@dataclass
class StepTrace:
    """What the harness saw of one step, handed to `Sharder.expected_collectives`."""
    mode: str                            # "fast" | "deterministic"
    micro_batches: int                   # forward/backward passes on this rank this step
    forward_calls: dict[str, int]        # unit name -> forward calls in the step
    backward_units: set[str]             # units whose output joined autograd (reached by backward)
    recorded: dict[str, list[int]]       # kind -> [calls, bytes] as the recorder counted them
    # names (model.named_parameters()) of this rank's parameters holding a gradient after the
    # step's backward, before the optimizer step: a unit none of whose parameters got one (all
    # unused this step) may skip its reduction; None: not known (every trainable one, as before)
    with_grad: Optional[frozenset] = None


class Sharder:
    """Subclass and override what applies; see DESIGN section 6 for each method's contract."""

    name = "sharder"          # shown in reports
    world = "group"           # "group": shard() gets the case's process group; "default": the
                              #   sharder uses the default group, which is exactly the case's ranks
    modes: tuple[str, ...] = ("fast",)
    dtypes: tuple[str, ...] = ("fp32",)
    offload = False
    hsdp = False              # True where plan.mesh (a 2-D replicate x shard mesh) is honoured
    # Whether the sharder may regroup the gradient sum of a tensor that several units receive
    # (FSDP2 wraps each unit's inputs in an autograd function, which changes the order autograd
    # accumulates that tensor's gradient in): None (not said) or True: where one tensor feeds
    # two or more units, a fast-mode case that fails only in its numbers (with SGD: only in the
    # last bits) is judged at the looser tier (`verify.case.judge.regrouping_tier`); False: held
    # to section 3's tier there too (a sharder that leaves its units' inputs alone).
    regroups_shared_inputs: Optional[bool] = None

    # -- parent side ----------------------------------------------------------------------------
    def unsupported(self, scenario) -> Optional[str]:
        """The reason this case is skipped, or None. Decided before anything runs."""
        return None

    def tier(self, scenario) -> Optional[str]:
        """A looser tier for this case than section 3 gives, or None for section 3's."""
        return None

    # -- rank side ------------------------------------------------------------------------------
    def shard(self, model, plan: WrapPlan, group):
        """Shard ``model`` in place (return None or the model) or return a new module."""
        raise NotImplementedError(f"{type(self).__name__}.shard() is required")

    def optimizer(self, model, plan: WrapPlan):
        return plan.make_optimizer(model.named_parameters())

    def shard_with_optimizer(self, model, plan: WrapPlan, group):
        """(the sharded model, its optimizer): what the harness calls. Default: `shard`, then
        `optimizer` on what it returned; an engine that must see the optimizer to wrap the
        model (``deepspeed.initialize``) overrides this instead of `shard`."""
        sharded = self.shard(model, plan, group)
        model = model if sharded is None else sharded
        return model, self.optimizer(model, plan)

    def backward(self, model, loss) -> None:
        """One backward pass of ``loss`` (already divided by the micro-batches per rank).
        Default: ``loss.backward()``."""
        loss.backward()

    def set_gradient_sync(self, model, flag: bool) -> None:
        model.set_requires_gradient_sync(flag)

    def gradient_sync(self, model, flag: bool):
        """A context around one micro-batch's forward and backward: gradients synchronised
        (``flag``) or only accumulated. Default: `set_gradient_sync` before it, nothing around
        it; a sharder whose switch is a context (``with model.no_sync(): ...``) returns that."""
        self.set_gradient_sync(model, flag)
        return contextlib.nullcontext()

    def full_parameters(self, model, optimizer) -> dict[str, "torch.Tensor"]:
        """Collective: the full parameters by the unsharded model's names. Default: each of
        ``model.named_parameters()``, gathered where it is a DTensor."""
        out = {}
        for name, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone()
        return out

    def state_bytes(self, model, optimizer) -> Optional[int]:
        """This rank's bytes of parameters, gradients and optimizer state, read after backward
        and before the step; None: n/a. Default: measured from ``optimizer.param_groups`` and
        ``optimizer.state``, and the module's parameters held apart from them
        (`verify.case.probes.state_bytes`)."""
        # lazy: verify.case.probes imports torch, and `from verify import Sharder` must not
        from verify.case.probes import state_bytes
        return state_bytes(optimizer, model)

    # Optional probes: None means "not provided" and the check is reported as n/a.
    def padding_views(self, model, optimizer):
        return None

    def local_pieces(self, model):
        return None

    def reduced_gradients(self, model):
        return None

    def optimizer_state(self, model, optimizer):
        """After the step: {parameter name: {state key: (flat offset, this rank's real
        elements)}} of every state tensor shaped like the parameter (exp_avg, exp_avg_sq,
        momentum_buffer), the ``local_pieces`` form (check ``optimizer_state``, in every
        tier). `verify.reference.param_state` builds it from any ``optimizer.state``."""
        return None

    def expected_collectives(self, model, trace: StepTrace):
        """{kind: (calls, bytes)} for the step, compared exactly with what the harness
        recorded (``trace.recorded``): kind is the torch.distributed function's name as called
        (``all_gather_single``, ``reduce_scatter_tensor``, ``all_reduce``, ...), bytes those of
        the larger of its first two tensor arguments (the unsharded side of a gather or a
        reduce-scatter, the buffer of an all-reduce or all-to-all), summed over the calls. The
        harness's own probes are not counted; a kind recorded but not named here fails."""
        return None

    def unsharded_units(self, model):
        return None

    def planned(self, scenario):
        """Parent side: the `verify.plan.units.PlanFigures` a layout planner predicts for this case
        (per-rank state bytes per step, collectives per step), compared exactly with what
        the case measured (check ``plan``); None: n/a."""
        return None

    # Optional checkpointing: define both `save(path, model, optimizer)` and
    # `load(path, model, optimizer)` (collective) for resume cases to run for this sharder.


def has_checkpointing(sharder: Sharder) -> bool:
    return callable(getattr(sharder, "save", None)) and callable(getattr(sharder, "load", None))

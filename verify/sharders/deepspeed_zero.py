"""DeepSpeed ZeRO stages 1, 2 and 3 (`deepspeed.initialize`) through the adapter protocol:
`DeepSpeedZero1`, `DeepSpeedZero2`, `DeepSpeedZero3`. DeepSpeed is an optional extra
(``pip install .[deepspeed]``, pinned in pyproject.toml); without it this module still imports
and every case is skipped with that reason (`unsupported`).

How a case runs: the scenario's optimizer is built over the unsharded model's parameters and
handed to ``deepspeed.initialize`` with a config of fp32 throughout, no gradient clipping, one
micro-batch per step (the harness concatenates a rank's micro-batches), ZeRO at the class's
stage, ``zero_allow_untested_optimizer`` (a plain torch optimizer) and, for stage 3,
``stage3_param_persistence_threshold: 0`` (every parameter partitioned, none kept whole). The
harness then trains the engine as a user does: ``engine(batch)``, ``engine.backward(loss)``
(`backward`), ``engine.step()`` (what the returned `EngineOptimizer` steps).

DeepSpeed uses the default process group (``world = "default"``: the harness runs each case
on processes whose default group is exactly its W ranks, with the launcher's variables set,
`verify.case.train.launcher_env`; DeepSpeed reads ``LOCAL_RANK``).

[Note: DeepSpeed's shared-memory op]
On its first communication in a process DeepSpeed JIT-builds a shared-memory all-reduce op
with the C++ compiler (``ShareMemCommBuilder``; a minute or more on a loaded machine, under a
file lock in the torch extensions directory). The op serves only ``inference_all_reduce``,
which training never calls, and a rank killed by the case timeout while it builds leaves a
stale lock on which every later build waits forever. `shard_with_optimizer` marks the op
incompatible (``deepspeed.ops.__compatible_ops__``, read only by ``build_shm_op``) before
DeepSpeed's communication backend is created, so it is never built; training traffic goes
through torch.distributed as before.

What is declared, and why:
- fast mode only: deterministic mode needs gradient accumulation without communication, and
  ZeRO-2/3 refuse ``no_sync()``; no stage reduces in section 3's fixed tree order.
- fp32 only: DeepSpeed's bf16 mode reduces gradients in bf16 and keeps its own fp32 master
  copy, which is not the scenario's policy (bf16 compute, fp32 reduction).
- no offload: ZeRO-Offload wants DeepSpeed's CPU Adam, a compiled op.
- no 0-d parameters (`unsupported`): DeepSpeed flattens and partitions every parameter and
  refuses a 0-d one.
- no checkpoints: ``engine.save_checkpoint`` writes per-rank ZeRO partitions that load only at
  the world size that saved them (other sizes need DeepSpeed's universal-checkpoint
  conversion), so resume cases across world sizes are not run.

Probes: no padding views (DeepSpeed allocates its partition padding with ``torch.empty`` and
never zeroes it, so there is no invariant to check: n/a, not a pass); stage 3's local pieces
(``param.ds_tensor``, this rank's slice of the flattened parameter: the reassembly check) and
reduced gradients (``safe_get_local_grad``, the averaged gradient partition: the `gradients`
check, and the first step replayed from them in the tolerance and reported tiers); stages 1
and 2's reduced gradients are read from the fragment of the averaged gradient partition each
parameter maps to on this rank (``param._hp_mapping``; not ``.grad``, which may still hold the
unreduced local gradient): [Note: ZeRO-1/2 reduced gradients];
`state_bytes` (the engine's optimizer state lives in DeepSpeed's flat fp32 partitions, which
the generic probe cannot see; see its docstring).

[Note: DeepSpeed's class-global state]
``deepspeed.zero.Init`` keeps a parameter id counter and the number of persisted parameters
and elements as class attributes, which carry over from one engine to the next in a process
(the rank pool reuses its processes). `shard_with_optimizer` resets them first.

[Note: ZeRO-3 summation order]
ZeRO-3 registers, on every submodule (not only the wrap plan's units), a forward pre-hook that
passes the module's tensor inputs through an autograd Function
(``PostBackwardFunctionModule``, deepspeed/runtime/zero/parameter_offload.py). Where one
gradient-requiring tensor feeds two or more modules, autograd then accumulates that tensor's
gradient contributions in another order than the plain model does, so gradients differ in the
last bits even at W = 1 (measured on cs336: 1 to 48 ULP). As for FSDP2
(`verify.sharders.torch_fsdp2`), `tier` finds such a tensor with one forward of the reference
model (`fanned_out_inputs`) and only then holds stage 3 to the tier fsdp_core has at W >= 4
(tolerance with SGD, reported with Adam); every other case keeps section 3's tier.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Optional

import torch

from verify.compare import tier_for
from verify.scenarios import build_model
from verify.sharders._inputs import input_consumers
from verify.sharders.base import Sharder, WrapPlan

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"   # what DeepSpeed detects anyway, without its warning
try:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import Init as _ZeroInit
except ImportError as exc:   # the optional extra is not installed
    deepspeed, _ZeroInit = None, None
    MISSING = (f"DeepSpeed is not installed ({type(exc).__name__}: {exc}); "
               "pip install '.[deepspeed]'")
else:
    MISSING = None

__all__ = ["DeepSpeedZero1", "DeepSpeedZero2", "DeepSpeedZero3", "EngineOptimizer", "MISSING",
           "fanned_out_inputs"]


class EngineOptimizer:
    """What the harness steps for a DeepSpeed engine: ``step()`` is ``engine.step()`` (the ZeRO
    optimizer's step on this rank's partitions and the gathers of the updated parameters),
    ``zero_grad`` the ZeRO optimizer's. ``param_groups`` and ``state`` are the torch optimizer's
    inside DeepSpeed's (over the flat fp32 partitions)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def inner(self):
        return self.engine.optimizer.optimizer

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)


class _DeepSpeedZero(Sharder):
    stage = 0
    world = "default"
    modes = ("fast",)
    dtypes = ("fp32",)
    offload = False

    def unsupported(self, scenario) -> Optional[str]:
        if MISSING is not None:
            return MISSING
        zero_d = [n for n, p in build_model(scenario, device="meta").named_parameters()
                  if p.dim() == 0]
        if zero_d:
            return (f"DeepSpeed flattens and partitions every parameter and refuses 0-d "
                    f"parameters ({', '.join(zero_d[:3])})")
        return None

    def config(self, plan: WrapPlan, world_size: int) -> dict:
        zero = {"stage": self.stage}
        if self.stage == 3:
            zero["stage3_param_persistence_threshold"] = 0
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "train_batch_size": world_size, "gradient_clipping": 0.0,
                "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                "steps_per_print": 2 ** 31, "wall_clock_breakdown": False}

    def shard(self, model, plan: WrapPlan, group):   # the protocol's required method
        return self.shard_with_optimizer(model, plan, group)[0]

    def shard_with_optimizer(self, model, plan: WrapPlan, group):
        if MISSING is not None:
            raise RuntimeError(MISSING)
        # see [Note: DeepSpeed's class-global state]
        _ZeroInit.param_id = 0
        _ZeroInit.num_persisted_parameters = 0
        _ZeroInit.num_persisted_elements = 0
        _ZeroInit.apply_param_persistence = False
        _no_shm_op()   # see [Note: DeepSpeed's shared-memory op]
        _quiet()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(group))
        optimizer = plan.make_optimizer(model.named_parameters())
        world = torch.distributed.get_world_size(group)
        with contextlib.redirect_stdout(None):   # DeepSpeed prints its config banner
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=self.config(plan, world))
        return engine, EngineOptimizer(engine)

    def backward(self, model, loss) -> None:
        model.backward(loss)

    def set_gradient_sync(self, model, flag: bool) -> None:
        if not flag:
            raise RuntimeError("DeepSpeed ZeRO has no gradient accumulation without "
                               "communication here (modes = ('fast',))")

    def full_parameters(self, model, optimizer):
        return {n: p.detach().cpu().clone() for n, p in model.module.named_parameters()}

    # [Note: ZeRO-1/2 reduced gradients]
    # ZeRO-1/2 keep each rank's partition of the averaged gradient in flat buffers, one per
    # parameter group (``optimizer.averaged_gradients``). DeepSpeed maps every parameter with
    # elements in this rank's partition to its fragment there (``param._hp_mapping``: where the
    # fragment starts in the flattened parameter, ``lp_fragment_address``, and the fragment,
    # ``get_lp_grad_fragment``). That is the probe's {name: (flat offset, elements)}, read
    # without a collective between backward and the step, the window DeepSpeed keeps them in
    # (``get_lp_grad_fragment`` raises outside it: then the probe gives None, n/a). Not ``.grad``
    # nor ``safe_get_full_grad``, which returns ``.grad`` when it is set, and at stage 1 that
    # can be the unreduced local gradient. A parameter with no elements on this rank, a frozen
    # one and one without a gradient fragment give no piece here.
    def reduced_gradients(self, model):
        """{name: (flat offset, this rank's fragment of the averaged gradient)}: see
        [Note: ZeRO-1/2 reduced gradients]."""
        out = {}
        for n, p in model.module.named_parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or not p.requires_grad:
                continue
            try:
                frag = mapping.get_lp_grad_fragment(p._index_in_param_group)
            except ValueError:   # outside DeepSpeed's window: nothing to read
                return None
            if frag is not None:
                addr = mapping.lp_fragment_address
                out[n] = (addr.start, frag.detach().reshape(-1)[: addr.numel].cpu().clone())
        return out

    def state_bytes(self, model, optimizer) -> Optional[int]:
        """This rank's parameters as the module holds them (stage 3: its partition
        ``ds_tensor``; stages 1 and 2: the whole replica) and their ``.grad`` where set, plus
        DeepSpeed's flat fp32 partitions (``single_partition_of_fp32_groups``, stage 3
        ``fp32_partitioned_groups_flat``: stage 3 empties the torch optimizer's
        ``param_groups`` between steps, so they cannot be read there) with the torch
        optimizer's state for each. Stages 2 and 3 keep the reduced gradient of this rank's
        partition in flat buffers the probe cannot name; it is counted as one partition-sized
        tensor per fp32 partition (stage 1 keeps the whole gradient in ``.grad``, counted
        above)."""
        n = 0
        for p in model.module.parameters():
            local = getattr(p, "ds_tensor", p)
            n += local.numel() * local.element_size()
            if p.grad is not None:
                n += p.grad.numel() * p.grad.element_size()
        zero = optimizer.engine.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = getattr(zero, "single_partition_of_fp32_groups", None)
        state = getattr(optimizer.inner, "state", None)
        if flats is None or state is None:
            return None
        for flat in flats:
            n += flat.numel() * flat.element_size() * (2 if self.stage >= 2 else 1)
            for v in (state.get(flat) or {}).values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    n += v.numel() * v.element_size()
        return n


def _quiet() -> None:
    """DeepSpeed's warnings that say nothing about a case, once per rank process: ZeRO with a
    plain torch optimizer ("untested optimizer", what the config allows on purpose) and its
    calls of the torch.distributed names the pinned torch deprecates."""
    deepspeed.utils.logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|"
                                    r"reduce_scatter_tensor)` is deprecated")


def _no_shm_op() -> None:
    ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    if ops is None:   # not probed yet (probing runs the compiler for every op): no probe
        ops = deepspeed.ops.__compatible_ops__ = {}
    ops["deepspeed_shm_comm"] = False


class DeepSpeedZero1(_DeepSpeedZero):
    name = "deepspeed_zero1"
    stage = 1


class DeepSpeedZero2(_DeepSpeedZero):
    name = "deepspeed_zero2"
    stage = 2


class DeepSpeedZero3(_DeepSpeedZero):
    name = "deepspeed_zero3"
    stage = 3

    def tier(self, scenario) -> Optional[str]:
        """See [Note: ZeRO-3 summation order]."""
        if MISSING is not None or tier_for(scenario) != "bitwise" or scenario.mode != "fast":
            return None
        if not fanned_out_inputs(scenario):
            return None
        return "tolerance" if scenario.optimizer in ("sgd", "sgd_momentum") else "reported"

    def full_parameters(self, model, optimizer):
        """Collective: every partitioned parameter gathered (``GatheredParameters``)."""
        params = list(model.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params}

    def local_pieces(self, model):
        """{name: (flat offset, this rank's real elements)}: ``ds_tensor`` is the rank's equal
        slice of the flattened parameter, its tail past ``ds_numel`` padding."""
        rank = torch.distributed.get_rank()
        return {n: _partition_piece(p, p.ds_tensor, rank) for n, p in model.module.named_parameters()}

    def reduced_gradients(self, model):
        """{name: (flat offset, this rank's reduced gradient)}: DeepSpeed's own accessor of the
        averaged gradient partition (``safe_get_local_grad``), laid out as `local_pieces`; a
        parameter without a gradient partition (frozen) is left out."""
        from deepspeed.utils import safe_get_local_grad  # optional extra, imported where it is there
        rank = torch.distributed.get_rank()
        grads = {n: safe_get_local_grad(p) if p.requires_grad else None
                 for n, p in model.module.named_parameters()}
        return {n: _partition_piece(p, grads[n], rank) for n, p in model.module.named_parameters()
                if grads[n] is not None}


def _partition_piece(p, part: torch.Tensor, rank: int) -> tuple[int, torch.Tensor]:
    """(flat offset, real elements) of this rank's equal partition ``part`` of ZeRO-3 parameter
    ``p`` (its tail past ``ds_numel`` is padding)."""
    part = part.detach().reshape(-1)
    start = rank * p.ds_tensor.numel()
    real = max(0, min(part.numel(), p.ds_numel - start))
    return start, part[:real].cpu().clone()


def fanned_out_inputs(s) -> list[str]:
    """Modules (by name) that, with ZeRO-3's hooks on every module, would receive one and the
    same gradient-requiring tensor, found in the first micro-batch's forward of the reference
    model. A module's hook wraps what it receives, and its submodules receive the wrapped
    tensor: so the consumers of one tensor are grouped by their nearest ancestor that received
    it too, and a group of two or more reads one tensor (q, k and v of one attention); a
    submodule that receives its parent's input (a block's first linear) is a chain, not a
    fan-out. Conservative like `verify.sharders.torch_fsdp2.shared_unit_inputs`: two consumers
    already count, though only three can reorder a sum."""
    model, modules = input_consumers(s, lambda model: model.modules())
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    parent = {id(c): id(m) for m in model.modules() for c in m.children()}
    consumers = [[id(m) for m in mods] for mods in modules]
    fanned: set[str] = set()
    for mods in consumers:
        scopes: dict = {}
        for m in mods:
            scope = parent.get(m)
            while scope is not None and scope not in mods:
                scope = parent.get(scope)
            scopes.setdefault(scope, []).append(m)
        for group in scopes.values():
            if len(group) >= 2:
                fanned.update(names[m] for m in group)
    return sorted(fanned)

"""The peers: the same drawn cases through PyTorch's own sharders, next to fsdp_core.

`torch_fsdp2` is `torch.distributed.fsdp.fully_shard` on a 1-D `DeviceMesh` made from the case's
process group, with the scenario's wrap plan (and `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` for bf16). `ddp` is `DistributedDataParallel` on the case's group (the wrap
plan does not apply: DDP replicates the whole model). Both train in fast mode only.

Parent side: `canonical(name)` maps the spellings the CLI accepts to one name, and
`unsupported_reason(s, sharder)` decides, before anything runs, the cases a peer cannot run.
Rank side: `run_peer_case(payload, ctx)` is `verify.runner.run_case` for a peer: the same
training protocol and the same record per step (loss, and on rank 0 the full parameters after
the step and the step's whole reduced gradient; collectives, state bytes, step time) without
the fsdp_core-only checks (padding views, local pieces, the collective formula), which have no
meaning for a peer. (DDP's all-reduces are issued by its C++ reducer, which the collective
recorder does not see.)

[Note: peer tiers]
At W <= 2 our fast tier is bitwise against the data-parallel reference (tree of the per-rank
local-batch gradients, / W). DDP meets it: it divides each rank's bucket by W before a SUM
all-reduce, and g0/2 + g1/2 == (g0 + g1)/2 exactly (halving is exact above the subnormal range).
FSDP2 meets it too (fp32 reduce-scatter with ReduceOp.AVG, the sum divided by W on gloo) except
where one tensor that needs a gradient feeds two or more FSDP2 units (e.g. q/k/v projections
wrapped as units by `every_leaf`): FSDP2 puts an autograd function on every unit's inputs, which
changes the order in which autograd sums the three or more gradient contributions into that
tensor, so the gradients differ in the last bits even at W = 1 (measured on cs336 with
every_leaf: up to 148 ULP in a gradient element, 1 ULP in parameters after an SGD step, up to
292 ULP after Adam steps; fsdp_core avoids exactly this, see the regressions in
tests/test_equivalence.py). Two consumers alone cannot reorder a sum (a + b == b + a), so the
test is conservative: some cases it moves to the tolerance tier are bitwise anyway. `peer_tier` detects that case up front with one
forward of the reference model and holds FSDP2 to the tier fsdp_core has at W >= 4
(tolerance with SGD, reported with Adam); every other peer case is held to fsdp_core's tier.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from verify.compare import tier_for
from verify.scenarios import (Scenario, build_model, cat_batches, loss_fn, make_batch,
                              make_optimizer, tree, wrap_units)

__all__ = ["PEERS", "SHARDER_NAMES", "ALIASES", "canonical", "unsupported_reason",
           "shard_torch_fsdp2", "shard_ddp", "run_peer_case", "peer_tier", "shared_unit_inputs"]

PEERS = ("torch_fsdp2", "ddp")
SHARDER_NAMES = ("fsdp_core",) + PEERS
ALIASES = {"fsdp2": "torch_fsdp2"}


def canonical(name: str) -> str:
    """The one name of a sharder ("fsdp2" is "torch_fsdp2"); ValueError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in SHARDER_NAMES:
        raise ValueError(f"unknown sharder {name!r}; choose from {', '.join(SHARDER_NAMES)} "
                         f"(or the alias{'es' if len(ALIASES) > 1 else ''} "
                         f"{', '.join(ALIASES)})")
    return name


def peer_tier(s: Scenario, sharder: str) -> str:
    """The tier `sharder` is held to on `s` (see [Note: peer tiers]): ours, except FSDP2 where a
    tensor that needs a gradient feeds two or more units at W <= 2 in fast mode, which is held
    to the tier fsdp_core has at W >= 4 (tolerance with SGD, reported with Adam)."""
    tier = tier_for(s)
    if canonical(sharder) != "torch_fsdp2" or tier != "bitwise" or s.mode != "fast":
        return tier
    if not shared_unit_inputs(s):
        return tier
    return "tolerance" if s.optimizer in ("sgd", "sgd_momentum") else "reported"


def shared_unit_inputs(s: Scenario) -> list[str]:
    """Units (by module name) that receive one and the same gradient-requiring tensor in the
    first micro-batch's forward of the reference model: where FSDP2's per-unit autograd
    function on the inputs can reorder the gradient accumulation into that tensor."""
    model = build_model(s)
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    consumers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []   # keeps every seen tensor alive, so no id is reused

    def pre_hook(module, args, kwargs):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                alive.append(t)
                consumers.setdefault(id(t), []).append(names[id(module)])

    handles = [u.register_forward_pre_hook(pre_hook, with_kwargs=True) for u in wrap_units(s, model)]
    try:
        with torch.random.fork_rng(devices=[]):
            loss_fn(s, model, make_batch(s, 0, 0))
    finally:
        for h in handles:
            h.remove()
    shared = [units for units in consumers.values() if len(units) >= 2]
    return sorted({u for units in shared for u in units})


def unsupported_reason(s: Scenario, sharder: str) -> Optional[str]:
    """Why `sharder` cannot run `s` ("unsupported: ..."), or None when it can. Decided from the
    scenario and its model alone, in the parent, so no rank starts a case it cannot finish."""
    sharder = canonical(sharder)
    if sharder == "fsdp_core":
        return None
    if s.mode == "deterministic":
        return (f"unsupported: {sharder} has no deterministic mode (its gradient reduction "
                "order is the backend's; nothing makes it bitwise equal across world sizes)")
    if sharder == "ddp" and s.dtype == "bf16":
        return ("unsupported: DDP has no public mixed-precision policy to mirror ours (bf16 "
                "compute with inputs cast at every wrap unit, fp32 reduction, fp32 master); "
                "its private, experimental _MixedPrecision casts inputs only at the root's "
                "forward")
    if sharder == "torch_fsdp2":
        zero_d = [n for n, p in build_model(s, device="meta").named_parameters() if p.dim() == 0]
        if zero_d:
            return (f"unsupported: FSDP2 shards every parameter on dim 0 and refuses 0-d "
                    f"parameters ({', '.join(zero_d[:3])})")
    return None


# -- the adapters (rank side) ---------------------------------------------------------------

def shard_torch_fsdp2(s: Scenario, model: torch.nn.Module, group) -> torch.nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(group, device_type)
    mp = MixedPrecisionPolicy()
    if s.dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in wrap_units(s, model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=s.reshard_after_forward, mp_policy=mp)
    return model


def shard_ddp(s: Scenario, model: torch.nn.Module, group) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    if s.dtype != "fp32":
        raise ValueError(unsupported_reason(s, "ddp"))
    device_ids = None
    if dist.get_backend(group) == "nccl":
        device_ids = [torch.cuda.current_device()]
        model = model.cuda()
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def _full_params(sharder: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state after a step, on every rank (collective for FSDP2)."""
    if sharder == "torch_fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        sd = model.module.state_dict()
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def _full_grads(sharder: str, model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """The step's reduced gradient of every trainable parameter, unsharded and flattened, in
    the (start, values) form of `verify.runner`'s gradient pieces (one piece from 0), so the
    parent compares it bitwise with the reference's step gradient (collective for FSDP2)."""
    named = model.module.named_parameters() if sharder == "ddp" else model.named_parameters()
    out = {}
    for name, p in named:
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = (0, g.detach().reshape(-1).cpu().clone())
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """This rank's bytes of parameters + gradients + optimizer state (the local shard of a
    DTensor, the whole replica for DDP)."""
    n = 0
    for p in model.parameters():
        n += local_tensor(p).numel() * p.element_size()
        if p.grad is not None:
            n += local_tensor(p.grad).numel() * p.grad.element_size()
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                n += local_tensor(v).numel() * v.element_size()
    return n


_ADAPTERS = {"torch_fsdp2": shard_torch_fsdp2, "ddp": shard_ddp}


def run_peer_case(payload: dict, ctx) -> dict:
    """Rank side of one case through a peer: fast mode, records as `verify.runner` makes them."""
    from verify.runner import CollectiveRecorder
    s = Scenario.from_json(payload["scenario"])
    sharder = canonical(payload["sharder"])
    reason = unsupported_reason(s, sharder)
    if reason is not None:  # the parent decides this first; a direct caller gets the same answer
        return dict(rank=ctx.rank, unsupported=reason, pad_init=[], records=[])
    if s.world_size != ctx.world_size:
        raise ValueError(f"scenario world_size {s.world_size} sent to a group of {ctx.world_size} ranks")
    torch.set_num_threads(1)
    W, r, k = ctx.world_size, ctx.rank, s.k
    model = _ADAPTERS[sharder](s, build_model(s), ctx.group)
    opt = make_optimizer(s, model.named_parameters())
    recorder = CollectiveRecorder()
    records = []
    for step in range(s.steps):
        batch = cat_batches([make_batch(s, step, m) for m in range(r * k, (r + 1) * k)])
        if ctx.device.type == "cuda":
            batch = tuple(t.to(ctx.device) for t in batch)
        t0 = time.perf_counter()
        with recorder.recording():
            loss = loss_fn(s, model, batch)
            loss.backward()
            t1 = time.perf_counter()
            nbytes = state_bytes(model, opt)
            grads = _full_grads(sharder, model)
            t2 = time.perf_counter()
            opt.step()
        step_time = (time.perf_counter() - t2) + (t1 - t0)
        opt.zero_grad(set_to_none=True)
        collectives = recorder.take()
        local = loss.detach().float().reshape(1)
        gathered = torch.empty(W, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local, group=ctx.group)
        gathered = gathered.cpu()
        full = _full_params(sharder, model)
        records.append(dict(
            step=step, loss=tree(list(gathered)) / W, params=full if r == 0 else None,
            pieces={}, grads=grads if r == 0 else None, pad_reduce=[], pad_step=[], collectives=collectives,
            expected_collectives={}, state_bytes=nbytes, step_time_s=step_time))
    return dict(rank=r, pad_init=[], records=records)

"""fsdp_core through the adapter protocol: every probe, both modes, bf16, CPU offload and
checkpoints (`fsdp_core.checkpoint`)."""
from __future__ import annotations

import fsdp_core
from fsdp_core._collectives import GATHER_KIND, REDUCE_SCATTER_KIND
from verify.plan.units import plan_scenario
from verify.reference import param_state
from verify.scenarios import split_ties
from verify.sharders.base import Sharder, StepTrace, WrapPlan

__all__ = ["FsdpCore", "FsdpCoreNoPrefetch"]


class FsdpCore(Sharder):
    name = "fsdp_core"
    world = "group"
    modes = ("fast", "deterministic")
    dtypes = ("fp32", "bf16")
    offload = True
    hsdp = True
    regroups_shared_inputs = False   # hooks on unit outputs, no autograd function on inputs

    def unsupported(self, scenario):
        split = split_ties(scenario)
        if split:
            return (f"fsdp_core refuses a parameter tied across two units ({', '.join(split[:2])}): "
                    "fully_shard raises ValueError; shard the tie's common ancestor instead")
        return None

    def shard(self, model, plan: WrapPlan, group):
        mp = None
        if plan.param_dtype is not None:
            mp = fsdp_core.MixedPrecisionPolicy(param_dtype=plan.param_dtype,
                                                reduce_dtype=plan.reduce_dtype)
        offload = fsdp_core.CPUOffloadPolicy() if plan.offload else None
        mesh = group if plan.mesh is None else fsdp_core.hsdp_mesh(group, *plan.mesh)
        for _, unit in plan.units:
            fsdp_core.fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                                  mp_policy=mp, offload_policy=offload,
                                  deterministic=plan.deterministic)
        return model

    def full_parameters(self, model, optimizer):
        return fsdp_core.full_state_dict(model)

    def padding_views(self, model, optimizer):
        return list(fsdp_core.padding_views(model, optimizer))

    def local_pieces(self, model):
        """name -> (start in the flattened parameter, this rank's real elements)."""
        out = {}
        for name, p in model.named_parameters():
            unit = getattr(p, "_fsdp_unit", None)
            if unit is None:
                out[name] = (0, p.detach().reshape(-1).clone())
                continue
            piece = unit.pieces[p._fsdp_index]
            out[name] = (piece.param_start, p.detach()[: piece.real_numel].float().clone())
        return out

    def reduced_gradients(self, model):
        out = {}
        for name, p in model.named_parameters():
            unit = getattr(p, "_fsdp_unit", None)
            if unit is not None and p.grad is not None:
                piece = unit.pieces[p._fsdp_index]
                out[name] = (piece.param_start, p.grad.detach()[: piece.real_numel].clone())
        return out

    def optimizer_state(self, model, optimizer):
        """The state is shaped like the local flat shard: its first real_numel elements."""
        def piece(p, t):
            unit = getattr(p, "_fsdp_unit", None)
            if unit is None:
                return 0, t.detach().reshape(-1).cpu().clone()
            at = unit.pieces[p._fsdp_index]
            return at.param_start, t.detach()[: at.real_numel].cpu().clone()
        return param_state(optimizer, model.named_parameters(), piece)

    def unsharded_units(self, model):
        return [f"{u.module_name}[{u.names[0]}...]" for u in fsdp_core.units_of(model)
                if u.state.value != "sharded" or u.prefetched]

    def expected_collectives(self, model, trace: StepTrace):
        """Per unit and micro-batch: one all-gather per forward call plus one in backward when
        resharding after forward (without: one per micro-batch the unit's forward runs in;
        none in backward for a unit autograd never reaches, none at all for a unit whose forward
        never runs), and one reduction per unit with a parameter that got a gradient this
        step (``trace.with_grad``; reduce-scatter in fast mode, all-to-all in deterministic
        mode): a unit whose parameters were all unused has nothing to reduce. Nothing on one rank.
        On a 2-D mesh (R, S) the gathers and that reduction are in the shard group (none when
        S = 1), and each unit with trainable parameters adds one replicate-group reduction of
        its shard: an all-reduce (fast) or an all-gather of R shards (deterministic, to sum
        them in mesh order; [Note: HSDP reduction order] in fsdp_core/_collectives.py)."""
        micro = trace.micro_batches
        gathers, reduce, replicate = [0, 0], [0, 0], {}
        names = {id(m): n for n, m in model.named_modules()}
        reduced = {id(p._fsdp_unit) for n, p in model.named_parameters()
                   if (p.requires_grad if trace.with_grad is None else n in trace.with_grad)
                   and getattr(p, "_fsdp_unit", None) is not None}
        for m in model.modules():
            unit = getattr(m, "_fsdp_unit", None) if isinstance(m, fsdp_core.FSDPModule) else None
            if unit is None:
                continue
            R = unit.dp_world // unit.world_size
            if R > 1 and id(unit) in reduced:
                kind = "all_reduce" if trace.mode == "fast" else GATHER_KIND
                shard_bytes = unit.layout.shard_numel * unit.reduce_dtype.itemsize
                entry = replicate.setdefault(kind, [0, 0])
                entry[0] += 1
                entry[1] += shard_bytes * (1 if trace.mode == "fast" else R)
            if unit.world_size == 1:
                continue
            name = names[id(m)]
            item = unit.param_dtype.itemsize
            calls = trace.forward_calls.get(name, 0)
            regather = 1 if name in trace.backward_units else 0
            # resharded after forward: a gather per forward and one for backward, per
            # micro-batch; kept unsharded: one per micro-batch its forward runs in (none for
            # a unit whose forward never runs, e.g. a dead head)
            n = (calls // micro + regather) * micro if unit.reshard_after_forward \
                else min(calls, micro)
            gathers[0] += n
            gathers[1] += n * unit.layout.padded_numel * item
            if id(unit) in reduced:
                reduce[0] += 1
                reduce[1] += unit.layout.padded_numel * unit.reduce_dtype.itemsize
        kind = "all_to_all_single" if trace.mode == "deterministic" else REDUCE_SCATTER_KIND
        out = {GATHER_KIND: gathers} if gathers[0] else {}
        if reduce[0]:
            out[kind] = reduce
        for k, (calls, nbytes) in replicate.items():
            entry = out.setdefault(k, [0, 0])
            entry[0] += calls
            entry[1] += nbytes
        return out

    def planned(self, scenario):
        if scenario.mesh is not None:   # the planner models 1-D layouts (verify/plan/units.py)
            return None
        return plan_scenario(scenario)

    # fsdp_core.checkpoint is imported on first use (fsdp_core's __getattr__): it pulls in
    # torch.distributed.checkpoint, which only checkpoint-resume cases need.
    def save(self, path, model, optimizer):
        fsdp_core.checkpoint.save(path, model, optimizer)

    def load(self, path, model, optimizer):
        fsdp_core.checkpoint.load(path, model, optimizer)


class FsdpCoreNoPrefetch(FsdpCore):
    """fsdp_core with prefetch off (`model.set_prefetch(False)`): what prefetch buys (bench)."""
    name = "fsdp_core_noprefetch"

    def shard(self, model, plan: WrapPlan, group):
        model = super().shard(model, plan, group)
        model.set_prefetch(False)
        return model

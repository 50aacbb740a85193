"""`python -m verify plan`: per-rank memory and per-step traffic of fsdp_core at scale, from the
same unit layouts as `verify.plan.units.plan_scenario` (fsdp_core._layout), with FSDP2's layout and
DeepSpeed's ZeRO-3 estimate beside it. Nothing is trained and no parameter memory is allocated:
the model lives on the meta device.

Per rank (W = R*S; a 1-D run is R = 1, S = W):
  parameters = sum over units of shard_numel(S) x 4 (fp32 master), gradients the same for
  trainable pieces, optimizer state (momentum: 1, Adam/AdamW: 2) x the gradients; the largest
  unit's unsharded buffer (padded_numel x param dtype); the peak of unsharded buffers alive at once
  (fsdp_core keeps the root unit unsharded through forward and backward, and with prefetch one
  more unit in flight); reduce buffers of the largest unit (flat padded gradient + the
  reduce-scatter output, reduce dtype fp32); with --offload the state lives in CPU memory.
Per step: all-gathers and reduce-scatters in the shard group (S ranks), and with R > 1 an
all-reduce of each gradient shard in the replicate group (R ranks): what fsdp_core's HSDP
(2-D mesh, DESIGN section 2) does. Bytes follow the harness's recorder convention (the larger
tensor of a call); time is the ring estimate, (n-1)/n x bytes (x 2 for an all-reduce) over the
group's bandwidth: intra-node when the group fits in one node, inter-node otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.nn as nn

from verify.scenarios import Scenario, _post_order as po, wrap_units
from verify.plan.units import OPT_STATES, UnitShape, default_events, peak_unsharded, unit_figures, unit_shapes
from verify.plan.models import PlanModel

__all__ = ["PlanOptions", "ScaleRow", "plan_units", "plan_scale", "fsdp2_layout", "deepspeed_zero3"]


@dataclass(frozen=True)
class PlanOptions:
    dtype: str = "fp32"                 # param (compute) dtype; master and reduce stay fp32
    optimizer: str = "adamw"
    wrap: str = "per_block"
    reshard_after_forward: bool = True
    offload: bool = False
    prefetch: bool = True
    gpus_per_node: int = 8
    intra_gbps: float = 150.0           # GB/s per GPU inside a node (NVLink class)
    inter_gbps: float = 25.0            # GB/s per GPU across nodes (a 200 Gb/s NIC per GPU)

    @property
    def param_item(self) -> int:
        return 2 if self.dtype == "bf16" else 4


@dataclass
class ScaleRow:
    world_size: int
    replicate: int
    shard: int
    params: int
    grads: int
    optim: int
    offloaded: int                      # bytes in CPU memory (--offload), else 0
    largest_unit: int
    peak_unsharded: int                 # with the --prefetch setting
    peak_unsharded_no_prefetch: int
    reduce_buffers: int
    collectives: list[dict] = field(default_factory=list)   # kind, group, ranks, calls, bytes, time_s
    fsdp2_state: int = 0
    fsdp2_largest_unit: int = 0
    deepspeed_gpu: int = 0
    unpadded_state: int = 0             # (8 + 4 x optimizer states) x N / S: no padding, no units

    @property
    def state(self) -> int:             # on the GPU
        return 0 if self.offloaded else self.params + self.grads + self.optim

    @property
    def total(self) -> int:
        return self.state + self.peak_unsharded + self.reduce_buffers

    @property
    def comm_time_s(self) -> float:
        return sum(c["time_s"] for c in self.collectives)


def _post_order(module: nn.Module):
    return list(po(module))


def plan_units(pm: PlanModel, wrap: str) -> list[UnitShape]:
    """The model's fully_shard units for a wrap policy (verify.scenarios.wrap_units's rules),
    with the default forward pattern: the root's inputs are token ids (no grad)."""
    model = pm.model
    if wrap == "per_block":
        chosen = pm.blocks(model)
    elif wrap == "every_leaf":
        chosen = wrap_units(Scenario(family="mlp", model=(), world_size=1, wrap="every_leaf"), model,
                            traced=False)
    elif wrap == "root_only":
        chosen = []
    else:
        raise ValueError(f"--wrap {wrap!r}: per_block, root_only or every_leaf")
    pos = {id(m): i for i, m in enumerate(_post_order(model))}
    chosen = sorted((m for m in chosen if m is not model), key=lambda m: pos[id(m)]) + [model]
    units = unit_shapes(model, chosen)
    units[-1] = dataclasses.replace(units[-1], input_grad=False)
    return units


def fsdp2_layout(shape: tuple[int, ...], shard: int) -> int:
    """Elements per rank of one parameter under FSDP2: dim-0 chunks, every chunk padded to the
    first one, ceil(d0 / S) rows (torch/distributed/fsdp/_fully_shard/_fsdp_param.py:
    _init_sharded_param uses chunks[0].size() as the padded sharded size)."""
    shape = shape or (1,)
    return math.ceil(shape[0] / shard) * math.prod(shape[1:])


def deepspeed_zero3(total_params: int, largest_layer_params: int, world_size: int, *,
                    gpus_per_node: int, offload: bool) -> int:
    """GPU bytes per rank of DeepSpeed's estimate_zero3_model_states_mem_needs (deepspeed/runtime/
    zero/stage3.py), as a formula: largest_layer_memory = 4 x largest_layer_params; without CPU
    offload gpu_mem = largest_layer_memory + int(18 x total_params / total_gpus); with parameter
    and optimizer offload gpu_mem = largest_layer_memory (the rest in CPU memory). 18 bytes per
    parameter is its mixed-precision Adam; largest_layer_params is the largest module's own
    parameters (recurse=False): no padding, no units."""
    del gpus_per_node
    largest = 4 * largest_layer_params
    return largest if offload else largest + int(18 * total_params / world_size)


def _group_time(kind: str, nbytes: int, ranks: int, intra: bool, o: PlanOptions) -> float:
    if ranks <= 1:
        return 0.0
    bw = (o.intra_gbps if intra else o.inter_gbps) * 1e9
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * nbytes * (ranks - 1) / ranks / bw


def plan_row(units: Sequence[UnitShape], replicate: int, shard: int, o: PlanOptions, *,
             total_params: int, largest_layer_params: int) -> ScaleRow:
    S, R, W = shard, replicate, replicate * shard
    n_state = OPT_STATES[o.optimizer]
    layouts = [u.layout(S) for u in units]
    mixed = any(u.has_grad != (True,) * len(u.numels) for u in units)
    ranks = range(S) if mixed else [0]
    state, coll = unit_figures(units, S, optimizer=o.optimizer, steps=2, param_item=o.param_item,
                               reshard_after_forward=o.reshard_after_forward, ranks=ranks)
    params = sum(lay.shard_numel for lay in layouts) * 4
    grads = max(st - params for st in state[0])
    optim = n_state * grads
    ubytes = [lay.padded_numel * o.param_item for lay in layouts]
    events = default_events(units)
    kw = dict(reshard_after_forward=o.reshard_after_forward)
    peak_pf = peak_unsharded(units, ubytes, events, prefetch=True, **kw)
    peak_no = peak_unsharded(units, ubytes, events, prefetch=False, **kw)
    trainable = [lay for u, lay in zip(units, layouts) if u.trainable]
    reduce_buf = max((lay.padded_numel * 4 + lay.shard_numel * 4 for lay in trainable), default=0)
    shard_intra = S <= o.gpus_per_node
    rep_intra = W <= o.gpus_per_node
    rows = []
    for kind, (calls, nbytes) in coll.items():
        rows.append(dict(kind=kind, group="shard", ranks=S, calls=calls, bytes=nbytes,
                         time_s=_group_time(kind, nbytes, S, shard_intra, o)))
    if R > 1 and trainable:
        nbytes = sum(lay.shard_numel * 4 for lay in trainable)
        rows.append(dict(kind="all_reduce", group="replicate", ranks=R, calls=len(trainable),
                         bytes=nbytes, time_s=_group_time("all_reduce", nbytes, R, rep_intra, o)))
    f2 = [sum(fsdp2_layout(sh, S) for sh, g in zip(u.shapes, u.has_grad) if g) for u in units]
    f2_params = sum(fsdp2_layout(sh, S) for u in units for sh in u.shapes)
    n_trainable = sum(n for u in units for n, g in zip(u.numels, u.has_grad) if g)
    return ScaleRow(
        world_size=W, replicate=R, shard=S, params=params, grads=grads, optim=optim,
        offloaded=(params + grads + optim) if o.offload else 0,
        largest_unit=max(ubytes), peak_unsharded=peak_pf if o.prefetch else peak_no,
        peak_unsharded_no_prefetch=peak_no, reduce_buffers=reduce_buf, collectives=rows,
        fsdp2_state=(f2_params + (1 + n_state) * sum(f2)) * 4,
        fsdp2_largest_unit=max(sum(S * fsdp2_layout(sh, S) for sh in u.shapes) for u in units) * o.param_item,
        deepspeed_gpu=deepspeed_zero3(total_params, largest_layer_params, W,
                                      gpus_per_node=o.gpus_per_node, offload=o.offload),
        unpadded_state=(total_params * 4 + (1 + n_state) * n_trainable * 4) // S)


def _largest_layer(model: nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def plan_scale(pm: PlanModel, world_sizes: Sequence[int], meshes: Sequence[tuple[int, int]] = (),
               options: Optional[PlanOptions] = None) -> dict:
    """Rows for every 1-D world size and every (R, S) mesh, and the model's summary."""
    o = options or PlanOptions()
    if o.optimizer not in OPT_STATES:
        raise ValueError(f"--optimizer {o.optimizer!r}: one of {', '.join(OPT_STATES)}")
    units = plan_units(pm, o.wrap)
    total = sum(sum(u.numels) for u in units)
    big = _largest_layer(pm.model)
    rows = [plan_row(units, 1, w, o, total_params=total, largest_layer_params=big) for w in world_sizes]
    rows += [plan_row(units, r, s, o, total_params=total, largest_layer_params=big) for r, s in meshes]
    return dict(model=pm.name, n_params=total, n_units=len(units), largest_layer_params=big,
                largest_unit_params=max(sum(u.numels) for u in units), options=o, rows=rows)

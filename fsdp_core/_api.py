"""``fully_shard``: validate, collect the parameters a unit owns, build the unit, swap the class."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import _collectives as C

from ._mesh import ShardMesh, resolve_mesh
from ._module import FSDPModule, install_hooks, swap_class
from ._policies import MixedPrecisionPolicy, OffloadPolicy
from ._flat_param import FlatUnit, Registration

__all__ = ["fully_shard"]



def _compute_device(group, params: list[nn.Parameter]) -> torch.device:
    dev = params[0].device if params else torch.device("cpu")
    if dev.type != "meta" and dev.type != "cpu":
        return dev
    return C.comm_device(group)


def fully_shard(
    module: nn.Module,
    *,
    mesh=None,
    reshard_after_forward: bool = True,
    mp_policy: Optional[MixedPrecisionPolicy] = None,
    offload_policy: Optional[OffloadPolicy] = None,
    deterministic: bool = False,
) -> nn.Module:
    """Shard ``module``'s parameters (those not already owned by an inner call) across the
    ranks of ``mesh`` as one flat unit. Call it on inner modules first and the root last.
    Modifies ``module`` in place (its class becomes ``FSDP<Class>``) and returns it.

    ``mesh``: None (every rank), a ProcessGroup, a 1-D DeviceMesh, or a 2-D DeviceMesh with dims
    (replicate, shard) for HSDP: sharded over the shard dim, replicated over the other,
    gradients reduced over both and divided by R*S (see [Note: HSDP reduction order])."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard expects an nn.Module, got {type(module).__name__}")
    if type(module).forward is nn.Module.forward:   # a container: its forward hooks never fire
        raise ValueError(f"fully_shard: {type(module).__name__} has no forward of its own (a "
                         "container), so its parameters would never be gathered; call fully_shard "
                         "on the modules inside it, or on the module that calls them")
    if isinstance(module, FSDPModule):
        extra = ""
        prior = module.__dict__.get("_fsdp_mesh")
        if prior is not None and mesh is not None:
            try:
                other = resolve_mesh(mesh)
                if other.key != prior.key:
                    extra = f" (on {prior.describe()}; now asked for {other.describe()})"
            except Exception:  # noqa: BLE001 - the first problem is the double call
                pass
        raise ValueError(f"{type(module).__name__} is already sharded{extra}: call fully_shard once per module")
    mp_policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    offload_policy = OffloadPolicy() if offload_policy is None else offload_policy
    if not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a MixedPrecisionPolicy, got {type(mp_policy).__name__}")
    if not isinstance(offload_policy, OffloadPolicy):
        raise TypeError(f"offload_policy must be an OffloadPolicy, got {type(offload_policy).__name__}")
    smesh = resolve_mesh(mesh)
    world = smesh.world
    if deterministic and world & (world - 1):
        shape = f" (a {smesh.R} x {smesh.S} mesh)" if smesh.is_hsdp else ""
        raise ValueError(f"fully_shard({type(module).__name__}, deterministic=True) needs a power-of-two "
                         f"world size, got {world}{shape}: use 1, 2, 4, 8, ... ranks")
    _check_same_mesh(module, smesh)
    group = smesh.shard_group

    params, regs = _collect(module)
    unit = None
    if params:
        _check_params(module, params, regs)
        unit = FlatUnit(
            module=module, params=params, registrations=regs, mesh=smesh, mp_policy=mp_policy,
            offload_policy=offload_policy, reshard_after_forward=reshard_after_forward,
            deterministic=deterministic, compute_device=_compute_device(group, params),
        )
        for i, p in enumerate(params):
            # Marks the original tensor: if it is also registered outside this unit (tied across
            # units), an outer fully_shard call finds the mark and refuses.
            p._fsdp_sharded_by = (unit, unit.names[i])
    module._fsdp_unit = unit
    module.__dict__["_fsdp_mesh"] = smesh
    # On the module, not the unit: a module that owns no parameter (unit None) still casts its
    # floating inputs and outputs by the policy, as FSDP2 does.
    module.__dict__["_fsdp_mp_policy"] = mp_policy
    swap_class(module)
    install_hooks(module)
    return module


def _check_same_mesh(module: nn.Module, mesh: ShardMesh) -> None:
    """Every unit under ``module`` must shard over the same mesh (same shard and replicate
    groups): one backward, one optimizer step and one checkpoint span them all."""
    for name, inner in module.named_modules():
        other = inner.__dict__.get("_fsdp_mesh") if isinstance(inner, FSDPModule) else None
        if other is not None and other.key != mesh.key:
            raise ValueError(
                f"fully_shard({type(module).__name__}): its submodule {name!r} "
                f"({type(inner).__name__}) is already sharded on {other.describe()}, but this call "
                f"uses {mesh.describe()}: shard every module of one model on the same mesh (pass "
                "the same mesh to every fully_shard call)")


def _collect(module: nn.Module) -> tuple[list[nn.Parameter], list[Registration]]:
    """Parameters registered under ``module`` not yet sharded, in first-registration order."""
    sub_modules = set(module.modules())
    params: list[nn.Parameter] = []
    index: dict[int, int] = {}
    regs: list[Registration] = []
    for mod_name, sub in module.named_modules(remove_duplicate=False):
        for attr, p in sub._parameters.items():
            if p is None:
                continue
            fqn = f"{mod_name}.{attr}" if mod_name else attr
            sharding_unit = getattr(p, "_fsdp_unit", None)
            if sharding_unit is not None:  # a local shard of some unit
                if not any(m._fsdp_unit is sharding_unit for m in sub_modules if isinstance(m, FSDPModule)):
                    raise ValueError(
                        f"parameter {fqn!r} of {type(module).__name__} is already sharded by a "
                        "fully_shard call on an ancestor module; call fully_shard on inner modules "
                        "first and on the root last"
                    )
                continue
            owner = getattr(p, "_fsdp_sharded_by", None)
            if owner is not None:
                raise ValueError(
                    f"parameter {fqn!r} of {type(module).__name__} is the same tensor as "
                    f"{owner[1]!r} of the fully_shard unit {owner[0].module_name!r}, which "
                    "already shards it (names relative to each module): a parameter "
                    "tied across two units cannot be sharded; call fully_shard on a module that "
                    "contains every use of the tied parameter (e.g. only on their common ancestor)"
                )
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
            regs.append(Registration(sub, attr, index[id(p)], fqn))
    return params, regs


def _check_params(module: nn.Module, params: list[nn.Parameter], regs: list[Registration]) -> None:
    names = {}
    for reg in regs:
        names.setdefault(reg.index, reg.fqn)
    devices = {}
    for i, p in enumerate(params):
        devices.setdefault(p.device, names[i])
    if len(devices) > 1:
        desc = ", ".join(f"{name!r} on {dev}" for dev, name in devices.items())
        raise ValueError(
            f"{type(module).__name__} has parameters on mixed devices ({desc}): move the module to "
            "one device (or build it on meta) before fully_shard"
        )
    for i, p in enumerate(params):
        # [Note: contiguous parameters only]
        # Each parameter is rebuilt as a contiguous view of its unit's flat buffer. A parameter
        # with other strides (e.g. a transpose registered as is) would come back with new
        # strides, and with them other kernels for the ops that use it and other last bits:
        # refuse it, as FSDP2 does, rather than change the numerics silently.
        if not p.is_contiguous():
            raise ValueError(
                f"{type(module).__name__}: parameter {names[i]!r} is not contiguous (shape "
                f"{tuple(p.shape)}, stride {p.stride()}): fully_shard stores every parameter as a "
                "contiguous view of a flat buffer, which would change its strides and its numerics; "
                "make it contiguous before fully_shard, e.g. `param.data = param.data.contiguous()`"
            )
    dtypes = {}
    for i, p in enumerate(params):
        dtypes.setdefault(p.dtype, names[i])
        if not p.is_floating_point():
            raise TypeError(f"parameter {names[i]!r} has non-floating dtype {p.dtype}; fully_shard shards floating parameters")
    if len(dtypes) > 1:
        desc = ", ".join(f"{name!r} is {dt}" for dt, name in dtypes.items())
        raise TypeError(
            f"{type(module).__name__} mixes parameter dtypes ({desc}): one unit holds one dtype; "
            "cast the module (e.g. module.float()) or shard the differing submodules as their own units"
        )

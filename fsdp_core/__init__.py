"""fsdp_core: a from-scratch flat-parameter ZeRO-3 sharder with FSDP2's ``fully_shard`` API.

The data path, top down (each module imports only the ones below it):

    _api          fully_shard: validate, collect a unit's parameters, build it  (_policies: knobs)
    _module       the FSDPModule mixin a sharded module's class gets
    _hooks        forward / backward hooks, end-of-backward callback, prefetch order
    _flat_param   a unit's flat shard, views, unshard / reshard (the all-gather)
    _grad_reduce  gradient accumulation (pairwise) and reduction (reduce-scatter or tree)
    _collectives  every torch.distributed call; agree(); the device choice
    _layout       pure shard math (no torch)          _mesh  1-D groups and 2-D HSDP meshes

shard -> all-gather (_flat_param) -> compute (_hooks) -> reduce (_grad_reduce) -> optimizer step
(the user's, on the local shards). Whole-model views sit on ``_traverse`` (units, state-dict
entries, padding views): ``_state_dict`` (full state dicts), ``_clip`` (clip_grad_norm_),
``_meta`` (meta-device init) and ``checkpoint/`` (sharded checkpoints, imported on first use:
it pulls in torch.distributed.checkpoint).
"""
from ._api import fully_shard
from ._clip import clip_grad_norm_
from ._layout import FlatLayout, LocalPiece, make_layout
from ._mesh import hsdp_mesh, prepare_hsdp_groups
from ._meta import materialize_meta
from ._module import FSDPModule
from ._policies import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
from ._state_dict import full_state_dict, load_full_state_dict
from ._traverse import padding_views, units_of

__all__ = [
    "fully_shard",
    "hsdp_mesh",
    "prepare_hsdp_groups",
    "FSDPModule",
    "MixedPrecisionPolicy",
    "CPUOffloadPolicy",
    "OffloadPolicy",
    "full_state_dict",
    "load_full_state_dict",
    "padding_views",
    "clip_grad_norm_",
    "materialize_meta",
    "units_of",
    "FlatLayout",
    "LocalPiece",
    "make_layout",
    "checkpoint",
]


def __getattr__(name: str):
    if name == "checkpoint":  # fsdp_core.checkpoint.save / load, without slowing `import fsdp_core`
        import importlib  # heavy: the target pulls in torch.distributed.checkpoint; imported on use

        return importlib.import_module(".checkpoint", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

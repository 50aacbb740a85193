"""fsdp_core: a from-scratch flat-parameter ZeRO-3 sharder with FSDP2's ``fully_shard`` API.

Data path, one module per stage: ``_layout`` (pure shard math) -> ``_unit`` (flat shard,
all-gather, gradient reduction) -> ``_collectives`` (every torch.distributed call) ->
``_module`` (forward/backward hooks) -> ``_api`` (``fully_shard``); whole-model views in
``_state`` (state dicts, padding, clipping) and ``_meta`` (meta-device init); sharded
checkpoints in ``checkpoint`` (imported on first use: it pulls in torch.distributed.checkpoint).
"""
from ._api import fully_shard
from ._layout import FlatLayout, LocalPiece, make_layout
from ._mesh import hsdp_mesh, prepare_hsdp_groups
from ._meta import materialize_meta
from ._module import FSDPModule
from ._policies import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
from ._state import clip_grad_norm_, full_state_dict, load_full_state_dict, padding_views, units_of

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
        import importlib

        return importlib.import_module(".checkpoint", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

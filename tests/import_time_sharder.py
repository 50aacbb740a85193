"""An adapter whose module, when imported, wraps torch.distributed.all_reduce and registers a
global module hook (as a library's import does): both must outlive the cases that follow
(tests/test_global_state.py)."""
from __future__ import annotations

import functools

import torch.distributed as dist
from torch.nn.modules.module import _global_forward_hooks, register_module_forward_hook

from verify.sharders.fsdp_core import FsdpCore

_plain = dist.all_reduce


@functools.wraps(_plain)
def _all_reduce(*args, **kwargs):
    return _plain(*args, **kwargs)


_all_reduce._import_time = True  # type: ignore[attr-defined]
dist.all_reduce = _all_reduce
_HOOK = register_module_forward_hook(lambda module, args, out: None)


def _wrapper_in_chain() -> bool:
    fn, seen = dist.all_reduce, 0
    while fn is not None and seen < 50:
        if getattr(fn, "_import_time", False):
            return True
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return False


class ImportTimePatches(FsdpCore):
    name = "import_time_patches"

    def shard(self, model, plan, group):
        if not _wrapper_in_chain():
            raise RuntimeError("the all_reduce wrapper installed at import is gone")
        if _HOOK.id not in _global_forward_hooks:
            raise RuntimeError("the global forward hook registered at import is gone")
        return super().shard(model, plan, group)

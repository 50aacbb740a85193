"""Which modules of a scenario's reference model receive one and the same tensor: the input a
sharder's per-module autograd function may wrap, and so where it may reorder the gradient
accumulation into that tensor (the FSDP2 and DeepSpeed ZeRO-3 adapters' `tier`, and
`verify.case.judge.regrouping_tier` for every adapter that does not say it never does)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.utils._pytree import tree_leaves

from verify.scenarios import build_model, loss_fn, make_batch, wrap_units

__all__ = ["input_consumers", "shared_unit_inputs"]


def input_consumers(s, watched: Callable[[torch.nn.Module], Iterable[torch.nn.Module]]
                    ) -> tuple[torch.nn.Module, list[list[torch.nn.Module]]]:
    """(the reference model built from ``s``, for every gradient-requiring tensor that a module
    of ``watched(model)`` receives in the first micro-batch's forward: those modules, in call
    order)."""
    model = build_model(s)
    consumers: dict[int, list[torch.nn.Module]] = {}
    alive: list[torch.Tensor] = []   # keeps every seen tensor alive, so no id is reused

    def pre_hook(module, args, kwargs):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                alive.append(t)
                consumers.setdefault(id(t), []).append(module)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in watched(model)]
    try:
        with torch.random.fork_rng(devices=[]):
            loss_fn(s, model, make_batch(s, 0, 0))
    finally:
        for h in handles:
            h.remove()
    return model, list(consumers.values())


def shared_unit_inputs(s) -> list[str]:
    """Units (by module name) that receive one and the same gradient-requiring tensor in the
    first micro-batch's forward of the reference model: where FSDP2's per-unit autograd
    function on the inputs can reorder the gradient accumulation into that tensor."""
    model, consumers = input_consumers(s, lambda model: wrap_units(s, model))
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    shared = [[names[id(m)] for m in units] for units in consumers if len(units) >= 2]
    return sorted({u for units in shared for u in units})

"""What a training step takes from a scenario: its batches (`make_batch`), its loss (`loss_fn`),
the one summation order deterministic mode promises (`tree`, `step_loss`) and its optimizer
(`optimizer_spec`, `grouped_optimizer`, `make_optimizer`)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from verify.scenarios.families import family_module
from verify.scenarios.scenario import OPTIMIZERS, Scenario, _derive_seed

__all__ = ["make_batch", "cat_batches", "batch_to", "loss_fn", "tree", "step_loss", "no_decay",
           "optimizer_spec", "grouped_optimizer", "make_optimizer"]


# -- data and loss ------------------------------------------------------------------------------

def make_batch(s: Scenario, step: int, micro: int) -> Any:
    """Global micro-batch `micro` of step `step`, on the CPU: a function of (seed, step, micro)
    only, independent of world size and rank."""
    gen = torch.Generator().manual_seed(_derive_seed(s.seed, "batch", step, micro))
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # whatever a sharder set globally: the data is fixed
    try:
        with torch.device("cpu"):
            return family_module(s.family).make_batch(s.model_kwargs, s.micro_batch_size, gen)
    finally:
        torch.set_default_dtype(dtype)


def cat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate micro-batches, in order, into one batch (fast mode's local or global batch):
    each tensor of the batch's structure (an (x, y) pair, a dict of input_ids and labels, ...)
    along dim 0; anything else as the first micro-batch has it."""
    return tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
                    batches[0], *batches[1:])


def batch_to(batch: Any, device) -> Any:
    """Every tensor of ``batch`` on ``device``, the structure kept."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def loss_fn(s: Scenario, model: nn.Module, batch) -> torch.Tensor:
    """The scalar mean loss of `batch`, always fp32 (outputs are upcast before the loss)."""
    return family_module(s.family).loss(model, batch)


def tree(xs: Sequence):
    """Balanced pairwise sum in order: the one summation order deterministic mode promises."""
    if not xs:
        raise ValueError("tree() of an empty sequence")
    if len(xs) == 1:
        return xs[0]
    half = len(xs) // 2
    return tree(xs[:half]) + tree(xs[half:])


def step_loss(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """A deterministic-mode step's loss: tree(per-micro-batch losses) / M."""
    return tree(list(losses)) / len(losses)


# -- optimizer ----------------------------------------------------------------------------------

def no_decay(name: str) -> bool:
    """Parameters that get no weight decay, chosen by name: biases and norms."""
    parts = name.split(".")
    return name.endswith("bias") or any("norm" in p or p.startswith("ln") for p in parts)


def optimizer_spec(s: Scenario) -> tuple[type, dict]:
    """The scenario's optimizer class and keyword arguments (``weight_decay`` is the decay
    group's; `grouped_optimizer` gives biases and norms none).

    foreach=False and fused=False: the for-loop implementation does the same elementwise math on a
    shard as on the full tensor, on every device. The foreach/fused defaults depend on the device
    and may order or fuse the arithmetic differently, which would break bitwise equality.
    """
    common = dict(lr=s.lr, weight_decay=s.weight_decay, foreach=False, fused=False)
    if s.optimizer == "sgd":
        return torch.optim.SGD, dict(common, momentum=0.0)
    if s.optimizer == "sgd_momentum":
        return torch.optim.SGD, dict(common, momentum=0.9)
    if s.optimizer == "adam":
        return torch.optim.Adam, common
    if s.optimizer == "adamw":
        return torch.optim.AdamW, common
    raise ValueError(f"optimizer={s.optimizer!r}: allowed values are {list(OPTIMIZERS)}")


def grouped_optimizer(cls: type, kwargs: dict, named_params: Iterable[tuple[str, nn.Parameter]]):
    """``cls`` over ``named_params`` with parameter groups chosen BY NAME (a sharded parameter
    is a flat shard, so its shape cannot tell a norm from a weight): `no_decay` names get no
    weight decay, the others ``kwargs["weight_decay"]``; empty groups omitted."""
    decay, nodecay = [], []
    for name, p in named_params:
        (nodecay if no_decay(name) else decay).append(p)
    wd = kwargs.get("weight_decay", 0.0)
    groups = [{"params": ps, "weight_decay": w} for ps, w in ((decay, wd), (nodecay, 0.0)) if ps]
    return cls(groups, **kwargs)


def make_optimizer(s: Scenario, named_params: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """The scenario's optimizer (`optimizer_spec`) with its parameter groups (`grouped_optimizer`)."""
    cls, kwargs = optimizer_spec(s)
    return grouped_optimizer(cls, kwargs, named_params)

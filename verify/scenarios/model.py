"""The model a scenario builds: `build_model` (on any device, the meta device included), the
seeded `init_weights` that gives every process the same bits, `param_names`, and `wrap_units`,
the modules the scenario's wrap policy shards."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from verify.scenarios.families import family_module
from verify.scenarios.scenario import WRAPS, Scenario, _derive_seed

__all__ = ["build_model", "init_weights", "param_names", "wrap_units", "tied_owners", "tie_weights",
           "split_ties", "modules_called"]


# -- model --------------------------------------------------------------------------------------

def build_model(s: Scenario, device: torch.device | str | None = None) -> nn.Module:
    """Construct the fp32 model on `device` and initialise it with `init_weights`.

    On the meta device nothing is initialised: materialise with `model.to_empty(device=...)`
    and then `init_weights(model, s)`, which gives the same bits as the eager build. The caller's
    global RNG state is left untouched.
    """
    fam = family_module(s.family)
    with torch.random.fork_rng(devices=[]):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = fam.build(**s.model_kwargs)
        if not any(t.is_meta for t in _tensors(model)):
            torch.manual_seed(s.seed)
            init_weights(model, s)
    return model


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


@torch.no_grad()
def init_weights(model: nn.Module, s: Scenario) -> None:
    """Re-initialise every parameter and every buffer (non-persistent ones too), module by module
    in `named_modules()` order.

    Each tensor's value is a function of (seed, its name, its shape) alone, drawn on the CPU from
    its own generator, so it does not depend on what was initialised before it, on the device,
    or on whether the model was built on the meta device. Values are random everywhere (biases
    and gains too) so that a swapped or misplaced shard is visible from step 0:
      weights (>= 2-d): N(0, 1/fan_in); biases: N(0, 0.1^2); other 0-d/1-d params: 1 + N(0, 0.1^2);
      floating buffers: 1 + N(0, 0.1^2), unless the module defines `reset_buffers()`;
      integer buffers: zeros. A tied parameter is initialised once, under its first name.
    Ties are first restored by calling `tie_weights()` on every module that defines it, since
    Module.to_empty() (materialising a meta model) gives each alias its own tensor.
    """
    tie_weights(model)
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                _fill(p, _init_value(s, "param", dot + name, p))
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
            continue
        for name, b in module.named_buffers(recurse=False):
            _fill(b, _init_value(s, "buffer", dot + name, b))


def _init_value(s: Scenario, kind: str, name: str, t: torch.Tensor) -> torch.Tensor:
    shape = tuple(t.shape)
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros(shape, dtype=t.dtype)
    gen = torch.Generator().manual_seed(_derive_seed(s.seed, kind, name))
    noise = torch.randn(shape, generator=gen)
    if kind == "param" and len(shape) >= 2:
        return noise * (math.prod(shape[1:]) ** -0.5)
    if kind == "param" and name.endswith("bias"):
        return noise * 0.1
    return 1.0 + noise * 0.1


def _fill(t: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(value.shape):
        raise ValueError(f"init_weights: tensor of shape {tuple(t.shape)} where the unsharded "
                         f"model has {tuple(value.shape)}; initialise before sharding or while "
                         "unsharded")
    t.copy_(value)


def tie_weights(model: nn.Module) -> None:
    """``tie_weights()`` on every module that defines it: restores the model's ties (after
    Module.to_empty(), or after sharding for a scenario whose ties are "split_retie", as
    transformers re-ties a model once it is wrapped)."""
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()


def tied_owners(model: nn.Module) -> list[list[nn.Module]]:
    """For every parameter registered directly on two or more modules (a tie), those modules
    in `named_modules()` order."""
    owners: dict[int, list[nn.Module]] = {}
    for _, m in model.named_modules():
        for p in dict.fromkeys(m.parameters(recurse=False)):
            owners.setdefault(id(p), []).append(m)
    return [ms for ms in owners.values() if len(ms) >= 2]


def param_names(model: nn.Module) -> list[str]:
    """Parameter names as model.state_dict() has them: tied parameters under every name."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


# -- sharding plan ------------------------------------------------------------------------------

def wrap_units(s: Scenario, model: nn.Module, traced: bool = True) -> list[nn.Module]:
    """The modules to shard, inner units first, the root last (and always).

    per_block: each block of the family. root_only: [model]. every_leaf: every module that
    directly owns parameters, except modules sharing a parameter with another module (a tied
    pair must stay inside one unit, so it falls to the nearest enclosing unit) and modules whose
    forward never runs (`modules_called`: a parent that reads a child's parameters itself, as
    nn.MultiheadAttention does with out_proj, would use them unsharded in no unit's forward;
    ``traced=False``, for a model that is not the scenario's, keeps them), then the root.
    Unless the scenario keeps its ties (``ties`` "split" or "split_retie"), the first module
    owning each tied parameter (the input embedding) is added as a unit of its own, so the tie
    spans two units: accelerate's FSDP2 preparation, which wrapped the embedding (with the final
    norm) and left the tied head to the root (pytorch#176076, docs/real_bugs.md).
    Order is post-order (children before parents), so no unit precedes a unit inside it.
    """
    post = list(_post_order(model))
    if s.wrap == "root_only":
        units = []
    elif s.wrap == "per_block":
        units = family_module(s.family).blocks(model)
    elif s.wrap == "every_leaf":
        owners: dict[int, int] = {}  # parameter id -> how many modules own it directly
        for m in post:
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        called = modules_called(s) if traced else None   # traced: ``model`` is ``s``'s
        names = {id(m): n for n, m in model.named_modules()}
        units = [m for m in post
                 if any(True for _ in m.parameters(recurse=False))
                 and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
                 and (called is None or names.get(id(m)) in called)]
    else:
        raise ValueError(f"wrap={s.wrap!r}: allowed values are {list(WRAPS)}")
    if s.ties != "kept":   # the first owner of each tie (an input embedding) in a unit of its own
        units = list(units) + [next(m for m in ms if m is not model) for ms in tied_owners(model)]
    position = {id(m): i for i, m in enumerate(post)}
    units = list({id(m): m for m in units}.values())
    units = sorted((m for m in units if m is not model), key=lambda m: position[id(m)])
    return units + [model]


_CALLED: dict = {}


def modules_called(s: Scenario):
    """Names of the modules whose forward runs when the model computes the loss of its first
    micro-batch (traced once per family and shape, on the meta device), or None where that
    cannot run on the meta device (code that reads values: then every module counts as run)."""
    key = (s.family, s.model, s.micro_batch_size)
    if key not in _CALLED:
        from verify.scenarios.training import batch_to, loss_fn, make_batch  # lazy: training imports this module
        model = build_model(s, device="meta")
        called: set[str] = set()
        for name, m in model.named_modules():
            m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
        batch = batch_to(make_batch(s, 0, 0), "meta")
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                loss_fn(s, model, batch)
            _CALLED[key] = frozenset(called)
        except Exception:   # noqa: BLE001 - a value read on the meta device: not known
            _CALLED[key] = None
    return _CALLED[key]


def split_ties(s: Scenario) -> list[str]:
    """Names of the tied parameters whose owning modules fall in different wrap units under the
    scenario's plan (built on the meta device): what a sharder that refuses split ties refuses."""
    model = build_model(s, device="meta")
    units = {id(m) for m in wrap_units(s, model)}
    unit_of: dict[int, int] = {}

    def walk(m: nn.Module, unit: int) -> None:   # each module's innermost enclosing unit
        unit = id(m) if id(m) in units else unit
        unit_of.setdefault(id(m), unit)
        for child in m.children():
            walk(child, unit)
    walk(model, id(model))
    owners: dict[int, list] = {}   # parameter -> (its name, its unit) per module owning it
    for name, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{attr}".lstrip("."), unit_of[id(m)]))
    return [regs[0][0] for regs in owners.values() if len({u for _, u in regs}) > 1]


def _post_order(module: nn.Module, seen: set[int] | None = None):
    """Every distinct module once, children before parents."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module

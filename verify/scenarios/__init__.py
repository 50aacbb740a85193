"""A case as frozen data, and everything a rank (or the reference) rebuilds from it.

A `Scenario` is small, hashable, picklable and JSON-able; `build_model`, `make_batch`,
`loss_fn`, `wrap_units` and `make_optimizer` turn it into the same model, data, sharding plan and
optimizer in every process. One short module per model family lives next to this file; each
exposes DEFAULTS, check(kw), build(**kw), blocks(model), make_batch(kw, n, gen), loss(model, batch).

  scenario   the Scenario dataclass: its fields, JSON form and validation; derived seeds
  families   the family registry (built-in names, a user's import path)
  model      build_model, init_weights, param_names, wrap_units (the sharding plan), tied_owners,
             tie_weights, split_ties
  training   batches, the loss, the deterministic sum order, the optimizer
"""
from __future__ import annotations

from verify.scenarios.families import (CORE_FAMILIES, FAMILIES, HF_FAMILIES, family_module,
                                       is_family_path)
from verify.scenarios.model import (_post_order, build_model, init_weights, param_names, split_ties,
                                    tie_weights, tied_owners, wrap_units)
from verify.scenarios.scenario import (ALL_WORLD_SIZES, DTYPES, MODES, OPTIMIZERS, WORLD_SIZES,
                                       TIES, WRAPS, Scenario, _derive_seed)
from verify.scenarios.training import (batch_to, cat_batches, grouped_optimizer, loss_fn, make_batch,
                                       make_optimizer, no_decay, optimizer_spec, step_loss, tree)

__all__ = [
    "Scenario", "FAMILIES", "CORE_FAMILIES", "HF_FAMILIES", "MODES", "OPTIMIZERS", "DTYPES", "WRAPS", "TIES", "WORLD_SIZES", "ALL_WORLD_SIZES",
    "build_model", "tie_weights", "tied_owners", "split_ties", "init_weights", "make_batch", "cat_batches", "batch_to", "loss_fn", "wrap_units",
    "make_optimizer", "optimizer_spec", "grouped_optimizer", "no_decay", "param_names", "tree",
    "step_loss", "family_module", "is_family_path",
    # private helpers, for verify's own modules (plan/scale.py, tools/converge.py)
    "_post_order", "_derive_seed",
]

"""Parts of the ``structure`` check (verify/case/judge.py): the unsharded model's names, every
rank's full parameters held to rank 0's, and what a structural failure hints at."""
from __future__ import annotations

from functools import lru_cache

from verify.scenarios import Scenario, build_model

__all__ = ["model_names", "ranks_disagree", "prefix_hint", "replica_hint"]


@lru_cache(maxsize=256)
def model_names(scenario_json: str) -> tuple[tuple[tuple[str, ...], ...], frozenset]:
    """(groups of parameter names that alias one tensor, buffer names) of the unsharded model."""
    model = build_model(Scenario.from_json(scenario_json), device="meta")
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    buffers = frozenset(n for n, _ in model.named_buffers(remove_duplicate=False))
    return tuple(tuple(g) for g in groups.values()), buffers


def replica_hint(s: Scenario, rank: int, values: list[dict], step: int, mine: list) -> str:
    """On a 2-D mesh (R, S), a rank of another replica that differs while rank 0's replica
    agrees: the replicas were not reduced together."""
    if s.mesh is None or s.mesh[0] < 2 or rank < s.mesh[1]:
        return ""
    same_replica = [d for v, d in zip(values, mine) if 0 < v["rank"] < s.mesh[1] and d]
    if any(d != mine[0] for d in same_replica):
        return ""
    return (f" (on the ({s.mesh[0]}, {s.mesh[1]}) mesh rank {rank} is in replica "
            f"{rank // s.mesh[1]} and rank 0's replica agrees with itself: are the gradients "
            "all-reduced across the replicate dimension?)")


def prefix_hint(unexpected: list[str], missing) -> str:
    """Where every unexpected name is a missing one with one prefix (a wrapper's ``module.``),
    what to do about it."""
    missing = set(missing)
    heads = {n[: -len(m) - 1] for n in unexpected for m in missing if n.endswith("." + m)}
    if len(heads) == 1 and all(any(n.endswith("." + m) for m in missing) for n in unexpected):
        return (f": every one is a missing name with the prefix {next(iter(heads)) + '.'!r} "
                "(full_parameters must name the unsharded model's parameters: a wrapper's "
                "named_parameters() carries its attribute's name)")
    return ""


def ranks_disagree(s: Scenario, values: list[dict], step: int, where: str) -> list[str]:
    """Full parameters that some rank's ``full_parameters`` gave differently from rank 0's (the
    ones compared with the reference): by their fingerprints (verify/case/train.py, `digests`).
    Parameters only: a buffer a state dict carries (BatchNorm's running statistics) is each
    rank's own in data-parallel training."""
    mine = [v["records"][step].get("digests") for v in values]
    if not mine or not mine[0]:
        return []
    names = {n for group in model_names(s.to_json())[0] for n in group}
    out = []
    for v, theirs in zip(values[1:], mine[1:]):
        differ = sorted(n for n, d in (theirs or {}).items()
                        if n in names and n in mine[0] and d != mine[0][n])
        if differ:
            out.append(f"{where}: rank {v['rank']}'s full parameters differ from rank 0's "
                       f"(full_parameters is the same model on every rank): {differ[:5]}"
                       + replica_hint(s, v["rank"], values, step, mine))
    return out

"""Where an offloaded case keeps its shards and optimizer state (`WrapPlan.offload`): recorded
on the rank after the last step (`placement`), judged in the parent (`offload_status`, the
``offload`` check)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["placement", "offload_status"]


def placement(optimizer, device) -> dict:
    """The devices of the tensors the optimizer holds (``param_groups`` and ``state``), and the
    device the rank computes on (on a CPU-only run everything is on the CPU whether or not
    anything was offloaded)."""
    seen = set()
    for group in getattr(optimizer, "param_groups", None) or []:
        for p in group.get("params", []):
            if isinstance(p, torch.Tensor):
                seen.add(str(p.device))
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        for entries in state.values():
            for t in (entries or {}).values() if isinstance(entries, dict) else ():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    seen.add(str(t.device))
    return {"compute": str(device), "held": sorted(seen)}


def offload_status(where: list[Optional[dict]]) -> tuple[str, None, Optional[int], str]:
    """(status, step, rank, detail) of the ``offload`` check from every rank's `placement`:
    pass where every tensor is on the CPU while the rank computes elsewhere; n/a on a CPU-only
    run, so that an offload row never reads as verified placement where none could be seen."""
    if any(p is None for p in where) or not any(p["held"] for p in where):
        return "n/a", None, None, "the optimizer holds no tensors the harness can see"
    if all(p["compute"] == "cpu" for p in where):
        return ("n/a", None, None, "a CPU-only run: shards and optimizer state are on the CPU "
                "whether or not they were offloaded; placement is checked on accelerator runs")
    off = [(r, d) for r, p in enumerate(where) for d in p["held"] if d != "cpu"]
    if not off:
        return "pass", None, None, ""
    rank, device = off[0]
    return ("fail", None, rank, f"offloaded case: rank {rank}'s optimizer holds tensors on "
            f"{device}, not the CPU (WrapPlan.offload)")

"""The ``gradients`` and ``optimizer_state`` checks of verify/case/judge.py: the reduced gradient
and the optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...),
reassembled from every rank's pieces, against the reference's, in every tier.

[Note: state checks in every tier]
Parameters alone cannot see a gradient scaled by a constant under Adam: ``m_hat / sqrt(v_hat)``
does not change when every gradient is multiplied by c (up to eps), so a sharder that forgets to
divide by W, or a backend whose ``ReduceOp.AVG`` returns the sum (pytorch#162338, gloo in torch
2.8.0), trains Adam's parameters within the reported tier's bound. The state is not invariant:
``exp_avg`` is c times the reference's, ``exp_avg_sq`` c^2 times. So both checks hold in every
tier. In the bitwise tier every element is compared bit for bit. In the tolerance and reported
tiers the tensors of one kind (every gradient; every exp_avg; every exp_avg_sq; ...) are held
together to a relative error: ||actual - expected||_2 <= `NORM_RTOL` * ||expected||_2 over all
their elements. A gradient scaled by c is off by |c - 1| (1 at W = 2, 3 at W = 4; exp_avg_sq 3
and 15), a gradient from the wrong shard or rank by about its own norm; a correct sharder's
reduction order and, after the first step, the parameter differences its tier allows move them
by far less. Measured on the pinned torch over drawn W = 4 and 8 fast campaigns (seeds 3, 11, 21,
33; fsdp_core and FSDP2; SGD, momentum, Adam, AdamW): at most 4.2e-6 in fp32, 0 in bf16 (a
sum of a few bf16 values is exact in fp32). Per tensor or per element it would not do: a bias
before a GroupNorm has a gradient of pure rounding noise, whose relative error is O(1) in any
order, and Adam's exp_avg_sq (~1e-3 g^2) is far below any absolute tolerance.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from verify.compare import diff_stats, int_view
from verify.scenarios import build_model

__all__ = ["NORM_RTOL", "LOADED_RIGHT", "loaded_problems", "reassemble", "norm_problems", "gradient_problems", "state_problems",
           "reassembled_gradients", "update_problems", "all_zero", "zero_extras", "pieces_problems",
           "ZERO_EXTRA"]

# The relative norm error allowed in the non-bitwise tiers, by compute dtype: 2000x the worst
# measured (see the Note), and any constant scale c with |c - 1| > 1% is caught.
NORM_RTOL = {"fp32": 1e-2, "bf16": 1e-2}
_ZERO_FLOOR = 1e-12   # per element: what an all-zero reference tensor may come back as


def reassemble(pieces: list[Optional[dict]], name: str, numel: int, dtype) -> tuple[torch.Tensor, str]:
    """The flat tensor the ranks' (start, values) pieces of ``name`` make, NaN where no rank
    gave an element, and what is wrong with the pieces ("" if nothing): a piece outside the
    tensor, or two ranks giving different values for one element."""
    flat = torch.full((numel,), float("nan"), dtype=dtype)
    seen = torch.zeros(numel, dtype=torch.bool)
    for rank, mine in enumerate(pieces):
        if not mine or name not in mine:
            continue
        start, vals = mine[name]
        vals = vals.detach().reshape(-1).to(dtype)
        if vals.numel() == 0:   # this rank holds only padding of this parameter
            continue
        if start < 0 or start + vals.numel() > numel:
            return flat, f"rank {rank}'s piece [{start}, {start + vals.numel()}) is outside {numel}"
        sl = slice(start, start + vals.numel())
        overlap = seen[sl]
        if overlap.any() and not torch.equal(int_view(flat[sl][overlap]), int_view(vals[overlap])):
            return flat, f"ranks disagree on the elements of rank {rank}'s piece at {start}"
        flat[sl] = vals
        seen[sl] = True
    return flat, ""


# why a parameter with a zero gradient the reference has none of moved
ZERO_EXTRA = ("{names}: this sharder gave {them} an all-zero gradient where unsharded training "
              "gives none (unused this step), so {opt} stepped {them} (weight decay, momentum, "
              "Adam's moments); unsharded training leaves a parameter without a gradient alone")


def zero_extras(values: list[dict], step: int, ref_grads: Optional[dict]) -> set[str]:
    """Names of the parameters the sharder gave an all-zero reduced gradient at ``step`` that
    the reference has none of (unused or frozen there)."""
    recs = [v["records"][step].get("grads") for v in values]
    if ref_grads is None or any(r is None for r in recs):
        return set()
    return {n for r in recs for n in r if n not in ref_grads and all_zero(recs, n)}


def all_zero(pieces: list[Optional[dict]], name: str) -> bool:
    """Whether every rank's piece of ``name`` is all zeros (and some rank gave one): a gradient
    the reference has none of that is zero (FSDP1 gives an unused parameter one) changes
    nothing by itself; what an optimizer makes of it (weight decay, momentum) shows in the
    parameters, which are checked on their own."""
    given = [mine[name][1] for mine in pieces if mine and name in mine]
    return bool(given) and all(not bool(v.detach().ne(0).any()) for v in given)


def bitwise_problem(actual: torch.Tensor, expected: torch.Tensor) -> str:
    d = diff_stats(actual.reshape(-1), expected.reshape(-1).to(actual.dtype))
    return "" if d.bitwise else f"{d.n_diff}/{d.numel} elements differ, max ULP {d.max_ulp}"


def norm_problems(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: str,
                  label: str, failed: Optional[list] = None) -> list[str]:
    """The non-bitwise tiers' comparison of a group of tensors of one kind (every gradient, or
    every exp_avg): non-finite elements by tensor, then the group's relative norm error against
    `NORM_RTOL`, naming the tensors that contribute most to it with their norm ratios (a scale
    shows as the same ratio everywhere)."""
    bad, err2, ref2, out2 = [], 0.0, 0.0, 0.0
    contrib = []
    for name, (a, e) in pairs.items():
        a, e = a.detach().reshape(-1).double(), e.detach().reshape(-1).double()
        if not torch.isfinite(a).all():
            bad.append(f"{name} ({int((~torch.isfinite(a)).sum())}/{a.numel()} elements not "
                       "finite or not given)")
            continue
        d = float((a - e).norm())
        err2, ref2, out2 = err2 + d * d, ref2 + float(e.norm()) ** 2, out2 + float(a.norm()) ** 2
        contrib.append((d, name, float(a.norm()), float(e.norm())))
    err, ref = math.sqrt(err2), math.sqrt(ref2)
    if err <= NORM_RTOL[dtype] * ref + _ZERO_FLOOR * math.sqrt(max(len(contrib), 1)):
        return bad
    if failed is not None:   # the excess over the bound (verify/case/severity.py)
        failed.append(err / ref / NORM_RTOL[dtype] if ref else math.inf)
    ratio = f"{math.sqrt(out2) / ref:.4f}x the reference's norm" if ref else "the reference is 0"
    bad.append(f"{label}: relative norm error {err / ref if ref else math.inf:.3g} > "
               f"{NORM_RTOL[dtype]} ({ratio})")
    for d, name, na, ne in sorted((c for c in contrib if c[0] > 0), reverse=True)[:4]:
        bad.append(f"{name} ({na / ne:.4f}x)" if ne else f"{name} (reference 0, |actual| {na:.3g})")
    return bad


def _compare(recs: list[dict], want: dict[str, torch.Tensor], tier: str, dtype: str,
             what: str, group=lambda name: "", failed: Optional[list] = None) -> list[str]:
    """The problems of ``recs`` against ``want`` in ``tier``; ``failed``, where given, collects
    (reassembled, reference) of each tensor that failed bit for bit, None for one that could not
    be compared, and a group's relative norm error over its bound where that failed (the
    severity's input: verify/case/severity.py)."""
    given = {n for r in recs for n in r}
    bad, groups = [], {}
    for name in list(want) + sorted(given - set(want)):
        ref = want.get(name)
        if ref is None and what == "a gradient" and all_zero(recs, name):
            continue
        if ref is None:
            bad.append(f"{name} ({what} the reference has none of: frozen or unused there)")
            if failed is not None:
                failed.append(None)
            continue
        if name not in given:
            bad.append(f"{name} ({what} the reference has, which no rank's probe gave; a probe is "
                       "read after backward and before the optimizer step: one whose values exist "
                       "only inside step() returns None there, n/a)")
            if failed is not None:
                failed.append(None)
            continue
        flat, problem = reassemble(recs, name, ref.numel(), ref.dtype)
        if not problem and tier == "bitwise":
            problem = bitwise_problem(flat, ref)
        comparable = not problem.startswith(("rank", "ranks")) and bool(flat.isfinite().all())
        if problem:
            bad.append(f"{name} ({problem})")
            if failed is not None:
                failed.append((flat, ref.reshape(-1)) if tier == "bitwise" and comparable else None)
        if not problem or (tier == "bitwise" and comparable):
            groups.setdefault(group(name), {})[name] = (flat, ref)
    if tier != "bitwise":
        for key, pairs in groups.items():
            bad += norm_problems(pairs, dtype, f"all {key or what.split()[-1] + 's'}", failed)
    elif bad and failed is not None:
        # how bad a bitwise failure is: a group off by more than the relative-norm bound (a
        # scaled gradient) is beyond tolerance however small its elements are
        for key, pairs in groups.items():
            norm_problems(pairs, dtype, "", failed)
    return bad


def gradient_problems(values: list[dict], step: int, ref_grads: Optional[dict], tier: str,
                      dtype: str, failed: Optional[list] = None) -> Optional[list[str]]:
    """Parameters whose reduced gradient, reassembled from the ranks' pieces, differs from the
    reference's step gradient beyond the tier; None when there is nothing to compare (the
    adapter has no ``reduced_gradients`` probe).

    Parameters are compared after the update too, but a last-bit gradient error (a summation
    order, one ulp) is mostly absorbed by ``p - lr * g`` and a scaled one by Adam: only this
    check sees them reliably."""
    recs = [v["records"][step].get("grads") for v in values]
    if ref_grads is None or any(r is None for r in recs):
        return None
    return _compare(recs, ref_grads, tier, dtype, "a gradient", failed=failed)


def reassembled_gradients(values: list[dict], step: int, ref_grads: Optional[dict]
                          ) -> Optional[dict[str, torch.Tensor]]:
    """The sharder's reduced gradients of ``step``, reassembled from every rank's pieces and
    shaped like the reference's, by name; None where the adapter has no ``reduced_gradients``
    probe or any of them is missing, not finite or does not reassemble (the ``gradients`` check
    reports that)."""
    recs = [v["records"][step].get("grads") for v in values]
    if ref_grads is None or any(r is None for r in recs):
        return None
    out = {}
    for name, ref in ref_grads.items():
        flat, problem = reassemble(recs, name, ref.numel(), ref.dtype)
        if problem or not bool(flat.isfinite().all()):
            return None
        out[name] = flat.view(ref.shape)
    return out


def state_problems(values: list[dict], step: int, ref_state: Optional[dict], tier: str,
                   dtype: str, failed: Optional[list] = None) -> Optional[list[str]]:
    """``name.key`` of every optimizer state tensor (``exp_avg`` of ``w`` is ``w.exp_avg``)
    that differs from the reference's after the step beyond the tier; None when there is
    nothing to compare (the adapter has no ``optimizer_state`` probe, or the optimizer keeps no
    per-parameter tensors, as plain SGD)."""
    recs = [v["records"][step].get("optim") for v in values]
    if ref_state is None or any(r is None for r in recs):
        return None
    want = {f"{n}.{k}": t for n, state in ref_state.items() for k, t in state.items()}
    flat_recs = [{f"{n}.{k}": piece for n, state in r.items() for k, piece in state.items()}
                 for r in recs]
    if not want and not any(flat_recs):
        return None
    return _compare(flat_recs, want, tier, dtype, "a state tensor",
                    group=lambda name: name.rsplit(".", 1)[1], failed=failed)


# a resume case that failed after the load with the loaded parameters right: where to look
LOADED_RIGHT = ("\n(the parameters as loaded equal the saved ones: what the checkpoint missed is "
                "elsewhere: optimizer state, step counts, persistent buffers, which the load "
                "starts from another seed's values, or a copy of the parameters the optimizer "
                "steps, a shard or an fp32 master, that load() did not refresh)")


def pieces_problems(pieces: list[dict], full: dict, missing_ok: bool = False) -> list[str]:
    """The names (with what is wrong) whose ranks' (start, values) pieces do not reassemble to
    ``full``'s tensor bit for bit; a name ``full`` lacks is one too, unless ``missing_ok``."""
    bad = []
    for name in sorted({n for p in pieces for n in p}):
        want = full.get(name)
        if want is None:
            if not missing_ok:
                bad.append(f"{name} (not among the full parameters)")
            continue
        flat, problem = reassemble(pieces, name, want.numel(), torch.float32)
        if problem or not torch.equal(flat, want.reshape(-1).float()):
            bad.append(f"{name} ({problem or 'pieces differ from the gathered tensor or leave gaps'})")
    return bad


def loaded_problems(saved: dict, loaded: dict, cut: int,
                    pieces: Optional[list] = None) -> list[str]:
    """The `loaded` check of a resume case: rank 0's full parameters after the load against
    the ones saved after step ``cut - 1``, bit for bit; and, where the adapter has the
    ``local_pieces`` probe (``pieces``: every rank's, right after the load), the pieces each
    rank holds against those full parameters, as the reassembly check holds them every step (a
    load that refreshed what ``full_parameters`` reads but not the shard the optimizer steps)."""
    missing = sorted(set(saved) - set(loaded))
    bad = [k for k in saved if k in loaded and not (
        saved[k].shape == loaded[k].shape and saved[k].dtype == loaded[k].dtype
        and torch.equal(saved[k], loaded[k]))]
    out = []
    if missing:
        out.append(f"after the load: {missing[:5]} missing from the loaded model")
    if bad:
        out.append(f"after the load: {bad[:5]} differ from the state saved after step {cut - 1}")
    if pieces and all(p is not None for p in pieces):
        stale = pieces_problems(pieces, loaded, missing_ok=True)
        if stale:
            out.append(f"after the load: the ranks' own pieces (local_pieces) of {stale[:5]} are "
                       "not the parameters full_parameters reads: load() did not refresh the "
                       "shard (or fp32 master) this sharder's optimizer steps")
    return out


# [Note: the update check]
# The tolerance tier holds each parameter after the step to a torch.testing tolerance; in bf16
# its atol is widened by lr * S / 4 ([Note: fast bf16 SGD bounds] in verify/compare.py), and any
# atol admits an update below it: a sharder whose gradients are zero, halved or doubled can pass
# element by element where updates are small (seen: zeroed gradients passing fast bf16 SGD at
# W = 4). SGD's update is linear in the gradients, so the step's update (the parameters after it
# minus before, each run its own) is held like the gradients check holds the reduced gradients:
# a relative norm error over all parameters within `NORM_RTOL`. It needs no probe, so it also
# covers adapters without `reduced_gradients`. Not for Adam (its update is not linear in the
# gradient; the reported tier has its replayed steps instead).

def update_problems(s, records: list[dict], ref: list, i: int, first_step: bool,
                    params: dict, params_ref: dict, failed: list) -> list[str]:
    """[Note: the update check] for record ``i``: the parameters before it are the previous
    record's (the reference's previous step) or, for the run's first step (``first_step``), the
    model's initial ones, the same for both; none known (a resumed phase's first): no check."""
    if i > 0:
        before, before_ref = records[i - 1].get("params") or {}, ref[i - 1].params
    elif first_step:
        before = before_ref = {k: v.detach().float() for k, v in build_model(s).state_dict().items()}
    else:
        return []
    pairs = {n: (params[n].double() - before[n].double(), e.double() - before_ref[n].double())
             for n, e in params_ref.items()
             if n in params and n in before and n in before_ref and params[n].shape == e.shape
             and before[n].shape == e.shape}
    return norm_problems(pairs, s.dtype, "the update (the parameters after the step minus before)",
                         failed)

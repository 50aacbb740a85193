"""Rank-side functions for tests/test_fsdp_core_model_edges.py: model features at the edge of
what fully_shard takes (a unit without parameters of its own, non-contiguous parameters, a
shard used outside its unit's forward, a parameter used on some ranks only). Module-level so
they pickle by reference; each returns plain data that the test asserts on."""
from __future__ import annotations

import torch
import torch.nn as nn

import fsdp_core
from fsdp_core import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def _error(fn) -> tuple[str, str]:
    """(exception type name, message) of ``fn()``, or ("no error", "")."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return type(e).__name__, str(e)
    return "no error", ""


# ------------------------------------------------------------------ a unit without parameters
class _NoParamRoot(nn.Module):
    """The root owns no parameter itself: its only parameters are in ``fc``, its own unit."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        self.seen.append(x.dtype)
        return x + self.fc(x)


def paramless_unit_cast(payload: dict, ctx) -> dict:
    """dtypes the body of a parameter-less unit sees and returns, under a bf16 policy."""
    torch.manual_seed(0)
    m = _NoParamRoot()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              output_dtype=payload.get("output_dtype"))
    fully_shard(m.fc, mesh=ctx.group, mp_policy=mp)
    fully_shard(m, mesh=ctx.group, mp_policy=mp)
    out = m(torch.randn(2, 3))
    out.float().sum().backward()
    return dict(seen=str(m.seen[0]), out=str(out.dtype), has_grad=m.fc.weight.grad is not None)


# ------------------------------------------------------------------ non-contiguous parameters
class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.proj.wt = nn.Parameter(torch.randn(4, 3).t())  # (3, 4), strides (1, 3)

    def forward(self, x):
        return self.proj(x) @ self.proj.wt


def noncontiguous(payload: dict, ctx) -> dict:
    out = {}
    m = _Transposed()
    out["refused"] = _error(lambda: fully_shard(m, mesh=ctx.group))
    out["class"] = type(m).__name__  # refused before the class swap
    fixed = _Transposed()
    fixed.proj.wt.data = fixed.proj.wt.data.contiguous()  # what the message says to do
    out["fixed"] = _error(lambda: fully_shard(fixed, mesh=ctx.group))
    return out


# ------------------------------------------------------------------ a shard used outside its unit
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _shard_mlp(m: nn.Module, group, **kw) -> nn.Module:
    fully_shard(m[0], mesh=group, **kw)
    fully_shard(m, mesh=group, **kw)
    return m


def _batch(ctx, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + ctx.rank)
    return torch.randn(2, 3, generator=g)


def shard_used_outside(payload: dict, ctx) -> dict:
    """An L2 penalty over ``model.parameters()`` in the loss, after forward: on every rank
    (``where="all"``) or on rank 0 only (``"rank0"``). Then a plain step and a collective: the
    pass that raised must have left no peer waiting and the model usable."""
    m = _shard_mlp(_mlp(), ctx.group)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def step():
        loss = m(_batch(ctx)).sum()
        if payload["where"] == "all" or ctx.rank == 0:
            loss = loss + 1e-2 * sum(p.pow(2).sum() for p in m.parameters())
        loss.backward()

    out = {"penalty": _error(step)}
    opt.zero_grad(set_to_none=True)
    out["plain_step"] = _error(lambda: m(_batch(ctx, 1)).sum().backward())
    out["grads"] = [p.grad is not None for p in m.parameters()]
    opt.step()
    full = fsdp_core.full_state_dict(m)  # a collective after the error: every rank gets here
    out["finite"] = all(bool(v.isfinite().all()) for v in full.values())
    return out


def no_false_alarm(payload: dict, ctx) -> dict:
    """Normal training in the modes the guards must stay silent in: fast, deterministic with
    micro-batches, gradient accumulation without sync, CPU offload, mixed precision."""
    out = {}
    mode = payload["mode"]
    kw = {}
    if mode == "offload":
        kw["offload_policy"] = CPUOffloadPolicy()
    if mode == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mode == "deterministic":
        kw["deterministic"] = True
    m = _shard_mlp(_mlp(), ctx.group, **kw)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)

    def train():
        for step in range(2):
            k = 1 if mode in ("fast", "offload", "bf16") else 2
            for i in range(k):
                m.set_requires_gradient_sync(i == k - 1)
                (m(_batch(ctx, 2 * step + i)).float().sum() / k).backward()
            assert all(p.grad is not None for p in m.parameters()), "a parameter got no gradient"
            opt.step()
            opt.zero_grad(set_to_none=True)

    out["error"] = _error(train)
    return out


# ------------------------------------------------------------------ parameters used on some ranks
class _Branch(nn.Module):
    """``b`` is used only when the batch sums positive (decided per rank, per micro-batch).
    With 2 + 8 elements on 2 ranks, rank 0 holds ``a`` and ``b[0:3]``, rank 1 ``b[3:8]``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(2))
        self.b = nn.Parameter(torch.ones(8))

    def forward(self, x):
        h = x * self.a
        if x.sum() > 0:
            h = h + self.b.sum()
        return h.sum()


def branch_on_some_ranks(payload: dict, ctx) -> dict:
    """Fast mode: the branch is taken on the ranks in ``payload["taken"]`` only."""
    m = fully_shard(_Branch(), mesh=ctx.group)
    sign = 1.0 if ctx.rank in payload["taken"] else -1.0
    out = {"error": _error(lambda: m(torch.ones(1, 2) * sign).backward())}
    out["b_grad"] = m.b.grad is not None
    full = fsdp_core.full_state_dict(m)  # a collective after the error: every rank gets here
    out["keys"] = sorted(full)
    return out


def branch_in_some_microbatches(payload: dict, ctx) -> dict:
    """Deterministic mode, k = 2 micro-batches per rank: rank 0 takes the branch in its first
    micro-batch only, rank 1 in both. Each rank's shard gradient must be the tree reference's."""
    W, k = ctx.world_size, 2
    signs = {0: [1.0, -1.0], 1: [1.0, 1.0]}
    xs = [torch.ones(1, 2) * s * (1 + r) for r in range(W) for s in signs[r]]  # global order
    m = fully_shard(_Branch(), mesh=ctx.group, deterministic=True)
    err = None
    for i in range(k):
        m.set_requires_gradient_sync(i == k - 1)
        err = _error(lambda: (m(xs[ctx.rank * k + i]) / k).backward())
        if err[0] != "no error":
            break
    ref = _Branch()
    grads = []
    for x in xs:
        ref.zero_grad(set_to_none=True)
        (ref(x) / k).backward()
        grads.append([torch.zeros_like(q) if q.grad is None else q.grad for q in ref.parameters()])
    g = grads
    want = [((g[0][i] + g[1][i]) + (g[2][i] + g[3][i])) / W for i in range(2)]  # tree over 4
    same = []
    for (name, p), w in zip(m.named_parameters(), want):
        piece = p._fsdp_unit.pieces[p._fsdp_index]
        exp = w.reshape(-1)[piece.param_start: piece.param_start + piece.real_numel]
        got = None if p.grad is None else p.grad[: piece.real_numel]
        same.append((name, got is not None and torch.equal(got, exp)))
    return dict(error=err, same=same)


def eval_first_then_train(payload: dict, ctx) -> dict:
    """An inference_mode forward before any training (an evaluation first), then two SGD steps:
    the parameters as an unsharded twin trained on the same global batches ends with."""
    m = _shard_mlp(_mlp(), ctx.group)
    twin = _mlp()
    out = {"eval": _error(lambda: _run_inference(m, ctx))}
    opt, opt_twin = torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    for step in range(2):
        m(_batch(ctx, step)).sum().backward()   # gradients averaged over the ranks
        for r in range(ctx.world_size):   # the global batch, as the ranks' slices
            g = torch.Generator().manual_seed(100 * step + r)
            twin(torch.randn(2, 3, generator=g)).sum().div(ctx.world_size).backward()
        opt.step(), opt_twin.step()
        opt.zero_grad(set_to_none=True), opt_twin.zero_grad(set_to_none=True)
    full = fsdp_core.full_state_dict(m)
    out["equal"] = all(torch.allclose(full[k], v, rtol=0, atol=1e-6) for k, v in twin.state_dict().items())
    return out


def _run_inference(m, ctx):
    with torch.inference_mode():
        m(_batch(ctx, 9))


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.reentrant = nn.Linear(3, 4), nn.Linear(4, 2), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint   # lazy: only this case checkpoints
        return checkpoint(self.b, torch.tanh(self.a(x)), use_reentrant=self.reentrant)


def reentrant_checkpoint(payload: dict, ctx) -> dict:
    """Activation checkpointing around a sharded unit. Reentrant: its forward runs without grad
    and its recompute inside backward, where no hook could reduce it: a clear error, not
    gradients silently lost. Non-reentrant: trains."""
    m = _Checkpointed(payload["reentrant"])
    fully_shard(m.b, mesh=ctx.group)
    fully_shard(m, mesh=ctx.group)
    return {"error": _error(lambda: m(_batch(ctx)).sum().backward())}


def gradient_penalty(payload: dict, ctx) -> dict:
    """A gradient penalty: autograd.grad with create_graph=True, then backward through it. On
    one rank (the shard is the parameter) it trains; on more, a clear error rather than the
    resharded views' 'out of bounds for storage of size 0'."""
    m = _shard_mlp(_mlp(), ctx.group)

    def step():
        x = _batch(ctx).requires_grad_(True)
        out = m(x).pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (out + gx.pow(2).sum()).backward()
    return {"error": _error(step)}

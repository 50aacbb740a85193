"""Rank-side functions for the HSDP tests (2-D (replicate, shard) meshes built inside the rank
pool with ``fsdp_core.hsdp_mesh``). Module-level so they pickle by reference; each returns plain
data that tests/test_hsdp.py asserts on."""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fsdp_core
import fsdp_core.checkpoint as ckpt
from fsdp_core import fully_shard, hsdp_mesh
import checkpoint_cases as cc
import sharder_cases as sc
import sharder_models as zm


SHAPES = [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4), (8, 1), (4, 2), (2, 4), (1, 8)]


def prepare(payload: dict, ctx) -> bool:
    """Run at the pool's full world size: every rank creates the meshes' sub-groups (see
    [Note: sub-groups inside a pool] in fsdp_core/_mesh.py). Idempotent and cheap once done."""
    fsdp_core.prepare_hsdp_groups([sh for sh in SHAPES if sh[0] * sh[1] <= ctx.world_size])
    return True


def mesh_of(payload: dict, ctx):
    """The case's mesh: ``payload["mesh"]`` = (R, S) gives a 2-D mesh over ctx.group, None the
    1-D group itself."""
    shape = payload.get("mesh")
    if shape is None:
        return ctx.group
    R, S = shape
    assert R * S == ctx.world_size, (shape, ctx.world_size)
    return hsdp_mesh(ctx.group, R, S)


def on_mesh(ctx, mesh):
    """ctx with ``group`` replaced by the mesh: the sharder tests' helpers pass ctx.group to
    fully_shard and take rank / world size (the data-parallel index and W) from ctx."""
    return dataclasses.replace(ctx, group=mesh)


# ------------------------------------------------------------------------------ a second model
class Mlp(nn.Module):
    """Odd sizes (padding everywhere), a frozen layer, a 0-d scale, a LayerNorm."""

    def __init__(self, d_in: int = 5, width: int = 7):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.mid = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())
        self.frozen = nn.Linear(width, width, bias=False)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.mid(h) + self.frozen(h)
        return self.out(h * self.scale)


def build(family: str, seed: int):
    if family == "zoo":
        return zm.build_zoo(seed)
    torch.manual_seed(seed)
    return Mlp()


def units(family: str, model, wrap: str):
    if family == "zoo":
        return zm.units(model, wrap)
    if wrap == "root_only":
        return [model]
    return [model.inp, model.mid, model]


def batch(family: str, step: int, micro: int):
    if family == "zoo":
        return zm.batch(step, micro)
    g = torch.Generator().manual_seed(10_000 * step + micro)
    return torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)


def loss_of(family: str, model, b):
    if family == "zoo":
        return zm.loss_of(model, b)
    x, y = b
    return F.mse_loss(model(x), y)


def cat(bs):
    return torch.cat([x for x, _ in bs]), torch.cat([y for _, y in bs])


def shard(family: str, model, mesh, p: dict):
    mp = fsdp_core.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if p.get("bf16") else None
    for m in units(family, model, p.get("wrap", "per_block")):
        fully_shard(m, mesh=mesh, deterministic=p.get("det", False), mp_policy=mp)
    return model


def _bad_padding(model, opt) -> list[str]:
    return sc._padding_bad(model, opt)


# ------------------------------------------------------------------------------------- training
def train(payload: dict, ctx) -> dict:
    """The same training on the 2-D mesh, on the 1-D group of the same W (prefetch off there),
    and as a single-process reference; per step: bitwise equality of every parameter with both,
    the largest difference to the reference, the clip norms, and the padding invariant.

    det: rank g (data-parallel index r*S + s) runs micro-batches [g*k, (g+1)*k); the reference
    sums the M micro-batch gradients with ``tree`` / W. fast: the data-parallel reference, each
    rank's local-batch gradient summed with ``tree`` in rank order / W."""
    fam, det = payload.get("family", "zoo"), payload.get("det", False)
    W, g, M, steps = ctx.world_size, ctx.rank, payload.get("M", 8), payload.get("steps", 2)
    k = M // W
    clip = payload.get("clip")
    opt_kind = payload.get("opt", "adamw")
    mesh2 = mesh_of(payload, ctx)
    hsdp = shard(fam, build(fam, 0), mesh2, payload)
    flat = shard(fam, build(fam, 0), ctx.group, payload)
    flat.set_prefetch(False)
    ref = build(fam, 0)
    opts = [sc._opt(opt_kind, list(m.named_parameters())) for m in (hsdp, flat, ref)]
    records = []
    pad_init = _bad_padding(hsdp, opts[0])
    for step in range(steps):
        mbs = [batch(fam, step, m) for m in range(M)]
        norms, pad_reduce = [], []
        for model, opt in zip((hsdp, flat), opts):
            if det:
                for i in range(k):
                    model.set_requires_gradient_sync(i == k - 1)
                    (loss_of(fam, model, mbs[g * k + i]) / k).backward()
            else:
                loss_of(fam, model, cat(mbs[g * k:(g + 1) * k])).backward()
            pad_reduce += _bad_padding(model, None)
            if clip:
                norms.append(float(fsdp_core.clip_grad_norm_(model, clip)))
            opt.step()
            opt.zero_grad()
        # reference
        if det:
            leaves = []
            for mb in mbs:
                ref.zero_grad(set_to_none=True)
                (loss_of(fam, ref, mb) / k).backward()
                leaves.append([q.grad for q in ref.parameters()])
        else:
            leaves = []
            for r in range(W):
                ref.zero_grad(set_to_none=True)
                loss_of(fam, ref, cat(mbs[r * k:(r + 1) * k])).backward()
                leaves.append([q.grad for q in ref.parameters()])
        for i, q in enumerate(ref.parameters()):
            gs = [lv[i] for lv in leaves]
            q.grad = None if gs[0] is None else sc.tree(gs) / W
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip, foreach=False)))
        opts[2].step()
        opts[2].zero_grad()
        a, b, want = fsdp_core.full_state_dict(hsdp), fsdp_core.full_state_dict(flat), ref.state_dict()
        records.append(dict(
            step=step,
            vs_1d=sorted(n for n in want if not torch.equal(a[n], b[n])),
            vs_ref=sorted(n for n in want if not torch.equal(a[n], want[n])),
            max_diff=max(float((a[n].double() - want[n].double()).abs().max()) for n in want if want[n].numel()),
            norms=norms, pad_reduce=pad_reduce, pad_step=_bad_padding(hsdp, opts[0]),
            reassembled=sc._reassembly_ok(hsdp, a)))
    return dict(records=records, pad_init=pad_init, names=[n for n, _ in hsdp.named_parameters()],
                ref_names=[n for n, _ in ref.named_parameters()],
                shard_numels=[u.layout.shard_numel for u in fsdp_core.units_of(hsdp)],
                optim_numel=sum(v.numel() for st in opts[0].state.values() for v in st.values()
                                if isinstance(v, torch.Tensor) and v.dim() == 1))


def accumulation(payload: dict, ctx) -> dict:
    """Fast mode: k micro-batches with set_requires_gradient_sync vs one local batch."""
    return sc.accumulation(payload, on_mesh(ctx, mesh_of(payload, ctx)))


def prefetch(payload: dict, ctx) -> dict:
    return sc.prefetch(payload, on_mesh(ctx, mesh_of(payload, ctx)))


# ------------------------------------------------------------------------------- state dicts
def state_dicts(payload: dict, ctx) -> dict:
    """full_state_dict / load_full_state_dict (every rank, and from one source rank), and
    materialize_meta, on a 2-D mesh."""
    mesh = mesh_of(payload, ctx)
    p = dict(payload, group=mesh)
    plain = zm.build_zoo(5).state_dict()
    a = sc._shard(zm.build_zoo(5), dict(p))
    sd = fsdp_core.full_state_dict(a)
    b = sc._shard(zm.build_zoo(9), dict(p))
    fsdp_core.load_full_state_dict(b, sd)
    c = sc._shard(zm.build_zoo(device="meta"), dict(p))
    c.to_empty(device="cpu")
    with torch.no_grad():
        for i, blk in enumerate(c.blocks):
            blk.phase.copy_(torch.sin(torch.arange(blk.phase.numel()) * (i + 1) / torch.pi))
    src = payload.get("src_rank", 0)
    fsdp_core.load_full_state_dict(c, plain if ctx.rank == src else None, src_rank=src)
    m = sc._shard(zm.build_zoo(device="meta"), dict(p))
    fsdp_core.materialize_meta(m, device="cpu", init_fn=lambda mod: zm.init_zoo(mod, 5))
    out = {}
    for name, model in (("full", a), ("loaded", b), ("from_rank", c), ("meta", m)):
        got = fsdp_core.full_state_dict(model)
        out[name] = dict(keys=list(got) == list(plain),
                         equal=all(torch.equal(got[k], plain[k]) for k in plain),
                         buffers=all(torch.equal(x, y) for x, y in zip(model.buffers(), zm.build_zoo(5).buffers())),
                         pad=_bad_padding(model, None))
    return out


# -------------------------------------------------------------------------------- checkpoints
def _shared_path(payload: dict, ctx) -> dict:
    return cc._shared(payload, ctx)


def ckpt_train_save(payload: dict, ctx) -> dict:
    """Train ``s`` steps on the mesh, save, ``t`` more steps: the uninterrupted run."""
    payload = _shared_path(payload, ctx)
    mctx = on_mesh(ctx, mesh_of(payload, ctx))
    model, opt = cc._build(0, payload, mctx)
    for step in range(payload["s"]):
        cc._train_step(model, opt, step, payload, mctx)
    opt.param_groups[0]["lr"] = payload.get("lr_at_save", opt.param_groups[0]["lr"])
    ckpt.save(payload["path"], model, opt)
    saved = fsdp_core.full_state_dict(model)
    for step in range(payload["s"], payload["s"] + payload["t"]):
        cc._train_step(model, opt, step, payload, mctx)
    final = fsdp_core.full_state_dict(model)
    with open(os.path.join(payload["path"], ckpt.MANIFEST)) as f:
        import json
        manifest = json.load(f)
    return dict(saved=cc._rank0(ctx, saved), final=cc._rank0(ctx, final),
                files=sorted(os.listdir(payload["path"])), pad=_bad_padding(model, opt),
                manifest_mesh=manifest.get("mesh"), manifest_world=manifest.get("world_size"))


def ckpt_resume(payload: dict, ctx) -> dict:
    """A differently initialised model on this mesh (payload["mesh_b"]), loaded, ``t`` steps."""
    payload = _shared_path(payload, ctx)
    mctx = on_mesh(ctx, mesh_of(dict(payload, mesh=payload.get("mesh_b")), ctx))
    model, opt = cc._build(9, dict(payload, wrap=payload.get("wrap_b", "per_block")), mctx)
    ckpt.load(payload["path"], model, opt)
    loaded = fsdp_core.full_state_dict(model)
    steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
    pad_load = _bad_padding(model, opt)
    for step in range(payload["s"], payload["s"] + payload["t"]):
        cc._train_step(model, opt, step, payload, mctx)
    return dict(loaded=cc._rank0(ctx, loaded), final=cc._rank0(ctx, fsdp_core.full_state_dict(model)),
                steps=steps, lrs=[gr["lr"] for gr in opt.param_groups], pad_load=pad_load,
                pad_end=_bad_padding(model, opt))


# ------------------------------------------------------------------------------------- errors
def errors(payload: dict, ctx) -> dict:
    """Mesh mistakes end in clear exceptions (type and message per case). W = 4."""
    from torch.distributed.device_mesh import DeviceMesh
    from fsdp_core._mesh import _singleton

    out = {}
    attempt = functools.partial(sc.record_error, out)

    mesh = hsdp_mesh(ctx.group, 2, 2)
    ranks = torch.arange(4, dtype=torch.int)

    def three_dims():
        solo = _singleton(dist.get_rank())
        m3 = DeviceMesh.from_group([mesh.get_group(0), mesh.get_group(1), solo], "cpu",
                                   mesh=ranks.view(2, 2, 1), mesh_dim_names=("a", "b", "c"))
        fully_shard(nn.Linear(2, 2), mesh=m3)

    def sizes_do_not_multiply():
        bad = DeviceMesh.from_group([ctx.group, mesh.get_group(1)], "cpu", mesh=ranks.view(2, 2),
                                    mesh_dim_names=("replicate", "shard"))
        fully_shard(nn.Linear(2, 2), mesh=bad)

    def helper_sizes():
        hsdp_mesh(ctx.group, 3, 2)

    def groups_swapped():
        bad = DeviceMesh.from_group([mesh.get_group(1), mesh.get_group(0)], "cpu", mesh=ranks.view(2, 2),
                                    mesh_dim_names=("replicate", "shard"))
        fully_shard(nn.Linear(2, 2), mesh=bad)

    def inner_on_other_mesh():
        m = zm.build_zoo(0)
        fully_shard(m.blocks[0], mesh=mesh)
        fully_shard(m, mesh=ctx.group)

    def resharded_on_other_mesh():
        m = nn.Linear(2, 2)
        fully_shard(m, mesh=mesh)
        fully_shard(m, mesh=ctx.group)

    for fn in (three_dims, sizes_do_not_multiply, helper_sizes, groups_swapped, inner_on_other_mesh,
               resharded_on_other_mesh):
        attempt(fn.__name__, fn)
    return out


def fsdp2_peer_smoke(payload: dict, ctx) -> dict:
    """FSDP2's own fully_shard accepts the mesh hsdp_mesh builds (the harness's HSDP peer)."""
    from torch.distributed.fsdp import fully_shard as fsdp2_shard
    mesh = mesh_of(payload, ctx)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # FSDP2 refuses 0-d params
    fsdp2_shard(model[0], mesh=mesh)
    fsdp2_shard(model, mesh=mesh)
    x, y = batch("mlp", 0, ctx.rank)
    F.mse_loss(model(x), y).backward()
    w = model[0].weight
    return dict(placements=str(w.placements), local=tuple(w.to_local().shape),
                grad=w.grad is not None)

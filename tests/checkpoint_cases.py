"""Rank-side functions for the checkpoint tests (run through the rank pool as ``fn(payload, ctx)``;
module-level so they pickle by reference). Big results (full state dicts) come back from rank 0
only; every rank reports what it raised, so the tests can check that all ranks agree."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

import fsdp_core
import fsdp_core.checkpoint as ckpt
import sharder_cases as sc
import sharder_models as zm
from fsdp_core.checkpoint import _dcp as _ckpt_dcp


# ----------------------------------------------------------------------------------- training
def _build(seed: int, p: dict, ctx, **kw):
    model = sc._shard(zm.build_zoo(seed, **kw), dict(p, group=ctx.group))
    return model, sc._opt(p.get("opt", "adamw"), list(model.named_parameters()))


def _train_step(model, opt, step: int, p: dict, ctx) -> None:
    """The micro-batch protocol of sharder_cases.parity: rank r owns micro-batches [r*k, (r+1)*k)."""
    W, r, M = ctx.world_size, ctx.rank, p.get("M", 8)
    k = M // W
    mbs = [zm.batch(step, m) for m in range(r * k, (r + 1) * k)]
    if p.get("det"):
        for i, mb in enumerate(mbs):
            model.set_requires_gradient_sync(i == k - 1)
            (zm.loss_of(model, mb) / k).backward()
    else:
        zm.loss_of(model, (torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs]))).backward()
    opt.step()
    opt.zero_grad()


def _rank0(ctx, value):
    return value if ctx.rank == 0 else None


def _shared(payload: dict, ctx) -> dict:
    """Rank 0's paths for every rank: under torchrun each rank's pytest has its own tmp_path."""
    paths = [{k: payload[k] for k in ("path", "root", "plain_path") if k in payload}]
    dist.broadcast_object_list(paths, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
    return dict(payload, **paths[0])


def train_save(payload: dict, ctx) -> dict:
    """Train ``s`` steps, save, train ``t`` more: the uninterrupted run. Changes group 0's lr
    before saving (as a scheduler would), so a resume that ignores hyperparameters diverges."""
    payload = _shared(payload, ctx)
    model, opt = _build(0, payload, ctx)
    s, t = payload["s"], payload["t"]
    for step in range(s):
        _train_step(model, opt, step, payload, ctx)
    opt.param_groups[0]["lr"] = payload.get("lr_at_save", opt.param_groups[0]["lr"])
    ckpt.save(payload["path"], model, opt)
    saved = fsdp_core.full_state_dict(model)
    for step in range(s, s + t):
        _train_step(model, opt, step, payload, ctx)
    final = fsdp_core.full_state_dict(model)
    return dict(saved=_rank0(ctx, saved), final=_rank0(ctx, final), files=sorted(os.listdir(payload["path"])),
                pad=sc._padding_bad(model, opt))


def resume(payload: dict, ctx) -> dict:
    """A differently initialised model at this world size (and wrap), loaded, trained ``t`` steps."""
    payload = _shared(payload, ctx)
    p = dict(payload, wrap=payload.get("wrap_b", payload.get("wrap", "per_block")))
    model, opt = _build(9, p, ctx)
    ckpt.load(payload["path"], model, opt)
    loaded = fsdp_core.full_state_dict(model)
    steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
    lrs = [g["lr"] for g in opt.param_groups]
    pad_after_load = sc._padding_bad(model, opt)
    for step in range(payload["s"], payload["s"] + payload["t"]):
        _train_step(model, opt, step, p, ctx)
    return dict(loaded=_rank0(ctx, loaded), final=_rank0(ctx, fsdp_core.full_state_dict(model)),
                steps=steps, lrs=lrs, pad_load=pad_after_load, pad_end=sc._padding_bad(model, opt))


def unsharded_resume(payload: dict, ctx) -> dict:
    """Standard tools only: an unsharded model and optimizer read the checkpoint with DCP's own
    ``get_state_dict`` / ``dcp.load`` / ``set_state_dict``, then train ``t`` steps with the
    single-process tree reference (sum of the M micro-batch gradients with ``tree``); with
    ``plain_path``, then save with ``get_state_dict`` / ``dcp.save``."""
    payload = _shared(payload, ctx)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    plain = zm.build_zoo(9)
    opt = sc._opt("adamw", list(plain.named_parameters()))
    msd, osd = get_state_dict(plain, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=payload["path"], no_dist=True)
    set_state_dict(plain, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = {k: v.clone() for k, v in plain.state_dict().items()}
    M = payload.get("M", 8)
    for step in range(payload["s"], payload["s"] + payload["t"]):
        grads = []
        for m in range(M):
            plain.zero_grad(set_to_none=True)
            zm.loss_of(plain, zm.batch(step, m)).div(M).backward()
            grads.append([q.grad for q in plain.parameters()])
        for i, q in enumerate(plain.parameters()):
            gs = [g[i] for g in grads]
            q.grad = None if gs[0] is None else sc.tree(gs)
        opt.step()
        opt.zero_grad()
    if "plain_path" in payload:  # and the other direction: a checkpoint written by DCP's own tools
        msd, osd = get_state_dict(plain, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=payload["plain_path"], no_dist=True)
    return dict(loaded=loaded, final=plain.state_dict(), lrs=[g["lr"] for g in opt.param_groups])


# ------------------------------------------------------------------------------------ atomicity
def _listing(path: str) -> list[str]:
    parent, name = os.path.split(path)
    return sorted(f for f in os.listdir(parent) if name in f)


def crash(payload: dict, ctx) -> dict:
    """Save A; a second save crashes on rank 1 in the middle of writing its file; then the states
    a killed process leaves (a stale temp dir; the old checkpoint renamed aside mid-publish)."""
    payload = _shared(payload, ctx)
    path = payload["path"]
    model, opt = _build(0, payload, ctx)
    _train_step(model, opt, 0, payload, ctx)
    ckpt.save(path, model, opt)
    a = fsdp_core.full_state_dict(model)
    _train_step(model, opt, 1, payload, ctx)
    b = fsdp_core.full_state_dict(model)
    out: dict = {}

    original = _ckpt_dcp.Writer.write_data

    def crashing(self, plan, planner):
        fut = original(self, plan, planner)
        fut.wait()
        for f in os.listdir(self.path):
            if f.startswith(f"__{ctx.rank}_"):
                fp = os.path.join(self.path, f)
                os.truncate(fp, os.path.getsize(fp) // 2)
        raise RuntimeError("simulated crash in the middle of writing")

    if ctx.rank == 1:
        _ckpt_dcp.Writer.write_data = crashing
    try:
        ckpt.save(path, model, opt)
        out["crash_error"] = ("no error", "")
    except Exception as e:  # noqa: BLE001 - inspected by the test
        out["crash_error"] = (type(e).__name__, str(e))
    finally:
        _ckpt_dcp.Writer.write_data = original
    dist.barrier(group=ctx.group)
    out["after_crash"] = _listing(path)
    out["a_intact"] = _load_equals(path, a, payload, ctx)

    # A process killed mid-save leaves its temp dir behind: harmless, removed by the next save.
    if ctx.rank == 0:
        stale = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-stale")
        os.makedirs(stale)
        with open(os.path.join(stale, "__0_0.distcp"), "wb") as f:
            f.write(b"half a file")
    dist.barrier(group=ctx.group)
    out["stale_a_intact"] = _load_equals(path, a, payload, ctx)

    # Killed between the two fallback renames: the old checkpoint sits under .old-*.
    if ctx.rank == 0:
        os.rename(path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-deadbeef"))
    dist.barrier(group=ctx.group)
    out["mid_publish_listing"] = _listing(path)
    out["mid_publish_a_intact"] = _load_equals(path, a, payload, ctx)

    ckpt.save(path, model, opt)   # recovers, cleans up, publishes B
    out["after_resave"] = _listing(path)
    out["b_loaded"] = _load_equals(path, b, payload, ctx)
    return out


def _load_equals(path, want: dict, payload, ctx) -> bool:
    model, opt = _build(9, payload, ctx)
    ckpt.load(path, model, opt)
    got = fsdp_core.full_state_dict(model)
    return all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------- errors
def errors(payload: dict, ctx) -> dict:
    """Every broken checkpoint or mismatched model ends in an exception on every rank; returns
    (type, message) per case from this rank."""
    payload = _shared(payload, ctx)
    root = payload["root"]
    good = os.path.join(root, "good")
    model, opt = _build(0, payload, ctx)
    _train_step(model, opt, 0, payload, ctx)
    ckpt.save(good, model, opt)
    ckpt.save(os.path.join(root, "no_optim"), model)
    out: dict = {}

    def variant(name, damage):
        """A copy of the good checkpoint, damaged by rank 0."""
        d = os.path.join(root, name)
        if ctx.rank == 0:
            shutil.copytree(good, d)
            damage(d)
        dist.barrier(group=ctx.group)
        return d

    def attempt(name, fn):
        try:
            fn()
            out[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001
            out[name] = (type(e).__name__, str(e))

    def truncate(d, f="__1_0.distcp"):
        os.truncate(os.path.join(d, f), os.path.getsize(os.path.join(d, f)) - 7)

    def flip(d, f="__1_0.distcp"):
        fp = os.path.join(d, f)
        data = bytearray(open(fp, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(fp, "wb").write(bytes(data))

    def fresh(**kw):
        return _build(9, payload, ctx, **kw)

    truncated = variant("truncated", truncate)
    corrupt = variant("corrupt", flip)
    bad_meta = variant("bad_meta", lambda d: truncate(d, ".metadata"))
    bad_manifest = variant("bad_manifest", lambda d: truncate(d, ckpt.MANIFEST))
    plain_trunc = variant("plain_truncated", lambda d: (os.remove(os.path.join(d, ckpt.MANIFEST)), truncate(d)))
    missing_file = variant("missing_file", lambda d: os.remove(os.path.join(d, "__1_0.distcp")))
    attempt("missing_path", lambda: ckpt.load(os.path.join(root, "nope"), *fresh()))
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    attempt("not_a_checkpoint", lambda: ckpt.load(os.path.join(root, "empty"), *fresh()))
    attempt("truncated", lambda: ckpt.load(truncated, *fresh()))
    attempt("corrupt", lambda: ckpt.load(corrupt, *fresh()))
    attempt("bad_metadata", lambda: ckpt.load(bad_meta, *fresh()))
    attempt("bad_manifest", lambda: ckpt.load(bad_manifest, *fresh()))
    attempt("plain_dcp_truncated", lambda: ckpt.load(plain_trunc, *fresh()))
    attempt("missing_file", lambda: ckpt.load(missing_file, *fresh()))

    def other_shapes():
        m = zm.build_zoo(9)
        m.blocks[1].tiny = nn.Parameter(torch.zeros(5))
        m = sc._shard(m, dict(payload, group=ctx.group))
        ckpt.load(good, m, sc._opt("adamw", list(m.named_parameters())))

    attempt("other_shapes", other_shapes)
    attempt("missing_keys", lambda: ckpt.load(good, *fresh(n_blocks=3)))
    attempt("unexpected_keys", lambda: ckpt.load(good, *fresh(n_blocks=1)))

    def one_group():
        m, _ = fresh()
        ckpt.load(good, m, torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False))

    attempt("other_param_groups", one_group)
    attempt("no_optimizer_state", lambda: ckpt.load(os.path.join(root, "no_optim"), *fresh()))

    def meta_model():
        m = sc._shard(zm.build_zoo(device="meta"), dict(payload, group=ctx.group))
        ckpt.load(good, m)

    attempt("meta_model", meta_model)
    attempt("replace_non_checkpoint", lambda: ckpt.save(root, model, opt))
    # After all that, the group is healthy and the good checkpoint loads.
    out["healthy"] = _load_equals(good, fsdp_core.full_state_dict(model), payload, ctx)
    return out


# ---------------------------------------------------------------------------- pretrained weights
def pretrained(payload: dict, ctx) -> dict:
    """The FSDP2 guide's flow: all ranks build on meta and shard; rank 0 alone holds the full
    state dict; weights are scattered one unit at a time. Records every tensor each rank sends
    or receives through scatter/broadcast."""
    p = dict(payload, group=ctx.group)
    eager = sc._shard(zm.build_zoo(5), dict(p))
    model = sc._shard(zm.build_zoo(device="meta"), dict(p))
    model.to_empty(device="cpu")
    with torch.no_grad():  # non-persistent buffers are not in a state dict: initialise them
        for i, b in enumerate(model.blocks):
            b.phase.copy_(torch.sin(torch.arange(b.phase.numel()) * (i + 1) / torch.pi))
    sd = zm.build_zoo(5).state_dict() if ctx.rank == 0 else None
    seen: list[tuple[str, int]] = []
    real_scatter, real_broadcast = dist.scatter, dist.broadcast

    def scatter(tensor, scatter_list=None, *a, **kw):
        seen.append(("scatter_recv", tensor.numel()))
        if scatter_list:
            seen.append(("scatter_send", sum(t.numel() for t in scatter_list)))
        return real_scatter(tensor, scatter_list, *a, **kw)

    def broadcast(tensor, *a, **kw):
        seen.append(("broadcast", tensor.numel()))
        return real_broadcast(tensor, *a, **kw)

    dist.scatter, dist.broadcast = scatter, broadcast
    try:
        fsdp_core.load_full_state_dict(model, sd, src_rank=0)
    finally:
        dist.scatter, dist.broadcast = real_scatter, real_broadcast
    a, b = fsdp_core.full_state_dict(eager), fsdp_core.full_state_dict(model)
    units = fsdp_core.units_of(model)
    out = dict(
        equal=a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        buffers=all(torch.equal(x, y) for x, y in zip(eager.buffers(), model.buffers())),
        pad=sc._padding_bad(model, None), seen=seen,
        shard_numels=[u.layout.shard_numel for u in units],
        padded_numels=[u.layout.padded_numel for u in units],
        model_numel=sum(v.numel() for v in a.values()),
        buffer_numels=[x.numel() for x in model.buffers()],
    )
    # Mistakes are refused on every rank, not left hanging in a scatter.
    errs = {}
    for name, bad in (("src_passes_none", None),
                      ("wrong_shape", dict(zm.build_zoo(5).state_dict(), **{"blocks.0.fc.weight": torch.zeros(2, 2)}))):
        try:
            fsdp_core.load_full_state_dict(model, bad if ctx.rank == 0 else None, src_rank=0)
            errs[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001
            errs[name] = (type(e).__name__, str(e))
    out["errors"] = errs
    return out

"""Rank-side functions for the sharder's multi-rank tests (run through the rank pool as
``fn(payload, ctx)``; module-level so they pickle by reference). Each returns plain data that
the test asserts on in the parent process; every rank computes the same small reference."""
from __future__ import annotations

import functools

import copy

import torch

import fsdp_core
from fsdp_core import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
import sharder_models as zm


def tree(xs):
    """The definition (DESIGN section 3): balanced pairwise sum in order."""
    return xs[0] if len(xs) == 1 else tree(xs[: len(xs) // 2]) + tree(xs[len(xs) // 2:])


def _opt(kind: str, named):
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n)]
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=False)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=1e-2, foreach=False)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    raise ValueError(kind)


def _shard(model, p):
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if p.get("bf16") else None
    off = CPUOffloadPolicy() if p.get("offload") else None
    for m in zm.units(model, p.get("wrap", "per_block")):
        fully_shard(m, mesh=p["group"], deterministic=p.get("det", False), mp_policy=mp,
                    offload_policy=off, reshard_after_forward=p.get("reshard", True))
    return model


def _padding_bad(model, opt) -> list[str]:
    return [name for name, v in fsdp_core.padding_views(model, opt)
            if v.numel() and v.view(torch.int32 if v.element_size() == 4 else torch.int16).any()]


def _reassembly_ok(model, full: dict) -> bool:
    """This rank's local pieces equal the matching slices of the full (gathered) params."""
    for name, p in model.named_parameters():
        unit, i = p._fsdp_unit, p._fsdp_index
        piece = unit.pieces[i]
        want = full[name].reshape(-1)[piece.param_start: piece.param_start + piece.real_numel]
        if not torch.equal(p.detach()[: piece.real_numel], want):
            return False
    return True


def _diffs(sd: dict, ref: dict) -> dict:
    assert sd.keys() == ref.keys(), f"keys differ: {sorted(sd.keys() ^ ref.keys())}"
    out = {}
    for k in ref:
        a, b = sd[k], ref[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        out[k] = (float((a.double() - b.double()).abs().max()) if a.numel() else 0.0, bool(torch.equal(a, b)))
    return out


def _cast_copy(model):
    """Reference compute copy for bf16: parameters cast, buffers left as they are."""
    cm = copy.deepcopy(model)
    for q in cm.parameters():
        q.data = q.data.to(torch.bfloat16)
    return cm


def parity(payload: dict, ctx) -> dict:
    """Fast or deterministic training of the zoo against a single-process reference.

    fast: rank r's local batch is micro-batches [r*k, (r+1)*k) concatenated; the reference trains
    on all M concatenated. deterministic: k micro-batches per rank with gradient sync on the
    last; the reference sums the M micro-batch gradients with ``tree`` and divides by W."""
    p = dict(payload, group=ctx.group)
    W, r, M, steps = ctx.world_size, ctx.rank, payload.get("M", 8), payload.get("steps", 4)
    k = M // W
    opt_kind = payload.get("opt", "sgd")
    reuse = payload.get("reuse", True)
    ref = zm.build_zoo(payload.get("seed", 0), reuse=reuse)
    model = _shard(zm.build_zoo(payload.get("seed", 0), reuse=reuse,
                                checkpoint=payload.get("act_ckpt", False)), p)
    names = [n for n, _ in model.named_parameters()]
    opt = _opt(opt_kind, list(model.named_parameters()))
    ref_opt = _opt(opt_kind, list(ref.named_parameters()))
    bf16 = payload.get("bf16", False)
    records = []
    bad0 = _padding_bad(model, opt)
    for step in range(steps):
        mbs = [zm.batch(step, m) for m in range(M)]
        # ---- sharded
        if payload.get("det"):
            for i in range(k):
                model.set_requires_gradient_sync(i == k - 1)
                (zm.loss_of(model, mbs[r * k + i]) / k).backward()
        else:
            local = mbs[r * k:(r + 1) * k]
            b = (torch.cat([x for x, _ in local]), torch.cat([y for _, y in local]))
            zm.loss_of(model, b).backward()
        pad_after_reduce = _padding_bad(model, None)
        if payload.get("clip"):
            fsdp_core.clip_grad_norm_(model, payload["clip"])
        opt.step()
        pad_after_step = _padding_bad(model, opt)
        opt.zero_grad()
        # ---- reference
        ref_opt.zero_grad(set_to_none=True)
        cm = _cast_copy(ref) if bf16 else ref
        if payload.get("det"):
            grads = []
            for mb in mbs:
                cm.zero_grad(set_to_none=True)
                (zm.loss_of(cm, mb) / k).backward()
                grads.append([q.grad.float() if q.grad is not None else None for q in cm.parameters()])
            for i, q in enumerate(ref.parameters()):
                gs = [g[i] for g in grads]
                q.grad = None if gs[0] is None else tree(gs) / W
        else:
            b = (torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs]))
            zm.loss_of(cm, b).backward()
            if bf16:
                for q, c in zip(ref.parameters(), cm.parameters()):
                    q.grad = None if c.grad is None else c.grad.float()
        if payload.get("clip"):
            torch.nn.utils.clip_grad_norm_(ref.parameters(), payload["clip"], foreach=False)
        ref_opt.step()
        full = fsdp_core.full_state_dict(model)
        records.append(dict(step=step, diffs=_diffs(full, ref.state_dict()), pad_reduce=pad_after_reduce,
                            pad_step=pad_after_step, reassembled=_reassembly_ok(model, full)))
    return dict(names=names, ref_names=[n for n, _ in ref.named_parameters()], pad_init=bad0, records=records)


def accumulation(payload: dict, ctx) -> dict:
    """k micro-batches with set_requires_gradient_sync vs one local batch of k times the size."""
    k = payload["k"]
    a = _shard(zm.build_zoo(1), dict(payload, group=ctx.group))
    b = _shard(zm.build_zoo(1), dict(payload, group=ctx.group))
    mbs = [zm.batch(0, ctx.rank * k + i) for i in range(k)]
    for i, mb in enumerate(mbs):
        a.set_requires_gradient_sync(i == k - 1)
        (zm.loss_of(a, mb) / k).backward()
    zm.loss_of(b, (torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs]))).backward()
    ga = {n: q.grad.clone() for n, q in a.named_parameters() if q.grad is not None}
    gb = {n: q.grad.clone() for n, q in b.named_parameters() if q.grad is not None}
    return dict(keys_a=sorted(ga), keys_b=sorted(gb),
                max_diff=max(float((ga[n] - gb[n]).abs().max()) if ga[n].numel() else 0.0 for n in ga))


def meta_init(payload: dict, ctx) -> dict:
    """Build on meta, shard, materialise with the same init: bitwise equal to eager."""
    p = dict(payload, group=ctx.group)
    eager = _shard(zm.build_zoo(3), dict(p))
    meta = _shard(zm.build_zoo(device="meta"), dict(p))
    fsdp_core.materialize_meta(meta, device="cpu", init_fn=lambda m: zm.init_zoo(m, 3))
    a, b = fsdp_core.full_state_dict(eager), fsdp_core.full_state_dict(meta)
    bufs_equal = all(torch.equal(x, y) for x, y in zip(eager.buffers(), meta.buffers()))
    # One training step on each must agree bitwise too (the shards are live, hooks work).
    for m in (eager, meta):
        zm.loss_of(m, zm.batch(0, ctx.rank)).backward()
    grads_equal = all(torch.equal(x.grad, y.grad) for x, y in zip(eager.parameters(), meta.parameters())
                      if x.grad is not None)
    return dict(equal=all(torch.equal(a[k], b[k]) for k in a), keys=a.keys() == b.keys(),
                buffers=bufs_equal, grads=grads_equal, pad=_padding_bad(meta, None))


def meta_init_missing_buffer(payload: dict, ctx) -> str:
    """An init_fn that forgets the non-persistent buffer must be refused, naming it."""
    meta = _shard(zm.build_zoo(device="meta"), dict(payload, group=ctx.group))

    def forgetful(m):
        with torch.no_grad():
            for q in m.parameters():
                q.fill_(0.1)
            for b in m.blocks:
                b.scale.fill_(1.0)  # phase (non-persistent) forgotten
    try:
        fsdp_core.materialize_meta(meta, device="cpu", init_fn=forgetful)
    except RuntimeError as e:
        return str(e)
    return "no error"


_KEEP_ALIVE: list = []


def record_error(out: dict, name: str, fn) -> None:
    """Run ``fn``; ``out[name]`` = (exception type name, message), or ("no error", "")."""
    try:
        fn()
        out[name] = ("no error", "")
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        out[name] = (type(e).__name__, str(e))


def errors(payload: dict, ctx) -> dict:
    """Each user mistake ends in a clear exception; returns type and message per case."""
    import torch.nn as nn
    out = {}
    attempt = functools.partial(record_error, out)

    g = ctx.group

    def mixed_devices():
        m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
        fully_shard(m, mesh=g)

    def tied_across_units():
        m = zm.build_zoo(0)
        fully_shard(m.emb, mesh=g)   # emb.weight is tied to head.weight, which is outside emb
        fully_shard(m, mesh=g)

    def forward_on_meta():
        m = _shard(zm.build_zoo(device="meta"), dict(payload, group=g))
        m(zm.batch(0, 0)[0])

    def already_sharded():
        m = nn.Linear(2, 2)
        fully_shard(m, mesh=g)
        fully_shard(m, mesh=g)

    def outer_first():
        m = zm.build_zoo(0)
        fully_shard(m, mesh=g)
        fully_shard(m.blocks[0], mesh=g)

    def sd_missing():
        m = _shard(zm.build_zoo(0), dict(payload, group=g))
        sd = fsdp_core.full_state_dict(m)
        sd.pop("blocks.0.fc.weight")
        sd["bogus.weight"] = torch.zeros(1)
        fsdp_core.load_full_state_dict(m, sd)

    def sd_shape():
        m = _shard(zm.build_zoo(0), dict(payload, group=g))
        sd = fsdp_core.full_state_dict(m)
        sd["blocks.1.fc.weight"] = torch.zeros(3, 3)
        fsdp_core.load_full_state_dict(m, sd)

    def not_a_module():
        fully_shard(torch.zeros(3), mesh=g)

    def container():
        fully_shard(nn.ModuleDict({"a": nn.Linear(2, 2)}), mesh=g)

    def det_grad_sync_odd():
        m = _shard(zm.build_zoo(0), dict(payload, group=g, det=True))
        _KEEP_ALIVE.append(m)  # an aborted model that outlives its case must not disturb the next
        for i in range(3):  # 3 micro-batches per rank: not a power of two
            m.set_requires_gradient_sync(i == 2)
            zm.loss_of(m, zm.batch(0, i)).backward()

    for fn in (mixed_devices, tied_across_units, forward_on_meta, already_sharded, outer_first,
               sd_missing, sd_shape, not_a_module, container, det_grad_sync_odd):
        attempt(fn.__name__, fn)
    return out


def roundtrip(payload: dict, ctx) -> dict:
    """full_state_dict -> load_full_state_dict into a differently initialised sharded model."""
    a = _shard(zm.build_zoo(0), dict(payload, group=ctx.group))
    b = _shard(zm.build_zoo(9), dict(payload, group=ctx.group))
    sd = fsdp_core.full_state_dict(a)
    fsdp_core.load_full_state_dict(b, sd)
    sd_b = fsdp_core.full_state_dict(b)
    plain = zm.build_zoo(0).state_dict()
    return dict(same=all(torch.equal(sd[k], sd_b[k]) for k in sd),
                keys=list(sd) == list(plain), shapes=all(sd[k].shape == plain[k].shape for k in sd),
                plain_equal=all(torch.equal(sd[k], plain[k]) for k in sd), pad=_padding_bad(b, None))


def unshard_api(payload: dict, ctx) -> dict:
    m = _shard(zm.build_zoo(0), dict(payload, group=ctx.group))
    blk = m.blocks[0]
    before = tuple(blk.fc.weight.shape)
    blk.unshard()
    during = tuple(blk.fc.weight.shape)
    equal = torch.equal(blk.fc.weight.detach(), zm.build_zoo(0).blocks[0].fc.weight.detach())
    blk.reshard()
    after = tuple(blk.fc.weight.shape)
    handle = blk.unshard(async_op=True)  # FSDP2's async form: wait() completes it
    in_flight = blk._fsdp_unit.state.value
    handle.wait()
    async_equal = torch.equal(blk.fc.weight.detach(), zm.build_zoo(0).blocks[0].fc.weight.detach())
    blk.reshard()
    return dict(before=before, during=during, after=after, equal=equal, in_flight=in_flight,
                async_equal=async_equal, after_async=tuple(blk.fc.weight.shape),
                cls=type(m).__name__, is_fsdp=isinstance(m, fsdp_core.FSDPModule))


class _Chain(torch.nn.Module):
    """Blocks run in the order ``self.route`` names (set per step): a data-dependent order."""

    def __init__(self, n: int = 4, d: int = 16):
        super().__init__()
        self.emb = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh())
                                          for _ in range(n))
        self.route = list(range(n))

    def forward(self, x):
        x = self.emb(x)
        for i in self.route:
            x = self.blocks[i](x)
        return x.square().mean()


def prefetch(payload: dict, ctx) -> dict:
    """The same training with prefetch on and off, step by step over ``payload["routes"]``:
    gathers per step (sync / async), unit states after each step, and bitwise equality."""
    import fsdp_core._collectives as C
    from fsdp_core._flat_param import UNSHARDED_BYTES, ShardState
    counts = {"sync": 0, "async": 0}
    orig = C.all_gather_flat

    def counting(out, shard, group, *, async_op=False):
        counts["async" if async_op else "sync"] += 1
        return orig(out, shard, group, async_op=async_op)

    C.all_gather_flat = counting
    try:
        models, opts = [], []
        for on in (True, False):
            torch.manual_seed(0)
            m = _Chain()
            for b in m.blocks:
                fully_shard(b, mesh=ctx.group, deterministic=payload.get("det", False))
            fully_shard(m, mesh=ctx.group, deterministic=payload.get("det", False))
            m.set_prefetch(on)
            models.append(m)
            opts.append(torch.optim.AdamW(m.parameters(), lr=1e-2))
        steps = []
        for step, route in enumerate(payload["routes"]):
            g = torch.Generator().manual_seed(100 * step + ctx.rank)
            x = torch.randn(4, 16, generator=g)
            rec = {}
            for m, opt, key in zip(models, opts, ("on", "off")):
                m.route = route
                counts.update({"sync": 0, "async": 0})
                UNSHARDED_BYTES.reset_peak()
                base = UNSHARDED_BYTES.now  # the process-wide count: other models may hold some
                loss = m(x)
                loss.backward()
                opt.step()
                opt.zero_grad()
                units = fsdp_core.units_of(m)
                rec[key] = dict(
                    loss=loss.item(), gathers=dict(counts),
                    left=[u.module_name for u in units
                          if u.state is not ShardState.SHARDED or u.prefetched or u._pending is not None],
                    peak=UNSHARDED_BYTES.peak - base, now=UNSHARDED_BYTES.now - base)
            on_sd, off_sd = (fsdp_core.full_state_dict(m) for m in models)
            rec["equal"] = all(torch.equal(on_sd[k], off_sd[k]) for k in on_sd)
            steps.append(rec)
        return dict(steps=steps)
    finally:
        C.all_gather_flat = orig


def reduction_order(payload: dict, ctx) -> dict:
    """Fast mode: what is alive when each unit's reduction starts, whether it is left in flight,
    and whether every shard gradient is in place when ``backward()`` returns."""
    import fsdp_core._collectives as C
    import fsdp_core._grad_reduce as G
    from fsdp_core._flat_param import FlatUnit, ShardState
    torch.manual_seed(0)
    m = _Chain()
    for b in m.blocks:
        fully_shard(b, mesh=ctx.group)
    fully_shard(m, mesh=ctx.group)
    units = fsdp_core.units_of(m)
    seen, orig = [], FlatUnit._reduce

    def reduce(self, flat, had_grad):
        seen.append(dict(sharded=self.state is ShardState.SHARDED,
                         unsharded_grads=sum(p.grad is not None for u in units
                                             for p in (u.unsharded_params or []))))
        orig(self, flat, had_grad)
        seen[-1]["in_flight"] = any(u is self and isinstance(p, C.Pending) for u, p, _ in G._in_flight)

    FlatUnit._reduce = reduce
    try:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(ctx.rank))
        m(x).backward()
    finally:
        FlatUnit._reduce = orig
    return dict(seen=seen, left_in_flight=len(G._in_flight),
                grads=[p.grad is not None for p in m.parameters()])


def forward_start_gathers(payload: dict, ctx) -> list:
    """Per step, the forward's first wait on a gather: which unit waits (0 = root, 1 + i = block
    i) and which units have a gather in flight at that moment ([Note: two gathers at a pass's
    start]). ``None`` where the forward waited on no gather (it gathered synchronously)."""
    from fsdp_core._flat_param import FlatUnit, ShardState
    torch.manual_seed(0)
    m = _Chain()
    for b in m.blocks:
        fully_shard(b, mesh=ctx.group)
    fully_shard(m, mesh=ctx.group)
    units = [m._fsdp_unit] + [b._fsdp_unit for b in m.blocks]
    first: list = []
    orig = FlatUnit._wait_gather

    def wait(self):
        if not first:
            first.append((units.index(self),
                          [i for i, u in enumerate(units) if u.state is ShardState.GATHERING]))
        return orig(self)

    FlatUnit._wait_gather = wait
    seen = []
    try:
        for step in range(3):
            first.clear()
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step + ctx.rank))
            loss = m(x)
            seen.append(first[0] if first else None)
            loss.backward()
    finally:
        FlatUnit._wait_gather = orig
    return seen


def one_rank_gradients(payload: dict, ctx) -> dict:
    """[Note: one rank, nothing to reduce] at W = 1, fast mode, over two backward passes without
    zero_grad: whether each shard gradient is bitwise the reference's (the sum of both passes),
    which parameters' gradients have non-zero padding, and per parameter whether its gradient
    shares storage with another parameter's (the flat path's single buffer) or not."""
    model = _shard(zm.build_zoo(0), dict(payload, group=ctx.group))
    ref = zm.build_zoo(0)
    for step in range(2):
        b = zm.batch(step, 0)
        zm.loss_of(model, b).backward()
        zm.loss_of(ref, b).backward()
    ref_grads = dict(ref.named_parameters())
    equal, storages = {}, {}
    for name, p in model.named_parameters():
        if p.grad is None:
            equal[name] = ref_grads[name].grad is None
            continue
        n = p._fsdp_unit.pieces[p._fsdp_index].real_numel
        equal[name] = torch.equal(p.grad[:n], ref_grads[name].grad.reshape(-1))
        storages.setdefault(p.grad.untyped_storage().data_ptr(), []).append(name)
    shared = {name: len(names) > 1 for names in storages.values() for name in names}
    return dict(equal=equal, pad_bad=_padding_bad(model, None), shared=shared,
                padded={n: p._fsdp_unit.pieces[p._fsdp_index].pad_numel > 0
                        for n, p in model.named_parameters()})

"""`python -m verify.tools.timing_check`: a second, independent timing of fsdp_core against FSDP2.

Independent of `verify bench` on purpose: its own GPT (pre-LN blocks on
``F.scaled_dot_product_attention``, tied embeddings), its own processes (spawned here, not the
harness's rank pool), PyTorch's default optimizer settings (``AdamW(params, lr)``; each sharder
gets what PyTorch picks for its parameters; ``--foreach true|false`` makes them the same), and alternating blocks of steps instead of
step-by-step interleaving. Each rank times ``--rounds`` rounds of ``--steps`` steps per sharder,
alternating which goes first; the figure is the median round time ours/FSDP2.

    python -m verify.tools.timing_check --world-size 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fsdp_core
from verify.ranks.rank import keep_on_loopback, open_store, private_store_dir


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def _build(kind: str, args, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(args.vocab, args.width, args.layers, args.seq)
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        for blk in model.blocks:
            fsdp_core.fully_shard(blk)
        fsdp_core.fully_shard(model)
    foreach = {"default": None, "true": True, "false": False}[args.foreach]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)


def _rank(rank: int, args, store_path: str, out) -> None:
    torch.set_num_threads(1)
    keep_on_loopback()          # no listener on the network: a file store, gloo on loopback
    dist.init_process_group("gloo", store=open_store(store_path), rank=rank,
                            world_size=args.world_size)
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    sharders = {k: _build(k, args) for k in ("fsdp_core", "fsdp2")}

    def steps(kind: str, n: int) -> float:
        model, opt = sharders[kind]
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(n):
            batch = data[i % len(data)]
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        dist.barrier()
        return time.perf_counter() - t0

    for kind in sharders:  # warm-up
        steps(kind, 2)
    rounds = {k: [] for k in sharders}
    for r in range(args.rounds):
        order = ("fsdp_core", "fsdp2") if r % 2 == 0 else ("fsdp2", "fsdp_core")
        for kind in order:
            rounds[kind].append(steps(kind, args.steps))
    if rank == 0:
        out.put({k: statistics.median(v) / args.steps for k, v in rounds.items()})
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.tools.timing_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--foreach", choices=("default", "true", "false"), default="default",
                    help="AdamW's foreach: PyTorch's default picks foreach for fsdp_core's plain "
                         "tensors and the per-tensor loop for FSDP2's DTensors; true/false give "
                         "both sharders the same implementation")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store_dir = private_store_dir("timing")      # mode 0700
    try:
        store_path = os.path.join(store_dir, "store")
        procs = [ctx.Process(target=_rank, args=(r, args, store_path, out))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        res = out.get()
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    ratio = round(res["fsdp_core"] / res["fsdp2"], 2)  # judged as printed
    print(f"W={args.world_size}: fsdp_core {1e3 * res['fsdp_core']:.1f} ms/step, FSDP2 "
          f"{1e3 * res['fsdp2']:.1f} ms/step, ours/FSDP2 {ratio:.2f} (median of {args.rounds} "
          f"rounds of {args.steps} steps, AdamW foreach={args.foreach})")
    return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

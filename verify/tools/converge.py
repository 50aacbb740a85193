"""`python -m verify converge`: does a sharded run learn like the unsharded one on real text?

The corpus is one every machine has: the bytes of Python's own standard-library sources (the
top-level `*.py` files under `sysconfig.get_paths()["stdlib"]`, sorted by name, concatenated,
capped), a byte-level vocabulary of 256. The last tenth is held out.

The model is the nanoGPT-style family (verify/scenarios/gpt.py), AdamW. For each mode, the same
model, data and optimizer train twice for the same steps:
- sharded: fsdp_core at W ranks of a rank pool (per-block units), the harness's protocol
  ([Note: the training protocol] in verify/case/train.py);
- unsharded: plain single-process PyTorch. fast: one forward/backward on the whole global
  batch (what a user runs without a sharder); deterministic: the M micro-batch gradients summed
  by the balanced tree, which deterministic mode promises to equal bit for bit.
Per step it keeps both losses; at the end it evaluates both final models on the held-out text.
`verify.report.write_convergence_report` renders the table and the plot.
"""
from __future__ import annotations

import contextlib
import hashlib
import platform
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from verify.case.train import Trainer
from verify.compare import compare_params
from verify.ranks.pool import RankPool
from verify.report import write_convergence_report
from verify.scenarios import (Scenario, _derive_seed, build_model, loss_fn, make_optimizer,
                              step_loss, tree)
from verify.sharders import DEFAULT_SHARDER

__all__ = ["load_corpus", "converge_scenario", "corpus_batch", "converge_case", "run_unsharded",
           "run_converge"]

HOLDOUT = 0.1
EVAL_BATCHES = 16


def load_corpus(max_bytes: int = 2_000_000) -> tuple[bytes, dict]:
    """The standard library's top-level sources, sorted by name, concatenated, cut at
    ``max_bytes``; and where they came from (for the report)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no *.py files under {root}: cannot build the corpus")
    chunks, total, used = [], 0, 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        used += 1
    corpus = b"".join(chunks)[:max_bytes]
    info = dict(root=str(root), files=used, bytes=len(corpus), python=platform.python_version(),
                sha256=hashlib.sha256(corpus).hexdigest()[:16])
    return corpus, info


def converge_scenario(*, mode: str, world_size: int, steps: int, width: int, layers: int,
                      seq: int, micro_batches: int, micro_batch_size: int, lr: float,
                      seed: int) -> Scenario:
    model = dict(vocab_size=256, n_embd=width, n_head=max(1, width // 16), n_layer=layers,
                 block_size=seq, tied=True, bias=True)
    s = Scenario(family="gpt", model=tuple(sorted(model.items())), world_size=world_size,
                 mode=mode, optimizer="adamw", lr=lr, weight_decay=0.1, steps=steps,
                 micro_batches=micro_batches, micro_batch_size=micro_batch_size, seed=seed)
    s.validate()
    return s


def corpus_batch(data: torch.Tensor, s: Scenario, step: int, micro: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global micro-batch ``micro`` of ``step``: micro_batch_size windows of block_size + 1
    bytes at offsets drawn from (seed, step, micro) alone, so every rank and the unsharded run
    draw the same ones."""
    T = s.model_kwargs["block_size"]
    gen = torch.Generator().manual_seed(_derive_seed(s.seed, "corpus", step, micro))
    starts = torch.randint(len(data) - T - 1, (s.micro_batch_size,), generator=gen)
    seq = torch.stack([data[i: i + T + 1] for i in starts.tolist()]).long()  # (n, T+1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _cat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _train_data(corpus: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    cut = int(len(data) * (1 - HOLDOUT))
    return data[:cut], data[cut:]


# -- rank side ----------------------------------------------------------------------------------

def converge_case(payload: dict, ctx) -> dict:
    """Train ``payload["scenario"]`` sharded by ``payload["sharder"]`` (default fsdp_core) on
    the corpus through the one training protocol (`verify.case.train.Trainer`); return the step
    losses and (rank 0) the final full parameters."""
    s = Scenario.from_json(payload["scenario"])
    train, _ = _train_data(payload["corpus"])
    trainer = Trainer(payload.get("sharder", DEFAULT_SHARDER), s, ctx,
                      batch_fn=lambda step, m: corpus_batch(train, s, step, m))
    losses, times = [], []
    for step in range(s.steps):
        t0 = time.perf_counter()
        loss = trainer.train_step(step)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    full = trainer.sharder.full_parameters(trainer.model, trainer.optimizer)
    return dict(losses=losses, step_s=times, params=full if ctx.rank == 0 else None)


# -- parent side --------------------------------------------------------------------------------

def run_unsharded(s: Scenario, corpus: bytes) -> dict:
    """The same training without a sharder, in this process (see the module docstring)."""
    train, _ = _train_data(corpus)
    model = build_model(s)
    opt = make_optimizer(s, model.named_parameters())
    losses, times = [], []
    for step in range(s.steps):
        batches = [corpus_batch(train, s, step, m) for m in range(s.micro_batches)]
        t0 = time.perf_counter()
        if s.mode == "deterministic":
            params = [p for p in model.parameters() if p.requires_grad]
            grads, per_micro = [], []
            for batch in batches:
                loss_m = loss_fn(s, model, batch)
                grads.append(torch.autograd.grad(loss_m / s.k, params))
                per_micro.append(loss_m.detach())
            for i, p in enumerate(params):
                p.grad = tree([g[i] for g in grads]) / s.world_size
            loss = step_loss(per_micro)
        else:
            loss = loss_fn(s, model, _cat(batches))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return dict(losses=losses, step_s=times, params={n: p.detach().clone()
                                                     for n, p in model.state_dict().items()})


@torch.no_grad()
def held_out_loss(s: Scenario, corpus: bytes, params: dict) -> float:
    """Mean loss of a model holding ``params`` on EVAL_BATCHES fixed held-out batches."""
    _, held = _train_data(corpus)
    model = build_model(s)
    model.load_state_dict(params)
    model.eval()
    total = 0.0
    for i in range(EVAL_BATCHES):
        x, y = corpus_batch(held, s, -1, i)
        logits = model(x).float()
        total += float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)))
    return total / EVAL_BATCHES


def _compare(a: Sequence[float], b: Sequence[float]) -> dict:
    diffs = [abs(x - y) for x, y in zip(a, b)]
    bitwise = sum(torch.equal(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
                  for x, y in zip(a, b))
    return dict(max_abs_loss_diff=max(diffs), bitwise_steps=int(bitwise))


def run_converge(*, world_size: int = 4, steps: int = 200, width: int = 64, layers: int = 2,
                 seq: int = 32, micro_batches: int = 8, micro_batch_size: int = 2,
                 lr: float = 3e-3, seed: int = 0, corpus_bytes: int = 2_000_000,
                 modes: Sequence[str] = ("fast", "deterministic"), out_dir="reports",
                 timeout_s: float = 1800.0, pool=None) -> list:
    """Run every mode sharded and unsharded, write OUT/convergence.md/.png/.json; return the
    report's paths. Raises RuntimeError when a sharded run fails. ``pool``: a rank pool (or
    torchrun context) to use instead of starting one."""
    torch.set_num_threads(1)
    corpus, info = load_corpus(corpus_bytes)
    print(f"corpus: {info['bytes']:,} bytes from {info['files']} files under {info['root']} "
          f"(Python {info['python']}, sha256 {info['sha256']})", flush=True)
    runs = []
    own = RankPool(world_size, timeout_s=timeout_s) if pool is None else contextlib.nullcontext(pool)
    with own as pool:
        for mode in modes:
            s = converge_scenario(mode=mode, world_size=world_size, steps=steps, width=width,
                                  layers=layers, seq=seq, micro_batches=micro_batches,
                                  micro_batch_size=micro_batch_size, lr=lr, seed=seed)
            t0 = time.perf_counter()
            result = pool.run(world_size, converge_case,
                              {"scenario": s.to_json(), "corpus": corpus}, timeout_s=timeout_s)
            if not result.ok:
                raise RuntimeError(f"sharded {mode} run failed:\n{result.error}")
            sharded_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            plain = run_unsharded(s, corpus)
            plain_s = time.perf_counter() - t0
            shard = result.values[0]
            params = {k: v for k, v in shard["params"].items() if k in plain["params"]}
            pdiff = compare_params(params, plain["params"])
            run = dict(mode=mode, scenario=s.to_json(), world_size=world_size,
                       sharded=shard["losses"], unsharded=plain["losses"],
                       sharded_wall_s=sharded_s, unsharded_wall_s=plain_s,
                       sharded_step_s=sorted(shard["step_s"])[len(shard["step_s"]) // 2],
                       unsharded_step_s=sorted(plain["step_s"])[len(plain["step_s"]) // 2],
                       held_out_sharded=held_out_loss(s, corpus, shard["params"]),
                       held_out_unsharded=held_out_loss(s, corpus, plain["params"]),
                       final_params_bitwise=pdiff.bitwise, final_params_max_abs=pdiff.max_abs,
                       **_compare(shard["losses"], plain["losses"]))
            runs.append(run)
            print(f"{mode}: final loss sharded {run['sharded'][-1]:.4f} vs unsharded "
                  f"{run['unsharded'][-1]:.4f}; held-out {run['held_out_sharded']:.4f} vs "
                  f"{run['held_out_unsharded']:.4f}; max |Δ loss| {run['max_abs_loss_diff']:.3g}; "
                  f"bitwise steps {run['bitwise_steps']}/{steps}; final params bitwise "
                  f"{pdiff.bitwise} (max |Δ| {pdiff.max_abs:.3g}); {sharded_s:.0f}s sharded, "
                  f"{plain_s:.0f}s unsharded", flush=True)
    config = dict(world_size=world_size, steps=steps, width=width, layers=layers, seq=seq,
                  micro_batches=micro_batches, micro_batch_size=micro_batch_size, lr=lr,
                  seed=seed, optimizer="adamw", weight_decay=0.1)
    return write_convergence_report(dict(corpus=info, config=config, runs=runs), Path(out_dir))

"""Planted adapters for the verdict tests (tests/test_verdicts.py).

`Misaligned`: correct, but every parameter lives in a flat buffer at an odd storage offset (the
way flat-parameter sharders hold them), so MKL's alignment-dependent code paths would show unless
MKL_CBWR is strict (verify/blas.py). `TwoFaults`: a last-bit fault (one element one ulp off) in
models without frozen parameters and a gross one (a parameter off by 0.5) in models with them,
so that one campaign fails with two signatures. `DeclinesDecay`: declines weight decay by name,
as an adapter of a course FSDP does. `NoScalars`: refuses 0-d parameters, as FSDP2 does.
"""
from __future__ import annotations

from typing import Optional

import torch

from verify.scenarios import build_model
from verify.sharders.ddp import DDP
from verify.sharders.fsdp_core import FsdpCore


def _into_flat_buffer(model: torch.nn.Module) -> None:
    """Every distinct parameter's data moved into one flat buffer, each at an odd offset."""
    params = list(dict.fromkeys(model.parameters()))
    total = sum(p.numel() + 2 for p in params) + 1
    buf = torch.zeros(total, dtype=torch.float32)
    at = 1
    for p in params:
        view = buf[at: at + p.numel()].view(p.shape)
        view.copy_(p.detach())
        p.data = view
        at += p.numel() + (2 if p.numel() % 2 == 0 else 1)   # the next one at an odd offset
        assert p.data.storage_offset() % 2 == 1


class Misaligned(DDP):
    name = "misaligned"

    def shard(self, model, plan, group):
        _into_flat_buffer(model)
        return super().shard(model, plan, group)


class TwoFaults(DDP):
    name = "two_faults"

    def shard(self, model, plan, group):
        self.gross = any(not p.requires_grad for p in model.parameters())
        return super().shard(model, plan, group)

    def full_parameters(self, model, optimizer):
        full = super().full_parameters(model, optimizer)
        name = next(iter(full))
        t = full[name].reshape(-1)
        if self.gross:
            t[0] += 0.5
        else:
            t[0] = torch.nextafter(t[0], torch.tensor(float("inf")))
        return full


class DeclinesDecay(DDP):
    name = "declines_decay"

    def unsupported(self, scenario) -> Optional[str]:
        return "no weight decay (declined by name)" if scenario.weight_decay else None


class NoScalars(DDP):
    name = "no_scalars"

    def unsupported(self, scenario) -> Optional[str]:
        zero_d = [n for n, p in build_model(scenario, device="meta").named_parameters() if p.dim() == 0]
        return f"refuses 0-d parameters ({', '.join(zero_d)})" if zero_d else None


class OtherKernel(DDP):
    """Correct sharding, another kernel: the first Linear wrap unit computes in float64 and
    rounds once (the reference's fp32 GEMM rounds as it accumulates)."""
    name = "other_kernel"

    def shard(self, model, plan, group):
        linear = next(m for _, m in plan.units if isinstance(m, torch.nn.Linear))

        def forward(x, m=linear):
            bias = None if m.bias is None else m.bias.double()
            return torch.nn.functional.linear(x.double(), m.weight.double(), bias).to(x.dtype)
        linear.forward = forward
        return super().shard(model, plan, group)


class FastLr(DDP):
    """Correct gradients, and Adam's steps taken with 1.5x the scenario's learning rate: every
    parameter moves by 1.5 lr where the reference moves by lr, within the 2 lr per step that the
    reported tier's physical bound admits; the replayed steps (verify/case/judge.py) see it."""
    name = "fast_lr"

    def optimizer(self, model, plan):
        opt = super().optimizer(model, plan)
        for group in opt.param_groups:
            group["lr"] *= 1.5
        return opt


class HalvesGradientsUnseen(FsdpCore):
    """fsdp_core (bf16 too) halving every gradient before the optimizer step, and giving no
    ``reduced_gradients``: only the parameters after each step show it, where the bf16 tolerance
    tier's widened atol admits a halved update element by element ([Note: the update check])."""
    name = "halves_gradients_unseen"

    def optimizer(self, model, plan):
        opt = super().optimizer(model, plan)

        def halve(o, args, kwargs):
            for group in o.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)
        opt.register_step_pre_hook(halve)
        return opt

    def reduced_gradients(self, model):
        return None


class SkewsForward(DDP):
    """Correct sharding and gradients of what it computes; the first wrap unit below the root
    adds a ramp of up to 1 along its output's last dimension (a scale or a constant would
    vanish in a following LayerNorm), from the step ``skew_from`` on (counted by an optimizer
    step hook): a forward fault, seen first in the loss."""
    name = "skews_forward"
    skew_from = 0

    def shard(self, model, plan, group):
        self.steps_done = 0
        unit = next(m for n, m in plan.units if n)
        unit.register_forward_hook(
            lambda m, args, out: out + torch.linspace(0, 1.0, out.shape[-1])
            if self.steps_done >= self.skew_from else out)
        return super().shard(model, plan, group)

    def optimizer(self, model, plan):
        opt = super().optimizer(model, plan)
        opt.register_step_post_hook(
            lambda o, args, kwargs: setattr(self, "steps_done", self.steps_done + 1))
        return opt


class SkewsForwardLater(SkewsForward):
    name = "skews_forward_later"
    skew_from = 1


try:
    from verify.sharders.deepspeed_zero import DeepSpeedZero1, DeepSpeedZero2, DeepSpeedZero3
except ImportError:   # pragma: no cover - the module imports without DeepSpeed
    DeepSpeedZero3 = None

if DeepSpeedZero3 is not None:
    class _FastLrEngine:
        """DeepSpeed ZeRO with its torch optimizer's learning rate raised 1.5x after
        ``deepspeed.initialize``: the gradients are right, the update is not, within the reported
        tier's 2 lr bound; the first step replayed from ``reduced_gradients`` sees it."""

        def shard_with_optimizer(self, model, plan, group):
            engine, opt = super().shard_with_optimizer(model, plan, group)
            for g in opt.inner.param_groups:
                g["lr"] *= 1.5
            return engine, opt

    class FastLrZero1(_FastLrEngine, DeepSpeedZero1):
        name = "fast_lr_zero1"

    class FastLrZero2(_FastLrEngine, DeepSpeedZero2):
        name = "fast_lr_zero2"

    class FastLrZero3(_FastLrEngine, DeepSpeedZero3):
        name = "fast_lr_zero3"


class ResetsAdam(DDP):
    """Correct gradients and a correct first step; after every step the optimizer's state is
    dropped on every rank (as an engine that rebuilds its optimizer each step would), so each
    later step is a fresh Adam's first step: about lr per element, within the reported tier's
    2 lr bound; the replayed steps (verify/case/judge.py) see it from step 1."""
    name = "resets_adam"

    def optimizer(self, model, plan):
        opt = super().optimizer(model, plan)
        opt.register_step_post_hook(lambda o, args, kwargs: o.state.clear())
        return opt


class SavesNoOptimizerState(DDP):
    """DDP's checkpoint without the optimizer state: the parameters load right (the `loaded`
    check passes) and the moments start from zero after the load."""
    name = "saves_no_optimizer_state"

    def load(self, path, model, optimizer):
        import os
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        model.module.load_state_dict(state["model"])


class ZeroFillsUnused(DDP):
    """Correct training, but a parameter without a gradient at the end of backward gets a zero
    one, as FSDP1 gives its unused parameters: the same training under plain SGD, and weight
    decay or momentum then step those parameters, which unsharded training leaves alone."""
    name = "zero_fills_unused"

    def shard(self, model, plan, group):
        from torch.autograd import Variable   # lazy: only this test adapter queues a callback
        model = super().shard(model, plan, group)
        params = [p for p in model.parameters() if p.requires_grad]

        def fill():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        def on_output(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: (Variable._execution_engine.queue_callback(fill), g)[1])
        model.register_forward_hook(on_output)
        return model

"""Single-process pins for the things that break bitwise equality (docs/determinism.md)."""
from __future__ import annotations

import pytest
import torch

from fsdp_core._layout import DEFAULT_ALIGN, make_layout


def test_every_unsharded_view_starts_on_a_64_byte_boundary():
    """BLAS picks kernels by address: a matmul on a misaligned view can differ in the last bit
    from the same matmul on a fresh tensor, so the layout aligns every parameter."""
    layout = make_layout([1, 7, 100, 3, 64, 0, 5], 8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        flat = torch.empty(layout.padded_numel, dtype=dtype)
        assert flat.data_ptr() % 64 == 0
        for off in layout.offsets:
            assert (flat.data_ptr() + off * flat.element_size()) % 64 == 0
    assert DEFAULT_ALIGN * 2 >= 64  # bf16/fp16: 32 elements are 64 bytes


def test_aligned_views_compute_like_fresh_tensors():
    torch.manual_seed(0)
    for o, i, b in [(1, 63, 27), (7, 33, 5), (16, 17, 9), (3, 1, 1)]:
        w, x = torch.randn(o, i), torch.randn(b, i)
        ref = torch.nn.functional.linear(x, w)
        for off in (DEFAULT_ALIGN, 2 * DEFAULT_ALIGN):
            flat = torch.zeros(o * i + 2 * off)
            flat[off: off + o * i] = w.flatten()
            got = torch.nn.functional.linear(x, flat[off: off + o * i].view(o, i))
            assert torch.equal(got, ref), (o, i, b, off)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("foreach", [False, True])
def test_optimizer_math_does_not_depend_on_the_view_split(kind, foreach):
    """The optimizer steps each rank's piece of a parameter as its own tensor, at any offset.
    Elementwise kernels must give the same bits as on the whole tensor (vectorised main loop vs
    scalar tail); this pins it for the for-loop and foreach implementations on this CPU."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    n = 1001

    def make(params):
        if kind == "sgd_momentum":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=foreach)
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(params, lr=1e-2, weight_decay=0.1, foreach=foreach)

    base = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 1e-3 for _ in range(3)]
    whole = torch.nn.Parameter(base.clone())
    opt = make([whole])
    for g in grads:
        whole.grad = g.clone()
        opt.step()
    for cuts in ([0, 5, 333, 1001], [0, 1, 2, 999, 1001], [0, 17, 500, 501, 1001]):
        flat = torch.zeros(n + 64)
        flat[3: 3 + n] = base
        pieces = [torch.nn.Parameter(flat[3 + a: 3 + b]) for a, b in zip(cuts, cuts[1:])]
        opt = make(pieces)
        for g in grads:
            for (a, b), p in zip(zip(cuts, cuts[1:]), pieces):
                p.grad = g[a:b].clone()
            opt.step()
        assert torch.equal(torch.cat([p.detach() for p in pieces]), whole.detach()), cuts


def test_tree_sum_is_not_sequential_sum():
    """The deterministic order matters: a sequential sum differs from the balanced tree."""
    from fsdp_core._collectives import tree_sum
    xs = [torch.tensor([1.0]), torch.tensor([1e8]), torch.tensor([-1e8]), torch.tensor([1.0])]
    assert float(tree_sum(xs)) == 0.0          # (1 + 1e8) + (-1e8 + 1) = 1e8 - 1e8
    assert float(((xs[0] + xs[1]) + xs[2]) + xs[3]) == 1.0

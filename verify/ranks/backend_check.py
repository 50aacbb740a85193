"""Check the communication backend before trusting a case: every torch.distributed collective a
sharder may use, on inputs whose exact results are known.

Every value below is a small integer (|x| <= 31, sums of up to 8 ranks within 256), so each sum
is exact in fp32 and bf16 and the expected result does not depend on the order the backend adds
in; any difference (one
ulp after a gather, a scaled reduction, a swapped chunk, a dropped rank) is a broken backend,
reported by name before the case's own checks run. It costs six to eight tiny collectives per
dtype the case communicates in (fp32 always, bf16 for bf16 cases): a collective torch offers
under two names (``all_gather_single`` and the deprecated ``all_gather_into_tensor``, the same
for reduce-scatter) is checked under both, since a sharder may call either.

[Note: when the check runs again]
``backend_problem`` remembers, per process group and dtype, the exact ``torch.distributed``
functions that last passed. A later case on the same group runs the check again if, on any rank,
one of those functions is no longer the same object (a planted bug, a wrapper, any monkeypatch
installed since) or the last check on that group failed; the ranks agree on that with one
all-gather of a flag. Otherwise the same functions on the same backend would only repeat the
same answer, at about a sixth of a small case's collectives.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

__all__ = ["check_backend", "backend_problem", "BackendError"]


class BackendError(RuntimeError):
    """A torch.distributed collective returned other values than the mathematics says."""


def _values(rank: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    # distinct per rank and position, exactly representable, with a sign change
    base = torch.arange(n, dtype=torch.float32, device=device)
    return (((base % 7) - 3) * (rank + 1) + rank).to(dtype)


def _expect(name: str, got: torch.Tensor, want: torch.Tensor, rank: int) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        raise BackendError(f"torch.distributed.{name} returned {got.dtype}{tuple(got.shape)} on rank {rank}, "
                           f"expected {want.dtype}{tuple(want.shape)}")
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    differ = (got.view(bits) != want.view(bits)).nonzero().flatten()
    if differ.numel():
        i = int(differ[0])
        raise BackendError(
            f"torch.distributed.{name} is broken: on rank {rank}, {differ.numel()} of {got.numel()} "
            f"elements differ from the exact result (first at index {i}: got {got[i].item()!r}, "
            f"expected {want[i].item()!r}); the case's results cannot be trusted")


# Newer names first (what the pinned torch wants called), the deprecated ones after.
_GATHERS = tuple(n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n))
_REDUCE_SCATTERS = tuple(n for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n))
KINDS = _GATHERS + _REDUCE_SCATTERS + ("all_to_all_single", "all_reduce", "broadcast", "all_gather")
# (group, dtype) -> the torch.distributed functions that passed; see [Note: when the check runs
# again]. The functions are held (not their ids), so a new wrapper can never look like an old one.
_passed: dict = {}


def _functions() -> tuple:
    return tuple(getattr(dist, name) for name in KINDS)


def backend_problem(group, device=None, *, dtypes=(torch.float32, torch.bfloat16),
                    cache: bool = True) -> "str | None":
    """``check_backend`` that never raises: the first problem as text, or None.

    Every rank runs the same sequence of collectives whatever it finds (raising on one rank
    would leave the others waiting in the next collective); each rank reports what it saw with
    its results, and the parent fails the case if any rank saw a problem."""
    funcs = _functions()
    stale = any(not cache or not _same(_passed.get((group, dt)), funcs) for dt in dtypes)
    # The ranks must agree (a wrapper may be installed on one rank only): one tiny gather of
    # the flags, through distributed_c10d's own function, which patches of the
    # torch.distributed namespace do not replace.
    if not _any_rank(stale, group, device):
        return None
    problems: list[str] = []
    check_backend(group, device, dtypes=dtypes, on_error=problems.append)
    failed = _any_rank(bool(problems), group, device)
    for dt in dtypes:
        if failed:
            _passed.pop((group, dt), None)
        else:
            _passed[(group, dt)] = funcs
    return problems[0] if problems else None


def _any_rank(flag: bool, group, device) -> bool:
    world = dist.get_world_size(group)
    mine = torch.tensor([int(flag)], dtype=torch.int32, device=device or torch.device("cpu"))
    every = torch.empty(world, dtype=torch.int32, device=mine.device)
    getattr(distributed_c10d, _GATHERS[0])(every, mine, group=group)
    return bool(every.any())


@contextlib.contextmanager
def _deprecated_ok():
    """Calling a deprecated name on purpose (to check it): without its FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        yield


def _same(a, b) -> bool:
    return a is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


@torch.no_grad()
def check_backend(group, device=None, *, dtypes=(torch.float32, torch.bfloat16), n: int = 33,
                  on_error=None) -> None:
    """Raise ``BackendError`` naming the first collective that returns wrong values (or, with
    ``on_error``, pass each error to it and carry on with the remaining collectives)."""
    def expect(name, got, want):
        try:
            _expect(name, got, want, rank)
        except BackendError as e:
            if on_error is None:
                raise
            on_error(str(e))

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = device or torch.device("cpu")
    m = n * world  # divisible by W for the scatter-style collectives
    for dtype in dtypes:
        mine = [_values(r, m, dtype, device) for r in range(world)]
        total = sum((t.float() for t in mine), torch.zeros(m, device=device)).to(dtype)
        x = mine[rank].clone()

        for name in _GATHERS:
            out = torch.empty(world * m, dtype=dtype, device=device)
            with _deprecated_ok():
                getattr(dist, name)(out, x, group=group)
            expect(name, out, torch.cat(mine))

        for name in _REDUCE_SCATTERS:
            out = torch.empty(m // world, dtype=dtype, device=device)
            with _deprecated_ok():
                getattr(dist, name)(out, x.clone(), op=dist.ReduceOp.SUM, group=group)
            expect(name, out, total.chunk(world)[rank])

        out = torch.empty(m, dtype=dtype, device=device)
        dist.all_to_all_single(out, x.clone(), group=group)
        expect("all_to_all_single", out, torch.cat([t.chunk(world)[rank] for t in mine]))

        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        expect("all_reduce", y, total)

        y = x.clone()
        dist.broadcast(y, src=dist.get_global_rank(group, 0), group=group)
        expect("broadcast", y, mine[0])

        outs = [torch.empty(m, dtype=dtype, device=device) for _ in range(world)]
        dist.all_gather(outs, x, group=group)
        expect("all_gather", torch.cat(outs), torch.cat(mine))

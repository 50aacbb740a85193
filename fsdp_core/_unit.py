"""One sharded unit: the flat shard, its unsharded buffer, and gradient reduction.

Data path of a unit, in order:
  shard (1-D, master dtype, the only persistent copy)  --all_gather-->  unsharded_flat
  (1-D, param dtype)  -->  unsharded params (original shapes, views)  -->  forward/backward
  -->  unsharded grads  --flatten, cast to reduce dtype-->  reduce (fast: reduce-scatter;
  deterministic: local pairwise tree, all-to-all, tree in rank order; on a 2-D mesh then over
  the replicate group, see [Note: HSDP reduction order])  -->  / W  -->  shard grad.

[Note: views and version counters]
The unsharded parameters are views of ``unsharded_flat``. Resharding frees the storage
(``resize_(0)``) and unsharding refills it in place, so tensors saved by autograd in forward see
the refilled data in backward. The refill happens under ``_unsafe_preserve_version_counter``:
it restores the same values, so it must not look like an in-place modification to autograd.

[Note: prefetch]
``unshard(async_op=True)`` allocates the buffer and starts the all-gather without waiting: the
unit is GATHERING and marked ``prefetched``. The next plain ``unshard()`` (the unit's own
pre-forward or pre-backward) waits, registers the unsharded parameters and clears the mark; a
``reshard()`` of a GATHERING unit waits before it frees the storage. A prefetch moves a gather
earlier, never adds one, and gathers the same bytes, so results are bitwise unchanged. Who
prefetches what is decided in ``_module`` (see [Note: prefetch order] there).
"""
from __future__ import annotations

import enum
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from . import _collectives as C
from ._layout import FlatLayout, make_layout
from ._mesh import ShardMesh
from ._policies import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy


class ShardState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"   # an async all-gather into the unsharded buffer is in flight
    UNSHARDED = "unsharded"


class UnshardedBytes:
    """Bytes of unsharded buffers allocated at once in this process (all units), and the peak
    since ``reset_peak()``: the transient memory of ZeRO-3, measured where it is allocated."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.now += n
        if self.now > self.peak:
            self.peak = self.now

    def reset_peak(self) -> None:
        self.peak = self.now


UNSHARDED_BYTES = UnshardedBytes()


class Registration:
    """Where a parameter is registered: ``module._parameters[attr]`` holds param ``index``."""

    __slots__ = ("module", "attr", "index", "fqn")

    def __init__(self, module: nn.Module, attr: str, index: int, fqn: str):
        self.module, self.attr, self.index, self.fqn = module, attr, index, fqn


class FlatUnit:
    """State of one ``fully_shard`` call (FSDP2 calls this a param group)."""

    def __init__(
        self,
        *,
        module: nn.Module,
        params: list[nn.Parameter],
        registrations: list[Registration],
        mesh: ShardMesh,
        mp_policy: MixedPrecisionPolicy,
        offload_policy: OffloadPolicy,
        reshard_after_forward: bool,
        deterministic: bool,
        compute_device: torch.device,
    ):
        self.module_name = type(module).__name__
        # The flat buffer is sharded over the shard group (S ranks; ``rank`` and ``world_size``
        # are this rank's place in it); on a 2-D mesh the R ranks of the replicate group hold the
        # same shard, and gradients are divided by ``dp_world`` = R * S.
        self.mesh = mesh
        self.group = mesh.shard_group
        self.replicate_group = mesh.replicate_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.dp_world = mesh.world
        self.mp_policy = mp_policy
        self.offload = isinstance(offload_policy, CPUOffloadPolicy)
        self.reshard_after_forward = reshard_after_forward
        self.deterministic = deterministic
        self.compute_device = compute_device
        self.registrations = registrations
        self.shapes = [tuple(p.shape) for p in params]
        self.names = [""] * len(params)
        for reg in reversed(registrations):  # first registration names the parameter
            self.names[reg.index] = reg.fqn
        self.requires_grad = [p.requires_grad for p in params]
        self.layout: FlatLayout = make_layout([p.numel() for p in params], self.world_size)
        self.pieces = self.layout.local_pieces(self.rank)
        self.requires_gradient_sync = True
        self.generation = -1                        # see [Note: backward bookkeeping]
        self.state = ShardState.SHARDED
        self.unsharded_flat: Optional[torch.Tensor] = None  # 1-D padded, param dtype, compute device
        self.unsharded_params: Optional[list[nn.Parameter]] = None
        self.prefetched = False   # gathered ahead of use and not yet used (see [Note: prefetch])
        self._pending = None      # (work, source) of an in-flight async all-gather
        self._acc: list[tuple[int, torch.Tensor]] = []  # deterministic: (count, flat) pairwise stack
        self.reset_backward_state()
        self._build_shard(params)

    # ------------------------------------------------------------------ sharded storage
    @property
    def master_dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def param_dtype(self) -> torch.dtype:
        return self.mp_policy.param_dtype or self.master_dtype

    @property
    def reduce_dtype(self) -> torch.dtype:
        return self.mp_policy.reduce_dtype or self.param_dtype

    @torch.no_grad()
    def _build_shard(self, params: list[nn.Parameter]) -> None:
        dtype, device = params[0].dtype, params[0].device
        if self.offload and device.type != "meta":
            device = torch.device("cpu")
        shard = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)  # 1-D padded shard
        if device.type == "cpu" and self.offload and self.offload_pin():
            shard = shard.pin_memory()
        if device.type != "meta":
            for piece, p in zip(self.pieces, params):
                src = p.detach().reshape(-1)[piece.param_start: piece.param_start + piece.real_numel]
                shard[piece.shard_start: piece.shard_start + piece.real_numel].copy_(src)
        self.shard = shard
        self.sharded_params = [self._sharded_view(i, None) for i in range(len(params))]
        self.register_sharded()

    def offload_pin(self) -> bool:
        return torch.cuda.is_available()

    def _sharded_view(self, i: int, existing: Optional[nn.Parameter]) -> nn.Parameter:
        piece = self.pieces[i]
        data = self.shard[piece.shard_start: piece.shard_end]  # 1-D local piece (+ its padding)
        if existing is None:
            p = nn.Parameter(data, requires_grad=self.requires_grad[i])
        else:
            p = existing
            p.data = data
        p._fsdp_unit = self  # type: ignore[attr-defined]
        p._fsdp_index = i  # type: ignore[attr-defined]
        p._fsdp_global_shape = self.shapes[i]  # type: ignore[attr-defined]
        return p

    @torch.no_grad()
    def relink(self) -> None:
        """After ``module._apply`` (``.to``, ``to_empty``, dtype casts) replaced parameter data:
        rebuild one flat shard from the registered parameters and point them back into it."""
        current = [None] * len(self.pieces)
        for reg in self.registrations:
            if current[reg.index] is None:
                current[reg.index] = reg.module._parameters[reg.attr]
        dtype, device = current[0].dtype, current[0].device
        shard = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
        if device.type != "meta":
            for piece, p in zip(self.pieces, current):
                shard[piece.shard_start: piece.shard_start + piece.real_numel].copy_(p.data[: piece.real_numel])
        self.shard = shard
        self.sharded_params = [self._sharded_view(i, p) for i, p in enumerate(current)]
        self.register_sharded()
        self.unsharded_flat, self.unsharded_params = None, None
        self.state = ShardState.SHARDED

    def register_sharded(self) -> None:
        for reg in self.registrations:
            reg.module._parameters[reg.attr] = self.sharded_params[reg.index]

    def register_unsharded(self) -> None:
        assert self.unsharded_params is not None
        for reg in self.registrations:
            reg.module._parameters[reg.attr] = self.unsharded_params[reg.index]

    @torch.no_grad()
    def zero_padding(self) -> None:
        for start, end in self.layout.padding_ranges(self.rank):
            self.shard[start:end].zero_()

    # ------------------------------------------------------------------ unshard / reshard
    @property
    def aliased(self) -> bool:
        """One rank, same dtype and device: the shard *is* the unsharded buffer (no copy)."""
        return (self.world_size == 1 and self.param_dtype == self.master_dtype
                and self.shard.device == self.compute_device)

    def _alloc_unsharded(self) -> None:
        if self.aliased:
            flat = self.shard
        else:
            flat = torch.empty(self.layout.padded_numel, dtype=self.param_dtype, device=self.compute_device)
            UNSHARDED_BYTES.add(flat.untyped_storage().size())
        params = []
        for i, (off, n, shape) in enumerate(zip(self.layout.offsets, self.layout.numels, self.shapes)):
            view = flat[off: off + n].view(shape)
            p = nn.Parameter(view, requires_grad=self.requires_grad[i])
            p._fsdp_unsharded_of = self.sharded_params[i]  # type: ignore[attr-defined]
            params.append(p)
        self.unsharded_flat, self.unsharded_params = flat, params

    @torch.no_grad()
    def unshard(self, async_op: bool = False) -> None:
        """Make the unsharded parameters available. With ``async_op`` only start the all-gather
        (a prefetch); a later plain call waits for it. See [Note: prefetch]."""
        if self.state is not ShardState.SHARDED:
            if not async_op:
                if self.state is ShardState.GATHERING:
                    self._wait_gather()
                self.prefetched = False
            return
        if self.shard.device.type == "meta":
            names = ", ".join(n for n in self.names[:3])
            raise RuntimeError(
                f"fully_shard unit {self.module_name!r} (parameters {names}...) is still on the meta "
                "device: materialize it first with fsdp_core.materialize_meta(model, init_fn=...) "
                "(or model.to_empty(device=...) followed by loading weights)"
            )
        if self.unsharded_flat is None:
            self._alloc_unsharded()
        flat = self.unsharded_flat
        self.prefetched = async_op
        if not self.aliased:
            storage = flat.untyped_storage()
            nbytes = flat.numel() * flat.element_size()
            if storage.size() != nbytes:
                storage.resize_(nbytes)
                UNSHARDED_BYTES.add(nbytes)
            src = self.shard.to(device=self.compute_device, dtype=self.param_dtype, non_blocking=True)
            with torch.autograd._unsafe_preserve_version_counter(flat):
                if self.world_size == 1:
                    flat.copy_(src)  # one rank: nothing to gather
                else:
                    version = flat._version
                    work = C.all_gather_flat(flat, src, self.group, async_op=async_op)
                    if work is not None:
                        self._pending = (work, src, version)  # src must outlive the gather
                        self.state = ShardState.GATHERING
                        return
        self._finish_unshard()

    def _wait_gather(self) -> None:
        work, _src, version = self._pending
        work.wait()
        # The backend's worker thread bumped the buffer's version when it wrote the gathered
        # values (see [Note: views and version counters]): put back the version of the issue.
        torch._C._autograd._unsafe_set_version_counter((self.unsharded_flat,), (version,))
        self._pending = None
        self._finish_unshard()

    def _finish_unshard(self) -> None:
        """The unsharded buffer holds the gathered parameters: register them."""
        self.register_unsharded()
        self.state = ShardState.UNSHARDED

    def reshard(self) -> None:
        if self.state is ShardState.SHARDED:
            return
        if self.state is ShardState.GATHERING:
            self._wait_gather()  # never free a buffer a collective is still writing
        self.prefetched = False
        self.register_sharded()
        if not self.aliased:
            storage = self.unsharded_flat.untyped_storage()
            UNSHARDED_BYTES.add(-storage.size())
            storage.resize_(0)
        self.state = ShardState.SHARDED

    # ------------------------------------------------------------------ backward bookkeeping
    def reset_backward_state(self) -> None:
        self.calls_with_hook = 0       # forward calls whose inputs carry the post-backward hook
        self.calls_without_hook = 0    # forward calls with no input requiring grad
        self.hooks_fired = 0
        self.post_backward_done = False
        self.backward_task: Optional[int] = None  # autograd graph task of the running backward
        self.enlisted_task: Optional[int] = None  # the task whose final callback processes us

    def abandon_backward(self) -> None:
        """A backward through this unit raised midway: its partial gradients are garbage."""
        self._acc.clear()
        if self.unsharded_params is not None:
            self._clear_unsharded_grads()
        self.reshard()
        self.reset_backward_state()

    def input_hook_fired(self) -> None:
        self.hooks_fired += 1
        if self.calls_without_hook == 0 and self.hooks_fired == self.calls_with_hook:
            self.post_backward()

    @torch.no_grad()
    def post_backward(self) -> None:
        """Once per backward: reduce this unit's gradients (if syncing) and reshard."""
        if self.post_backward_done:
            return
        self.post_backward_done = True
        if self.unsharded_params is not None:
            grads = [p.grad for p in self.unsharded_params]
            if any(g is not None for g in grads):
                self._accumulate_or_reduce(grads)
        self.reshard()

    def _flatten_grads(self, grads: list[Optional[torch.Tensor]]) -> torch.Tensor:
        flat = torch.zeros(self.layout.padded_numel, dtype=self.reduce_dtype, device=self.compute_device)
        for off, n, g in zip(self.layout.offsets, self.layout.numels, grads):
            if g is not None:
                flat[off: off + n].copy_(g.reshape(-1))  # exact cast to the reduce dtype
        return flat

    def _accumulate_or_reduce(self, grads: list[Optional[torch.Tensor]]) -> None:
        had_grad = [g is not None for g in grads]
        if self.deterministic:
            # Each backward is one micro-batch: push its gradient onto the pairwise stack.
            self._push_microbatch(self._flatten_grads(grads))
            self._clear_unsharded_grads()
            if not self.requires_gradient_sync:
                return
            local = self._pop_local_tree()
            if self.replicate_group is not None:  # HSDP: see [Note: HSDP reduction order]
                reduced = C.hsdp_tree_reduce_mean(local, self.group, self.replicate_group, self.dp_world)
            else:
                reduced = local if self.world_size == 1 else C.tree_reduce_mean(local, self.group)
        else:
            if not self.requires_gradient_sync:
                return  # grads stay on the unsharded params; autograd keeps accumulating
            flat = self._flatten_grads(grads)
            self._clear_unsharded_grads()
            if self.replicate_group is not None:  # HSDP: reduce-scatter, all-reduce, / W
                reduced = C.hsdp_reduce_scatter_mean(flat, self.group, self.replicate_group, self.dp_world)
            else:
                # One rank: the sum over ranks is the gradient itself and / 1 is exact.
                reduced = flat if self.world_size == 1 else C.reduce_scatter_mean(flat, self.group)
        self._assign_sharded_grads(reduced, had_grad)

    def _clear_unsharded_grads(self) -> None:
        for p in self.unsharded_params:
            p.grad = None

    def _push_microbatch(self, flat: torch.Tensor) -> None:
        self._acc.append((1, flat))
        while len(self._acc) >= 2 and self._acc[-1][0] == self._acc[-2][0]:
            n, right = self._acc.pop()
            _, left = self._acc.pop()
            self._acc.append((2 * n, left.add_(right)))  # left + right, in micro-batch order

    def _pop_local_tree(self) -> torch.Tensor:
        if len(self._acc) != 1:
            counts = [n for n, _ in self._acc]
            self._acc.clear()
            raise RuntimeError(
                f"deterministic fully_shard unit {self.module_name!r}: the number of micro-batches "
                f"accumulated on this rank ({sum(counts)}) is not a power of two; deterministic mode "
                "needs k = M / W micro-batches per rank with k a power of two"
            )
        return self._acc.pop()[1]

    def _assign_sharded_grads(self, reduced: torch.Tensor, had_grad: list[bool]) -> None:
        grad = reduced.to(device=self.shard.device, dtype=self.master_dtype)  # 1-D padded shard
        for start, end in self.layout.padding_ranges(self.rank):
            grad[start:end].zero_()
        for piece, p, has in zip(self.pieces, self.sharded_params, had_grad):
            if not has:
                continue
            g = grad[piece.shard_start: piece.shard_end]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    # ------------------------------------------------------------------ introspection
    def state_bytes(self) -> int:
        """Bytes of this rank's parameter shard and sharded gradients."""
        n = self.shard.numel() * self.shard.element_size()
        for p in self.sharded_params:
            if p.grad is not None:
                n += p.grad.numel() * p.grad.element_size()
        return n

"""One sharded unit's parameters: the flat shard, its unsharded buffer, the views, and
unshard / reshard (the all-gather). Its gradient side is ``_grad_reduce``.

Data path of a unit, in order:
  shard (1-D, master dtype, the only persistent copy)  --all_gather-->  unsharded_flat
  (1-D, param dtype)  -->  unsharded params (original shapes, views)  -->  forward/backward
  -->  unsharded grads  -->  ``_grad_reduce``  -->  shard grad.

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
prefetches what is decided in ``_hooks`` (see [Note: prefetch order] there).
"""
from __future__ import annotations

import enum
import weakref
from typing import Optional

import torch
import torch.nn as nn

from . import _collectives as C
from ._grad_reduce import GradReduction, guard_shard_grad
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


class FlatUnit(GradReduction):
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
        self._module = weakref.ref(module)  # for messages only (describe_param)
        # The flat buffer is sharded over the shard group (S ranks; ``rank`` and ``world_size``
        # are this rank's place in it); on a 2-D mesh the R ranks of the replicate group hold the
        # same shard, and gradients are divided by ``dp_world`` = R * S.
        self.mesh = mesh
        self.group = mesh.shard_group
        self.replicate_group = mesh.replicate_group
        self.rank = C.rank(self.group)
        self.world_size = C.world_size(self.group)
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
        self.padding_ranges = self.layout.padding_ranges(self.rank)  # shard-relative [start, end)
        self.requires_gradient_sync = True
        self.generation = -1                        # see [Note: backward bookkeeping] in _hooks
        self.last_forward_grad = False   # its last forward outside backward ran with grad
        self.state = ShardState.SHARDED
        self.unsharded_flat: Optional[torch.Tensor] = None  # 1-D padded, param dtype, compute device
        self.unsharded_params: Optional[list[nn.Parameter]] = None
        self.prefetched = False   # gathered ahead of use and not yet used (see [Note: prefetch])
        self._pending = None      # (work, source) of an in-flight async all-gather
        self._acc: list[tuple[int, torch.Tensor]] = []  # see [Note: pairwise accumulation]
        self._acc_had_grad: Optional[list[bool]] = None  # parameters with a gradient in _acc
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
        guard_shard_grad(p)  # see [Note: a shard used outside its unit] in _grad_reduce
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
        for start, end in self.padding_ranges:
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
        else:   # a normal tensor even when first made under inference_mode (an eval first):
            # it is reused by every later forward and backward, which need version counters
            with torch.inference_mode(False):
                flat = torch.empty(self.layout.padded_numel, dtype=self.param_dtype,
                                   device=self.compute_device)
            UNSHARDED_BYTES.add(flat.untyped_storage().size())
        params = []
        with torch.inference_mode(False):
            for i in range(self.layout.num_params):
                p = nn.Parameter(self.param_view(flat, i), requires_grad=self.requires_grad[i])
                p._fsdp_unsharded_of = self.sharded_params[i]  # type: ignore[attr-defined]
                params.append(p)
        self.unsharded_flat, self.unsharded_params = flat, params

    def param_view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index`` (original shape) as a view of a 1-D padded unsharded ``flat``."""
        off, n = self.layout.offsets[index], self.layout.numels[index]
        return flat[off: off + n].view(self.shapes[index])

    @torch.no_grad()
    def gather_full(self, local: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Collective over the shard group: a 1-D shard-sized tensor of the master dtype
        (default: the shard) gathered into a fresh 1-D padded flat on the compute device."""
        local = self.shard if local is None else local
        flat = torch.empty(self.layout.padded_numel, dtype=self.master_dtype, device=self.compute_device)
        C.all_gather_flat(flat, local.to(self.compute_device), self.group)
        return flat

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

    # ------------------------------------------------------------------ introspection
    def describe_param(self, index: int) -> str:
        """Parameter ``index`` for an error message: its name in the outermost sharded module
        (the name ``model.named_parameters()`` gives), else its name in this unit's module."""
        module = self._module()
        root = module
        while root is not None and root.__dict__.get("_fsdp_outer") is not None:
            root = root.__dict__["_fsdp_outer"]()
        if module is not None and root is not None:
            for prefix, sub in root.named_modules():
                if sub is module:
                    return repr(f"{prefix}.{self.names[index]}" if prefix else self.names[index])
        return f"{self.names[index]!r} (of the fully_shard unit {self.module_name})"

    def state_bytes(self) -> int:
        """Bytes of this rank's parameter shard and sharded gradients."""
        n = self.shard.numel() * self.shard.element_size()
        for p in self.sharded_params:
            if p.grad is not None:
                n += p.grad.numel() * p.grad.element_size()
        return n

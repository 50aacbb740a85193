"""The rank side of hang diagnosis: every collective a case issues, logged as it happens
(`CollectiveLog`); the parent reads the logs in verify/diagnosis/hangs.py.

[Note: the collective log]
A pool rank (verify/ranks/rank.py) has ``VERIFY_COLLECTIVE_LOG`` set to a file of its own in the
pool's private directory (mode 0700, removed with the generation). While a case runs
(`CollectiveLog`: the file is truncated when `verify.case.train.run_case` or a resume case's
save or load phase (verify/campaign/resume.py) begins, the wrappers installed after the
backend check and removed when the case ends) every ``torch.distributed`` collective the case calls is wrapped: on entry
the rank appends one line, ``B seq kind ranks bytes dtype where``, and on return ``E seq``,
each with one unbuffered ``os.write``, so the line is in the file even when the rank then
blocks forever in C++. ``where`` is the wrap unit in forward (innermost) or in backward (the
last one whose output gradient arrived) and the first calling frame outside torch and the
harness's wrappers. The parent (verify/ranks/failure.py) reads the files after a timeout
(`verify.diagnosis.hangs.explain`): no signal, no cooperation from the stuck rank. This is what
PyTorch's Flight Recorder analyzer does after the fact for NCCL jobs; here it is automatic, on
any backend.
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from verify.case.recorder import tensor_bytes

__all__ = ["CollectiveLog", "LOGGED", "LOG_ENV"]

LOG_ENV = "VERIFY_COLLECTIVE_LOG"
# Everything a sharder's data path and the harness call (object collectives log the tensor
# collective torch issues for them only where it goes through these names).
LOGGED = ("all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
          "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all",
          "all_reduce", "broadcast", "reduce", "gather", "scatter", "barrier",
          "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")

# Frames skipped for ``where``: torch's own and the harness's wrappers around the collectives.
_SKIP_FILES = (os.sep + "torch" + os.sep, os.path.join("verify", "diagnosis", "collective_log.py"),
               os.path.join("verify", "tools", "plants") + os.sep,
               os.path.join("verify", "case", "recorder.py"))


def _dtype(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).replace("torch.", "")
    if isinstance(x, (list, tuple)):
        for t in x:
            d = _dtype(t)
            if d != "-":
                return d
    return "-"


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


class CollectiveLog:
    """Rank side: log every collective while active (see [Note: the collective log]); a no-op
    where ``VERIFY_COLLECTIVE_LOG`` is unset (torchrun, a plain process)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path if path is not None else os.environ.get(LOG_ENV)
        self.fd: Optional[int] = None
        self.seq = 0
        self.step: Optional[int] = None
        self._saved: dict[str, Any] = {}
        self._mine: dict[str, Any] = {}
        self._sigs: dict[str, inspect.Signature] = {}
        self._ranks: dict[int, str] = {}
        self._forward: list[str] = []
        self._backward: Optional[str] = None
        self._handles: list = []
        self._depth = 0
        self._phase: Optional[str] = None
        self._restore = None

    # -- install / remove --------------------------------------------------------------------
    def __enter__(self) -> "CollectiveLog":
        if not self.path:
            return self
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError:
            self.fd = None
        return self

    def install(self) -> None:
        """Wrap the collectives (after the backend check, which wants the plain functions)."""
        if self.fd is None or self._saved:
            return
        for name in LOGGED:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))
            self._mine[name] = getattr(dist, name)

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            # a wrapper the sharder put over ours during the case stays (ours, under it, passes
            # calls through once ``fd`` is None): only the harness's own is taken off
            if getattr(dist, name, None) is self._mine.get(name):
                setattr(dist, name, fn)
        self._saved.clear()
        self._mine.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._restore is not None:
            try:
                self._restore()
            except Exception:
                pass
            self._restore = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def watch(self, units, optimizer: Any = None) -> None:
        """Track which wrap unit (``(name, module)`` pairs) is in forward or backward, and
        when ``optimizer.step()`` runs."""
        if self.fd is None:
            return
        step = getattr(optimizer, "step", None)
        if callable(step):
            def logged_step(*a, **kw):
                self._backward, self._phase = None, "optimizer step"
                try:
                    return step(*a, **kw)
                finally:
                    self._phase = None
            try:
                optimizer.step = logged_step
                self._restore = lambda: setattr(optimizer, "step", step)
            except Exception:
                pass
        for name, m in units:
            label = name or "<root>"
            self._handles.append(m.register_forward_pre_hook(
                lambda *_a, label=label: self._forward.append(label)))
            self._handles.append(m.register_forward_hook(
                lambda _m, _i, out, label=label: self._post_forward(label, out)))

    def end_step(self) -> None:
        self._forward.clear()
        self._backward = self._phase = None

    def run_steps(self, trainer: Any, steps) -> list[dict]:
        """``trainer.step(i)`` for each step, each logged as that step."""
        records = []
        for i in steps:
            self.step = i
            records.append(trainer.step(i))
            self.end_step()
        return records

    def outside_steps(self, phase: str, fn, *args: Any) -> Any:
        """``fn(*args)`` logged as ``phase`` (an adapter's save or load) rather than a step."""
        self.step, self._phase = None, phase
        try:
            return fn(*args)
        finally:
            self._phase = None

    def _post_forward(self, label: str, out: Any) -> None:
        if self._forward and self._forward[-1] == label:
            self._forward.pop()
        self._backward = None
        try:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, label=label: self._enter_backward(label))
                    break
        except Exception:
            pass

    def _enter_backward(self, label: str) -> None:
        self._backward = label

    # -- one call ----------------------------------------------------------------------------
    def _group_ranks(self, group) -> str:
        key = id(group)
        if key not in self._ranks:
            try:
                ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
                self._ranks[key] = ",".join(map(str, ranks))
            except Exception:
                self._ranks[key] = "?"
        return self._ranks[key]

    def _where(self) -> str:
        unit = (f"forward {self._forward[-1]}" if self._forward else
                f"backward {self._backward}" if self._backward else self._phase or "")
        frame = sys._getframe(2)
        while frame is not None and any(s in frame.f_code.co_filename for s in _SKIP_FILES):
            frame = frame.f_back
        call = ""
        if frame is not None:
            parts = frame.f_code.co_filename.split(os.sep)
            call = f"{'/'.join(parts[-2:])}:{frame.f_lineno}:{frame.f_code.co_name}"
        step = f"step {self.step}" if self.step is not None else ""
        return " ".join(x for x in (step, unit, "<-", call) if x).replace("\t", " ")

    def _wrap(self, name: str, fn):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None

        def logged(*args, **kwargs):
            if self._depth or self.fd is None:
                return fn(*args, **kwargs)
            self.seq += 1
            seq = self.seq
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments if sig else kwargs
                tensors = [v for k, v in bound.items()
                           if k in ("output", "input", "tensor", "output_tensor", "input_tensor",
                                    "tensor_list", "output_tensor_list", "input_tensor_list",
                                    "object_list", "obj")]
                nbytes = max((tensor_bytes(t) for t in tensors), default=0)
                dtype = next((d for d in map(_dtype, tensors) if d != "-"), "-")
                line = (f"B\t{seq}\t{name}\t{self._group_ranks(bound.get('group'))}\t{nbytes}\t"
                        f"{_SHORT.get(dtype, dtype)}\t{self._where()}\n")
                os.write(self.fd, line.encode())
            except Exception:
                pass
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                try:
                    os.write(self.fd, f"E\t{seq}\n".encode())
                except Exception:
                    pass
        logged.__wrapped__ = fn  # type: ignore[attr-defined]
        return logged

"""Hangs explained: the sequence of collectives each rank issued in a case, logged as it
happens, and, when a case does not finish, the first position where the ranks disagree.

[Note: the collective log]
A pool rank (verify/ranks/rank.py) has ``VERIFY_COLLECTIVE_LOG`` set to a file of its own in the
pool's private directory (mode 0700, removed with the generation). While a case runs
(`CollectiveLog`: the file is truncated when `verify.case.train.run_case` begins, the wrappers
installed after the backend check and removed when the case ends) every ``torch.distributed`` collective the case calls is wrapped: on entry
the rank appends one line, ``B seq kind ranks bytes dtype where``, and on return ``E seq``,
each with one unbuffered ``os.write``, so the line is in the file even when the rank then
blocks forever in C++. ``where`` is the wrap unit in forward (innermost) or in backward (the
last one whose output gradient arrived) and the first calling frame outside torch and the
harness's wrappers. The parent (verify/ranks/pool.py) reads the files after a timeout (`explain`):
no signal, no cooperation from the stuck rank. This is what PyTorch's Flight Recorder analyzer
does after the fact for NCCL jobs; here it is automatic, on any backend.

Sequences are compared per process group: the members of a group must issue the same
collectives on it in the same order (kind, bytes, dtype). An async collective's ``E`` line
marks its return, not its completion.
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["CollectiveLog", "explain", "hang_summary", "read_log", "Entry", "LOGGED",
           "LOG_ENV"]

LOG_ENV = "VERIFY_COLLECTIVE_LOG"
HEADER = "collective sequences"
# Everything a sharder's data path and the harness call (object collectives log the tensor
# collective torch issues for them only where it goes through these names).
LOGGED = ("all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
          "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all",
          "all_reduce", "broadcast", "reduce", "gather", "scatter", "barrier",
          "all_gather_object", "broadcast_object_list")

_SKIP_FILES = (os.sep + "torch" + os.sep, os.path.join("verify", "hangs.py"),
               os.path.join("verify", "plant.py"), os.path.join("verify", "case", "probes.py"))


def _dtype(x: Any) -> str:
    import torch
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
        import torch.distributed as dist
        if self.fd is None or self._saved:
            return
        for name in LOGGED:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
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

    def _post_forward(self, label: str, out: Any) -> None:
        if self._forward and self._forward[-1] == label:
            self._forward.pop()
        self._backward = None
        try:
            from torch.utils._pytree import tree_leaves
            import torch
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
        import torch.distributed as dist
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
        # rank side only (probes imports torch; the parent reading the logs needs none of it)
        from verify.case.probes import tensor_bytes
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


# -- parent side ---------------------------------------------------------------------------------

@dataclass
class Entry:
    seq: int
    kind: str
    group: str        # "0,1"
    nbytes: int
    dtype: str
    where: str
    done: bool = False

    def key(self) -> tuple:
        return (self.kind, self.nbytes, self.dtype)

    def describe(self) -> str:
        return (f"{self.kind} {_size(self.nbytes)} {self.dtype} on group [{self.group.replace(',', ', ')}]"
                + (f" ({self.where})" if self.where else ""))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def read_log(path: str) -> Optional[list[Entry]]:
    """A rank's log, in issue order; None where there is no file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    entries: dict[int, Entry] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        try:
            if parts[0] == "B" and len(parts) >= 7:
                entries[int(parts[1])] = Entry(int(parts[1]), parts[2], parts[3], int(parts[4]),
                                               parts[5], parts[6])
            elif parts[0] == "E" and len(parts) >= 2 and int(parts[1]) in entries:
                entries[int(parts[1])].done = True
        except ValueError:
            continue   # a line cut short by the kill
    return [entries[k] for k in sorted(entries)]


def explain(log_dir: str, world_size: int) -> str:
    """The ranks' collective sequences after a run that did not finish: the first position
    where the members of a group disagree, or, where they agree, who is inside the last one.
    "" when no rank logged anything."""
    logs = {r: read_log(os.path.join(log_dir, f"collectives.{r}")) for r in range(world_size)}
    logs = {r: v for r, v in logs.items() if v is not None}
    if not logs:
        return ""
    counts = ", ".join(f"rank {r}: {len(v)}" for r, v in sorted(logs.items()))
    lines = [f"{HEADER} (collectives issued in this case, {counts}):"]
    lines.append(_first_divergence(logs))
    for r, seq in sorted(logs.items()):
        tail = seq[-3:]
        lines.append(f"  rank {r}'s last: " + ("; ".join(
            f"#{len(seq) - len(tail) + i + 1} {e.describe()}{'' if e.done else ' [not returned]'}"
            for i, e in enumerate(tail)) or "(none)"))
    return "\n".join(lines)


def _first_divergence(logs: dict[int, list[Entry]]) -> str:
    groups: dict[str, list[int]] = {}
    for seq in logs.values():
        for e in seq:
            if e.group not in groups and e.group != "?":
                groups[e.group] = [int(x) for x in e.group.split(",")]
    found = []   # (global index in the earliest rank's log, message)
    for g, members in groups.items():
        present = [r for r in members if r in logs]
        on = {r: [(i, e) for i, e in enumerate(logs[r]) if e.group == g] for r in present}
        longest = max(len(v) for v in on.values())
        for pos in range(longest):
            have = {r: v[pos] for r, v in on.items() if pos < len(v)}
            keys = {e.key() for _, e in have.values()}
            if len(keys) == 1 and len(have) == len(present):
                continue
            first_at = min(i for i, _ in have.values())
            n = _ordinal(pos + 1)
            missing = [r for r in present if r not in have]
            if len(keys) > 1:
                ref_rank = min(have)
                ref = have[ref_rank][1]
                other = next(r for r in sorted(have) if have[r][1].key() != ref.key())
                msg = (f"first divergent collective: rank {other}'s {n} collective on group "
                       f"[{g.replace(',', ', ')}] is {have[other][1].describe()}, rank {ref_rank}'s "
                       f"is {ref.describe()}")
            else:
                r0 = min(have)
                e = have[r0][1]
                msg = (f"first divergent collective: rank{'s' * (len(missing) > 1)} "
                       f"{', '.join(map(str, missing))} issued only {pos} collective"
                       f"{'s' * (pos != 1)} on group [{g.replace(',', ', ')}]; rank {r0}'s "
                       f"{n} is {e.describe()}, which rank{'s' * (len(missing) > 1)} "
                       f"{', '.join(map(str, missing))} never issued")
            found.append((first_at, msg))
            break
    if found:
        return min(found)[1]
    # Every group agrees: who is inside the last collective?
    last = {r: seq[-1] for r, seq in logs.items() if seq}
    if not last:
        return "no rank issued a collective in this case (see the stacks)"
    inside = sorted(r for r, e in last.items() if not e.done)
    idle = [r for r in sorted(logs) if r not in inside]
    r0 = max(logs, key=lambda r: len(logs[r]))
    e = logs[r0][-1] if logs[r0] else None
    what = f"#{len(logs[r0])} {e.describe()}" if e else "none"
    if inside and idle:
        return (f"the ranks' sequences agree; the last collective, {what}, is entered by ranks "
                f"{inside} and not by rank{'s' * (len(idle) > 1)} {', '.join(map(str, idle))}, "
                f"which returned from every collective it issued (stuck elsewhere: see its stack)")
    if inside:
        return (f"the ranks' sequences agree; every rank is inside the last collective, {what}, "
                f"and none returned (a backend stall, or a rank stuck inside a wrapper: see the "
                f"stacks)")
    return (f"the ranks' sequences agree and every rank returned from its last collective, "
            f"{what}: they are stuck outside a collective (see the stacks)")


def hang_summary(reason: str) -> str:
    """The collective-sequence block of a pool error, or ""."""
    lines = (reason or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(HEADER):
            out = []
            for ln in lines[i:]:
                if not ln.strip():
                    break
                out.append(ln)
            return "\n".join(out)
    return ""

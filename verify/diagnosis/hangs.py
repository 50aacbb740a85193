"""Hangs explained, on the parent side: the collective sequences every rank logged in a case
(verify/diagnosis/collective_log.py, see [Note: the collective log]) read back after a timeout,
and the first position where the ranks disagree. Needs no torch.

Sequences are compared per process group: the members of a group must issue the same
collectives on it in the same order (kind, bytes, dtype). An async collective's ``E`` line
marks its return, not its completion.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["explain", "hang_summary", "read_log", "Entry"]

HEADER = "collective sequences"
# where a hang's stacks are: the console shows a case's first line only
_STACKS = "the ranks' Python stacks are in the case's full reason: OUT/results.json, or run its replay line"


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
        return f"no rank issued a collective in this case ({_STACKS})"
    inside = sorted(r for r, e in last.items() if not e.done)
    idle = [r for r in sorted(logs) if r not in inside]
    r0 = max(logs, key=lambda r: len(logs[r]))
    e = logs[r0][-1] if logs[r0] else None
    what = f"#{len(logs[r0])} {e.describe()}" if e else "none"
    if e is not None and not e.done:
        members = {int(x) for x in e.group.split(",") if x.strip().lstrip("-").isdigit()}
        outside = sorted(members - set(logs))
        if outside:
            return (f"the last collective, {what}, is on a group with rank{'s' * (len(outside) > 1)} "
                    f"{', '.join(map(str, outside))}, which {'do' if len(outside) > 1 else 'does'} "
                    f"not run this case (its ranks: {sorted(logs)}), so it can never complete: the "
                    "sharder used a group it was not given (the default process group?); an "
                    "adapter whose sharder uses the default group declares world = \"default\" "
                    "(DESIGN section 6), and the harness then runs each case on processes whose "
                    "default group is exactly its ranks")
    if inside and idle:
        return (f"the ranks' sequences agree; the last collective, {what}, is entered by ranks "
                f"{inside} and not by rank{'s' * (len(idle) > 1)} {', '.join(map(str, idle))}, "
                f"which returned from every collective it issued (stuck elsewhere; {_STACKS})")
    if inside:
        return (f"the ranks' sequences agree; every rank is inside the last collective, {what}, "
                f"and none returned (a backend stall, or a rank stuck inside a wrapper: see the "
                f"stacks)")
    return (f"the ranks' sequences agree and every rank returned from its last collective, "
            f"{what}: they are stuck outside a collective ({_STACKS})")


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

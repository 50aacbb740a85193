"""Result records that cross the process boundary: plain, picklable, JSON-able.

A case is one scenario run through one sharder at one world size. The rank side produces
`StepRecord`s; comparison against the reference fills the diff fields; the CLI and the
report only ever read these records (as dicts, through `to_dict`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["StepRecord", "CaseResult", "VERDICTS", "PASSING", "held_verdict", "headline",
           "SEVERITY_CLASSES", "worst_first", "severity_label", "UNSEEN", "reason_line", "NEAR_ZERO_ULP"]

# The collective kind under which a step records the collectives its process groups ran that
# the recorder could not see (issued below Python): [count, 0]; the step's bytes are unknown.
UNSEEN = "not_seen"

# pass: every check held, in the bitwise or the tolerance tier (`tier` says which). reported:
# every check held in the reported tier (fast mode, Adam family, W >= 4): figures within the
# documented bound, not asserted tight. fail: a check failed (a numerical divergence, padding
# written, a shard that does not reassemble). error: the case did not complete (a rank raised,
# died or hung). skipped: the sharder does not run this case (reason says why: outside its
# declared modes, dtypes, offload or meshes, or its unsupported()).
VERDICTS = ("pass", "reported", "fail", "error", "skipped")
PASSING = ("pass", "reported", "skipped")   # the verdicts that do not fail a run


@dataclass
class StepRecord:
    step: int
    loss: float                       # sharded run's step loss
    loss_ref: float                   # reference's step loss
    loss_bitwise: bool = False
    loss_abs_diff: float = 0.0
    max_abs: float = 0.0              # over every parameter element after the step
    max_rel: float = 0.0
    max_ulp: int = 0
    bitwise: bool = False             # loss and every parameter bit-identical to the reference
    n_params_differ: int = 0          # parameters (tensors) not bitwise equal
    worst_param: str = ""             # parameter with the largest max_abs
    padding_ok: Optional[bool] = True  # every padding view bitwise zero on every rank
                                      # (None here and below: not checked, a peer sharder)
    padding_bad: list[str] = field(default_factory=list)  # labels of non-zero padding views
    reassembly_ok: Optional[bool] = True  # local shards concatenate to the full parameters
    grads_ok: Optional[bool] = None   # bitwise tier: reduced gradients bitwise equal to the
                                      # reference's step gradient (None: not compared)
    resharded_ok: Optional[bool] = None  # no unit holds a gathered copy once backward is done
    collectives: dict[str, list[int]] = field(default_factory=dict)  # kind -> [count, bytes] (rank 0)
    collectives_expected: dict[str, list[int]] = field(default_factory=dict)  # the formula
    collectives_ok: Optional[bool] = True  # recorded == formula for every kind the formula names
    state_bytes: list[int] = field(default_factory=list)  # per rank: params + grads + optimizer state
    state_bytes_model: int = 0        # ZeRO-3 model: unsharded (params + grads + optimizer state) / W
    step_time_s: float = 0.0          # rank 0 wall time of the step (forward + backward + step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CaseResult:
    scenario_json: str
    sharder: str
    family: str
    world_size: int
    mode: str
    dtype: str
    optimizer: str
    tier: str                          # "bitwise" | "tolerance" | "reported"
    verdict: str                       # one of VERDICTS
    reason: str = ""                   # why it failed / errored / is unsupported
    steps: list[StepRecord] = field(default_factory=list)
    first_divergence: Optional[tuple[int, str]] = None  # (step, parameter) first not bitwise equal
    replay: str = ""                   # one-line command that reruns exactly this case
    wall_time_s: float = 0.0
    # Checkpoint-resume cases (verify/campaign/resume.py) only: the world size that trained the first
    # `save_after` steps and saved; world_size is the one that loaded and finished.
    save_world_size: Optional[int] = None
    save_after: Optional[int] = None
    sharder_spec: str = ""             # how --sharder names it (a built-in name or pkg.module:Name)
    mesh: str = ""                     # HSDP: "RxS" (replicate x shard); "" for a 1-D group
    offload: bool = False              # the scenario's CPU offload (shards and optimizer state on CPU)
    # Structured check records (verify/case/judge.py `Check`): check, status (pass | fail |
    # n/a), step, rank, detail. The reason is their failures' details, for people.
    checks: list[dict] = field(default_factory=list)
    # How bad a failure is (verify/case/severity.py): "last-bit" | "beyond tolerance" |
    # "invariant" | "error" ("" for a case that did not fail), and the worst numerical excess
    # (|d| / (atol + rtol |e|); at most 1 for last-bit; None where no numerical check failed).
    severity: str = ""
    excess: Optional[float] = None
    # Diagnosis of a failing case (verify/diagnosis/diagnose.py; empty / None for a passing one):
    signature: str = ""                # the failure's signature: failures sharing it shrink once
    flaky: Optional[bool] = None       # True: the failure did not reproduce on replay
    minimal_scenario_json: str = ""    # the smallest scenario found that fails the same way
    minimal_replay: str = ""           # the replay command of the minimal scenario
    minimal_reason: str = ""           # how the minimal scenario fails
    shrink_note: str = ""              # how the shrinking went (runs, seconds, budget)
    divergence: str = ""               # one line: the first divergence's step, phase and unit
    minimal_divergence: str = ""       # the same for the minimal scenario
    hang: str = ""                     # a hung case: the first divergent collective of the ranks
    tier_note: str = ""                # why the case was judged at a looser tier after the run
    #                                    (verify/case/regroup.py, [Note: a regrouped gradient sum])

    @property
    def passed(self) -> bool:
        return self.verdict in PASSING

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def held_verdict(tier: str) -> str:
    """The verdict of a case whose every check held: "reported" in the reported tier."""
    return "reported" if tier == "reported" else "pass"


_FAILURE_ORDER = ("last-bit", "beyond tolerance", "invariant", "error")
# The failure classes of verify/case/severity.py, worst first.
SEVERITY_CLASSES = ("beyond tolerance", "invariant", "error", "last-bit")


def worst_first(case: Any) -> tuple:
    """Sort key of failing cases (CaseResult or dict), the worst first: the severity class,
    then the greatest excess over the tolerance, then the greatest ULP distance."""
    cls = _text(_field(case, "severity"), "")
    steps = _field(case, "steps") or []
    ulp = max((_field(st, "max_ulp") or 0 for st in steps), default=0)
    return (SEVERITY_CLASSES.index(cls) if cls in SEVERITY_CLASSES else len(SEVERITY_CLASSES),
            -(_field(case, "excess") or 0.0), -ulp)


def _field(r: Any, key: str) -> Any:
    return r.get(key) if isinstance(r, dict) else getattr(r, key, None)


def _text(v: Any, default: str) -> str:
    """A string field of a record, or ``default`` where it is missing (None, NaN, "")."""
    return v if isinstance(v, str) and v else default


def _breakdown(counts: dict[str, int], order: tuple) -> str:
    keys = [k for k in order if counts.get(k)] + sorted(k for k in counts if k not in order)
    return " (" + ", ".join(f"{counts[k]} {k}" for k in keys) + ")" if keys else ""


def headline(results) -> str:
    """What a campaign's console and report say first, every count exact: "3 passed (2 bitwise,
    1 tolerance), 5 reported, 6 failed (2 last-bit, 4 beyond tolerance), 10 skipped".
    passed: verdict pass, by the tier it passed in; reported: held in the reported tier (not
    asserted tight); failed: fail or error, by severity (verify/case/severity.py: last-bit,
    beyond tolerance, invariant, error); skipped: not run. Zero reported or skipped left out."""
    passed: dict[str, int] = {}
    failed: dict[str, int] = {}
    reported = skipped = 0
    for r in results:
        v = _field(r, "verdict")
        if v == "pass":
            tier = _text(_field(r, "tier"), "?")
            passed[tier] = passed.get(tier, 0) + 1
        elif v == "reported":
            reported += 1
        elif v == "skipped":
            skipped += 1
        else:
            cls = "error" if v == "error" else _text(_field(r, "severity"), "unclassified")
            failed[cls] = failed.get(cls, 0) + 1
    parts = [f"{sum(passed.values())} passed" + _breakdown(passed, ("bitwise", "tolerance"))]
    parts += [f"{reported} reported"] if reported else []
    parts += [f"{sum(failed.values())} failed" + _breakdown(failed, _FAILURE_ORDER)]
    parts += [f"{skipped} skipped"] if skipped else []
    return ", ".join(parts)


# Beyond this many ulp a difference that is still within the tolerance is between values near 0
# (of either sign: every tiny float lies between them), where an ulp count says nothing about
# size; the label gives the fraction of the tolerance instead.
NEAR_ZERO_ULP = 1 << 16


def severity_label(case: Any) -> str:
    """"last-bit, 3 ulp" | "beyond tolerance, 4.2e+04x" | "invariant" | "error" | "" (passed)."""
    cls = _field(case, "severity") or ""
    if _field(case, "verdict") == "error":
        return "error"
    ulp = max((c.get("ulp") or 0 for c in _field(case, "checks") or []
               if c.get("status") == "fail"), default=0)
    excess = _field(case, "excess")
    if cls == "last-bit":
        if ulp > NEAR_ZERO_ULP and excess is not None:   # see NEAR_ZERO_ULP
            return f"last-bit, {excess:.2g} of the tolerance (values near 0, {ulp} ulp apart)"
        return f"last-bit, {ulp} ulp"
    if cls == "beyond tolerance" and excess is not None and excess == float("inf"):
        return "beyond tolerance, pieces not comparable element by element"
    if cls == "beyond tolerance" and excess is not None:
        return f"beyond tolerance, {excess:.3g}x"
    return cls


# -- one line of a reason ---------------------------------------------------------------------

_RAISED = re.compile(r"^rank (\d+) raised in \S+ at world size \d+:$")
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+), in (.+)$')
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_TORCH_FRAME = re.compile(r"[/\\](site|dist)-packages[/\\]torch[/\\]")
_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep   # verify/ itself


def _where(path: str, line: str, fn: str) -> str:
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    except ValueError:
        pass
    return f"{path}:{line} in {fn}"


def _exception_at(raw: list[str], start: int) -> Optional[str]:
    """The exception of the traceback whose header is ``raw[start]`` (following chained
    tracebacks to the last), with where it was raised: the innermost frame of the sharder's or
    the user's code (outside torch and the harness), else that of the exception it was raised
    from (the harness's error about an adapter's own: its import, say), else the innermost
    outside torch (the harness's line that called into torch), else the innermost."""
    exc: Optional[str] = None
    frames: list[tuple[str, str, str]] = []
    cause: list[tuple[str, str, str]] = []   # the user's frames of the chained exceptions before
    for ln in raw[start:]:
        s = ln.strip()
        if s.startswith("Traceback"):
            cause = _theirs(frames) or cause
            exc, frames = None, []
        elif frame := _FRAME.match(ln):
            frames.append(frame.groups())
        elif s and not ln[:1].isspace():   # tracebacks indent frames and code, not the exception
            if exc is None:
                exc = s
            elif not s.startswith(_CHAINED):
                break
    if exc is None:
        return None
    if not frames:
        return exc
    outside = [f for f in frames if not _TORCH_FRAME.search(f[0])]
    return f"{exc} (at {_where(*(_theirs(frames) or cause or outside or frames)[-1])})"


def _theirs(frames: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The frames of the user's code: outside torch, the harness and Python's frozen modules."""
    return [f for f in frames if not _TORCH_FRAME.search(f[0]) and not f[0].startswith("<frozen")
            and not os.path.abspath(f[0]).startswith(_HARNESS_DIR)]


_DIED = re.compile(r"^rank (\d+) \(pid \d+\) ((?:exited with code|was killed by) [^ ]+(?: [^ ]+)?) "
                   r"while running ")
# what a rank raises when a peer process went away under a collective (gloo's words)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Connection refused")


def _raised_exception(raw: list[str], lines: list[str], i: int) -> Optional[str]:
    """The exception of the "rank N raised in" block at line ``i``."""
    tb = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("Traceback")), None)
    return _exception_at(raw, tb) if tb is not None else (lines[i + 1] if i + 1 < len(lines) else None)


def reason_line(reason: str) -> str:
    """The one line of a case's reason that says the most (console, report tables, diagnosis):
    a rank's exception with the rank and where it was raised, followed by which ranks were then
    left waiting; a hang's "timed out after" line; a traceback's exception; a "...:" heading
    with the line of what follows it; else the first line."""
    raw = [ln for ln in (reason or "").splitlines() if ln.strip()]
    lines = [ln.strip() for ln in raw]
    if not lines:
        return ""
    raised = [i for i, ln in enumerate(lines) if _RAISED.match(ln)]
    if lines[0].endswith(":") and len(lines) > 1 and raised[:1] != [0] \
            and not lines[0].startswith("Traceback"):
        return f"{lines[0]} {reason_line(chr(10).join(raw[1:]))}"
    died = next((_DIED.match(ln) for ln in lines if _DIED.match(ln)), None)
    if died and raised and all(any(p in (_raised_exception(raw, lines, i) or "") for p in _PEER_GONE)
                    for i in raised):
        # the ranks that raised lost a peer: the one that died is the cause, not they
        out = f"rank {died.group(1)} {died.group(2)}"
        others = ", ".join(_RAISED.match(lines[j]).group(1) for j in raised)
        return f"{out} (then ranks {others} raised: the peer was gone)"
    if raised:
        i = raised[0]
        exc = _raised_exception(raw, lines, i)
        rank = _RAISED.match(lines[i]).group(1)
        out = f"rank {rank} raised {exc}" if exc else lines[i]
        others = [_RAISED.match(lines[j]).group(1) for j in raised[1:]]
        if others:
            out += f" (ranks {', '.join(others)} raised too)"
        stalled = next((ln for ln in lines if " did not finish within " in ln), None)
        if stalled:
            out += "; then " + stalled.split("; the pool restarts")[0]
        return out
    hang = next((ln for ln in lines if ln.startswith("timed out after")
                 or " did not finish within " in ln), None)
    if hang:
        return hang
    tb = next((j for j, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if tb is not None:
        return _exception_at(raw, tb) or lines[0]
    return lines[0]

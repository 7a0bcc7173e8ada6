"""Watching a grid from its files alone: per-run rows, the table, the ETA.

The trainer updates ``status.json`` when a run starts and ends; progress in between
comes from the end of ``metrics.jsonl``: the first look seeks from the end of the
file (``rundir.tail_metrics``), later refreshes read only the lines appended since.
A file of one run that cannot be read (a bad metrics line, a corrupt status.json)
marks that run's row with the problem; it never stops the table.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .store import METRICS_FILE, MetricsTail, RunDirError, read_record, read_status
from twinflow_train.rundir import TERMINAL


def pid_is_trainer(pid: Any) -> bool:
    """Is ``pid`` a live trainer process on this machine (Linux: its command line names twinflow_train)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        except OSError:
            return False
        return not Path("/proc").is_dir()  # no /proc: cannot tell, trust the pid
    return b"twinflow_train" in cmdline


@dataclass
class RunRow:
    arm: str
    seed: int
    run_dir: Path
    steps: int | None
    state: str
    reason: str | None = None
    step: int = 0
    grad_norm: float | None = None
    val_loss: float | None = None
    step_s: float | None = None
    wall_s: float | None = None
    attempts: int = 0
    eta_s: float | None = None
    problem: str | None = None
    """A file of the run that could not be read (shown under the table)."""


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt_float(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


class GridMonitor:
    """Rows of a grid's runs from their files; ``harness_live`` says whether a harness is running the grid now.

    A ``running`` status with no harness running the grid and no live trainer process
    is shown as ``interrupted`` (the process was killed; a re-run resumes it).
    """

    def __init__(self, runs: Sequence[tuple[str, int, Path, int | None]]):
        self.runs = list(runs)
        self._tails = {run_dir: MetricsTail(run_dir / METRICS_FILE, from_end=True) for _, _, run_dir, _ in self.runs}

    def rows(self, *, harness_live: bool) -> list[RunRow]:
        out = []
        for arm, seed, run_dir, steps in self.runs:
            problems: list[str] = []
            status = record = None
            if run_dir.is_dir():
                for what, read in (("status", read_status), ("record", read_record)):
                    try:
                        value = read(run_dir)
                    except (RunDirError, TypeError) as e:
                        problems.append(str(e))
                        continue
                    status, record = (value, record) if what == "status" else (status, value)
            tail = self._tails[run_dir]
            tail.poll()
            problems += tail.problems[:1]
            last = tail.last
            state = status["state"] if status else ("new" if record is None else "queued")
            if state == "running" and not harness_live and not pid_is_trainer(status.get("pid")):
                state = "interrupted"
            step = int(last.get("step", 0)) if last else 0
            if status and state in TERMINAL:
                step = max(step, int(status.get("step") or 0))
            row = RunRow(arm=arm, seed=seed, run_dir=run_dir, steps=steps, state=state,
                         reason=status.get("reason") if status else None, step=step,
                         grad_norm=_num(last.get("grad_norm/total")), val_loss=_num(last.get("val/loss")),
                         step_s=_num(last.get("time/step_s")), wall_s=_num(last.get("time/wall_s")),
                         attempts=len(record.attempts) if record else 0,
                         problem="; ".join(problems) or None)
            out.append(row)
        _estimate(out)
        return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _estimate(rows: list[RunRow]) -> None:
    """Per-run ETA: remaining steps x seconds per step; runs not started borrow the median rate of the others."""
    rates = [r.wall_s / r.step for r in rows if r.wall_s and r.step and r.state != "new"]
    typical = statistics.median(rates) if rates else None
    for r in rows:
        if r.state in TERMINAL:
            r.eta_s = 0.0
            continue
        rate = r.step_s or (r.wall_s / r.step if r.wall_s and r.step else None) or typical
        if rate is None or r.steps is None:
            r.eta_s = None
        else:
            r.eta_s = max(0, r.steps - r.step) * rate


def grid_eta(rows: Sequence[RunRow], *, slots: int) -> float | None:
    """Seconds until every run ends with ``slots`` runs in flight (None when no rate is known yet)."""
    pending = [r.eta_s for r in rows if r.state not in TERMINAL]
    if not pending:
        return 0.0
    if any(e is None for e in pending):
        return None
    longest = max(pending)
    return max(longest, sum(pending) / max(1, slots))


def render_table(rows: Sequence[RunRow], *, slots: int, title: str = "") -> str:
    header = ("arm", "seed", "state", "step", "grad norm", "val loss", "ETA")
    body = []
    for r in rows:
        step = f"{r.step}/{r.steps}" if r.steps else str(r.step)
        state = r.state if r.attempts <= 1 else f"{r.state} (x{r.attempts})"
        body.append((r.arm, str(r.seed), state, step, _fmt_float(r.grad_norm), _fmt_float(r.val_loss),
                     "-" if r.state in TERMINAL else _fmt_duration(r.eta_s)))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines.append(f"{len(rows)} runs: {summary}; grid ETA {_fmt_duration(grid_eta(rows, slots=slots))}")
    failed = [r for r in rows if r.state in ("failed", "diverged") and r.reason]
    for r in failed:
        lines.append(f"  {r.arm}/seed-{r.seed} {r.state}: {r.reason}")
    for r in rows:
        if r.problem:
            lines.append(f"  {r.arm}/seed-{r.seed} problem: {r.problem}")
    return "\n".join(lines)


class LiveDisplay:
    """Redraws the table in place on a terminal; elsewhere prints one line per state change."""

    def __init__(self, stream: Any, *, tty: bool | None = None, every_s: float = 1.0):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._lines = 0
        self._last = 0.0

    def due(self) -> bool:
        return self.tty and time.monotonic() - self._last >= self.every_s

    def draw(self, text: str) -> None:
        self._last = time.monotonic()
        if not self.tty:
            return
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._lines = text.count("\n") + 1

    def event(self, message: str) -> None:
        """A state change (run started / ended); on a terminal the next redraw shows it instead."""
        if self.tty:
            return
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
        self.stream.flush()

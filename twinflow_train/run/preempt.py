"""Stop on a signal and lose nothing: SIGTERM, SIGUSR1 or SIGUSR2 end a run at a checkpoint.

A cluster stops a job with a signal: Slurm sends SIGTERM on preemption and at the time limit,
and with ``--signal`` a SIGUSR1/SIGUSR2 ahead of it; the harness sends SIGTERM when it is
stopped itself. ``PreemptWatch`` turns the first such signal into a request that the training
loop reads after each step (``agreed``): the step in flight finishes, every rank writes the
checkpoint of that step, status.json says ``preempted`` with the step, and the process exits
with ``EXIT_PREEMPTED``.

The loop must not hang on a rank that did not hear the signal, so the ranks agree: a MAX
all-reduce of the flag every ``run.preempt_check_every`` steps (one process reads its own flag
every step, with no collective).

``run.preempt_grace_s`` bounds the stop: when the grace runs out before the checkpoint is
written, or a second signal comes, the process exits at once with ``EXIT_PREEMPTED_NOW``;
checkpoints are written under a temporary name and renamed into place, so ``latest`` is still
the last complete one. A signal within ``REPEAT_S`` seconds of the first is the same stop
delivered twice (Slurm signals every process of a job step, and torchrun forwards the one it
got to its workers) and is not a second signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..rundir import EXIT_PREEMPTED, EXIT_PREEMPTED_NOW

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REPEAT_S = float(os.environ.get("TWINFLOW_PREEMPT_REPEAT_S", "5"))
"""Signals closer than this to the first are the same stop (``TWINFLOW_PREEMPT_REPEAT_S`` sets it)."""


def signals_at_steps(spec: str, *, rank: int) -> dict[int, list[int]]:
    """``TWINFLOW_SIGNAL_AT_STEP`` (tests inject preemption this way): ``STEP:SIGNAL[@RANK],...``, e.g.
    ``7:SIGTERM@0`` sends SIGTERM to rank 0's own process as step 7 starts (every rank without ``@``)."""
    out: dict[int, list[int]] = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        try:
            step, rest = item.split(":", 1)
            name, _, only = rest.partition("@")
            sig = signal.Signals[name.strip()]
            if only and int(only) != rank:
                continue
            out.setdefault(int(step), []).append(int(sig))
        except (KeyError, ValueError):
            raise ValueError(f"TWINFLOW_SIGNAL_AT_STEP: {item!r} is not STEP:SIGNAL[@RANK] "
                             "(e.g. 7:SIGTERM@0)") from None
    return out


class Preempted(Exception):
    """The run stopped on a signal at a checkpoint of ``step``; it resumes from there."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


class PreemptWatch:
    """Signal handlers for one ``fit`` (installed in the main thread only; elsewhere it never fires).

    ``on_exit_now(reason)``: called, best effort, just before an immediate exit (the trainer
    records status.json there)."""

    def __init__(self, *, grace_s: float, check_every: int = 1,
                 on_exit_now: Callable[[str], None] | None = None):
        self.grace_s = float(grace_s)
        self.check_every = int(check_every)
        self.on_exit_now = on_exit_now
        self.signal_name: str | None = None
        self.first_at: float | None = None
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers

    def install(self) -> "PreemptWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> "PreemptWatch":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is None:
            self.signal_name, self.first_at = name, now
            print(f"twinflow-train: received {name}: finishing the step in flight, then a checkpoint "
                  f"(grace {self.grace_s:g}s; a second signal exits at once)", flush=True)
            self._timer = threading.Timer(self.grace_s, self.exit_now,
                                          args=(f"the grace of {self.grace_s:g}s after {name} ran out",))
            self._timer.daemon = True
            self._timer.start()
        elif now - self.first_at >= REPEAT_S:
            self.exit_now(f"a second signal ({name}) after {name if self.signal_name is None else self.signal_name}")

    def exit_now(self, reason: str) -> None:
        """Exit this process at once, leaving the last complete checkpoint."""
        print(f"twinflow-train: {reason}: exiting at once; the run resumes from its last complete checkpoint",
              flush=True)
        if self.on_exit_now is not None:
            try:
                self.on_exit_now(reason)
            except Exception as e:  # noqa: BLE001 - the exit must happen whatever the record does
                print(f"twinflow-train: could not record the stop: {e}", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED_NOW)

    # ------------------------------------------------------------------ the loop's question

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def agreed(self, step: int, *, world: int, device: torch.device) -> bool:
        """Whether every rank stops after ``step`` (a collective at the cadence when ``world`` > 1)."""
        if world <= 1 or not dist.is_initialized():
            return self.requested
        if step % self.check_every != 0:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

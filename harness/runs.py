"""One run directory under the harness: what it holds, and one attempt from its launch to its record.

Grids (``harness.grid``) and searches (``harness.search_runs``) run trainer processes through
this module alone, so a run is prepared, started, recorded and stopped the same way whoever
runs it:

- ``classify``: what a run directory holds, as one word (``RunDirState.kind``);
- ``prepare_run_dir``: ``launch.yaml``, ``harness.json`` (identity, attempts), ``status.json`` queued;
- ``start_run`` / ``finish_run``: one attempt, from its launch to its recorded outcome;
- ``stop_runs``: stop live runs (SIGTERM, SIGKILL after a grace period) and record why;
- ``sigterm_raises``: SIGTERM stops the runs in flight as Ctrl-C does;
- ``supersede``: set a directory of another identity aside under ``<grid>/.superseded/`` (never deleted);
- ``prepare_shared_assets``: ``twinflow-train teacher`` once, before the runs start.

The files are those of ``harness.store`` (the harness's side of a run directory) and
``twinflow_train.rundir`` (the trainer's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, TextIO

import yaml

from twinflow_train.config import to_dict, to_yaml
from twinflow_train.rundir import EXIT_DONE, EXIT_STATES, RESTART_FLAG

from .identity import wandb_run_id
from .launchers import TRAINER_MODULE, Handle, Launcher, LaunchJob, LocalLauncher, SubmititHandle
from .matrix import RunSpec
from .monitor import pid_is_trainer
from .store import (HARNESS_DIR, LAUNCH_CONFIG, LOG_DIR, Attempt, RunDirError, RunRecord, atomic_write_text,
                    read_record, read_status, resume_step, write_record, write_status)

DirKind = Literal["new", "done", "diverged", "retry", "resume", "changed", "alive"]
ENDED = ("done", "failed", "diverged")
"""Run states the trainer (or ``finish_run``) writes when a run has ended."""
PREEMPTED = "preempted"
"""The trainer stopped on a signal at a checkpoint (``twinflow_train.run.preempt``): an attempt that is not a
failure; the run resumes from that checkpoint (on the next poll of a grid, or when the grid is re-run)."""
STOP_MARGIN_S = 10.0
"""A stop waits a run's ``run.preempt_grace_s`` plus this before SIGKILL."""
SUPERSEDED_DIR = ".superseded"
STOP_GRACE_S = 15.0

RunEnv = Mapping[str, Mapping[str, str]]
"""Extra environment per arm name or per run key (``arm/seed-k``), e.g.
``{"crash": {"TWINFLOW_FAULT_AT_STEP": "5"}}`` (tests inject faults this way)."""


class GridError(RuntimeError):
    """Runs cannot be started as asked (a changed run, a run still alive, failed shared assets); nothing was
    launched."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- what a directory holds


@dataclass(frozen=True)
class RunDirState:
    kind: DirKind
    """``new`` nothing to continue; ``done`` / ``diverged`` ended for good; ``retry`` failed (``failures``
    times); ``resume`` interrupted with a checkpoint; ``changed`` another identity, no or an unreadable
    ``harness.json``; ``alive`` its trainer is running now."""
    note: str = ""
    """Why, in words (shown by ``grid run --dry-run`` and in errors)."""
    failures: int = 0
    """Failed attempts so far (``retry``)."""
    reason: str | None = None
    """status.json's reason (``done``, ``diverged``, ``retry``)."""


def classify(spec: RunSpec, *, code_version: str) -> RunDirState:
    """What ``spec``'s run directory holds (reads only). ``code_version``: the trainer's now, named when it changed."""
    d = spec.run_dir
    if not d.is_dir() or not any(d.iterdir()):
        return RunDirState("new")
    try:
        record = read_record(d)
    except (RunDirError, TypeError) as e:  # its identity cannot be told: like a directory of unknown origin
        return RunDirState("changed", f"its harness.json does not load ({e})")
    if record is None:
        return RunDirState("changed", "the directory exists but was not made by the harness (no harness.json)")
    if record.identity != spec.identity:
        return RunDirState("changed", _changed_note(spec, record, code_version))
    try:
        status = read_status(d)
    except RunDirError as e:  # this run alone: resume it from its newest checkpoint, which the trainer verifies
        step = resume_step(d)
        return RunDirState("resume" if step else "new", f"{e}; resumes from step {step}")
    state = status["state"] if status else None
    reason = status.get("reason") if status else None
    if state == "done":
        return RunDirState("done", "done", reason=reason)
    if state == "diverged":
        return RunDirState("diverged", f"diverged: {reason}", reason=reason)
    if state == "failed":
        return RunDirState("retry", f"failed {record.failures} time(s): {reason}", failures=record.failures,
                           reason=reason)
    if state == PREEMPTED:
        step = resume_step(d)
        return RunDirState("resume" if step else "new", f"preempted ({reason}); resumes from step {step}",
                           reason=reason)
    if state == "running" and pid_is_trainer(status.get("pid")):
        return RunDirState("alive", f"{d}: run {spec.key} is still running (pid {status.get('pid')})")
    step = resume_step(d)
    return RunDirState("resume" if step else "new",
                       f"interrupted; resumes from step {step}" if step else "interrupted before a checkpoint")


def _changed_note(spec: RunSpec, record: RunRecord, code: str) -> str:
    parts = []
    if record.code_version != code:
        parts.append(f"trainer code changed ({record.code_version} -> {code})")
    launch = spec.run_dir / LAUNCH_CONFIG
    if launch.is_file():
        before = _flat(yaml.safe_load(launch.read_text()) or {})
        after = _flat(to_dict(spec.config))
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if keys:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys[:5])
            parts.append(f"config changed ({shown}{', ...' if len(keys) > 5 else ''})")
    return "; ".join(parts) or f"identity {record.identity} != {spec.identity}"


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def status_or_none(run_dir: Path) -> dict[str, Any] | None:
    """status.json where the harness is about to rewrite it: an unreadable one counts as none."""
    try:
        return read_status(run_dir)
    except RunDirError:
        return None


# --------------------------------------------------------------------------- before a run starts


def supersede(spec: RunSpec, *, grid_dir: Path) -> Path:
    """Move ``spec``'s directory to ``<grid>/.superseded/<arm>/seed-<k>-<old identity>`` (never deleted)."""
    try:
        record = read_record(spec.run_dir)
    except (RunDirError, TypeError):
        record = None
    old = record.identity if record else "unknown"
    dest = Path(grid_dir) / SUPERSEDED_DIR / spec.arm / f"seed-{spec.seed}-{old}"
    n = 1
    while dest.exists():
        dest = dest.with_name(f"seed-{spec.seed}-{old}.{n}")
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(spec.run_dir, dest)
    return dest


def prepare_run_dir(spec: RunSpec, *, code_version: str, matrix: Path) -> None:
    """``launch.yaml``, the identity record (once), status ``queued``; closes an attempt a killed harness left open."""
    d = spec.run_dir
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / LAUNCH_CONFIG, to_yaml(spec.config))
    record = read_record(d)
    if record is None:
        write_record(d, RunRecord(identity=spec.identity, config_hash=spec.config_hash, code_version=code_version,
                                  grid=spec.grid, arm=spec.arm, seed=spec.seed, matrix=str(matrix),
                                  overrides=spec.overrides))
    elif record.attempts and record.attempts[-1].ended is None:
        # the previous harness was killed with this attempt in flight: close it in the history
        last = record.attempts[-1]
        traces = [p for p in (d / (last.log or ""), d / "metrics.jsonl") if p.is_file()]
        last.ended = max((p.stat().st_mtime for p in traces), default=time.time())  # its last sign of life
        last.outcome, last.reason = "interrupted", "the harness was killed while the run was in flight"
        write_record(d, record)
    status = status_or_none(d)
    write_status(d, "queued", step=int(status.get("step") or 0) if status else resume_step(d),
                 config_hash=spec.config_hash)


def prepare_shared_assets(spec: RunSpec, launcher: Launcher, *, grid_dir: Path, stream: TextIO) -> float:
    """``twinflow-train teacher`` once with ``spec``'s config (the cache is process-safe); returns its seconds.

    Nothing to do where the base weights come from the model directory (Qwen-Image ``from_pretrained``
    layout): there is no teacher to train, and the runs' preflight checks the directory.
    Raises ``GridError`` naming the log when the preparation fails."""
    from twinflow_train.assets.teacher import base_weights_in_model  # lazy: the teacher brings torch

    if base_weights_in_model(spec.config):
        stream.write("base weights come from the model directory; no teacher preparation step\n")
        stream.flush()
        return 0.0
    hdir = Path(grid_dir) / HARNESS_DIR
    cfg_path = hdir / "teacher.yaml"
    atomic_write_text(cfg_path, to_yaml(spec.config))
    log = hdir / "teacher.log"
    # single-process work: locally it gets every core, on Slurm it is a job like the runs
    runner = launcher if launcher.kind == "slurm" else LocalLauncher(
        workers=1, module=getattr(launcher, "module", TRAINER_MODULE))
    stream.write(f"preparing shared assets (teacher, codec, reward, eval nets) -> {log}\n")
    stream.flush()
    t0 = time.perf_counter()
    rc = runner.run_blocking(LaunchJob(name="teacher", argv=["teacher", "--config", str(cfg_path.resolve()),
                                                             "--no-progress"], log_path=log), echo=stream)
    if rc != 0:
        raise GridError([f"teacher preparation failed ({exit_text(rc)}): {tail_reason(log)} (log: {log})"])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- one attempt


@dataclass
class ActiveRun:
    """A run whose attempt was started and has not been recorded as ended yet."""

    spec: RunSpec
    handle: Handle
    record: RunRecord
    attempt: Attempt


def run_env_for(spec: RunSpec, run_env: RunEnv) -> dict[str, str]:
    """The environment a run gets on top of the harness's: its W&B run id, then its arm's and its own variables."""
    env = {"WANDB_RUN_ID": wandb_run_id(spec.identity), "WANDB_RESUME": "allow"}
    env.update(run_env.get(spec.arm, {}))
    env.update(run_env.get(spec.key, {}))
    return {k: str(v) for k, v in env.items()}


def start_run(spec: RunSpec, launcher: Launcher, *, run_env: RunEnv | None = None,
              restart_on_corrupt: bool = False, extra_argv: Sequence[str] = ()) -> ActiveRun:
    """Record a new attempt in ``harness.json`` and launch the trainer on a prepared run directory."""
    d = spec.run_dir
    record = read_record(d)
    if record is None:
        raise RunDirError(f"{d}: no harness.json; prepare_run_dir comes first")
    number = len(record.attempts) + 1
    log_rel = f"{LOG_DIR}/attempt-{number}.log"
    attempt = Attempt(number=number, launcher=launcher.kind, started=time.time(), log=log_rel,
                      start_step=resume_step(d))
    record.attempts.append(attempt)
    write_record(d, record)
    job = LaunchJob(name=spec.key, log_path=d / log_rel, env=run_env_for(spec, run_env or {}),
                    argv=["fit", "--config", str((d / LAUNCH_CONFIG).resolve()), "--run-dir", str(d.resolve()),
                          "--no-progress", *([RESTART_FLAG] if restart_on_corrupt else []), *extra_argv])
    return ActiveRun(spec=spec, handle=launcher.start(job), record=record, attempt=attempt)


def _ended_by_itself(active: ActiveRun, status: Mapping[str, Any]) -> bool:
    """status.json holds an end (or a stop on a signal) the trainer wrote during this attempt."""
    return (status.get("state") in (*ENDED, PREEMPTED)
            and float(status.get("updated") or 0) >= active.attempt.started - 1.0)


def finish_run(active: ActiveRun, rc: int) -> str:
    """Record the attempt's outcome from status.json (and the exit code when the trainer could not write it)."""
    spec, attempt, d = active.spec, active.attempt, active.spec.run_dir
    status = status_or_none(d) or {}
    state = status.get("state")
    expected = EXIT_STATES.get(rc)
    if _ended_by_itself(active, status) and state == PREEMPTED and rc != EXIT_DONE:
        # whatever the exit code says (torchrun's agent and the scheduler's wrapper report their own)
        outcome, reason = PREEMPTED, status.get("reason")
    elif _ended_by_itself(active, status) and (expected is None or expected == state):
        outcome, reason = state, status.get("reason")
    else:
        # the trainer died without writing its end (signal, OOM, crash in start-up) or
        # contradicts its exit code: record a failure with what we know
        outcome = "failed"
        scheduler = active.handle.error if isinstance(active.handle, SubmititHandle) else None
        tail = tail_reason(d / (attempt.log or ""))
        if rc == EXIT_DONE and state != "done":
            reason = f"exited 0 but status.json says {state!r}"
        else:
            reason = "; ".join(x for x in (exit_text(rc), scheduler, tail) if x)
        write_status(d, "failed", step=max(int(status.get("step") or 0), resume_step(d)), reason=reason,
                     config_hash=spec.config_hash)
    attempt.ended, attempt.exit_code, attempt.outcome, attempt.reason = time.time(), rc, outcome, reason
    write_record(d, active.record)
    return outcome


def stop_runs(actives: list[ActiveRun], *, state: Literal["queued", "diverged"] = "queued",
              outcome: Literal["interrupted", "diverged"] = "interrupted", reason: str,
              grace_s: float = STOP_GRACE_S) -> list[str | None]:
    """Stop every run of ``actives`` (SIGTERM to its process group or the scheduler's cancel, SIGKILL after
    ``grace_s``, or the runs' ``run.preempt_grace_s`` plus a margin when longer), then record why: status
    ``state`` with ``reason``, the attempt ended as ``outcome``.

    The trainer turns the SIGTERM into a checkpoint of the step in flight and status ``preempted``; such a run,
    and one that ended by itself before the stop reached it, keeps its own verdict (``finish_run``:
    ``preempted`` is no failed attempt). Returns, per run, that outcome, or None for a run this stop ended."""
    for a in actives:
        a.handle.terminate()
    grace_s = max([grace_s, *(a.spec.config.run.preempt_grace_s + STOP_MARGIN_S for a in actives)])
    deadline = time.monotonic() + grace_s
    pending = list(actives)
    while pending and time.monotonic() < deadline:
        pending = [a for a in pending if a.handle.poll() is None]
        if pending:
            time.sleep(0.05)
    for a in pending:
        kill = getattr(a.handle, "kill", None)
        if kill is not None:
            kill()
    outcomes: list[str | None] = []
    for a in actives:
        d, rc = a.spec.run_dir, a.handle.poll()
        status = status_or_none(d) or {}
        preempted = status.get("state") == PREEMPTED
        if _ended_by_itself(a, status) and not (preempted and state != "queued"):
            # a stop meant to resume later that the trainer turned into a checkpoint: preempted, with the stop's
            # reason; a stop that ends the run (diverged) is recorded as that below
            outcomes.append(finish_run(a, rc if rc is not None else -int(signal.SIGTERM)))
            if preempted:
                step = int(status.get("step") or 0)
                write_status(d, PREEMPTED, step=step, reason=f"{reason} (stopped at the checkpoint of step {step})",
                             config_hash=a.spec.config_hash)
            continue
        write_status(d, state, step=max(int(status.get("step") or 0), resume_step(d)), reason=reason,
                     config_hash=a.spec.config_hash)
        a.attempt.ended, a.attempt.exit_code = time.time(), rc
        a.attempt.outcome, a.attempt.reason = outcome, reason
        write_record(d, a.record)
        outcomes.append(None)
    return outcomes


@contextlib.contextmanager
def sigterm_raises(error: type[BaseException]) -> Iterator[None]:
    """While the block runs, SIGTERM (a scheduler stopping the harness) raises ``error`` like Ctrl-C raises
    KeyboardInterrupt, so the runs in flight are stopped and recorded. Handlers belong to the main thread: in
    another thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame: Any) -> None:
        raise error(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- reasons


def tail_reason(log_path: Path, limit: int = 300) -> str | None:
    """Last meaningful line of a log (the exception line of a traceback)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # "$ ..." lines are the launch commands the launchers write, not output of the process
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("$ ")]
    return lines[-1][:limit] if lines else None


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"

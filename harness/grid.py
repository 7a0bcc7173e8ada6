"""Run a grid: plan from the run directories, prepare shared assets, launch, watch, record.

Re-running a grid is always safe. Each run's directory says what to do with it:

=====================================  ===============================================
what the directory holds                what ``run_grid`` does
=====================================  ===============================================
nothing                                 start the run (action ``new``)
``done``                                nothing (``skip``)
``diverged``                            nothing: the same config and seed diverge again
``failed``, fewer than ``retries``+1    start it again; the trainer resumes from
failed attempts                         ``checkpoints/latest`` (action ``retry``)
``failed``, retries used up             nothing (``exhausted``)
``queued`` / ``running`` and no live    start it again, resuming from its checkpoint
process (interrupted)                   (action ``resume``)
another identity (config or trainer     error naming the run, unless ``on_changed=
code changed), or no ``harness.json``   "supersede"``: the old directory is moved to
                                        ``<grid>/.superseded/<arm>/seed-<k>-<identity>``
                                        (never deleted) and the run starts fresh
=====================================  ===============================================

Only one harness runs a grid at a time (``<grid>/.harness/lock``, an OS lock that a
killed harness releases by dying).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TextIO

from twinflow_train.config import to_dict, to_yaml
from twinflow_train.rundir import EXIT_DONE, EXIT_STATES, RESTART_FLAG

from .identity import wandb_run_id
from .launchers import TRAINER_MODULE, Handle, Launcher, LaunchJob, LocalLauncher, SubmititHandle
from .matrix import Grid, RunSpec
from .monitor import GridMonitor, LiveDisplay, pid_is_trainer, render_table
from .store import (LAUNCH_CONFIG, LOG_DIR, Attempt, RunDirError, RunRecord, atomic_write_text, read_record,
                    read_status, resume_step, write_record, write_status)

Action = Literal["new", "resume", "retry", "skip", "exhausted", "changed"]
LAUNCH_ACTIONS = ("new", "resume", "retry")
HARNESS_DIR = ".harness"
SUPERSEDED_DIR = ".superseded"


class GridError(RuntimeError):
    """The grid cannot be run as asked (a changed run, a run still alive, a failed teacher); nothing was launched."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class GridInterrupted(Exception):
    """The harness was asked to stop (SIGTERM); the runs in flight were stopped and can be resumed."""


# --------------------------------------------------------------------------- lock


def _lock_path(grid_dir: Path) -> Path:
    return Path(grid_dir) / HARNESS_DIR / "lock"


class GridLock:
    """Exclusive OS lock on a grid; its file holds who runs the grid (pid, launcher, slots)."""

    def __init__(self, grid_dir: Path):
        self.path = _lock_path(grid_dir)
        self._fd: int | None = None

    def acquire(self, info: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_info(self.path.parent.parent) or {}
            raise GridError([f"grid {self.path.parent.parent} is being run by another harness "
                             f"(pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')})"]) from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(dict(info)) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def grid_is_live(grid_dir: Path) -> bool:
    """Is a harness running this grid right now?"""
    path = _lock_path(grid_dir)
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


def lock_info(grid_dir: Path) -> dict[str, Any] | None:
    path = _lock_path(grid_dir)
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- plan


@dataclass
class PlannedRun:
    spec: RunSpec
    action: Action
    note: str = ""


def _changed_note(spec: RunSpec, record: RunRecord, code: str) -> str:
    parts = []
    if record.code_version != code:
        parts.append(f"trainer code changed ({record.code_version} -> {code})")
    launch = spec.run_dir / LAUNCH_CONFIG
    if launch.is_file():
        import yaml

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


def plan_grid(grid: Grid, *, retries: int = 0, own_lock: bool = False) -> list[PlannedRun]:
    """What to do with every run of ``grid`` given its directory (read-only). See the module docstring.

    ``own_lock``: the caller holds the grid's lock, so no other harness is running it.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0 (got {retries})")
    live = False if own_lock else grid_is_live(grid.grid_dir)
    if live:
        info = lock_info(grid.grid_dir) or {}
        raise GridError([f"grid {grid.grid_dir} is being run by another harness (pid {info.get('pid', '?')}, "
                         f"started {info.get('started_at', '?')}); `twinflow-lab grid status` shows its progress"])
    plans = []
    for spec in grid.runs:
        d = spec.run_dir
        if not d.is_dir() or not any(d.iterdir()):
            plans.append(PlannedRun(spec, "new"))
            continue
        try:
            record = read_record(d)
        except (RunDirError, TypeError) as e:  # its identity cannot be told: like a directory of unknown origin
            plans.append(PlannedRun(spec, "changed", f"its harness.json does not load ({e})"))
            continue
        if record is None:
            plans.append(PlannedRun(spec, "changed", "the directory exists but was not made by the harness "
                                                     "(no harness.json)"))
            continue
        if record.identity != spec.identity:
            plans.append(PlannedRun(spec, "changed", _changed_note(spec, record, grid.code_version)))
            continue
        try:
            status = read_status(d)
        except RunDirError as e:  # this run alone: resume it from its newest checkpoint, which the trainer verifies
            step = resume_step(d)
            plans.append(PlannedRun(spec, "resume" if step else "new", f"{e}; resumes from step {step}"))
            continue
        state = status["state"] if status else None
        if state == "done":
            plans.append(PlannedRun(spec, "skip", "done"))
        elif state == "diverged":
            plans.append(PlannedRun(spec, "skip", f"diverged: {status.get('reason')}"))
        elif state == "failed":
            if record.failures <= retries:
                plans.append(PlannedRun(spec, "retry", f"failed {record.failures} time(s): {status.get('reason')}"))
            else:
                plans.append(PlannedRun(spec, "exhausted", f"failed {record.failures} time(s), retries={retries}: "
                                                           f"{status.get('reason')}"))
        elif state == "running" and pid_is_trainer(status.get("pid")):
            raise GridError([f"{d}: run {spec.key} is still running (pid {status.get('pid')}); "
                             "wait for it or stop it before re-running the grid"])
        else:
            step = resume_step(d)
            note = f"interrupted; resumes from step {step}" if step else "interrupted before a checkpoint"
            plans.append(PlannedRun(spec, "resume" if step else "new", note))
    return plans


@dataclass
class RunCheck:
    key: str
    action: Action
    problem: str | None
    """What the trainer's preflight refuses (paths, weights, reward), or None: the run would start."""


def dry_run_grid(grid: Grid, *, retries: int = 0) -> list[RunCheck]:
    """What ``run_grid`` would do with every run, and the trainer's own preflight for each run it would
    launch (weights and data paths, reward model, existing run directory). Reads only; writes nothing."""
    from twinflow_train.config import ConfigError
    from twinflow_train.trainer import preflight

    checks = []
    for p in plan_grid(grid, retries=retries):
        problem = p.note if p.action == "changed" else None
        if p.action in LAUNCH_ACTIONS:
            try:
                preflight(p.spec.config, p.spec.run_dir)
            except ConfigError as e:
                problem = str(e)
        checks.append(RunCheck(key=p.spec.key, action=p.action, problem=problem))
    return checks


# --------------------------------------------------------------------------- run


@dataclass
class GridResult:
    grid: str
    outcomes: dict[str, str] = field(default_factory=dict)
    """run key (arm/seed-k) -> done | failed | diverged: its state when this invocation ended."""
    launched: list[str] = field(default_factory=list)
    """Run keys started by this invocation (a retried run appears once per attempt)."""
    skipped: list[str] = field(default_factory=list)
    teacher_s: float = 0.0
    """Seconds spent preparing shared assets."""
    runs_wall_s: float = 0.0
    """Seconds from the first launch to the last run's end."""

    @property
    def exit_code(self) -> int:
        """0 every run done; 3 the grid finished but some run failed or diverged."""
        return 0 if all(v == "done" for v in self.outcomes.values()) else 3


@dataclass
class _Active:
    spec: RunSpec
    handle: Handle
    record: RunRecord
    attempt: Attempt


def _tail_reason(log_path: Path, limit: int = 300) -> str | None:
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


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def run_grid(grid: Grid, *, launcher: Launcher, retries: int = 0,
             on_changed: Literal["error", "supersede"] = "error",
             run_env: Mapping[str, Mapping[str, str]] | None = None,
             stream: TextIO | None = None, tty: bool | None = None, poll_s: float = 0.1,
             prepare_teacher: bool = True, restart_on_corrupt: bool = False) -> GridResult:
    """Launch every run of ``grid`` that is not done, watch them, record what happened.

    ``run_env``: extra environment per arm name or per run key (``arm/seed-k``), e.g.
    ``{"crash": {"TWINFLOW_FAULT_AT_STEP": "5"}}`` (tests inject faults this way).
    ``restart_on_corrupt``: passed to the trainer (a run whose checkpoints all fail to verify
    starts again from step 0 instead of failing).
    Raises ``GridError`` before anything is launched when a run changed identity
    (``on_changed="error"``), is still alive, or the teacher cannot be prepared.
    """
    if on_changed not in ("error", "supersede"):
        raise ValueError(f"on_changed must be 'error' or 'supersede' (got {on_changed!r})")
    stream = stream if stream is not None else sys.stdout
    run_env = run_env or {}
    result = GridResult(grid=grid.name)

    def check(plans: list[PlannedRun]) -> None:
        changed = [p for p in plans if p.action == "changed"]
        if changed and on_changed == "error":
            raise GridError([f"{p.spec.run_dir}: run {p.spec.key} has a different identity: {p.note}; "
                             "re-run with --supersede-changed to set the old directory aside and start fresh"
                             for p in changed])

    check(plan_grid(grid, retries=retries))  # read-only: a refused grid creates nothing
    lock = GridLock(grid.grid_dir)
    lock.acquire({"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "launcher": launcher.kind, "slots": launcher.slots, "matrix": str(grid.matrix_path)})
    # SIGTERM (a scheduler stopping the harness) unwinds like Ctrl-C so the runs in flight are stopped and
    # recorded; handlers can only be set from the main thread
    main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.getsignal(signal.SIGTERM) if main_thread else None

    def on_term(signum: int, _frame: Any) -> None:
        raise GridInterrupted(f"received {signal.Signals(signum).name}")

    if main_thread:
        signal.signal(signal.SIGTERM, on_term)
    try:
        plans = plan_grid(grid, retries=retries, own_lock=True)
        check(plans)
        for p in plans:
            if p.action == "changed":
                _supersede(grid, p.spec)
                p.action = "new"
        for p in plans:
            if p.action not in LAUNCH_ACTIONS:
                result.skipped.append(p.spec.key)
                result.outcomes[p.spec.key] = (_status_or_none(p.spec.run_dir) or {}).get("state", "?")
        todo = [p for p in plans if p.action in LAUNCH_ACTIONS]
        display = LiveDisplay(stream, tty=tty)
        stream.write(f"grid {grid.name}: {len(grid.runs)} runs, {len(todo)} to launch, {len(result.skipped)} "
                     f"skipped; {launcher.describe()}\n")
        stream.flush()
        if todo and prepare_teacher:
            result.teacher_s = _prepare_teacher(grid, todo[0].spec, launcher, display)
        for p in todo:
            _prepare_run_dir(grid, p.spec)
        _schedule(grid, todo, launcher=launcher, retries=retries, run_env=run_env, display=display,
                  poll_s=poll_s, result=result, restart_on_corrupt=restart_on_corrupt)
        monitor = GridMonitor([(s.arm, s.seed, s.run_dir, s.config.run.steps) for s in grid.runs])
        stream.write(render_table(monitor.rows(harness_live=True), slots=launcher.slots,
                                  title=f"grid {grid.name}: finished") + "\n")
        stream.flush()
        return result
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        lock.release()


def _supersede(grid: Grid, spec: RunSpec) -> None:
    try:
        record = read_record(spec.run_dir)
    except (RunDirError, TypeError):
        record = None
    old = record.identity if record else "unknown"
    dest = grid.grid_dir / SUPERSEDED_DIR / spec.arm / f"seed-{spec.seed}-{old}"
    n = 1
    while dest.exists():
        dest = dest.with_name(f"seed-{spec.seed}-{old}.{n}")
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(spec.run_dir, dest)


def _prepare_teacher(grid: Grid, spec: RunSpec, launcher: Launcher, display: LiveDisplay) -> float:
    """``twinflow-train teacher`` once, with the first run's resolved config (the cache is process-safe).

    Nothing to do where the base weights come from the model directory (Qwen-Image ``from_pretrained``
    layout): there is no teacher to train, and the runs' preflight checks the directory."""
    from twinflow_train.teacher import base_weights_in_model

    if base_weights_in_model(spec.config):
        display.stream.write("base weights come from the model directory; no teacher preparation step\n")
        display.stream.flush()
        return 0.0
    hdir = grid.grid_dir / HARNESS_DIR
    cfg_path = hdir / "teacher.yaml"
    atomic_write_text(cfg_path, to_yaml(spec.config))
    log = hdir / "teacher.log"
    # single-process work: locally it gets every core, on Slurm it is a job like the runs
    runner = launcher if launcher.kind == "slurm" else LocalLauncher(
        workers=1, module=getattr(launcher, "module", TRAINER_MODULE))
    display.stream.write(f"preparing shared assets (teacher, codec, reward, eval nets) -> {log}\n")
    display.stream.flush()
    t0 = time.perf_counter()
    rc = runner.run_blocking(LaunchJob(name="teacher", argv=["teacher", "--config", str(cfg_path.resolve()),
                                                             "--no-progress"], log_path=log))
    if rc != 0:
        raise GridError([f"teacher preparation failed ({_exit_text(rc)}): {_tail_reason(log)} (log: {log})"])
    return time.perf_counter() - t0


def _prepare_run_dir(grid: Grid, spec: RunSpec) -> None:
    d = spec.run_dir
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / LAUNCH_CONFIG, to_yaml(spec.config))
    record = read_record(d)
    if record is None:
        write_record(d, RunRecord(identity=spec.identity, config_hash=spec.config_hash,
                                  code_version=grid.code_version, grid=grid.name, arm=spec.arm, seed=spec.seed,
                                  matrix=str(grid.matrix_path), overrides=spec.overrides))
    elif record.attempts and record.attempts[-1].ended is None:
        # the previous harness was killed with this attempt in flight: close it in the history
        last = record.attempts[-1]
        traces = [p for p in (d / (last.log or ""), d / "metrics.jsonl") if p.is_file()]
        last.ended = max((p.stat().st_mtime for p in traces), default=time.time())  # its last sign of life
        last.outcome, last.reason = "interrupted", "the harness was killed while the run was in flight"
        write_record(d, record)
    status = _status_or_none(d)
    write_status(d, "queued", step=int(status.get("step") or 0) if status else resume_step(d),
                 config_hash=spec.config_hash)


def _status_or_none(run_dir: Path) -> dict[str, Any] | None:
    """status.json where the harness is about to rewrite it: an unreadable one counts as none."""
    try:
        return read_status(run_dir)
    except RunDirError:
        return None


def _env_for(spec: RunSpec, run_env: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    env = {"WANDB_RUN_ID": wandb_run_id(spec.identity), "WANDB_RESUME": "allow"}
    env.update(run_env.get(spec.arm, {}))
    env.update(run_env.get(spec.key, {}))
    return {k: str(v) for k, v in env.items()}


def _start(spec: RunSpec, launcher: Launcher, run_env: Mapping[str, Mapping[str, str]], *,
           restart_on_corrupt: bool = False) -> _Active:
    d = spec.run_dir
    record = read_record(d)
    assert record is not None, d
    number = len(record.attempts) + 1
    log_rel = f"{LOG_DIR}/attempt-{number}.log"
    attempt = Attempt(number=number, launcher=launcher.kind, started=time.time(), log=log_rel,
                      start_step=resume_step(d))
    record.attempts.append(attempt)
    write_record(d, record)
    job = LaunchJob(name=spec.key, log_path=d / log_rel, env=_env_for(spec, run_env),
                    argv=["fit", "--config", str((d / LAUNCH_CONFIG).resolve()), "--run-dir", str(d.resolve()),
                          "--no-progress", *([RESTART_FLAG] if restart_on_corrupt else [])])
    handle = launcher.start(job)
    return _Active(spec=spec, handle=handle, record=record, attempt=attempt)


def _finish(active: _Active, rc: int) -> str:
    """Record the attempt's outcome from status.json (and the exit code when the trainer could not write it)."""
    spec, attempt, d = active.spec, active.attempt, active.spec.run_dir
    status = _status_or_none(d) or {}
    state = status.get("state")
    fresh = float(status.get("updated") or 0) >= attempt.started - 1.0
    expected = EXIT_STATES.get(rc)
    if state in ("done", "failed", "diverged") and fresh and (expected is None or expected == state):
        outcome, reason = state, status.get("reason")
    else:
        # the trainer died without writing its end (signal, OOM, crash in start-up) or
        # contradicts its exit code: record a failure with what we know
        outcome = "failed"
        scheduler = getattr(active.handle, "error", None) if isinstance(active.handle, SubmititHandle) else None
        tail = _tail_reason(d / (attempt.log or ""))
        if rc == EXIT_DONE and state != "done":
            reason = f"exited 0 but status.json says {state!r}"
        else:
            reason = "; ".join(x for x in (_exit_text(rc), scheduler, tail) if x)
        write_status(d, "failed", step=max(int(status.get("step") or 0), resume_step(d)), reason=reason,
                     config_hash=spec.config_hash)
    attempt.ended, attempt.exit_code, attempt.outcome, attempt.reason = time.time(), rc, outcome, reason
    write_record(d, active.record)
    return outcome


def _interrupt(actives: list[_Active], display: LiveDisplay, why: str, grace_s: float = 15.0) -> None:
    for a in actives:
        a.handle.terminate()
    deadline = time.monotonic() + grace_s
    pending = list(actives)
    while pending and time.monotonic() < deadline:
        pending = [a for a in pending if a.handle.poll() is None]
        time.sleep(0.1)
    for a in pending:
        kill = getattr(a.handle, "kill", None)
        if kill is not None:
            kill()
    for a in actives:
        d = a.spec.run_dir
        status = _status_or_none(d) or {}
        if status.get("state") not in ("done", "failed", "diverged"):
            write_status(d, "queued", step=resume_step(d), config_hash=a.spec.config_hash,
                         reason=f"interrupted ({why}); re-run the grid to resume")
        a.attempt.ended, a.attempt.outcome, a.attempt.reason = time.time(), "interrupted", why
        write_record(d, a.record)
        display.event(f"{a.spec.key} interrupted ({why})")


def _schedule(grid: Grid, todo: list[PlannedRun], *, launcher: Launcher, retries: int,
              run_env: Mapping[str, Mapping[str, str]], display: LiveDisplay, poll_s: float,
              result: GridResult, restart_on_corrupt: bool = False) -> None:
    queue = [p.spec for p in todo]
    active: list[_Active] = []
    monitor = GridMonitor([(s.arm, s.seed, s.run_dir, s.config.run.steps) for s in grid.runs])
    first_start: float | None = None
    try:
        while queue or active:
            while queue and len(active) < launcher.slots:
                spec = queue.pop(0)
                a = _start(spec, launcher, run_env, restart_on_corrupt=restart_on_corrupt)
                first_start = first_start if first_start is not None else time.perf_counter()
                active.append(a)
                result.launched.append(spec.key)
                display.event(f"{spec.key} started (attempt {a.attempt.number}"
                              f"{f', from step {a.attempt.start_step}' if a.attempt.start_step else ''})")
            still = []
            for a in active:
                rc = a.handle.poll()
                if rc is None:
                    still.append(a)
                    continue
                outcome = _finish(a, rc)
                took = a.attempt.ended - a.attempt.started
                display.event(f"{a.spec.key} {outcome} after {took:.1f}s"
                              f"{f': {a.attempt.reason}' if a.attempt.reason and outcome != 'done' else ''}")
                if outcome == "failed" and a.record.failures <= retries:
                    queue.append(a.spec)
                    display.event(f"{a.spec.key} will be retried ({a.record.failures}/{retries})")
                else:
                    result.outcomes[a.spec.key] = outcome
            active = still
            if display.due():
                display.draw(render_table(monitor.rows(harness_live=True), slots=launcher.slots,
                                          title=f"grid {grid.name} ({launcher.describe()})"))
            if queue or active:
                time.sleep(poll_s)
    except (KeyboardInterrupt, GridInterrupted) as e:
        _interrupt(active, display, why=str(e) or type(e).__name__)
        raise
    finally:
        if first_start is not None:
            result.runs_wall_s = time.perf_counter() - first_start

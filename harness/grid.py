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

The states come from ``harness.runs.classify``, the executor grids and searches share (prepare,
start, finish, stop, supersede). Only one harness runs a grid at a time (``<grid>/.harness/lock``, an OS lock that a
killed harness releases by dying).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Mapping, TextIO

from twinflow_train.inputs import ConfigError
from twinflow_train.rundir import tail_metrics

from .collect import collect_grid, run_statuses
from .forks import Fork, fork_argv, fork_points, plan_forks, source_run, sources_worth_running, with_sources
from .forks import describe as describe_forks
from .forks import ready as fork_ready
from .inference import ALPHA
from .launchers import Launcher
from .lock import GridLock, grid_is_live, lock_info
from .matrix import Grid, RunSpec
from .monitor import GridMonitor, LiveDisplay, render_table
from .runs import (ActiveRun, GridError, RunEnv, classify, finish_run, prepare_run_dir,
                   prepare_shared_assets, sigterm_raises, start_run, status_or_none, stop_runs, supersede)
from .sequential import look_json, open_tests_text, read_record, resume_state, write_record
from .store import write_grid_manifest
from .verdicts import sequential_look

Action = Literal["new", "resume", "retry", "skip", "exhausted", "changed"]
LAUNCH_ACTIONS = ("new", "resume", "retry")
__all__ = ["GridError", "GridInterrupted", "GridLock", "GridResult", "PlannedRun", "RunCheck", "dry_run_grid",
           "grid_is_live", "lock_info", "plan_grid", "run_grid"]


class GridInterrupted(Exception):
    """The harness was asked to stop (SIGTERM); the runs in flight were stopped and can be resumed."""


# --------------------------------------------------------------------------- plan


@dataclass
class PlannedRun:
    spec: RunSpec
    action: Action
    note: str = ""


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
        state = classify(spec, code_version=grid.code_version)
        if state.kind == "alive":
            raise GridError([f"{state.note}; wait for it or stop it before re-running the grid"])
        if state.kind in ("done", "diverged"):
            plans.append(PlannedRun(spec, "skip", state.note))
        elif state.kind == "retry" and state.failures > retries:
            plans.append(PlannedRun(spec, "exhausted", f"failed {state.failures} time(s), retries={retries}: "
                                                       f"{state.reason}"))
        else:
            plans.append(PlannedRun(spec, state.kind, state.note))
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
    from twinflow_train.run.trainer import preflight  # lazy: the trainer brings torch

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
    steps_computed: int | None = None
    """Training steps the grid's runs computed (sequential grids; printed at the end)."""

    @property
    def exit_code(self) -> int:
        """0 every run done; 3 the grid finished but some run failed or diverged."""
        return 0 if all(v == "done" for v in self.outcomes.values()) else 3


def run_grid(grid: Grid, *, launcher: Launcher, retries: int = 0,
             on_changed: Literal["error", "supersede"] = "error",
             run_env: RunEnv | None = None,
             stream: TextIO | None = None, tty: bool | None = None, poll_s: float = 0.1,
             prepare_teacher: bool = True, restart_on_corrupt: bool = False, forks: bool = True) -> GridResult:
    """Launch every run of ``grid`` that is not done, watch them, record what happened.

    ``forks``: arms that share a prefix with another arm start from its runs' state there
    (``harness.forks``; bit-identical to training them from step 0, which ``forks=False`` does).

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
    try:
        with sigterm_raises(GridInterrupted):
            plans = plan_grid(grid, retries=retries, own_lock=True)
            check(plans)
            # the arm order and the claims, for readers of the grid directory (reports) that never load the matrix
            write_grid_manifest(grid.grid_dir, kind="grid", source=grid.matrix_path, arms=[a.name for a in grid.arms],
                                parents={a.name: a.extends for a in grid.arms}, claims=[c.to_json() for c in grid.claims])
            for p in plans:
                if p.action == "changed":
                    supersede(p.spec, grid_dir=grid.grid_dir)
                    p.action = "new"
            for p in plans:
                if p.action not in LAUNCH_ACTIONS:
                    result.skipped.append(p.spec.key)
                    result.outcomes[p.spec.key] = (status_or_none(p.spec.run_dir) or {}).get("state", "?")
            todo = [p for p in plans if p.action in LAUNCH_ACTIONS]
            display = LiveDisplay(stream, tty=tty)
            if grid.plan is None:
                stream.write(f"grid {grid.name}: {len(grid.runs)} runs, {len(todo)} to launch, "
                             f"{len(result.skipped)} skipped; {launcher.describe()}\n")
            else:
                stream.write(f"grid {grid.name}: sequential, {len(grid.arms)} arms x {grid.plan.first}-"
                             f"{grid.plan.max} seeds ({len(result.skipped)} runs already ended); "
                             f"{launcher.describe()}\n")
            stream.flush()
            if todo and prepare_teacher:
                result.teacher_s = prepare_shared_assets(todo[0].spec, launcher, grid_dir=grid.grid_dir, stream=stream)
            fork_plan = plan_forks(grid) if forks else {}
            for line in describe_forks(fork_plan):
                stream.write(f"fork: {line}\n")
            if grid.plan is None:
                for p in todo:
                    prepare_run_dir(p.spec, code_version=grid.code_version, matrix=grid.matrix_path)
                _schedule(grid, todo, launcher=launcher, retries=retries, run_env=run_env, display=display,
                          poll_s=poll_s, result=result, restart_on_corrupt=restart_on_corrupt, forks=fork_plan)
            else:
                _run_waves(grid, plans, launcher=launcher, retries=retries, run_env=run_env, display=display,
                           poll_s=poll_s, result=result, restart_on_corrupt=restart_on_corrupt, stream=stream,
                           forks=fork_plan)
            result.steps_computed = _steps_computed(grid)
            stream.write(f"grid {grid.name}: {result.steps_computed:,} training steps computed by its runs "
                         f"(every arm and seed from step 0 would be {_steps_scratch(grid):,})\n")
            monitor = GridMonitor([(s.arm, s.seed, s.run_dir, s.config.run.steps) for s in grid.runs])
            rows = monitor.rows(harness_live=True)
            if grid.plan is not None:  # the seeds a sequential design never needed are not pending work
                rows = [r for r in rows if r.state != "new"]
            stream.write(render_table(rows, slots=launcher.slots, title=f"grid {grid.name}: finished") + "\n")
            stream.flush()
            return result
    finally:
        lock.release()


def _run_waves(grid: Grid, plans: list[PlannedRun], *, launcher: Launcher, retries: int, run_env: RunEnv,
               display: LiveDisplay, poll_s: float, result: GridResult, restart_on_corrupt: bool,
               stream: TextIO, forks: Mapping[str, Fork]) -> None:
    """A sequential grid (``harness.sequential``): run a wave, look at every open claim, give the next wave's
    seeds to the arms of the claims still open; resume from the recorded looks."""
    plan = grid.plan
    assert plan is not None
    arms = [a.name for a in grid.arms]
    by_key = {p.spec.key: p for p in plans}

    def tables():
        return collect_grid(grid.grid_dir), run_statuses(grid.grid_dir)

    record = read_record(grid.grid_dir)
    metrics, statuses = tables() if record and record.get("looks") else (None, None)
    wave = resume_state(grid.grid_dir, grid.claims, arms, plan, metrics, statuses)
    looks = list(record["looks"]) if record and record.get("looks") else []
    judgement = wave.judgement
    while not wave.done:
        ended = {k for k, p in by_key.items() if p.action not in LAUNCH_ACTIONS}
        wanted, no_fork = sources_worth_running(
            {f"{a}/seed-{s}" for a, n in wave.targets.items() for s in plan.seeds[:n]}, forks,
            {r.key: r for r in grid.runs}, ended=ended)
        todo = [by_key[k] for k in sorted(wanted, key=lambda k: list(by_key).index(k))
                if by_key[k].action in LAUNCH_ACTIONS]
        stream.write(f"wave {wave.number}: seeds per arm "
                     + ", ".join(f"{a} {n}" for a, n in wave.targets.items()) + f"; {len(todo)} runs to launch\n")
        stream.flush()
        for p in todo:
            prepare_run_dir(p.spec, code_version=grid.code_version, matrix=grid.matrix_path)
        _schedule(grid, todo, launcher=launcher, retries=retries, run_env=run_env, display=display,
                  poll_s=poll_s, result=result, restart_on_corrupt=restart_on_corrupt, forks=forks, no_fork=no_fork)
        for p in todo:
            p.action = "skip"  # ended (done, diverged or failed for good): a later wave does not start it again
        metrics, statuses = tables()
        judgement = sequential_look(grid.claims, metrics, statuses, targets=wave.targets, seeds=plan.seeds,
                                    previous=judgement, alpha=ALPHA,
                                    spending=plan.spending, n_max=plan.max)
        looks.append(look_json(wave.number, wave.targets, judgement))
        write_record(grid.grid_dir, plan=plan, claims=grid.claims, looks=looks)
        stream.write(f"look after wave {wave.number}:\n" + "".join(f"  {line}\n" for line in
                                                                  open_tests_text(judgement, grid.claims)))
        stream.flush()
        wave = resume_state(grid.grid_dir, grid.claims, arms, plan, metrics, statuses)


def _steps_computed(grid: Grid) -> int:
    """Training steps the grid's runs computed (their last logged step; a forked run counts from its fork)."""
    total = 0
    for spec in grid.runs:
        last = tail_metrics(spec.run_dir / "metrics.jsonl", kinds=("train",)).last.get("train")
        if last is None:
            continue
        fork = spec.run_dir / "fork.json"
        start = 0
        if fork.is_file():
            info = json.loads(fork.read_text())
            start = 0 if info.get("fallback") else int(info.get("step", 0))
        total += int(last["step"]) - start
    return total


def _steps_scratch(grid: Grid) -> int:
    """What the runs that have a record would have computed each from step 0."""
    total = 0
    for spec in grid.runs:
        last = tail_metrics(spec.run_dir / "metrics.jsonl", kinds=("train",)).last.get("train")
        total += int(last["step"]) if last is not None else 0
    return total


def _schedule(grid: Grid, todo: list[PlannedRun], *, launcher: Launcher, retries: int,
              run_env: RunEnv, display: LiveDisplay, poll_s: float,
              result: GridResult, restart_on_corrupt: bool = False, forks: Mapping[str, Fork] | None = None,
              no_fork: set[str] = frozenset()) -> None:
    forks = forks or {}
    runs = {r.key: r for r in grid.runs}
    points = fork_points(forks)
    # sources before the runs that fork from them; otherwise the plan's order
    depth = {s.key: len(with_sources({s.key}, forks, runs)) for s in (p.spec for p in todo)}
    queue = sorted((p.spec for p in todo), key=lambda s: depth[s.key])

    def startable(spec: RunSpec, active: list[ActiveRun]) -> bool:
        pending = {s.key for s in queue} | {a.spec.key for a in active}
        src = source_run(spec, forks, runs, no_fork)
        return src is None or src.key not in pending or fork_ready(spec, forks, runs, no_fork)

    active: list[ActiveRun] = []
    monitor = GridMonitor([(s.arm, s.seed, s.run_dir, s.config.run.steps) for s in grid.runs])
    first_start: float | None = None
    try:
        while queue or active:
            while queue and len(active) < launcher.slots:
                spec = next((s for s in queue if startable(s, active)), None)
                if spec is None:
                    break  # every queued run waits for its source's fork checkpoint
                queue.remove(spec)
                a = start_run(spec, launcher, run_env=run_env, restart_on_corrupt=restart_on_corrupt,
                              extra_argv=fork_argv(spec, forks, points, runs, no_fork))
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
                outcome = finish_run(a, rc)
                took = a.attempt.ended - a.attempt.started
                display.event(f"{a.spec.key} {outcome} after {took:.1f}s"
                              f"{f': {a.attempt.reason}' if a.attempt.reason and outcome != 'done' else ''}")
                if outcome == "failed" and a.record.failures <= retries:
                    queue.append(a.spec)
                    display.event(f"{a.spec.key} will be retried ({a.record.failures}/{retries})")
                elif outcome == "preempted":  # stopped on a signal at a checkpoint: no failed attempt
                    queue.append(a.spec)
                    display.event(f"{a.spec.key} resumes from its checkpoint")
                else:
                    result.outcomes[a.spec.key] = outcome
            active = still
            if display.due():
                display.draw(render_table(monitor.rows(harness_live=True), slots=launcher.slots,
                                          title=f"grid {grid.name} ({launcher.describe()})"))
            if queue or active:
                time.sleep(poll_s)
    except (KeyboardInterrupt, GridInterrupted) as e:
        why = str(e) or type(e).__name__
        ended = stop_runs(active, reason=f"interrupted ({why}); re-run the grid to resume")
        for a, outcome in zip(active, ended):
            display.event(f"{a.spec.key} {outcome or f'interrupted ({why})'}")
        raise
    finally:
        if first_start is not None:
            result.runs_wall_s = time.perf_counter() - first_start

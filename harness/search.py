"""``twinflow-lab search SPEC.yaml``: an Optuna study whose trials are harness runs.

Each trial samples the spec's parameters, runs the trainer once per seed through the
harness's launchers (run directories under ``<root>/<study>/trial-<nnnn>/seed-<k>/``,
see ``harness.search_runs``), reports the mean validation value at every evaluation
to the pruner, and ends COMPLETE (objective = mean over seeds), PRUNED (by the pruner,
or because it diverged: the sampler is told, with its last value) or FAIL (a real
error). ``workers`` threads each ask the study for trials; several search processes
(on several machines, with an RDB storage) may work on one study at once.

Storage: a journal file ``<root>/<study>/<study>.journal`` by default (append-only,
multi-process safe, readable by ``optuna-dashboard`` and by the reports), or any
SQLAlchemy URL. The study is created with ``load_if_exists``: running the same
command again continues it, and the trial budget (``trials``) counts every trial
already finished. A trial left RUNNING by a search process that died is marked FAIL
with the reason and enqueued again with the same parameters; the new trial continues
the same run directories from their checkpoints (docs/search.md).

Results, rewritten after every trial: ``<study dir>/best.yaml`` (a ready-to-run trainer
config of the best trial; ``pareto/trial-<nnnn>.yaml`` for several objectives) and
``trials.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping, TextIO

from twinflow_train.config import to_yaml
from twinflow_train.yamlio import InputError, dir_problem, is_number, reading_input

from .identity import code_version
from .launchers import Launcher, add_launcher_arguments, make_launcher, parse_launcher_params
from .runs import GridError, prepare_shared_assets, sigterm_raises
from .search_runs import TrialError, TrialExecutor, TrialResult
from .search_spec import SearchSpec, SearchSpecError, load_search_spec, storage_problem
from .store import HARNESS_DIR, atomic_write_json, atomic_write_text, write_grid_manifest

HELP = "Optuna search over trainer config keys (default rl.weight): parallel, resumable, prunes diverging trials"
JOURNAL_SUFFIX = ".journal"
RESULTS_BEST = "best.yaml"
RESULTS_PARETO = "pareto"
RESULTS_TABLE = "trials.csv"
GROUP_FILE = "trial.json"
# trial user attributes written by the search (visible in optuna-dashboard)
ATTR_OWNER, ATTR_HEARTBEAT, ATTR_GROUP = "owner", "heartbeat", "run_group"
ATTR_RETRY_OF, ATTR_RETRIED, ATTR_FAIL, ATTR_PRUNE = "retry_of", "retried", "fail_reason", "prune_reason"
ATTR_DIVERGED, ATTR_RUNS = "diverged", "run_dirs"
ATTR_RECORDED = "recorded"  # objective.record metrics: mean over seeds, same evaluation as the values
ATTR_LAST_STEP = "last_step"  # the newest step the trial's evaluation read (multi-objective trials report no steps)
# study user attributes
ATTR_FINGERPRINT, ATTR_DEFINITION = "fingerprint", "definition"


class SearchInterrupted(Exception):
    """The search was asked to stop (SIGTERM); running trials were stopped and will be resumed by a re-run."""


# --------------------------------------------------------------------------- who runs a trial


@dataclass(frozen=True)
class Owner:
    """A search process: host, pid and the pid's start time (so a recycled pid is not mistaken for it)."""

    host: str
    pid: int
    started: str

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started}


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), '' where /proc is absent, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: fields are counted after the last ')'
    return text[text.rindex(")") + 2:].split()[19]


def this_process() -> Owner:
    return Owner(host=socket.gethostname(), pid=os.getpid(), started=_process_start(os.getpid()) or "")


def process_alive(pid: int, started: str) -> bool:
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = _process_start(pid)
    return now is not None and (not started or now == started)


def heartbeat_text(t: float) -> str:
    """A heartbeat as the dashboard shows it: UTC ISO 8601 to the millisecond (``2026-05-01T12:00:00.123+00:00``)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def heartbeat_time(beat: Any) -> float | None:
    """Seconds since the epoch of a stored heartbeat: the ISO text, or the raw number older searches stored."""
    if isinstance(beat, (int, float)) and not isinstance(beat, bool):
        return float(beat)
    if isinstance(beat, str):
        try:
            return datetime.fromisoformat(beat).timestamp()
        except ValueError:
            return None
    return None


def flat_user_attrs(outcome_per_seed: Mapping[str, Mapping[str, float]], recorded: Mapping[str, float],
                    last_step: int | None) -> dict[str, float | int]:
    """The trial's numbers as one user attribute each (the dashboard shows a mapping as a JSON string):
    ``seed-<k>:<metric>`` and ``seed-<k>:step``, ``recorded:<metric>``, ``last_step``."""
    out: dict[str, float | int] = {}
    for seed, values in outcome_per_seed.items():
        for k, v in values.items():
            out[f"seed-{seed}:{k}"] = int(v) if k == "step" else float(v)
    out.update({f"{ATTR_RECORDED}:{m}": float(v) for m, v in recorded.items()})
    if last_step is not None:
        out[ATTR_LAST_STEP] = int(last_step)
    return out


def stale_reason(trial: Any, *, me: Owner, now: float, stale_after_s: float) -> str | None:
    """Why a RUNNING trial has nobody running it any more, or None when it is (or may be) alive.

    Same host: its owner process is gone. Another host: no heartbeat for ``stale_after_s``.
    """
    owner = trial.user_attrs.get(ATTR_OWNER)
    if not isinstance(owner, Mapping):
        start = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
        if now - start > stale_after_s:
            return f"no search process recorded itself as its owner in {now - start:.0f}s"
        return None
    if owner.get("host") == me.host and owner.get("pid") == me.pid and owner.get("started") == me.started:
        return None
    if owner.get("host") == me.host:
        if not process_alive(int(owner.get("pid", -1)), str(owner.get("started") or "")):
            return f"its search process (pid {owner.get('pid')} on {me.host}) is gone"
        return None
    last = heartbeat_time(trial.user_attrs.get(ATTR_HEARTBEAT))
    if last is None:
        last = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
    if now - last > stale_after_s:
        return (f"no heartbeat from its search process (pid {owner.get('pid')} on {owner.get('host')}) "
                f"for {now - last:.0f}s")
    return None


# --------------------------------------------------------------------------- storage and study


def storage_for(spec: SearchSpec, *, root: Path, override: str | None = None) -> tuple[Any, str]:
    """(Optuna storage, how to name it to a person). Journal file by default; ``scheme://`` means an RDB URL."""
    # lazy: optuna; the parser imports this module, --help stays free of it
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    where = override if override is not None else spec.storage
    if where is None:
        path = Path(root) / spec.name / f"{spec.name}{JOURNAL_SUFFIX}"
    elif "://" in where:
        return optuna.storages.RDBStorage(where), where
    else:
        path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the default lock (a symlink) is the one optuna-dashboard uses when it opens the file
    return JournalStorage(JournalFileBackend(str(path))), str(path)


def _sampler(spec: SearchSpec, seed: int) -> Any:
    # lazy: optuna; the parser imports this module, --help stays free of it
    import optuna

    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
                                      multivariate=len(spec.parameters) > 1, constant_liar=True)


def open_study(spec: SearchSpec, storage: Any) -> Any:
    """Create the study or load it; a study started from another definition is an error naming what changed."""
    # lazy: optuna; the parser imports this module, --help stays free of it
    import optuna

    if spec.objective.constraints and not hasattr(optuna.trial.Trial, "set_constraint"):
        raise SearchSpecError([f"{spec.path}: objective, key 'constraints': needs optuna >= 5.0 "
                               f"(Trial.set_constraint); optuna {optuna.__version__} is installed"])
    directions = list(spec.objective.directions)
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions,
                                load_if_exists=True, pruner=spec.pruner.build())
    have = [d.name.lower() for d in study.directions]
    stored = study.user_attrs.get(ATTR_FINGERPRINT)
    if have != directions:
        raise SearchSpecError([f"{spec.path}: study '{spec.name}' in this storage optimises {have}, the spec "
                               f"asks for {directions}; use another name or storage"])
    if stored is None:
        study.set_user_attr(ATTR_FINGERPRINT, spec.fingerprint())
        study.set_user_attr(ATTR_DEFINITION, spec.definition())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is marked experimental
            study.set_metric_names(list(spec.objective.metrics))
    elif stored != spec.fingerprint():
        before, after = study.user_attrs.get(ATTR_DEFINITION) or {}, spec.definition()
        changed = [k for k in after if before.get(k) != after.get(k)] or ["definition"]
        raise SearchSpecError([f"{spec.path}: study '{spec.name}' was started with a different "
                               f"{', '.join(changed)}; its trials would not be comparable. Use another name "
                               f"(or storage) for the changed search"])
    # a fixed seed would replay the same start-up samples in every invocation: offset it by the study's size
    study.sampler = _sampler(spec, spec.sampler.seed + 7919 * len(study.get_trials(deepcopy=False)))
    return study


def _set_trial_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    # Optuna offers no public way to annotate a trial another process asked for; the storage API is public,
    # the id is the trial's own
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


# --------------------------------------------------------------------------- results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _config_text(spec: SearchSpec, trial: Any, *, header: str) -> str:
    cfg = spec.config(trial.params, extra={"run.seed": spec.seeds[0]})
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines) + "\n" + to_yaml(cfg)


def write_results(spec: SearchSpec, study: Any, study_dir: Path, *, storage_name: str) -> Path | None:
    """``trials.csv`` and the best config(s); returns the path of ``best.yaml`` when there is a best trial."""
    trials = study.get_trials(deepcopy=False)
    metrics = list(spec.objective.metrics)
    recorded = list(spec.objective.record)
    params = [p.path for p in spec.parameters]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "state", *metrics, *recorded, *[f"param:{p}" for p in params], "run_group", "diverged",
                "reason", "duration_s", "last_step"])
    for t in trials:
        values = t.values if t.values is not None else [None] * len(metrics)
        kept = t.user_attrs.get(ATTR_RECORDED) or {}
        reason = t.user_attrs.get(ATTR_FAIL) or t.user_attrs.get(ATTR_PRUNE) or ""
        w.writerow([t.number, t.state.name, *["" if v is None else repr(float(v)) for v in values],
                    *["" if kept.get(m) is None else repr(float(kept[m])) for m in recorded],
                    *[t.params.get(p, "") for p in params], t.user_attrs.get(ATTR_GROUP, ""),
                    bool(t.user_attrs.get(ATTR_DIVERGED, False)), reason,
                    "" if t.duration is None else f"{t.duration.total_seconds():.1f}",
                    t.user_attrs.get(ATTR_LAST_STEP, max(t.intermediate_values) if t.intermediate_values else "")])
    atomic_write_text(study_dir / RESULTS_TABLE, buf.getvalue())

    run = "twinflow-train fit --config {path} --run-dir runs/{name}-{tag}"
    if not spec.objective.multi:
        try:
            best = study.best_trial
        except ValueError:  # no complete trial yet, or none feasible under the constraints
            return None
        value = f"{metrics[0]} = {_fmt(best.value)} ({spec.objective.directions[0]}, {spec.objective.reduce} "
        value += f"evaluation, mean over seeds {list(spec.seeds)})"
        header = (f"Best trial of search '{spec.name}' (storage: {storage_name}): trial {best.number}, {value}\n"
                  + "".join(f"  {k} = {_fmt(v)}\n" for k, v in best.params.items())
                  + (f"Constraints: {', '.join(c.name for c in spec.objective.constraints)} (all met)\n"
                     if spec.objective.constraints else "")
                  + f"Run it: {run.format(path=study_dir / RESULTS_BEST, name=spec.name, tag='best')}")
        path = study_dir / RESULTS_BEST
        atomic_write_text(path, _config_text(spec, best, header=header))
        return path
    front = study.best_trials
    out = study_dir / RESULTS_PARETO
    keep = set()
    for t in front:
        name = f"trial-{t.number:04d}.yaml"
        keep.add(name)
        header = (f"Pareto-optimal trial {t.number} of search '{spec.name}' (storage: {storage_name}):\n"
                  + "".join(f"  {m} = {_fmt(v)} ({d})\n" for m, v, d in zip(metrics, t.values,
                                                                             spec.objective.directions))
                  + "".join(f"  {m} = {_fmt(v)} (recorded)\n"
                            for m, v in (t.user_attrs.get(ATTR_RECORDED) or {}).items())
                  + "".join(f"  {k} = {_fmt(v)}\n" for k, v in t.params.items())
                  + f"Run it: {run.format(path=out / name, name=spec.name, tag=f'trial-{t.number:04d}')}")
        atomic_write_text(out / name, _config_text(spec, t, header=header))
    if out.is_dir():
        for old in out.glob("trial-*.yaml"):  # files this function wrote for trials no longer on the front
            if old.name not in keep:
                old.unlink()
    return None


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    study: str
    storage: str
    study_dir: Path
    told: list[tuple[int, str]] = field(default_factory=list)
    """(trial number, final state) of the trials this invocation ran, in the order they ended."""
    stale: list[int] = field(default_factory=list)
    """Trials found RUNNING with no live search process, marked FAIL and enqueued again."""
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    best_config: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    """Trials of the whole study by state when this invocation ended."""

    @property
    def exit_code(self) -> int:
        """0 the budget is done; 130 interrupted; 1 an error of the search; 3 a trial of this invocation FAILED."""
        if self.errors:
            return 1
        if self.interrupted:
            return 130
        return 3 if any(state == "FAIL" for _, state in self.told) else 0


class Search:
    """One invocation of a search: opens the study, marks stale trials, runs workers until the budget is spent."""

    def __init__(self, spec: SearchSpec, *, root: str | Path = "runs", trials: int | None = None,
                 workers: int | None = None, storage: str | None = None, launcher: Launcher | None = None,
                 launcher_kind: Literal["local", "torchrun", "accelerate", "slurm"] = "local",
                 nproc_per_node: int | None = None, slurm_cluster: Literal["slurm", "local"] = "slurm",
                 slurm_parameters: Mapping[str, Any] | None = None, accelerate_config: Path | None = None,
                 poll_s: float = 1.0, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0, stream: TextIO | None = None, progress: bool = True,
                 prepare_teacher: bool = True, run_env: Mapping[str, Mapping[str, str]] | None = None):
        if trials is not None and trials < 1:
            raise ValueError(f"trials must be >= 1 (got {trials})")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        if poll_s <= 0 or heartbeat_s <= 0 or stale_after_s <= 0:
            raise ValueError("poll_s, heartbeat_s and stale_after_s must be > 0")
        self.spec = spec
        self.root = Path(root)
        self.trials = trials if trials is not None else spec.trials
        self.workers = workers if workers is not None else spec.workers
        self.study_dir = self.root / spec.name
        self.poll_s, self.heartbeat_s, self.stale_after_s = poll_s, heartbeat_s, stale_after_s
        self.stream = stream if stream is not None else sys.stdout
        self.progress = progress
        self.prepare_teacher = prepare_teacher
        slots = self.workers * len(spec.seeds)  # every seed of a trial runs at once
        if launcher is None:
            launcher = make_launcher(launcher_kind, workers=slots, grid_dir=self.study_dir,
                                     nproc_per_node=nproc_per_node, slurm_cluster=slurm_cluster,
                                     slurm_parameters=slurm_parameters, accelerate_config=accelerate_config)
        self.launcher = launcher
        self.storage_override = storage
        self.run_env = run_env
        self.me = this_process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats: dict[int, float] = {}
        self._bar: Any = None

    # ----------------------------------------------------------------- output

    def _emit(self, message: str) -> None:
        line = f"[search {self.spec.name}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    # ----------------------------------------------------------------- study bookkeeping

    def _counted(self) -> int:
        """Trials that use the budget: finished ones (a retried FAIL excepted) and those running now."""
        # lazy: optuna; the parser imports this module, --help stays free of it
        from optuna.trial import TrialState

        n = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
                n += 1
            elif t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_RETRIED):
                n += 1
        return n

    def _retire(self, trial: Any, *, number: int, params: Mapping[str, Any], group: str, reason: str) -> bool:
        """FAIL a trial nobody can finish now and enqueue its parameters again (continuing its run directories)."""
        # lazy: optuna; the parser imports this module, --help stays free of it
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            _set_trial_attr(self.study, trial, ATTR_FAIL, reason)
            _set_trial_attr(self.study, trial, ATTR_RETRIED, True)
            self.study.tell(number, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError):
            return False  # another search process finished or retired it first
        if any(t.user_attrs.get(ATTR_RETRY_OF) == number for t in self.study.get_trials(deepcopy=False)):
            return False
        self.study.enqueue_trial(dict(params), user_attrs={ATTR_GROUP: group, ATTR_RETRY_OF: number})
        return True

    def _fail_stale(self, result: SearchResult) -> None:
        # lazy: optuna; the parser imports this module, --help stays free of it
        from optuna.trial import TrialState

        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            why = stale_reason(t, me=self.me, now=now, stale_after_s=self.stale_after_s)
            if why is None:
                continue
            group = t.user_attrs.get(ATTR_GROUP) or f"trial-{t.number:04d}"
            if self._retire(t, number=t.number, params=t.params, group=group, reason=f"stale: {why}"):
                result.stale.append(t.number)
                self._emit(f"trial {t.number} was left RUNNING ({why}): marked FAIL, its parameters are enqueued "
                           f"again and will continue in {group}/")

    def _beat(self, trial: Any) -> None:
        now = time.time()
        if now - self._beats.get(trial.number, 0.0) >= self.heartbeat_s:
            self._beats[trial.number] = now
            trial.set_user_attr(ATTR_HEARTBEAT, heartbeat_text(now))

    # ----------------------------------------------------------------- run

    def run(self) -> SearchResult:
        # lazy: optuna; the parser imports this module, --help stays free of it
        import optuna
        from tqdm import tqdm

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # a value enqueued outside the searched range through the Python API is deliberate (a spec's are checked)
        warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range", category=UserWarning)
        self.storage, storage_name = storage_for(self.spec, root=self.root, override=self.storage_override)
        self.storage_name = storage_name
        self.study_dir.mkdir(parents=True, exist_ok=True)
        self.study = open_study(self.spec, self.storage)
        result = SearchResult(study=self.spec.name, storage=storage_name, study_dir=self.study_dir)
        # a study directory reads like a grid; its trial groups (the arms) are made as the search runs
        write_grid_manifest(self.study_dir, kind="search", source=self.spec.path, arms=None, claims=[])
        self.executor = TrialExecutor(spec=self.spec, study_dir=self.study_dir, code_version=code_version(),
                                      launcher=self.launcher, stop=self._stop, emit=self._emit, poll_s=self.poll_s,
                                      beat=self._beat, run_env=self.run_env)
        self._fail_stale(result)
        for params in self.spec.enqueue:
            self.study.enqueue_trial(dict(params), skip_if_exists=True)
        counted = self._counted()
        self._emit(f"study '{self.spec.name}' ({storage_name}): {counted}/{self.trials} trials counted; "
                   f"{self.workers} worker(s), {len(self.spec.seeds)} seed(s) per trial; "
                   f"{self.launcher.describe()}")
        if counted < self.trials:
            if self.prepare_teacher:
                self._ensure_teacher()
            self._bar = tqdm(total=self.trials, initial=min(counted, self.trials), unit="trial",
                             desc=f"search {self.spec.name}", file=sys.stderr, disable=not self.progress)
            finished = [threading.Event() for _ in range(self.workers)]
            threads = [threading.Thread(target=self._worker, args=(i, result, finished[i]), name=f"search-worker-{i}")
                       for i in range(self.workers)]

            def wait_workers() -> None:
                # not Thread.join: in CPython 3.11 a signal handler's exception raised inside join()
                # marks the thread stopped while it still runs, and a second join() returns at once
                while not all(f.is_set() for f in finished):
                    time.sleep(0.1)

            with sigterm_raises(SearchInterrupted):
                try:
                    for t in threads:
                        t.start()
                        time.sleep(0.05)  # stagger the first asks: the constant liar then sees the trial before it
                    wait_workers()
                except (KeyboardInterrupt, SearchInterrupted) as e:
                    result.interrupted = True
                    self._stop.set()
                    self._emit(f"stopping ({e or 'Ctrl-C'}): running trials are stopped and will resume on a re-run")
                    while True:
                        try:
                            wait_workers()
                            break
                        except (KeyboardInterrupt, SearchInterrupted):
                            # leaving now would orphan the runs' records half-written; the stop takes seconds
                            self._emit("still stopping the running trials (at most 15 s per run)")
                finally:
                    self._bar.close()
                    self._bar = None
        with self._lock:
            result.best_config = write_results(self.spec, self.study, self.study_dir, storage_name=storage_name)
        counts: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        result.counts = counts
        self._emit("trials by state: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())))
        if result.best_config is not None:
            self._emit(f"best config: {result.best_config}")
        self._emit(f"dashboard: optuna-dashboard {storage_name}")
        return result

    def _ensure_teacher(self) -> None:
        """Train the shared assets once before the workers start (as ``grid run`` does).

        Skipped when this study already prepared the same assets config: the trainer's cache
        is process-safe, so even if it was emptied since, the runs rebuild it one at a time.
        """
        first = self.executor.run_specs({}, "trial-base")[0]
        marker = self.study_dir / HARNESS_DIR / "teacher.ok"
        wanted = to_yaml(first.config)
        if marker.is_file() and marker.read_text() == wanted:
            return
        prepare_shared_assets(first, self.launcher, grid_dir=self.study_dir, stream=self.stream)
        atomic_write_text(marker, wanted)

    def _worker(self, index: int, result: SearchResult, finished: threading.Event) -> None:
        try:
            self._work(index, result)
        finally:
            finished.set()

    def _work(self, index: int, result: SearchResult) -> None:
        trial = None
        try:
            while not self._stop.is_set():
                trial = None
                with self._lock:
                    self._fail_stale(result)
                    if self._counted() >= self.trials:
                        return
                    trial = self.study.ask(self.spec.distributions())
                    trial.set_user_attr(ATTR_OWNER, self.me.as_dict())
                    trial.set_user_attr(ATTR_HEARTBEAT, heartbeat_text(time.time()))
                    group = trial.user_attrs.get(ATTR_GROUP) or f"trial-{trial.number:04d}"
                    trial.set_user_attr(ATTR_GROUP, group)
                    self._record_group(trial, group)
                retry = trial.user_attrs.get(ATTR_RETRY_OF)
                self._emit(f"trial {trial.number} asked by worker {index}: "
                           + ", ".join(f"{k} = {_fmt(v)}" for k, v in trial.params.items())
                           + (f" (again for stale trial {retry}, continuing {group}/)" if retry is not None else ""))
                try:
                    outcome = self.executor.run_trial(trial, group)
                except TrialError as e:
                    outcome = TrialResult("failed", reason=str(e))
                self._tell(trial, group, outcome, result)
        except Exception as e:  # an error of the search itself: stop everything, keep the study consistent
            result.errors.append(f"worker {index}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            self._stop.set()
            if trial is not None:
                # lazy: optuna; the parser imports this module, --help stays free of it
                from optuna.trial import TrialState

                try:
                    if self.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                        trial.set_user_attr(ATTR_FAIL, f"search error: {type(e).__name__}: {e}")
                        self.study.tell(trial, state=TrialState.FAIL)
                except Exception as inner:  # noqa: BLE001 - the first error is the one reported
                    result.errors.append(f"worker {index}: could not mark trial {trial.number} failed: {inner}")
            self._emit(f"worker {index} stopped by an error: {type(e).__name__}: {e}")

    def _record_group(self, trial: Any, group: str) -> None:
        """``<study>/<group>/trial.json``: which trials ran in this directory, with which parameters."""
        path = self.study_dir / group / GROUP_FILE
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        numbers = sorted(set(data.get("trials", [])) | {trial.number})
        atomic_write_json(path, {"study": self.spec.name, "storage": self.storage_name, "trials": numbers,
                                 "params": trial.params, "spec": str(self.spec.path.resolve())})

    def _tell(self, trial: Any, group: str, outcome: TrialResult, result: SearchResult) -> None:
        # lazy: optuna; the parser imports this module, --help stays free of it
        from optuna.trial import TrialState

        with self._lock:
            trial.set_user_attr(ATTR_RUNS, outcome.run_dirs)
            for key, value in flat_user_attrs(outcome.per_seed, outcome.recorded or {}, outcome.last_step).items():
                trial.set_user_attr(key, value)
            if outcome.outcome == "interrupted":
                self._retire(trial, number=trial.number, params=trial.params, group=group,
                             reason=f"interrupted: {outcome.reason}")
                state = "FAIL"
                self._emit(f"trial {trial.number} interrupted; enqueued again, it resumes from its checkpoints")
            elif outcome.outcome == "complete":
                if outcome.recorded:
                    trial.set_user_attr(ATTR_RECORDED, outcome.recorded)
                for name, violation in outcome.constraints.items():
                    trial.set_constraint(name, violation)
                self.study.tell(trial, outcome.values)
                state = "COMPLETE"
                shown = ", ".join(f"{m} = {_fmt(v)}" for m, v in [*zip(self.spec.objective.metrics, outcome.values),
                                                                    *outcome.recorded.items()])
                feas = ""
                if outcome.constraints:
                    ok = all(v <= 0 for v in outcome.constraints.values())
                    feas = " (feasible)" if ok else " (infeasible: " + ", ".join(
                        n for n, v in outcome.constraints.items() if v > 0) + ")"
                self._emit(f"trial {trial.number} complete: {shown}{feas}")
            elif outcome.outcome == "pruned":
                trial.set_user_attr(ATTR_PRUNE, outcome.reason)
                trial.set_user_attr(ATTR_DIVERGED, outcome.diverging)
                self.study.tell(trial, state=TrialState.PRUNED)
                state = "PRUNED"
                self._emit(f"trial {trial.number} pruned{' as diverging' if outcome.diverging else ''}: "
                           f"{outcome.reason}")
            else:
                trial.set_user_attr(ATTR_FAIL, outcome.reason)
                self.study.tell(trial, state=TrialState.FAIL)
                state = "FAIL"
                self._emit(f"trial {trial.number} FAILED: {outcome.reason}")
            result.told.append((trial.number, state))
            self._beats.pop(trial.number, None)
            if self._bar is not None and outcome.outcome != "interrupted":
                self._bar.update(1)  # an interrupted trial is retried: it does not use the budget
            result.best_config = write_results(self.spec, self.study, self.study_dir, storage_name=self.storage_name)


# --------------------------------------------------------------------------- command line


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="search spec YAML (e.g. ablations/search-rl-weight.yaml)")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where studies live: ROOT/<study>/trial-<n>/"
                   "seed-<k>/ and the journal ROOT/<study>/<study>.journal (default: ./runs)")
    p.add_argument("--trials", type=int, default=None, help="total trials the study should have (overrides the "
                   "spec; finished trials of earlier invocations count)")
    p.add_argument("--workers", type=int, default=None, help="trials in flight at once in this process "
                   "(overrides the spec)")
    p.add_argument("--storage", default=None, help="journal file path or SQLAlchemy URL (e.g. postgresql://...); "
                   "overrides the spec (default: ROOT/<study>/<study>.journal)")
    add_launcher_arguments(p)
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between reads of the runs' files")
    p.add_argument("--heartbeat-s", type=float, default=30.0, help="seconds between a trial's heartbeats")
    p.add_argument("--stale-after-s", type=float, default=600.0, help="a RUNNING trial of another host without a "
                   "heartbeat for this long is stale (same host: as soon as its process is gone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _err(message: str) -> None:
    print(f"twinflow-lab search: {message}", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> Search:
    """Everything the command reads and checks before it writes anything; raises ``InputError``."""
    problems = [f"--{flag} must be >= 1 (got {v})" for flag in ("trials", "workers")
                if (v := getattr(args, flag)) is not None and v < 1]
    problems += [f"--{flag.replace('_', '-')} must be > 0 (got {v})" for flag in ("poll_s", "heartbeat_s",
                                                                               "stale_after_s")
                 if not is_number(v := getattr(args, flag)) or v <= 0]
    if (problem := dir_problem(args.root)) is not None:
        problems.append(f"--root: {problem}")
    if args.storage is not None and (problem := storage_problem(args.storage)) is not None:
        problems.append(f"--storage: {problem}")
    params: dict[str, Any] = {}
    try:
        params = parse_launcher_params(args)
    except InputError as e:
        problems += e.problems
    try:
        spec = load_search_spec(args.spec)
    except SearchSpecError as e:
        problems += e.problems
    if problems:
        raise SearchSpecError(problems)
    return Search(spec, root=args.root, trials=args.trials, workers=args.workers, storage=args.storage,
                  launcher_kind=args.launcher, nproc_per_node=args.nproc_per_node, slurm_cluster=args.slurm_cluster,
                  slurm_parameters=params, accelerate_config=args.accelerate_config, poll_s=args.poll_s,
                  heartbeat_s=args.heartbeat_s,
                  stale_after_s=args.stale_after_s, progress=not args.no_progress)


def run_search(args: argparse.Namespace) -> int:
    """Run (or continue) the search of ``args.spec``; returns the exit code (see ``SearchResult.exit_code``)."""
    try:
        with reading_input("twinflow-lab search"):
            search = _prepare(args)
        result = search.run()
    except InputError as e:  # a bad spec or argument, or a study in the storage with another definition
        for problem in e.problems:
            _err(problem)
        return 2
    except GridError as e:
        for problem in e.problems:
            _err(problem)
        return 1
    for error in result.errors:
        _err(error)
    return result.exit_code


# ``harness.cli`` registers string entries through these names
add_arguments = add_search_arguments
run = run_search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinflow-lab search", description=HELP)
    add_search_arguments(parser)
    return run_search(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

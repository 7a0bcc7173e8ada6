"""One search trial = one harness run per seed, launched, watched and stopped like any grid run.

A trial's runs live where a grid's would: ``<root>/<study>/<group>/seed-<k>/``, where
``<group>`` is ``trial-<nnnn>`` (the number of the first trial that ran these
parameters; a trial re-run after its search process died continues in the same
directory). Each run directory is prepared, started and recorded by the harness's
run executor (``harness.runs``: ``harness.json`` with its identity and attempts,
``launch.yaml``, ``logs/attempt-<n>.log``), so ``grid status``-style tables, ``collect_grid`` and the
reports read a study directory like any grid.

While the runs are alive their ``metrics.jsonl`` is read incrementally: validation
records feed the pruner (the mean over seeds at each evaluation step), training
records are checked for divergence (non-finite values, the spike threshold); a
pre-clip grad norm that stays above its bound is the trainer's own divergence rule
(``twinflow_train/run/divergence.py``), which ends the run as ``diverged``. A trial stopped early has its runs' process groups terminated (the local
launchers start every run as the leader of its own session).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from twinflow_train.config import config_hash
from twinflow_train.inputs import ConfigError

from .identity import run_identity
from .launchers import Launcher
from .matrix import RunSpec
from .runs import ActiveRun, RunEnv, classify, finish_run, prepare_run_dir, start_run, stop_runs, supersede
from .search_spec import SearchSpec
from .store import METRICS_FILE, MetricsTail

TrialOutcome = Literal["complete", "pruned", "failed", "interrupted"]


# --------------------------------------------------------------------------- results


@dataclass
class TrialResult:
    outcome: TrialOutcome
    values: list[float] | None = None
    """Mean over seeds of each objective metric (complete trials)."""
    constraints: dict[str, float] = field(default_factory=dict)
    """Constraint name -> violation (<= 0 feasible), from the same evaluation as the values."""
    reason: str | None = None
    diverging: bool = False
    """Pruned because it diverged (not because the pruner said so)."""
    per_seed: dict[str, dict[str, float]] = field(default_factory=dict)
    """seed -> metric -> value of the evaluation used."""
    recorded: dict[str, float] = field(default_factory=dict)
    """Mean over seeds of each ``objective.record`` metric (complete trials), from the same evaluation."""
    run_dirs: list[str] = field(default_factory=list)
    last_step: int | None = None


class TrialError(RuntimeError):
    """A trial cannot start (its runs are in a state the search must not touch)."""


@dataclass
class SeedRun:
    spec: RunSpec
    tail: MetricsTail
    active: ActiveRun | None = None
    outcome: str | None = None
    """done | failed | diverged once the run has ended (None while it runs or before it starts)."""
    reason: str | None = None
    divergence: str | None = None
    """Why the live telemetry says the run diverges (the search's own thresholds)."""
    vals: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Validation records by step (a resumed run rewrites steps after its checkpoint: the latest wins)."""
    step: int = 0
    """Last step of any record read."""
    launch: bool = False


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# --------------------------------------------------------------------------- trial executor


class TrialExecutor:
    """Runs trials for one search process: builds run specs, launches, watches, stops."""

    def __init__(self, *, spec: SearchSpec, study_dir: Path, code_version: str, launcher: Launcher,
                 stop: threading.Event, emit: Callable[[str], None], poll_s: float = 1.0,
                 beat: Callable[[Any], None] | None = None, run_env: RunEnv | None = None):
        self.spec = spec
        self.study_dir = Path(study_dir)
        self.code_version = code_version
        self.launcher = launcher
        self.stop = stop
        self.emit = emit
        self.poll_s = poll_s
        self.beat = beat or (lambda trial: None)
        self.run_env: RunEnv = dict(run_env or {})
        """Extra environment per run group or ``group/seed-k`` (tests inject faults this way)."""

    # ----------------------------------------------------------------- specs

    def run_specs(self, params: Mapping[str, Any], group: str) -> list[RunSpec]:
        """One RunSpec per seed; raises ``ConfigError`` when the parameters make an invalid config."""
        out = []
        for seed in self.spec.seeds:
            cfg = self.spec.config(params, extra={"run.seed": seed, "telemetry.group": self.spec.name,
                                                  "telemetry.name": f"{group}-{seed}"})
            out.append(RunSpec(grid=self.spec.name, arm=group, seed=seed,
                               overrides={**self.spec.overrides, **dict(params)}, config=cfg,
                               config_hash=config_hash(cfg), identity=run_identity(cfg, self.code_version),
                               run_dir=self.study_dir / group / f"seed-{seed}"))
        return out

    # ----------------------------------------------------------------- one trial

    def run_trial(self, trial: Any, group: str) -> TrialResult:
        """Run every seed of ``trial`` to its end (or until it is pruned, fails or the search stops)."""
        try:
            specs = self.run_specs(trial.params, group)
        except ConfigError as e:
            return TrialResult("failed", reason=f"parameters {trial.params} make an invalid trainer config: {e}")
        runs = [SeedRun(spec=s, tail=MetricsTail(s.run_dir / METRICS_FILE)) for s in specs]
        result_dirs = [str(r.spec.run_dir) for r in runs]
        for r in runs:
            self._prepare(r)
        try:
            for r in runs:
                if r.launch:
                    r.active = start_run(r.spec, self.launcher, run_env=self.run_env)
                    step = r.active.attempt.start_step
                    self.emit(f"trial {trial.number} ({r.spec.key}) started"
                              f"{f' from step {step}' if step else ''}")
            result = self._watch(trial, runs)
        except BaseException:
            # an error of the search itself: leave no trainer behind, resumable
            self._stop_all(runs, state="queued", outcome="interrupted",
                           reason="the search stopped with an error while the run was in flight")
            raise
        result.run_dirs = result_dirs
        return result

    def _prepare(self, r: SeedRun) -> None:
        state = classify(r.spec, code_version=self.code_version)
        if state.kind == "alive":
            raise TrialError(f"{state.note}; stop it before the trial can be run again")
        if state.kind in ("done", "diverged"):
            # a previous attempt finished (its search died before telling the study): reuse the result
            r.outcome, r.reason = state.kind, state.reason
            return
        if state.kind == "changed":
            # another config or trainer version left this directory: set it aside, never delete it
            supersede(r.spec, grid_dir=self.study_dir)
        prepare_run_dir(r.spec, code_version=self.code_version, matrix=self.spec.path)
        r.launch = True

    # ----------------------------------------------------------------- watching

    def _watch(self, trial: Any, runs: list[SeedRun]) -> TrialResult:
        obj = self.spec.objective
        report = not obj.multi  # Optuna keeps intermediate values for single-objective studies only
        reported: set[int] = set()
        while True:
            self.beat(trial)
            for r in runs:
                self._poll(r)
            # intermediate values first, so a trial pruned below leaves its latest value to the sampler
            if report:
                for step, value in self._step_means(runs):
                    if step in reported:
                        continue
                    reported.add(step)
                    if not math.isfinite(value):
                        continue  # the divergence check below acts on it
                    trial.report(value, step)
                    if not self._diverging(runs) and trial.should_prune():
                        reason = (f"pruned by the {self.spec.pruner.kind} pruner at step {step} "
                                  f"({obj.metrics[0]} = {value:.4g}, mean over {len(runs)} seed(s))")
                        self._stop_all(runs, state="queued", outcome="interrupted",
                                       reason=f"stopped by search '{self.spec.name}': trial {trial.number} {reason}")
                        return TrialResult("pruned", reason=reason, last_step=step)
            diverging = self._diverging(runs)
            if diverging:
                self._stop_all(runs, state="diverged", outcome="diverged",
                               reason=f"stopped by search '{self.spec.name}': {diverging}")
                return TrialResult("pruned", reason=diverging, diverging=True)
            failed = [r for r in runs if r.outcome == "failed"]
            if failed:
                self._stop_all(runs, state="queued", outcome="interrupted",
                               reason=f"stopped by search '{self.spec.name}': seed {failed[0].spec.seed} failed")
                return TrialResult("failed", reason="; ".join(f"seed {r.spec.seed}: {r.reason}" for r in failed))
            if all(r.outcome == "done" for r in runs):
                return self._complete(runs)
            if self.stop.is_set():
                self._stop_all(runs, state="queued", outcome="interrupted",
                               reason=f"interrupted: search '{self.spec.name}' was stopped; re-run it to resume")
                return TrialResult("interrupted", reason="the search was stopped while the trial was running")
            time.sleep(self.poll_s)

    def _poll(self, r: SeedRun) -> None:
        rc = r.active.handle.poll() if r.active is not None else None
        # read after polling the process, so the records of a run that just ended are all seen
        for rec in r.tail.poll():
            r.step = int(rec["step"])
            kind = rec.get("kind") or ("val" if any(k.startswith("val/") for k in rec) else "train")
            if kind == "val":
                r.vals[int(rec["step"])] = rec
            elif kind == "train" and r.divergence is None:
                r.divergence = self._train_divergence(rec)
        if rc is not None and r.active is not None:
            r.outcome = finish_run(r.active, rc)
            r.reason = r.active.attempt.reason
            r.active = None
            if r.outcome == "preempted" and not self.stop.is_set():
                # stopped on a signal at a checkpoint: not a failure; it resumes from there at once
                r.outcome, r.active = None, start_run(r.spec, self.launcher, run_env=self.run_env)
                self.emit(f"{r.spec.key} preempted; resumes from step {r.active.attempt.start_step}")

    def _train_divergence(self, rec: Mapping[str, Any]) -> str | None:
        div, step = self.spec.divergence, rec.get("step")
        if div.nonfinite:
            bad = [k for k in ("loss/total", "grad_norm/total") if k in rec and not _finite(rec[k])]
            count = rec.get("count/nonfinite")
            event = rec.get("event/nonfinite")
            if bad or (_finite(count) and count > 0) or (_finite(event) and event > 0):
                what = ", ".join(f"{k} = {rec[k]}" for k in bad) or f"count/nonfinite = {count}"
                return f"non-finite training values at step {step} ({what})"
        # grad-norm divergence is the trainer's own rule (run.diverge_grad_norm / run.diverge_steps, which the
        # spec's divergence.max_grad_norm / grad_norm_steps set): the run ends as diverged and _diverging sees it
        if div.max_spikes is not None and _finite(rec.get("count/spikes")) and rec["count/spikes"] > div.max_spikes:
            return f"{int(rec['count/spikes'])} grad-norm spikes > {div.max_spikes} by step {step}"
        return None

    def _diverging(self, runs: list[SeedRun]) -> str | None:
        for r in runs:
            if r.divergence:
                return f"seed {r.spec.seed}: {r.divergence}"
            if r.outcome == "diverged":
                return f"seed {r.spec.seed}: the trainer stopped the run as diverged ({r.reason})"
            if self.spec.divergence.nonfinite:
                for step in sorted(r.vals):
                    rec = r.vals[step]
                    for m in self.spec.objective.metrics + tuple(c.metric for c in self.spec.objective.constraints):
                        if m in rec and not _finite(rec[m]):
                            return f"seed {r.spec.seed}: {m} = {rec[m]} at step {step}"
        return None

    def _step_means(self, runs: list[SeedRun]) -> list[tuple[int, float]]:
        """(step, mean over seeds) of the first objective at the evaluation steps every seed has reached.

        With ``reduce: best`` each seed contributes its best value so far, so the reported
        curve is what the trial's final value would be if it stopped there.
        """
        metric, direction = self.spec.objective.metrics[0], self.spec.objective.directions[0]
        steps = set.intersection(*(set(r.vals) for r in runs)) if runs else set()
        out = []
        for step in sorted(steps):
            vals = []
            for r in runs:
                series = [r.vals[s].get(metric) for s in sorted(r.vals) if s <= step]
                series = [float(v) for v in series if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if not series:
                    break
                if self.spec.objective.reduce == "best":
                    finite = [v for v in series if math.isfinite(v)]
                    v = (min(finite) if direction == "minimize" else max(finite)) if finite else math.nan
                else:
                    v = series[-1]
                vals.append(v)
            else:
                out.append((step, sum(vals) / len(vals)))
        return out

    def _pick(self, r: SeedRun) -> dict[str, Any] | None:
        """The evaluation record a finished run is judged by (``reduce``)."""
        if not r.vals:
            return None
        if self.spec.objective.reduce == "final":
            return r.vals[max(r.vals)]
        metric, direction = self.spec.objective.metrics[0], self.spec.objective.directions[0]
        scored = [(float(rec[metric]), step) for step, rec in r.vals.items() if _finite(rec.get(metric))]
        if not scored:
            return r.vals[max(r.vals)]
        best = min(scored) if direction == "minimize" else max(scored, key=lambda x: (x[0], -x[1]))
        return r.vals[best[1]]

    def _complete(self, runs: list[SeedRun]) -> TrialResult:
        obj = self.spec.objective
        needed = list(obj.metrics) + [c.metric for c in obj.constraints]
        read = needed + [m for m in obj.record if m not in needed]
        per_seed: dict[str, dict[str, float]] = {}
        for r in runs:
            rec = self._pick(r)
            if rec is None:
                return TrialResult("failed", reason=f"seed {r.spec.seed}: the run finished without a validation "
                                                    f"record in {r.spec.run_dir / METRICS_FILE}")
            missing = [m for m in read if m not in rec]
            if missing:
                return TrialResult("failed", reason=f"seed {r.spec.seed}: validation record of step {rec['step']} "
                                                    f"has no {', '.join(missing)}")
            per_seed[str(r.spec.seed)] = {"step": int(rec["step"]), **{m: float(rec[m]) for m in read}}
        means = {m: sum(v[m] for v in per_seed.values()) / len(per_seed) for m in read}
        if any(not math.isfinite(means[m]) for m in needed):
            bad = ", ".join(f"{m} = {means[m]}" for m in needed if not math.isfinite(means[m]))
            if self.spec.divergence.nonfinite:
                return TrialResult("pruned", reason=f"non-finite objective at the end ({bad})", diverging=True,
                                   per_seed=per_seed)
            return TrialResult("failed", reason=f"non-finite objective at the end ({bad}) and divergence.nonfinite "
                                                f"is off", per_seed=per_seed)
        # a recorded metric is stored as it is (a non-finite one too): it is shown, never optimised or acted on
        return TrialResult("complete", values=[means[m] for m in obj.metrics],
                           constraints={c.name: c.violation(means[c.metric]) for c in obj.constraints},
                           recorded={m: means[m] for m in obj.record},
                           per_seed=per_seed, last_step=max(v["step"] for v in per_seed.values()))

    # ----------------------------------------------------------------- stopping

    def _stop_all(self, runs: list[SeedRun], *, state: Literal["queued", "diverged"],
                  outcome: Literal["interrupted", "diverged"], reason: str) -> None:
        """Stop every live run of a trial (process group), then record why in status.json and harness.json."""
        live = [r for r in runs if r.active is not None]
        ended = stop_runs([r.active for r in live], state=state, outcome=outcome, reason=reason)
        for r, own in zip(live, ended):
            r.outcome = own or "stopped"  # a run that ended by itself before the stop keeps its own verdict
            r.active = None

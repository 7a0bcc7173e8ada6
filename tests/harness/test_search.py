"""Acceptance of the Optuna search (``python -m harness.search SPEC.yaml``).

- bad specs fail with a message naming the file and key before anything is written;
- stale-trial rules (dead owner on this host, silent owner elsewhere);
- with a scripted stand-in trainer (milliseconds per run, so the search's own logic is
  tested quickly): the median pruner stops live runs (their whole process group), the
  objective is the mean over seeds, constraints pick the feasible best, a crash is FAIL,
  two objectives give the Pareto configs, a changed spec is refused;
- against the real trainer on tiny digits: 4 trials on 2 workers, each recorded once as
  COMPLETE or PRUNED, the absurd RL weights pruned as diverging, a second invocation
  repeats nothing, a search killed with SIGKILL mid-trial is resumed (stale trial FAIL,
  its parameters re-run from the run's checkpoint), and best.yaml trains as it is.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from harness.collect import run_statuses
from harness.launchers import LocalLauncher
from harness.matrix import load_matrix
from harness.monitor import pid_is_trainer
from harness.search import (Owner, Search, heartbeat_text, heartbeat_time, main, open_study, stale_reason, storage_for,
                            this_process)
from harness.search_spec import SearchSpecError, load_search_spec
from harness.store import read_metrics, read_record, read_status
from twinflow_train.rundir import resume_step as checkpoint_step

from .conftest import TINY_BASE

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, body: str, *, name: str = "s") -> Path:
    (tmp_path / "base.yaml").write_text(TINY_BASE)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\n" + body)
    return path


RL = "overrides: {rl.enabled: true, rl.reward: digits}\n"
OBJ = "objective: {metric: val/fd_nfe1, direction: minimize}\n"


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize("body, expected", [
    (RL + OBJ + "parameters: {rl.weigth: {low: 0.001, high: 1.0, log: true}}",
     "parameters, 'rl.weigth': value 0.001 does not make a valid trainer config: rl: unknown key 'weigth'"),
    (RL + OBJ + "parameters: {rl.weight: {low: 0.5, high: 0.5}}",
     "parameters, 'rl.weight': empty range: low (0.5) must be below high (0.5)"),
    (RL + OBJ + "parameters: {rl.clip: {type: categorical, choices: []}}",
     "parameters, 'rl.clip', key 'choices': empty range"),
    (RL + OBJ + "parameters: {rl.weight: {low: 0.0, high: 1.0, log: true}}",
     "parameters, 'rl.weight': a log range needs low > 0 (got low=0.0, high=1.0)"),
    (RL + "objective: {metric: val/fd_nfe2, direction: minimize}",
     "objective: unknown metric 'val/fd_nfe2'"),  # the tiny base evaluates at 1 NFE only
    (RL + "objective: {metric: val/fd_nfe1, direction: maximize, constraints: [{metric: val/fid, max: 3}]}",
     "objective: unknown metric 'val/fid'"),
    (OBJ + "parameters: {rl.weight: {low: 0.001, high: 1.0, log: true}}",
     "'rl.weight': the base config has rl.enabled false"),
    (RL + "objective: {metrics: [val/fd_nfe1, val/reward_nfe1], directions: [minimize, maximize]}\n"
     "pruner: {kind: median}", "cannot prune on intermediate values of a study with several objectives"),
    (RL + "objective: {metric: val/fd_nfe1, direction: minimize, record: [val/gold_nfe2]}",
     "objective: unknown metric 'val/gold_nfe2'"),
    (RL + "objective: {metric: val/fd_nfe1, direction: minimize, record: val/gold_nfe1}",
     "objective, key 'record': expected a list of metrics.jsonl keys"),
    (RL + "objective: {metric: val/fd_nfe1, direction: minimize, record: [val/fd_nfe1]}",
     "objective, key 'record': ['val/fd_nfe1'] is already an objective"),
    ("overrides: {rl.enabled: true, rl.reward: digits, run.diverge_steps: 3}\n" + OBJ +
     "divergence: {grad_norm_steps: 5}",
     "divergence.grad_norm_steps sets the trainer's run.diverge_steps, which overrides also set"),
    (RL + OBJ + "divergence: {grad_norm_steps: 0}", "grad_norm_steps"),
])
def test_bad_spec_fails_before_anything_is_written(tmp_path, capsys, body, expected):
    path = _spec(tmp_path, body)
    with pytest.raises(SearchSpecError) as e:
        load_search_spec(path)
    assert any(expected in p and p.startswith(str(path)) for p in e.value.problems), e.value.problems
    root = tmp_path / "runs"
    rc = main([str(path), "--root", str(root), "--no-progress"])
    assert rc == 2 and expected in capsys.readouterr().err
    assert not root.exists()  # no storage, no run directory


def test_every_problem_is_reported_at_once_and_the_module_runs_as_a_command(tmp_path):
    path = _spec(tmp_path, RL + textwrap.dedent("""\
        parameters:
          rl.weight: {low: -1.0, high: 1.0, log: true}
          optim.lr: {low: 2.0, high: 1.0}
          run.seed: {low: 0, high: 3}
        objective: {metric: val/fd_nfe1, direction: sideways, reduce: median}
        trials: 0
        bogus: 1
        """))
    proc = subprocess.run([sys.executable, "-m", "harness.search", str(path), "--root", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    for piece in ("unknown top-level key 'bogus'", "'rl.weight': a log range needs low > 0",
                  "'optim.lr': empty range", "'run.seed': set by the search", "key 'direction': unknown value 'sideways'",
                  "key 'reduce': unknown value 'median'", "key 'trials': expected an integer >= 1"):
        assert piece in proc.stderr, (piece, proc.stderr)
    assert not (tmp_path / "runs").exists()


def test_the_search_prunes_on_the_trainers_divergence_rule(tmp_path):
    """divergence.max_grad_norm / grad_norm_steps are the trainer's run.diverge_grad_norm / diverge_steps in every
    trial's config (one rule, applied by the trainer); left out, the base config's own rule (on by default) holds."""
    path = _spec(tmp_path, RL + OBJ + "divergence: {max_grad_norm: 50.0, grad_norm_steps: 4}\n")
    cfg = load_search_spec(path).config({"rl.weight": 0.1})
    assert (cfg.run.diverge_grad_norm, cfg.run.diverge_steps) == (50.0, 4)
    default = load_search_spec(_spec(tmp_path, RL + OBJ, name="d")).config({"rl.weight": 0.1})
    assert (default.run.diverge_grad_norm, default.run.diverge_steps) == (1000.0, 10)


def test_example_spec_and_matrix_arm_base_load():
    spec = load_search_spec(REPO / "ablations" / "search-rl-weight.yaml")
    assert [p.path for p in spec.parameters] == ["rl.weight"] and spec.parameters[0].log
    assert spec.config({"rl.weight": 0.01}).rl.weight == 0.01
    assert spec.objective.metrics == ("val/fd_nfe2", "val/proxy_nfe2")
    assert spec.objective.directions == ("minimize", "maximize") and spec.objective.record == ("val/gold_nfe2",)
    assert spec.pruner.kind == "none" and (spec.parameters[0].low, spec.parameters[0].high) == (0.1, 30.0)
    # the ladder's own rl_hard arm: a weight on the front is one the ladder can run as is
    ladder = load_matrix(REPO / "ablations" / "blog-digits.yaml", root=Path("/nonexistent"))
    rl_hard = next(r.config for r in ladder.runs if r.arm == "rl_hard")
    cfg = spec.config({"rl.weight": 2.0})
    assert (cfg.run.steps, cfg.rl.warmup, cfg.rl.reward, cfg.eval.n_samples) == (
        rl_hard.run.steps, rl_hard.rl.warmup, rl_hard.rl.reward, rl_hard.eval.n_samples)


def test_matrix_arm_as_base(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"matrix: {REPO / 'ablations' / 'blog-digits.yaml'}\narm: rl_sigmoid\n"
                    + OBJ.replace("nfe1", "nfe2") + "parameters: {rl.weight: {low: 0.001, high: 1.0, log: true}}\n")
    spec = load_search_spec(path)
    cfg = spec.config({"rl.weight": 0.2})
    steps = yaml.safe_load((REPO / "ablations" / "blog-digits.yaml").read_text())["vars"]["steps"]
    assert cfg.rl.schedule == "sigmoid" and cfg.rl.enabled and cfg.rl.weight == 0.2 and cfg.run.steps == steps
    path.write_text(path.read_text().replace("rl_sigmoid", "nope"))
    with pytest.raises(SearchSpecError, match="has no arm 'nope'"):
        load_search_spec(path)


# --------------------------------------------------------------------------- stale trials


def test_stale_rules(tmp_path):
    storage, _ = storage_for(load_search_spec(_spec(tmp_path, RL + OBJ)), root=tmp_path)
    study = optuna.create_study(study_name="x", storage=storage)
    me = this_process()
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = time.time()

    def trial_with(owner: dict | None, beat: float | None = None):
        t = study.ask()
        if owner is not None:
            t.set_user_attr("owner", owner)
        if beat is not None:
            t.set_user_attr("heartbeat", beat)
        return study.get_trials(deepcopy=False)[t.number]

    mine = trial_with(me.as_dict())
    assert stale_reason(mine, me=me, now=now, stale_after_s=5) is None
    dead = trial_with({"host": me.host, "pid": gone.pid, "started": "1"})
    assert "is gone" in stale_reason(dead, me=me, now=now, stale_after_s=1e9)
    # a live process of this host that is not us (pid 1 with its real start time) is not stale
    init = Owner(host=me.host, pid=1, started="")
    assert stale_reason(trial_with(init.as_dict()), me=me, now=now, stale_after_s=5) is None
    far = {"host": me.host + "-elsewhere", "pid": 4242, "started": "7"}
    assert "no heartbeat" in stale_reason(trial_with(far, beat=now - 100), me=me, now=now, stale_after_s=60)
    assert stale_reason(trial_with(far, beat=now - 10), me=me, now=now, stale_after_s=60) is None
    # heartbeats are stored as readable UTC times; the raw numbers of older studies (above) still read
    assert heartbeat_text(0.25) == "1970-01-01T00:00:00.250+00:00" and heartbeat_time(heartbeat_text(now)) == \
        pytest.approx(now, abs=1e-3)
    assert "no heartbeat" in stale_reason(trial_with(far, beat=heartbeat_text(now - 100)), me=me, now=now,
                                          stale_after_s=60)
    assert stale_reason(trial_with(far, beat=heartbeat_text(now - 10)), me=me, now=now, stale_after_s=60) is None


# --------------------------------------------------------------------------- stand-in trainer

# Reads the launch config like the trainer and writes the run-directory contract:
# FD = |log10 w| + 1 + 0.1*seed + 1/step (so lower w-distance to 1 is better, seeds differ),
# reward = proxy = log10 w, gold = r - r^2 (+ 0.01*seed: over-optimised beyond w = 10^0.5),
# pre-clip grad norm = w, fed to the trainer's own divergence rule (run.diverge_grad_norm / diverge_steps:
# the run ends as diverged, exit 3, like the trainer); w >= 1e3 crashes at step 3. It also starts a grandchild
# that only a process-group stop ends.
STANDIN = """\
import json, math, os, subprocess, sys, time
from pathlib import Path
import yaml
args = sys.argv[1:]
cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
d = Path(args[args.index("--run-dir") + 1])
from twinflow_train.rundir import write_status
from twinflow_train.run.divergence import GradNormRule
def status(state, reason=None, step=0):
    write_status(d, state, step=step, reason=reason)
w, n, every, seed = cfg["rl"]["weight"], cfg["run"]["steps"], cfg["run"]["val_every"], cfg["run"]["seed"]
rule = GradNormRule(bound=cfg["run"]["diverge_grad_norm"], steps=cfg["run"]["diverge_steps"])
status("running")
(d / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("STANDIN_MARK", "WANDB_RUN_ID")}))
child = subprocess.Popen(["sleep", "120"])
(d / "grandchild.pid").write_text(str(child.pid))
with open(d / "metrics.jsonl", "a") as f:
    for step in range(1, n + 1):
        time.sleep(float(os.environ.get("STANDIN_SLEEP", "0.02")))
        if w >= 1e3 and step == 3:
            status("failed", "RuntimeError: stand-in crash at step 3", step)
            child.kill()
            sys.exit(1)
        f.write(json.dumps({"step": step, "kind": "train", "loss/total": 1.0, "grad_norm/total": w,
                            "count/nonfinite": 0, "count/spikes": 0}) + "\\n")
        why = rule.observe(step, w)
        if why is not None:
            f.flush()
            status("diverged", why, step)
            child.kill()
            sys.exit(3)
        if step % every == 0 or step == n:
            fd = abs(math.log10(w)) + 1 + 0.1 * seed + 1.0 / step
            r = math.log10(w)
            f.write(json.dumps({"step": step, "kind": "val", "val/loss": fd, "val/fd_nfe1": fd,
                                "val/reward_nfe1": r, "val/proxy_nfe1": r, "val/gold_nfe1": r - r * r + 0.01 * seed})
                    + "\\n")
        f.flush()
child.kill()
status("done", None, n)
"""


class StandInLauncher(LocalLauncher):
    def __init__(self, script: Path, *, workers: int):
        super().__init__(workers=workers, threads=1)
        self.script = script

    def command(self, job):
        return [sys.executable, str(self.script), *job.argv]


@pytest.fixture
def standin(tmp_path) -> Path:
    p = tmp_path / "standin.py"
    p.write_text(STANDIN)
    return p


def _search(spec_path: Path, root: Path, script: Path, **kw) -> tuple[Search, object]:
    spec = load_search_spec(spec_path)
    search = Search(spec, root=root, launcher=StandInLauncher(script, workers=spec.workers * len(spec.seeds)),
                    poll_s=0.05, progress=False, stream=io.StringIO(), prepare_teacher=False, **kw)
    return search, search.run()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status not in ("Z", "X")  # a zombie awaiting its reaper has ended


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_median_pruner_stops_live_runs_and_objective_is_seed_mean(tmp_path, standin, monkeypatch, backend):
    monkeypatch.setenv("STANDIN_SLEEP", "0.05")  # 24 steps: the stop must land well before the end
    path = _spec(tmp_path, RL + OBJ + textwrap.dedent("""\
        seeds: [0, 1]
        parameters: {rl.weight: {low: 1.0e-4, high: 10.0, log: true}}
        trials: 2
        workers: 1
        pruner: {kind: median, n_startup_trials: 1}
        enqueue: [{rl.weight: 1.0}, {rl.weight: 1.0e-3}]
        """))
    root = tmp_path / "runs"
    storage = None if backend == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    search, result = _search(path, root, standin, storage=storage)
    assert result.exit_code == 0, search.stream.getvalue()
    assert (root / "s" / "s.journal").is_file() == (backend == "journal")
    study = search.study
    t0, t1 = study.get_trials(deepcopy=False)
    assert (t0.state, t1.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    # objective = mean over seeds of each run's final validation value, read back from the run files
    finals = [[r for r in read_metrics(root / "s" / "trial-0000" / f"seed-{k}" / "metrics.jsonl")
               if r["kind"] == "val"][-1]["val/fd_nfe1"] for k in (0, 1)]
    assert t0.value == pytest.approx(sum(finals) / 2)
    # each seed's value and step as a number of its own (optuna-dashboard shows a mapping as a JSON string)
    assert t0.user_attrs["seed-1:val/fd_nfe1"] == pytest.approx(finals[1])
    assert type(t0.user_attrs["seed-1:step"]) is int and t0.user_attrs["last_step"] == t0.user_attrs["seed-1:step"]
    # the worse trial was pruned by the pruner (not as diverging) at its first evaluation, runs stopped there
    assert "median pruner at step 8" in t1.user_attrs["prune_reason"] and not t1.user_attrs["diverged"]
    assert t1.value == pytest.approx(t1.intermediate_values[8])
    first = [[r for r in read_metrics(root / "s" / "trial-0001" / f"seed-{k}" / "metrics.jsonl")
              if r["kind"] == "val"][0]["val/fd_nfe1"] for k in (0, 1)]
    assert t1.intermediate_values[8] == pytest.approx(sum(first) / 2)
    for k in (0, 1):
        d = root / "s" / "trial-0001" / f"seed-{k}"
        st = read_status(d)
        assert st["state"] == "queued" and "pruned by the median pruner" in st["reason"]
        assert max(r["step"] for r in read_metrics(d / "metrics.jsonl")) < 24  # stopped before the end
        assert read_record(d).attempts[-1].outcome == "interrupted"
        grandchild = int((d / "grandchild.pid").read_text())
        deadline = time.time() + 5
        while _alive(grandchild) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), "the stop must reach the run's whole process group"
    # the study directory reads like a grid
    statuses = run_statuses(root / "s")
    assert sorted(zip(statuses["arm"], statuses["seed"])) == [("trial-0000", 0), ("trial-0000", 1),
                                                              ("trial-0001", 0), ("trial-0001", 1)]
    best = (root / "s" / "best.yaml").read_text()
    assert "trial 0" in best.splitlines()[0]


def test_a_trials_runs_get_their_run_env(tmp_path, standin):
    """``run_env`` reaches each seed's process: per run group, overridden per ``group/seed-k``."""
    path = _spec(tmp_path, RL + OBJ + textwrap.dedent("""\
        seeds: [0, 1]
        trials: 1
        workers: 1
        pruner: {kind: none}
        enqueue: [{rl.weight: 1.0}]
        """))
    root = tmp_path / "runs"
    search, result = _search(path, root, standin, run_env={"trial-0000": {"STANDIN_MARK": "group"},
                                                           "trial-0000/seed-1": {"STANDIN_MARK": "seed"}})
    assert result.exit_code == 0, search.stream.getvalue()
    seen = {k: json.loads((root / "s" / "trial-0000" / f"seed-{k}" / "env.json").read_text()) for k in (0, 1)}
    assert [seen[k]["STANDIN_MARK"] for k in (0, 1)] == ["group", "seed"]
    identity = read_record(root / "s" / "trial-0000" / "seed-0").identity
    assert seen[0]["WANDB_RUN_ID"] == f"tfl-{identity}"  # the harness's own variables are kept


def test_constraints_crash_pareto_and_changed_spec(tmp_path, standin, capsys):
    root = tmp_path / "runs"
    path = _spec(tmp_path, RL + textwrap.dedent("""\
        parameters: {rl.weight: {low: 1.0e-4, high: 1.0e4, log: true}}
        objective:
          metric: val/reward_nfe1
          direction: maximize
          constraints: [{metric: val/fd_nfe1, max: 2.5}]
        trials: 4
        workers: 2
        pruner: {kind: none}
        enqueue: [{rl.weight: 100.0}, {rl.weight: 10.0}, {rl.weight: 0.1}, {rl.weight: 1.0e4}]
        """), name="c")
    search, result = _search(path, root, standin)
    trials = {t.params["rl.weight"]: t for t in search.study.get_trials(deepcopy=False)}
    assert result.exit_code == 3  # a trial of this invocation failed
    crash = trials[1.0e4]
    assert crash.state == TrialState.FAIL and "stand-in crash at step 3" in crash.user_attrs["fail_reason"]
    assert read_status(root / "c" / crash.user_attrs["run_group"] / "seed-0")["state"] == "failed"
    hi, ok = trials[100.0], trials[10.0]
    assert hi.constraints["val/fd_nfe1<=2.5"] > 0 and ok.constraints["val/fd_nfe1<=2.5"] <= 0
    assert hi.value > ok.value  # the best reward is infeasible: the feasible best is chosen
    assert search.study.best_trial.number == ok.number
    from twinflow_train.config import load_config

    assert load_config(root / "c" / "best.yaml").rl.weight == 10.0
    # a failed trial uses the budget: re-running starts nothing
    again, res2 = _search(path, root, standin)
    assert res2.told == [] and len(again.study.get_trials(deepcopy=False)) == 4

    # a changed definition of the same study is refused before anything runs
    path.write_text(path.read_text().replace("high: 1.0e4", "high: 1.0e5"))
    capsys.readouterr()
    assert main([str(path), "--root", str(root), "--no-progress"]) == 2
    assert "was started with a different parameters" in capsys.readouterr().err

    # two objectives: one ready-to-run config per Pareto-optimal trial, no single best
    pareto = _spec(tmp_path, RL + textwrap.dedent("""\
        parameters: {rl.weight: {low: 1.0e-4, high: 1.0e2, log: true}}
        objective: {metrics: [val/fd_nfe1, val/reward_nfe1], directions: [minimize, maximize]}
        trials: 3
        workers: 1
        enqueue: [{rl.weight: 1.0}, {rl.weight: 10.0}, {rl.weight: 0.01}]
        """), name="p")
    ps, pres = _search(pareto, root, standin)
    assert pres.exit_code == 0
    front = sorted(t.number for t in ps.study.best_trials)
    assert front == [0, 1]  # w=0.01 has a worse FD and a worse reward than w=1: dominated
    assert sorted(p.name for p in (root / "p" / "pareto").iterdir()) == [f"trial-{n:04d}.yaml" for n in front]
    assert not (root / "p" / "best.yaml").exists()


def test_sigterm_stops_runs_and_a_rerun_resumes_the_trial(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("STANDIN_SLEEP", "0.05")
    path = _spec(tmp_path, RL + OBJ + textwrap.dedent("""\
        trials: 2
        workers: 1
        pruner: {kind: none}
        enqueue: [{rl.weight: 1.0}, {rl.weight: 0.5}]
        """))
    root = tmp_path / "runs"
    run0 = root / "s" / "trial-0000" / "seed-0"

    def stop_when_running() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            metrics = run0 / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    import threading

    watcher = threading.Thread(target=stop_when_running)
    watcher.start()
    search, result = _search(path, root, standin)
    watcher.join()
    assert result.interrupted and result.exit_code == 130
    t0 = search.study.get_trials(deepcopy=False)[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["fail_reason"].startswith("interrupted")
    status = read_status(run0)
    assert status["state"] == "queued" and "re-run it to resume" in status["reason"]
    assert not _alive(int((run0 / "grandchild.pid").read_text()))
    waiting = search.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    # enqueued trials hold their parameters as Optuna's fixed_params until a worker takes them
    assert [(t.system_attrs["fixed_params"]["rl.weight"], t.user_attrs.get("retry_of")) for t in waiting] == [
        (0.5, None), (1.0, 0)]

    again, res2 = _search(path, root, standin)
    assert res2.exit_code == 0 and sorted(n for n, _ in res2.told) == [1, 2]
    trials = again.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["run_group"] == "trial-0000"
    assert [a.outcome for a in read_record(run0).attempts] == ["interrupted", "done"]


# --------------------------------------------------------------------------- the real trainer


E2E_BASE = TINY_BASE.replace("run: {steps: 24, log_every: 1, val_every: 8, ckpt_every: 8}",
                             "run: {steps: 20, log_every: 1, val_every: 5, ckpt_every: 5}")


@pytest.mark.slow
def test_search_on_digits_parallel_resume_kill_and_best_config(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "base.yaml").write_text(E2E_BASE)
    path = tmp_path / "rlw.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: rlw
        base: base.yaml
        overrides: {{rl.enabled: true, rl.reward: digits, rl.warmup: 0, run.nonfinite: stop,
                    aux.cache_dir: {cache}}}
        seeds: [0]
        parameters: {{rl.weight: {{low: 1.0e-3, high: 1.0, log: true}}}}
        objective: {{metric: val/fd_nfe1, direction: minimize}}
        trials: 4
        workers: 2
        pruner: {{kind: median, n_startup_trials: 2}}
        divergence: {{max_grad_norm: 1.0e3, grad_norm_steps: 5}}
        """))
    root = tmp_path / "runs"
    study_dir = root / "rlw"
    spec = load_search_spec(path)
    # absurd weights, outside the searched range on purpose: a spec's enqueue refuses them, the Optuna API does not
    study = open_study(spec, storage_for(spec, root=root)[0])
    # clipped updates stay finite, the pre-clip grad norm explodes (7e3-2e4 from step 1): the trainer's rule ends it
    study.enqueue_trial({"rl.weight": 1.0e6})
    study.enqueue_trial({"rl.weight": 1.0e30})  # the loss overflows: the trainer stops the run as diverged

    def search(**kw):
        s = Search(spec, root=root, poll_s=0.1, progress=False, stream=io.StringIO(), **kw)
        return s, s.run()

    s1, r1 = search()
    assert r1.exit_code == 0, s1.stream.getvalue()
    trials = s1.study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert sorted(n for n, _ in r1.told) == [0, 1, 2, 3]  # each told exactly once
    absurd = {t.params["rl.weight"]: t for t in trials if t.params["rl.weight"] >= 1e6}
    # 1e6: the trainer's grad-norm rule fires (5 steps above 1000); 1e30: the step is non-finite, which the search
    # sees either in the logged record of that step or from the trainer's exit as diverged, whichever it reads first
    for w, whys in ((1e6, ("pre-clip grad norm",)), (1e30, ("stopped the run as diverged", "non-finite training values"))):
        t = absurd[w]
        assert t.state == TrialState.PRUNED and t.user_attrs["diverged"]
        assert any(why in t.user_attrs["prune_reason"] for why in whys), t.user_attrs["prune_reason"]
        assert read_status(study_dir / t.user_attrs["run_group"] / "seed-0")["state"] == "diverged"
    for t in trials:
        record = read_record(study_dir / f"trial-{t.number:04d}" / "seed-0")
        assert len(record.attempts) == 1 and record.arm == f"trial-{t.number:04d}" and record.grid == "rlw"
    best_before, best_value = (study_dir / "best.yaml").read_text(), s1.study.best_value

    # a second invocation with the budget spent runs nothing and repeats nothing
    s2, r2 = search()
    assert r2.told == [] and len(s2.study.get_trials(deepcopy=False)) == 4
    assert all(len(read_record(study_dir / f"trial-{n:04d}" / "seed-0").attempts) == 1 for n in range(4))

    # a search killed (SIGKILL) mid-trial: the next invocation marks the trial stale and continues it
    proc = subprocess.Popen([sys.executable, "-m", "harness.search", str(path), "--root", str(root), "--trials", "5",
                             "--poll-s", "0.1", "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    run4 = study_dir / "trial-0004" / "seed-0"
    deadline = time.time() + 240
    while time.time() < deadline and checkpoint_step(run4) < 5:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    assert checkpoint_step(run4) >= 5
    trainer = read_status(run4)["pid"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while pid_is_trainer(trainer) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_is_trainer(trainer), "the trainer must die with the search process"
    assert optuna.load_study(study_name="rlw", storage=storage_for(spec, root=root)[0]).trials[4].state \
        == TrialState.RUNNING

    s3, r3 = search(trials=5)
    assert r3.exit_code == 0 and r3.stale == [4], s3.stream.getvalue()
    trials = s3.study.get_trials(deepcopy=False)
    assert len(trials) == 6 and trials[4].state == TrialState.FAIL
    assert trials[4].user_attrs["fail_reason"].startswith("stale: its search process")
    retry = trials[5]
    assert retry.params == trials[4].params and retry.user_attrs["retry_of"] == 4
    assert retry.user_attrs["run_group"] == "trial-0004" and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    attempts = read_record(run4).attempts
    assert [a.outcome for a in attempts][0] == "interrupted" and attempts[1].start_step >= 5  # resumed, not restarted
    steps = [(r["step"], r["kind"]) for r in read_metrics(run4 / "metrics.jsonl")]
    assert len(steps) == len(set(steps))  # every step once across the kill
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 5 and len({t.number for t in counted}) == 5
    if retry.state != TrialState.COMPLETE or retry.value >= best_value:
        assert (study_dir / "best.yaml").read_text() == best_before

    # the best config trains as it is
    best = study_dir / "best.yaml"
    out = subprocess.run([sys.executable, "-m", "twinflow_train.cli", "fit", "--config", str(best),
                          "--run-dir", str(tmp_path / "best-run"), "--no-progress"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert read_status(tmp_path / "best-run")["state"] == "done"
    assert any(r.get("kind") == "val" for r in read_metrics(tmp_path / "best-run" / "metrics.jsonl"))

    # the reports find the study in the study directory and build its section from the journal
    from reports.study import find_studies, study_section

    (found,) = find_studies(study_dir)
    section = study_section(found)
    assert len(section.table) == 6 and "val/fd_nfe1" in section.table.columns
    assert math.isfinite(float(section.table["val/fd_nfe1"].min()))


@pytest.mark.slow
def test_two_objectives_record_the_gold_reward_and_the_report_draws_the_front(tmp_path, standin):
    """The trade-off search end to end: FD down, proxy up, gold recorded; a diverging weight pruned with no values;
    the report of the study directory draws the front coloured by gold and names the weights on it."""
    from reports.build import build_report

    root = tmp_path / "runs"
    path = _spec(tmp_path, RL + textwrap.dedent("""\
        seeds: [0, 1]
        parameters: {rl.weight: {low: 1.0e-2, high: 1.0e3, log: true}}
        objective:
          metrics: [val/fd_nfe1, val/proxy_nfe1]
          directions: [minimize, maximize]
          record: [val/gold_nfe1]
        trials: 4
        workers: 2
        divergence: {max_grad_norm: 50.0}
        enqueue: [{rl.weight: 1.0}, {rl.weight: 10.0}, {rl.weight: 0.01}, {rl.weight: 200.0}]
        """), name="mo")
    search, result = _search(path, root, standin)
    assert result.exit_code == 0, search.stream.getvalue()
    trials = {t.params["rl.weight"]: t for t in search.study.get_trials(deepcopy=False)}
    div = trials[200.0]
    assert div.state == TrialState.PRUNED and div.values is None and div.user_attrs["diverged"]
    # the trainer's rule (divergence.max_grad_norm sets run.diverge_grad_norm; 10 steps by default) ended the runs
    assert "stopped the run as diverged (pre-clip grad norm above 50 for 10 consecutive steps (steps 1-10; last 200))" \
        in div.user_attrs["prune_reason"], div.user_attrs["prune_reason"]
    for w in (1.0, 10.0, 0.01):  # gold: mean over seeds of each run's final value, read back from the files
        t = trials[w]
        finals = [[r for r in read_metrics(root / "mo" / t.user_attrs["run_group"] / f"seed-{k}" / "metrics.jsonl")
                   if r["kind"] == "val"][-1] for k in (0, 1)]
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["recorded"]["val/gold_nfe1"] == pytest.approx(sum(f["val/gold_nfe1"] for f in finals) / 2)
        assert t.values[1] == pytest.approx(sum(f["val/proxy_nfe1"] for f in finals) / 2)
    front = {t.params["rl.weight"] for t in search.study.best_trials}
    assert front == {1.0, 10.0}  # w = 0.01: worse FD and worse proxy than w = 1
    table = (root / "mo" / "trials.csv").read_text().splitlines()
    assert table[0].split(",")[:5] == ["trial", "state", "val/fd_nfe1", "val/proxy_nfe1", "val/gold_nfe1"]
    # a multi-objective trial reports no intermediate values; its last step still reaches the table
    import csv as _csv
    rows = {int(r["trial"]): r for r in _csv.DictReader((root / "mo" / "trials.csv").open())}
    for w in (1.0, 10.0, 0.01):
        t = trials[w]
        assert not t.intermediate_values and int(rows[t.number]["last_step"]) == t.user_attrs["last_step"] > 0
        assert isinstance(t.user_attrs["recorded:val/gold_nfe1"], float)
        assert datetime.fromisoformat(t.user_attrs["heartbeat"]).tzinfo is not None  # a readable UTC time

    out = tmp_path / "report"
    build_report(grid_dir=root / "mo", out_dir=out, progress=False)
    figs = {f["slug"]: f for f in json.loads((out / "figures.json").read_text())}
    meta = figs["study_mo_pareto"]["meta"]
    assert meta["colour"] == "val/gold_nfe1"
    assert meta["front"] == sorted(trials[w].number for w in front) and sorted(meta["labels"]) == [["1"], ["10"]]
    md = (out / "report.md").read_text()
    for w in (1.0, 10.0):
        assert f"#{trials[w].number} (rl.weight = {w:.4g}: val/fd_nfe1 = {trials[w].values[0]:.4g}" in md
    assert f"Pruned as diverging (1; no values, so not on any front): #{div.number} (rl.weight = 200)" in md
    assert "Pareto-optimal trials" in md

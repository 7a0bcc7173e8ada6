"""Acceptance of the harness against the real trainer (``python -m twinflow_train.cli``).

- a grid killed with SIGKILL mid-run and run again: done runs are not re-run, the
  interrupted run resumes from its checkpoint, every metrics.jsonl has each step once
  and no torn line, and the results equal those of a grid that was never interrupted;
- one arm diverging and one crashing are recorded with their reasons, the others complete;
- torchrun, accelerate and submitit (local executor) launchers run the same trainer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.collect import collect_grid, divergence_summary, run_statuses
from harness.grid import run_grid
from harness.launchers import AccelerateLauncher, LocalLauncher, SlurmLauncher, TorchrunLauncher
from harness.matrix import load_matrix
from harness.monitor import pid_is_trainer
from harness.store import read_metrics, read_record, read_status
from twinflow_train.rundir import resume_step as checkpoint_step

from .conftest import TINY_BASE, teacher_cache

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KILL_STEPS = 32  # long enough to be caught between checkpoints, short enough to keep the suite quick


shared_cache = pytest.fixture(scope="module", autouse=True)(teacher_cache)


def _matrix(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / "base.yaml").write_text(TINY_BASE)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\n{body}")
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _assert_clean_metrics(path: Path, steps: int) -> None:
    """Each (step, kind) once, every line parses, training steps 1..steps in order."""
    text = path.read_text()
    assert text.endswith("\n")
    recs = [json.loads(line) for line in text.splitlines()]  # raises on a torn line
    keys = [(r["step"], r.get("kind")) for r in recs]
    assert len(keys) == len(set(keys)), f"duplicated records in {path}"
    assert [r["step"] for r in recs if r.get("kind") == "train"] == list(range(1, steps + 1))


def _grid_cmd(matrix: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "grid", "run", str(matrix), "--root", str(root), *extra]


def test_sigkill_mid_run_then_rerun_resumes_and_matches_an_uninterrupted_grid(tmp_path):
    body = f"""\
seeds: [0]
overrides: {{run.steps: {KILL_STEPS}, run.log_every: 1, run.ckpt_every: 8, run.val_every: 16}}
arms:
  first: {{}}
  second: {{method.rect_weight: 0.5}}
"""
    matrix = _matrix(tmp_path, "killme", body)
    root = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    grid_dir = root / "killme"
    first, second = (grid_dir / a / "seed-0" for a in ("first", "second"))

    # 1. run the grid one run at a time; SIGKILL its whole process group in the middle of the second run
    proc = subprocess.Popen(_grid_cmd(matrix, root, "--workers", "1"), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # bounds a broken run only; a healthy one is caught in seconds
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ck = checkpoint_step(second)
            trained = [r["step"] for r in read_metrics(second / "metrics.jsonl") if r.get("kind") == "train"]
            if ck >= 8 and trained and ck < trained[-1] < KILL_STEPS - 4:
                killed_at = trained[-1]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: harness and trainer
    proc.wait(timeout=30)
    assert killed_at is not None, f"the grid ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert read_status(first)["state"] == "done"
    assert read_status(second)["state"] == "running"  # killed: the trainer never wrote its end
    time.sleep(0.5)
    assert not pid_is_trainer(read_status(second)["pid"]), "a trainer survived the killed grid"

    ck = checkpoint_step(second)
    first_bytes = (first / "metrics.jsonl").read_bytes()
    first_attempts = len(read_record(first).attempts)
    kept = [line for line in _lines(second / "metrics.jsonl") if json.loads(line)["step"] <= ck]

    # 2. the same grid again. In-process, with the code version the first invocation recorded: in a working
    # tree someone may be editing the trainer meanwhile, and a new code version is (rightly) a new identity
    code = read_record(first).code_version
    out = io.StringIO()
    rerun = run_grid(load_matrix(matrix, root=root, code_version=code), launcher=LocalLauncher(workers=1),
                     stream=out, tty=False, prepare_teacher=False)  # the first invocation prepared it
    assert rerun.exit_code == 0, out.getvalue()
    assert rerun.launched == ["second/seed-0"] and rerun.skipped == ["first/seed-0"]
    # done run not re-run
    assert (first / "metrics.jsonl").read_bytes() == first_bytes
    assert len(read_record(first).attempts) == first_attempts == 1
    # interrupted run resumed from its checkpoint: one more attempt, started at the checkpointed step,
    # and the records up to that step are the very lines written before the kill (not recomputed)
    attempts = read_record(second).attempts
    assert [a.outcome for a in attempts] == ["interrupted", "done"]
    assert attempts[1].start_step == ck > 0
    assert _lines(second / "metrics.jsonl")[:len(kept)] == kept
    for run in (first, second):
        assert read_status(run)["state"] == "done"
        _assert_clean_metrics(run / "metrics.jsonl", KILL_STEPS)

    # 3. an uninterrupted grid of the same matrix gives the same results
    clean = run_grid(load_matrix(matrix, root=tmp_path / "clean", code_version=code), launcher=LocalLauncher(workers=1),
                     stream=io.StringIO(), tty=False, prepare_teacher=False)
    assert clean.exit_code == 0
    for arm in ("first", "second"):
        a = tmp_path / "clean" / "killme" / arm / "seed-0"
        b = grid_dir / arm / "seed-0"
        assert _without_time(read_metrics(a / "metrics.jsonl")) == _without_time(read_metrics(b / "metrics.jsonl")), arm
        for npz in sorted((a / "samples").glob("*.npz")):
            x, y = np.load(npz), np.load(b / "samples" / npz.name)
            np.testing.assert_array_equal(x["images"], y["images"])
            np.testing.assert_array_equal(x["labels"], y["labels"])


def test_diverging_and_crashing_arms_are_recorded_and_the_rest_complete(tmp_path, capsys):
    body = """\
seeds: [0]
overrides: {run.steps: 12, run.ckpt_every: 4, run.val_every: 8}
arms:
  ok: {}
  # non-finite steps are skipped and logged; two in a row end the run as diverged
  huge_lr: {optim.lr: 1.0e+6, run.max_nonfinite: 2}
  crash: {method.rect_weight: 0.5}
"""
    matrix = _matrix(tmp_path, "faults", body)
    grid = load_matrix(matrix, root=tmp_path / "runs")
    out = io.StringIO()
    result = run_grid(grid, launcher=LocalLauncher(workers=2), stream=out, tty=False, retries=1,
                      run_env={"crash": {"TWINFLOW_FAULT_AT_STEP": "6"}})
    assert result.outcomes == {"ok/seed-0": "done", "huge_lr/seed-0": "diverged", "crash/seed-0": "failed"}, \
        out.getvalue()
    assert result.exit_code == 3
    st = run_statuses(grid.grid_dir).set_index("arm")
    assert "non-finite" in st.loc["huge_lr", "reason"]
    assert st.loc["crash", "reason"] == "RuntimeError: injected fault at step 6 (TWINFLOW_FAULT_AT_STEP)"
    # the crash was retried once (the retry resumed from the step-4 checkpoint and hit the fault again);
    # a diverged run is final and not retried
    crash = read_record(grid.grid_dir / "crash" / "seed-0").attempts
    assert [(a.outcome, a.start_step) for a in crash] == [("failed", 0), ("failed", 4)]
    assert [a.outcome for a in read_record(grid.grid_dir / "huge_lr" / "seed-0").attempts] == ["diverged"]
    _assert_clean_metrics(grid.grid_dir / "ok" / "seed-0" / "metrics.jsonl", 12)

    summary = divergence_summary(collect_grid(grid.grid_dir)).set_index("arm")
    diverged_at = summary.loc["huge_lr", "first_nonfinite_step"]
    assert 1 < diverged_at <= 12 and f"at step {int(diverged_at) + 1}" in st.loc["huge_lr", "reason"]
    assert np.isnan(summary.loc["ok", "first_nonfinite_step"]) and summary.loc["ok", "max_grad_norm"] > 0

    # the command line shows the same
    assert main(["grid", "status", str(matrix), "--root", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "diverged" in text and "injected fault at step 6" in text
    assert main(["grid", "collect", str(matrix), "--root", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "metrics.parquet" in text and "first_nonfinite_step" in text
    assert (grid.grid_dir / ".harness" / "metrics.parquet").is_file()
    assert f"-> {grid.grid_dir / 'metrics.parquet'}" in text  # the table where ls shows it
    assert (grid.grid_dir / "metrics.parquet").read_bytes() == (grid.grid_dir / ".harness" / "metrics.parquet").read_bytes()


@pytest.mark.distributed
def test_torchrun_launcher(tmp_path):
    matrix = _matrix(tmp_path, "tr", "seeds: [0]\noverrides: {run.steps: 8, run.val_every: 8, run.ckpt_every: 4}\n"
                                     "arms: {a: {}}\n")
    grid = load_matrix(matrix, root=tmp_path / "runs")
    result = run_grid(grid, launcher=TorchrunLauncher(workers=1, nproc_per_node=2), stream=io.StringIO(), tty=False)
    run = grid.grid_dir / "a" / "seed-0"
    log = (run / "logs" / "attempt-1.log").read_text()
    assert result.outcomes == {"a/seed-0": "done"}, log[-3000:]
    assert "torch.distributed.run" in log.splitlines()[0] and "--nproc_per_node=2" in log.splitlines()[0]
    _assert_clean_metrics(run / "metrics.jsonl", 8)



@pytest.mark.distributed
def test_accelerate_launcher(tmp_path):
    # a user's accelerate config: two processes on this machine; accelerate starts them, the trainer's own
    # process group (gloo on CPU) and FSDP do the rest
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\nmachine_rank: 0\ngpu_ids: all\n")
    matrix = _matrix(tmp_path, "acc", "seeds: [0]\noverrides: {run.steps: 8, run.val_every: 8, run.ckpt_every: 4}\n"
                                      "arms: {a: {}}\n")
    grid = load_matrix(matrix, root=tmp_path / "runs")
    launcher = AccelerateLauncher(config_file=config, workers=1)
    result = run_grid(grid, launcher=launcher, stream=io.StringIO(), tty=False)
    run = grid.grid_dir / "a" / "seed-0"
    log = (run / "logs" / "attempt-1.log").read_text()
    assert result.outcomes == {"a/seed-0": "done"}, log[-3000:]
    assert "accelerate.commands.launch" in log.splitlines()[0] and str(config) in log.splitlines()[0]
    assert read_record(run).attempts[0].launcher == "accelerate"
    _assert_clean_metrics(run / "metrics.jsonl", 8)

def test_submitit_local_executor(tmp_path):
    matrix = _matrix(tmp_path, "sl", "seeds: [0]\noverrides: {run.steps: 8, run.val_every: 8, run.ckpt_every: 4}\n"
                                     "arms: {a: {}}\n")
    grid = load_matrix(matrix, root=tmp_path / "runs")
    launcher = SlurmLauncher(folder=grid.grid_dir / ".harness" / "submitit", workers=1, cluster="local")
    result = run_grid(grid, launcher=launcher, stream=io.StringIO(), tty=False)
    run = grid.grid_dir / "a" / "seed-0"
    assert result.outcomes == {"a/seed-0": "done"}, (run / "logs" / "attempt-1.log").read_text()[-3000:]
    _assert_clean_metrics(run / "metrics.jsonl", 8)
    assert read_record(run).attempts[0].launcher == "slurm"
    assert any((grid.grid_dir / ".harness" / "submitit").rglob("*_submitted.pkl"))  # it went through submitit

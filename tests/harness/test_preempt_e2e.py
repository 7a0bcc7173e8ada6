"""A preempted run is resumed, not failed (the real trainer, a one-run grid), and a checkpoint is data.

- a run signalled mid-way under the local launcher is recorded ``preempted`` (no failed attempt), resumed on
  the next poll, and ends bit-identical to an uninterrupted grid;
- a harness stop (what Ctrl-C or a SIGTERM to ``grid run`` does) lets the run checkpoint the step in
  flight; the re-run resumes it with no failed attempt;
- submitit's local executor: the preemption signal (``job._interrupt()``) stops the trainer at a checkpoint
  and submitit requeues the job, which resumes it;
- ``grid run`` resuming a run whose latest checkpoint carries a pickle payload passes over it unread.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from harness.collect import run_statuses
from harness.grid import run_grid
from harness.launchers import LocalLauncher, SlurmLauncher, TorchrunLauncher
from harness.matrix import load_matrix
from harness.runs import prepare_run_dir, start_run, stop_runs
from harness.store import read_record, read_status
from twinflow_train import rundir

from ..twinflow_train.distributed.test_checkpoints_are_data import plant_in_state
from ..twinflow_train.run.test_preempt import assert_bit_identical, train_steps
from .conftest import TINY_BASE

pytestmark = pytest.mark.slow
STEPS = 16
BODY = f"seeds: [0]\noverrides: {{run.steps: {STEPS}, run.log_every: 1, run.ckpt_every: 4, run.val_every: 8}}\n" \
       "arms: {a: {}}\n"


def _grid(tmp: Path, root: str):
    (tmp / "base.yaml").write_text(TINY_BASE)
    path = tmp / "pre.yaml"
    path.write_text("name: pre\nbase: base.yaml\n" + BODY)
    return load_matrix(path, root=tmp / root)


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TWINFLOW_LAB_CACHE")
    os.environ["TWINFLOW_LAB_CACHE"] = str(cache)
    yield cache
    if old is None:
        del os.environ["TWINFLOW_LAB_CACHE"]
    else:
        os.environ["TWINFLOW_LAB_CACHE"] = old


@pytest.fixture(scope="module")
def reference(env_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    grid = _grid(tmp, "runs")
    result = run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False)
    assert result.outcomes == {"a/seed-0": "done"}
    return grid.grid_dir / "a" / "seed-0"


def _descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *_descendants(int(child))]
    return out


def _submitit_task(controller: int) -> int:
    (task,) = [p for p in _descendants(controller)
               if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return task


def _outcomes(run):
    return [a.outcome for a in read_record(run).attempts]


def test_a_signalled_run_is_resumed_on_the_next_poll_with_no_failed_attempt(reference, tmp_path):
    grid = _grid(tmp_path, "runs")
    result = run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False,
                      run_env={"a": {"TWINFLOW_SIGNAL_AT_STEP": "6:SIGUSR1"}})
    run = grid.grid_dir / "a" / "seed-0"
    assert result.outcomes == {"a/seed-0": "done"}
    assert _outcomes(run) == ["preempted", "done"] and read_record(run).failures == 0
    assert read_record(run).attempts[1].start_step == 6  # no completed step lost
    assert train_steps(run) == list(range(1, STEPS + 1))
    assert_bit_identical(reference, run)


@pytest.mark.distributed
def test_torchrun_a_run_preempted_on_rank_0_alone_is_resumed_with_no_failed_attempt(env_cache, tmp_path):
    grid = _grid(tmp_path, "runs")
    result = run_grid(grid, launcher=TorchrunLauncher(workers=1, nproc_per_node=2), stream=io.StringIO(), tty=False,
                      run_env={"a": {"TWINFLOW_SIGNAL_AT_STEP": "6:SIGTERM@0"}})
    run = grid.grid_dir / "a" / "seed-0"
    assert result.outcomes == {"a/seed-0": "done"}, (run / "logs" / "attempt-1.log").read_text()[-3000:]
    assert _outcomes(run) == ["preempted", "done"] and read_record(run).failures == 0
    assert read_record(run).attempts[1].start_step == 6
    assert train_steps(run) == list(range(1, STEPS + 1))


def test_a_harness_stop_lets_the_run_checkpoint_and_a_rerun_resumes_it(reference, tmp_path):
    grid = _grid(tmp_path, "runs")
    (spec,) = grid.runs
    prepare_run_dir(spec, code_version=grid.code_version, matrix=grid.matrix_path)
    active = start_run(spec, LocalLauncher(workers=1))
    deadline = time.monotonic() + 300
    while not (spec.run_dir / "metrics.jsonl").is_file() or not train_steps(spec.run_dir):
        assert active.handle.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (outcome,) = stop_runs([active], reason="interrupted (test); re-run the grid to resume")
    status = read_status(spec.run_dir)
    assert outcome == "preempted" and status["state"] == "preempted", status
    assert rundir.checkpoint_step(spec.run_dir / "checkpoints" / "latest") == status["step"] >= 1
    assert "interrupted (test)" in status["reason"] and _outcomes(spec.run_dir) == ["preempted"]
    assert run_statuses(grid.grid_dir).set_index("arm").loc["a", "state"] == "preempted"  # what `grid status` shows
    result = run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False)
    assert result.outcomes == {"a/seed-0": "done"}
    assert _outcomes(spec.run_dir) == ["preempted", "done"] and read_record(spec.run_dir).failures == 0
    assert train_steps(spec.run_dir) == list(range(1, STEPS + 1))
    assert_bit_identical(reference, spec.run_dir)


def test_submitit_local_executor_requeues_a_preempted_job(reference, tmp_path):
    grid = _grid(tmp_path, "runs")
    (spec,) = grid.runs
    launcher = SlurmLauncher(folder=grid.grid_dir / ".harness" / "submitit", workers=1, cluster="local")
    prepare_run_dir(spec, code_version=grid.code_version, matrix=grid.matrix_path)
    active = start_run(spec, launcher)
    deadline = time.monotonic() + 300
    while not (spec.run_dir / "metrics.jsonl").is_file() or not train_steps(spec.run_dir):
        assert active.handle.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    # submitit's preemption signal (USR2; Slurm's --signal sends it before the time limit) to the job's task, as
    # the local executor's controller forwards it at its own timeout
    os.kill(_submitit_task(active.handle.job._process.pid), signal.SIGUSR2)
    while (rc := active.handle.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert rc == 0, (spec.run_dir / active.attempt.log).read_text()[-3000:]
    log = (spec.run_dir / active.attempt.log).read_text()
    assert log.count("$ ") == 2 and "received SIGTERM" in log  # the job ran twice: requeued by submitit
    assert "checkpoint_fallback" not in log
    assert read_status(spec.run_dir)["state"] == "done"
    assert train_steps(spec.run_dir) == list(range(1, STEPS + 1))
    assert_bit_identical(reference, spec.run_dir)


def test_grid_run_passes_over_a_checkpoint_that_is_not_data(reference, tmp_path):
    grid = _grid(tmp_path, "runs")
    run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False,
             run_env={"a": {"TWINFLOW_FAULT_AT_STEP": "11"}})
    run = grid.grid_dir / "a" / "seed-0"
    assert read_status(run)["state"] == "failed"
    marker = tmp_path / "MARKER"
    plant_in_state(run / "checkpoints" / "latest", marker)
    result = run_grid(grid, launcher=LocalLauncher(workers=1), stream=io.StringIO(), tty=False, retries=1)
    assert result.outcomes == {"a/seed-0": "done"}
    assert not marker.exists()
    (event,) = [r for r in rundir.read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["checkpoint"] == "checkpoints/last_good" and "refused, not plain data" in event["reason"]
    assert_bit_identical(reference, run)

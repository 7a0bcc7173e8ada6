"""Stop on a signal, lose nothing (``twinflow_train.run.preempt``), against the real ``fit`` in a subprocess.

The signal is sent by the trainer to its own process as a step starts (``TWINFLOW_SIGNAL_AT_STEP``),
as a scheduler's would arrive while the step runs: the step finishes, its checkpoint is written,
status.json says ``preempted`` with the step, the exit code is 4; the resumed run ends bit-identical
to an uninterrupted one. A second signal, or the grace running out, exits at once (code 5) with the
last complete checkpoint, which the next ``fit`` resumes from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from twinflow_train import rundir
from twinflow_train.config import load_config
from twinflow_train.rundir import EXIT_DONE, EXIT_PREEMPTED, EXIT_PREEMPTED_NOW, read_status
from twinflow_train.run.preempt import signals_at_steps
from twinflow_train.run.trainer import fit

pytestmark = pytest.mark.slow


def _state(run):
    latest = run / "checkpoints" / "latest"
    state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
    if (latest / "shards").is_dir():  # dcp: the tensors live in the shards
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(latest / "shards", run / "dcp-full.pt")
        state.update(torch.load(run / "dcp-full.pt", map_location="cpu", weights_only=True))
    return state


def assert_bit_identical(a, b):
    """Same step, and every tensor of the model, the EMA target and the optimizer equal to the bit."""
    sa, sb = _state(a), _state(b)
    assert sa["state"]["step"] == sb["state"]["step"]
    for part in ("model", "extra", "optimizer"):
        flat_a, flat_b = _tensors(sa[part]), _tensors(sb[part])
        assert flat_a.keys() == flat_b.keys() and flat_a, part
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{part}: {k}"


def _tensors(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_tensors(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_tensors(v, f"{prefix}{i}."))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree
    return out


def train_steps(run):
    return [r["step"] for r in rundir.iter_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]


def fit_cli(run, overrides, *, env=None, torchrun: int = 0, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
            if torchrun else [sys.executable])
    return subprocess.run([*head, "-m", "twinflow_train.cli", "fit", "--run-dir", str(run), "--no-progress",
                           *overrides], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tiny_overrides, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert fit(load_config(None, tiny_overrides), ref, progress=False) == EXIT_DONE
    return ref


def test_signal_specs_are_checked():
    assert signals_at_steps("7:SIGTERM@0, 9:SIGUSR1", rank=1) == {9: [10]}
    with pytest.raises(ValueError, match="not STEP:SIGNAL"):
        signals_at_steps("7:SIGNOPE", rank=0)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_run_checkpoints_that_step_and_the_resume_is_bit_identical(tiny_overrides, reference,
                                                                             tmp_path, sig):
    run = tmp_path / "run"
    done = fit_cli(run, tiny_overrides, env={"TWINFLOW_SIGNAL_AT_STEP": f"6:{sig}"})
    assert done.returncode == EXIT_PREEMPTED, done.stdout[-3000:] + done.stderr[-3000:]
    status = read_status(run)
    assert status["state"] == "preempted" and status["step"] == 6 and sig in status["reason"]
    assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 6  # not 4: no completed step is lost
    assert train_steps(run) == list(range(1, 7))
    assert not (run / "samples" / "final-nfe1").exists()  # stopped, not finished
    assert fit(load_config(None, tiny_overrides), run, progress=False) == EXIT_DONE
    assert read_status(run)["state"] == "done"
    assert train_steps(run) == list(range(1, 13))
    assert_bit_identical(reference, run)


def test_a_second_signal_exits_at_once_and_the_run_resumes_from_its_last_checkpoint(tiny_overrides, reference,
                                                                                    tmp_path):
    run = tmp_path / "run"
    env = {"TWINFLOW_SIGNAL_AT_STEP": "6:SIGTERM,6:SIGUSR2", "TWINFLOW_PREEMPT_REPEAT_S": "0"}
    done = fit_cli(run, tiny_overrides, env=env)
    assert done.returncode == EXIT_PREEMPTED_NOW, done.stdout[-3000:] + done.stderr[-3000:]
    status = read_status(run)
    assert status["state"] == "preempted" and status["step"] == 4 and "second signal (SIGUSR2)" in status["reason"]
    assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 4
    assert rundir.verify_checkpoint(run / "checkpoints" / "latest") is None
    assert fit(load_config(None, tiny_overrides), run, progress=False) == EXIT_DONE
    assert train_steps(run) == list(range(1, 13))
    assert_bit_identical(reference, run)


def test_the_grace_running_out_exits_at_once(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    # a grace far shorter than a step: the timer fires while step 6 still runs
    done = fit_cli(run, [*tiny_overrides, "run.preempt_grace_s=0.001"], env={"TWINFLOW_SIGNAL_AT_STEP": "6:SIGTERM"})
    assert done.returncode == EXIT_PREEMPTED_NOW, done.stdout[-3000:] + done.stderr[-3000:]
    assert "grace of 0.001s after SIGTERM ran out" in read_status(run)["reason"]
    assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 4


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", ["full", "dcp"])
def test_two_gloo_processes_agree_on_a_signal_only_rank_0_got(tiny_overrides, tmp_path, fmt):
    over = [*tiny_overrides, "run.steps=8", "parallel.backend=gloo", f"checkpoint.format={fmt}"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = fit_cli(ref, over, torchrun=2)
    assert done.returncode == EXIT_DONE, done.stdout[-3000:] + done.stderr[-3000:]
    done = fit_cli(run, over, torchrun=2, env={"TWINFLOW_SIGNAL_AT_STEP": "5:SIGTERM@0"})
    # torchrun reports its workers' exit code as a failure of its own; status.json says what happened
    assert done.returncode != EXIT_DONE
    status = read_status(run)
    assert status["state"] == "preempted" and status["step"] == 5, done.stdout[-3000:] + done.stderr[-3000:]
    assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 5
    done = fit_cli(run, over, torchrun=2)
    # the resumed run's end is status.json's: a gloo worker was seen to abort at interpreter exit ("terminate
    # called without an active exception") after writing done, which torchrun then reports as a failure
    assert read_status(run)["state"] == "done", done.stdout[-3000:] + done.stderr[-3000:]
    assert train_steps(run) == list(range(1, 9))
    assert_bit_identical(ref, run)

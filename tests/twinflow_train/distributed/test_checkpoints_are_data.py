"""Checkpoints are data: a file that would run code when read is refused unread, with matching checksums too.

Each test plants a pickle payload (an object whose ``__reduce__`` runs ``touch MARKER``) into a real
checkpoint and rewrites meta.json to match, as anyone who can write the file can. ``fit`` passes over
that checkpoint to the previous valid one (an event names the file); ``sample``, ``eval`` and the loads
``export`` makes refuse it naming the file; the marker never appears.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from twinflow_train import rundir
from twinflow_train.config import load_config
from twinflow_train.distributed import checkpoint as ckpt
from twinflow_train.distributed.safeload import NotDataError, data_problem, load_data, read_dcp_metadata
from twinflow_train.rundir import read_metrics
from twinflow_train.run.trainer import EXIT_DONE, EXIT_FAILED, fit

from ..conftest import run_cli

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_in_state(ckpt_dir: Path, marker: Path) -> None:
    """The trainer state of ``ckpt_dir/state.pt`` carries the payload; meta.json is updated to match."""
    payload = load_data(ckpt_dir / "state.pt")
    payload["state"]["counters"]["note"] = Payload(marker)
    torch.save(payload, ckpt_dir / "state.pt")
    meta = rundir.read_json(ckpt_dir / rundir.META_FILE)
    extra = {k: v for k, v in meta.items() if k not in ("step", "format", "files")}  # a fork's kind, world, ...
    rundir.write_checkpoint_meta(ckpt_dir, step=meta["step"], fmt=meta["format"], extra=extra)
    assert rundir.verify_checkpoint(ckpt_dir) is None  # the checksums cannot tell


def plant_in_weights(path: Path, marker: Path) -> None:
    sd = load_data(path)
    sd["extra"] = Payload(marker)
    torch.save(sd, path)


@pytest.fixture(scope="module")
def crashed(tiny_overrides, tmp_path_factory):
    """A run that died at step 11: latest and last_good at 8, step-000000004, best weights."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    os.environ["TWINFLOW_FAULT_AT_STEP"] = "11"
    try:
        assert fit(load_config(None, tiny_overrides), run, progress=False) == EXIT_FAILED
    finally:
        del os.environ["TWINFLOW_FAULT_AT_STEP"]
    return run


@pytest.fixture
def planted(crashed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    marker = tmp_path / "MARKER"
    plant_in_state(run / "checkpoints" / "latest", marker)
    return run, marker


def test_the_payload_would_run_if_unpickled(tmp_path):
    # the check of the tests below: the payload is real
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_fit_passes_over_a_checkpoint_that_is_not_data_and_runs_none_of_it(tiny_overrides, planted, capfd):
    run, marker = planted
    assert "refused, not plain data" in data_problem(run / "checkpoints" / "latest")
    capfd.readouterr()
    assert fit(load_config(None, tiny_overrides), run, progress=False) == EXIT_DONE
    assert not marker.exists()
    out = capfd.readouterr().out
    assert "checkpoint_fallback at step 8 from checkpoints/last_good" in out and "state.pt" in out
    (event,) = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["checkpoint"] == "checkpoints/last_good"
    assert "state.pt: refused, not plain data" in event["reason"] and "posix.system" in event["reason"]


def test_with_no_data_checkpoint_left_fit_fails_naming_them(tiny_overrides, planted):
    run, marker = planted
    for name in ("last_good", rundir.kept_name(4)):
        plant_in_state(run / "checkpoints" / name, marker)
    with pytest.raises(ckpt.CheckpointError, match="refused, not plain data"):
        ckpt.choose_resume_point(run, restart_on_corrupt=False)
    assert fit(load_config(None, tiny_overrides), run, progress=False) == EXIT_FAILED
    assert not marker.exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_refuse_it_naming_the_file(planted, command, tmp_path):
    run, marker = planted
    args = [command, "--run-dir", str(run), "--no-progress"]
    if command == "sample":
        args += ["--out", str(tmp_path / "out")]
    done = run_cli(args)
    assert done.returncode != 0
    assert f"{run / 'checkpoints' / 'latest' / 'state.pt'}: refused, not plain data" in done.stdout + done.stderr
    assert not marker.exists()


def test_best_weights_and_the_loads_export_makes_refuse_it(tiny_overrides, planted):
    # export (``export.load_run_weights``) reads a run through ckpt.load_checkpoint and ckpt.load_weights
    run, marker = planted
    from twinflow_train.models.registry import build_model
    from twinflow_train.run.setup import build_setup

    cfg = load_config(None, tiny_overrides)
    setup = build_setup(cfg, device=torch.device("cpu"))
    model = build_model(cfg, latent_shape=setup.data.latent_shape, num_classes=setup.num_classes)
    with pytest.raises(NotDataError, match="latest/state.pt: refused, not plain data"):
        ckpt.load_checkpoint(run / "checkpoints" / "latest", model=model, optimizer=None, extra_modules={})
    best = rundir.best_weights(run)
    plant_in_weights(best, marker)
    with pytest.raises(NotDataError, match="best/weights.pt: refused"):
        ckpt.load_weights(best, model)
    assert not marker.exists()


def test_a_dcp_metadata_or_value_that_is_not_data_is_passed_over(tiny_overrides, tmp_path):
    over = tiny_overrides + ["checkpoint.format=dcp"]
    cfg = load_config(None, over)
    run = tmp_path / "run"
    os.environ["TWINFLOW_FAULT_AT_STEP"] = "11"
    try:
        assert fit(cfg, run, progress=False) == EXIT_FAILED
    finally:
        del os.environ["TWINFLOW_FAULT_AT_STEP"]
    marker = tmp_path / "MARKER"
    latest = run / "checkpoints" / "latest"
    md = read_dcp_metadata(latest / "shards" / ".metadata")  # the real records read back
    md.planner_data = Payload(marker)
    with open(latest / "shards" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    rundir.write_checkpoint_meta(latest, step=8, fmt="dcp")
    assert "shards/.metadata: refused, not plain data" in data_problem(latest)
    assert fit(cfg, run, progress=False) == EXIT_DONE
    (event,) = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["checkpoint"] == "checkpoints/last_good" and ".metadata" in event["reason"]
    assert not marker.exists()


def test_a_fork_checkpoint_that_is_not_data_is_never_loaded(tiny_overrides, tmp_path, capfd):
    from twinflow_train.run.fork import ForkRequest

    cfg = load_config(None, tiny_overrides)
    parent, child = tmp_path / "parent", tmp_path / "child"
    assert fit(cfg, parent, progress=False, fork_at=[4]) == EXIT_DONE
    marker = tmp_path / "MARKER"
    plant_in_state(rundir.fork_checkpoint(parent, 4), marker)
    capfd.readouterr()
    assert fit(cfg, child, progress=False, fork=ForkRequest(parent=parent, step=4)) == EXIT_DONE
    assert "fork_fallback at step 0" in capfd.readouterr().out
    assert "state.pt: refused, not plain data" in rundir.read_fork_file(child)["fallback"]
    assert not marker.exists()

"""Checkpoint integrity and full disks, against the real ``fit``.

Every checkpoint's meta.json records the size and sha256 of its files; a resume
takes the newest one that verifies (latest, last_good, then the kept step-<k>),
logs an ``event`` record and a line saying which and why, and fails naming them
all when none does (unless told to start again). A write that fails with ENOSPC
leaves the previous checkpoint and a metrics file without a torn record.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import torch

from twinflow_train.distributed import checkpoint as ckpt
from twinflow_train import rundir
from twinflow_train.config import ConfigError, load_config
from twinflow_train.rundir import iter_metrics, read_metrics, read_status, verify_checkpoint
from twinflow_train.run.trainer import EXIT_DONE, EXIT_FAILED, fit

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def _params(ckpt_dir):
    return torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b):
    pa, pb = _params(a / "checkpoints" / "latest"), _params(b / "checkpoints" / "latest")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)


def _train_steps(run_dir):
    return [r["step"] for r in iter_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def reference(tiny_overrides, tmp_path_factory):
    """An uninterrupted run (12 steps, checkpoints at 4, 8, 12)."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert fit(load_config(None, tiny_overrides), ref, progress=False) == EXIT_DONE
    return ref


def _crashed(cfg, run, monkeypatch, *, at: int = 11):
    """A run that died at step ``at`` (checkpoints at 4 and 8 taken: latest 8, last_good 8, step-000000004)."""
    monkeypatch.setenv("TWINFLOW_FAULT_AT_STEP", str(at))
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    monkeypatch.delenv("TWINFLOW_FAULT_AT_STEP")


def test_checkpoints_record_checksums_and_keep_the_previous_one(reference):
    cks = reference / "checkpoints"
    assert sorted(p.name for p in cks.iterdir()) == ["best", "last_good", "latest", rundir.kept_name(8)]
    for name in ("latest", "last_good", rundir.kept_name(8)):
        assert verify_checkpoint(cks / name) is None
    meta = rundir.read_json(cks / "latest" / "meta.json")
    assert meta["step"] == 12 and set(meta["files"]) == {"state.pt"} and len(meta["files"]["state.pt"]["sha256"]) == 64


def test_truncated_latest_resumes_from_last_good_with_an_event(tiny_overrides, reference, tmp_path, monkeypatch,
                                                              capfd):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    _crashed(cfg, run, monkeypatch)
    _truncate(run / "checkpoints" / "latest" / "state.pt")  # what a full disk or a preempted copy leaves
    capfd.readouterr()
    assert fit(cfg, run, progress=False) == EXIT_DONE
    out = capfd.readouterr().out
    assert "checkpoint_fallback at step 8 from checkpoints/last_good: checkpoints/latest: state.pt has" in out
    (event,) = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["event"] == "checkpoint_fallback" and event["checkpoint"] == "checkpoints/last_good"
    assert event["step"] == 8 and "checkpoints/latest" in event["reason"]
    assert _train_steps(run) == list(range(1, 13))
    _assert_same_weights(reference, run)


def test_a_kept_earlier_checkpoint_is_the_last_fallback(tiny_overrides, reference, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    _crashed(cfg, run, monkeypatch)
    (run / "checkpoints" / "latest" / "meta.json").write_text('{"step": 8, "form')  # torn metadata
    _truncate(run / "checkpoints" / "last_good" / "state.pt", keep=0.99)
    assert fit(cfg, run, progress=False) == EXIT_DONE
    (event,) = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["checkpoint"] == f"checkpoints/{rundir.kept_name(4)}" and event["step"] == 4
    assert "meta.json unreadable" in event["reason"] and "last_good" in event["reason"]
    assert _train_steps(run) == list(range(1, 13))
    _assert_same_weights(reference, run)


def test_no_valid_checkpoint_fails_naming_them_unless_told_to_restart(tiny_overrides, reference, tmp_path,
                                                                      monkeypatch):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    _crashed(cfg, run, monkeypatch)
    cks = run / "checkpoints"
    for name in ("latest", "last_good", rundir.kept_name(4)):
        _truncate(cks / name / "state.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "status.json"}
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    reason = read_status(run)["reason"]
    assert reason.startswith("CheckpointError: ") and "no checkpoint verifies" in reason
    for name in ("checkpoints/latest", "checkpoints/last_good", f"checkpoints/{rundir.kept_name(4)}"):
        assert f"{name}: state.pt has" in reason
    assert rundir.RESTART_FLAG in reason
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "status.json"}
    assert after == before  # nothing loaded, truncated or replaced

    assert fit(cfg, run, progress=False, restart_on_corrupt=True) == EXIT_DONE
    events = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("restart", 0)]
    assert _train_steps(run) == list(range(1, 13))
    _assert_same_weights(reference, run)


def test_the_restart_flag_is_on_the_command_line(tiny_overrides, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _crashed(load_config(None, tiny_overrides), run, monkeypatch, at=6)
    for name in ("latest", "last_good"):
        _truncate(run / "checkpoints" / name / "state.pt")
    args = ["fit", "--no-progress", "--run-dir", str(run), *tiny_overrides]
    refused = run_cli(args)
    assert refused.returncode == EXIT_FAILED and "no checkpoint verifies" in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
    done = run_cli([*args[:1], rundir.RESTART_FLAG, *args[1:]])
    assert done.returncode == EXIT_DONE, done.stdout[-2000:] + done.stderr[-2000:]


def test_dcp_checkpoints_are_verified_too(tiny_overrides, tmp_path, monkeypatch):
    over = tiny_overrides + ["checkpoint.format=dcp"]
    cfg = load_config(None, over)
    ref = tmp_path / "ref"
    assert fit(cfg, ref, progress=False) == EXIT_DONE
    run = tmp_path / "run"
    _crashed(cfg, run, monkeypatch)
    meta = rundir.read_json(run / "checkpoints" / "latest" / "meta.json")
    shards = sorted(k for k in meta["files"] if k.startswith("shards/"))
    assert shards and "state.pt" in meta["files"]
    shard = run / "checkpoints" / "latest" / shards[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits
    shard.write_bytes(bytes(data))
    assert "does not match its sha256" in verify_checkpoint(run / "checkpoints" / "latest")
    assert fit(cfg, run, progress=False) == EXIT_DONE
    (event,) = [r for r in read_metrics(run / "metrics.jsonl").records if r.get("kind") == "event"]
    assert event["checkpoint"] == "checkpoints/last_good" and shards[-1] in event["reason"]
    assert _train_steps(run) == list(range(1, 13))


# --------------------------------------------------------------------------- full disk


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_at_a_checkpoint_keeps_the_previous_one_and_fails_with_the_reason(tiny_overrides, reference,
                                                                                  tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    real = ckpt._save_payload
    calls = []

    def save(payload, path):
        calls.append(path)
        if len(calls) == 2:  # the step-8 checkpoint: half a file, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            _disk_full()
        real(payload, path)

    monkeypatch.setattr(ckpt, "_save_payload", save)
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    st = read_status(run)
    assert st["state"] == "failed" and "No space left on device" in st["reason"]
    cks = run / "checkpoints"
    assert rundir.checkpoint_step(cks / "latest") == 4 and verify_checkpoint(cks / "latest") is None
    assert not (cks / "latest.tmp").exists()  # the partial checkpoint gave its space back
    steps = _train_steps(run)  # the file reads strictly: no torn record
    assert steps == list(range(1, 9))
    monkeypatch.setattr(ckpt, "_save_payload", real)
    assert fit(cfg, run, progress=False) == EXIT_DONE
    assert _train_steps(run) == list(range(1, 13))
    _assert_same_weights(reference, run)


def test_enospc_at_a_metrics_write_leaves_no_torn_record(tiny_overrides, reference, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    real = rundir._write_all
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 7:  # the 7th record (step 6's train record): half of it reaches the file
            os.write(fd, data[: len(data) // 2])
            _disk_full()
        real(fd, data)

    monkeypatch.setattr(rundir, "_write_all", write)
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    st = read_status(run)
    assert st["state"] == "failed" and "No space left on device" in st["reason"]
    assert "metrics record of step 6" in st["reason"]
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert _train_steps(run) == [1, 2, 3, 4, 5]
    assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 4
    monkeypatch.setattr(rundir, "_write_all", real)
    assert fit(cfg, run, progress=False) == EXIT_DONE
    assert _train_steps(run) == list(range(1, 13))
    _assert_same_weights(reference, run)


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_really_full_disk_fails_the_run_and_keeps_its_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    """On a small tmpfs (where this machine allows mounting one): the disk fills while the run trains."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here; the injected ENOSPC tests cover the same paths")
    try:
        cfg = load_config(None, tiny_overrides)
        run = disk / "run"
        _crashed(cfg, run, monkeypatch, at=6)  # checkpoint at 4
        size = (run / "checkpoints" / "latest" / "state.pt").stat().st_size
        free = shutil.disk_usage(disk).free
        # leave room for the metrics of a few steps, not for another checkpoint
        (disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))
        assert fit(cfg, run, progress=False) == EXIT_FAILED
        st = read_status(run)
        assert st["state"] == "failed" and "No space left on device" in st["reason"], st
        assert verify_checkpoint(run / "checkpoints" / "latest") is None
        assert rundir.checkpoint_step(run / "checkpoints" / "latest") == 4
        assert not (run / "checkpoints" / "latest.tmp").exists()
        read_metrics(run / "metrics.jsonl")  # strict: no torn record in the middle
        assert (run / "metrics.jsonl").read_text().endswith("\n")
        (disk / "filler").unlink()
        assert fit(cfg, run, progress=False) == EXIT_DONE
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- the cached teacher


def test_fit_names_a_corrupt_cached_teacher_and_the_teacher_command_rebuilds_it(tiny_overrides, tiny_cache,
                                                                                  tmp_path):
    from twinflow_train.assets.auxiliary import entry_record
    from twinflow_train.assets.teacher import get_teacher, teacher_path

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("*.lock"))
    over = [o for o in tiny_overrides if not o.startswith("aux.cache_dir=")] + [f"aux.cache_dir={cache}"]
    cfg = load_config(None, over)
    weights = teacher_path(cfg)
    _truncate(weights, keep=0.9)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=str(weights.parent)):
        fit(cfg, run, progress=False)
    assert not run.exists()  # refused before anything was written
    r = run_cli(["fit", "--no-progress", "--run-dir", str(run), *over])
    assert r.returncode == 2 and "cached teacher" in r.stderr and str(weights.parent) in r.stderr
    assert "Traceback" not in r.stderr
    get_teacher(cfg, progress=False)  # what `twinflow-train teacher` (and `grid run`) does: set aside, rebuilt
    entry_record(weights)
    assert len(list(weights.parent.glob(f"{weights.name}.corrupt-*"))) == 1

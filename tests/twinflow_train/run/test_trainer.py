"""End-to-end behaviour of ``fit``: resume exactness, telemetry, bad configs, multi-process equivalence."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from twinflow_train.config import ConfigError, load_config
from twinflow_train.rundir import iter_metrics, read_status
from twinflow_train.run.trainer import EXIT_DIVERGED, EXIT_DONE, EXIT_FAILED, fit

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def _final_params(run_dir):
    return torch.load(run_dir / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=True)["model"]


def _train_steps(run_dir):
    return [r["step"] for r in iter_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def test_uninterrupted_run_writes_the_contract(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    assert fit(cfg, run, progress=False) == EXIT_DONE
    assert read_status(run)["state"] == "done"
    recs = list(iter_metrics(run / "metrics.jsonl"))
    teacher = [r for r in recs if r["kind"] == "teacher"]
    assert len(teacher) == 1 and teacher[0]["step"] == 0 and teacher[0]["teacher/fd"] > 0
    assert _train_steps(run) == list(range(1, 13))
    vals = [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [6, 12]
    assert all(k in vals[-1] for k in ("val/loss", "val/fd_nfe1", "val/fd_nfe2", "val/reward_nfe2", "val/accuracy_nfe2"))
    for tag in ("final-nfe1", "final-nfe2", "best-nfe2", "teacher"):
        z = __import__("numpy").load(run / "samples" / f"{tag}.npz")
        assert z["images"].dtype.name == "float32" and z["images"].shape == (40, 1, 8, 8)
        assert z["labels"].tolist() == [c for c in range(10) for _ in range(4)]
        assert (run / "samples" / f"{tag}.png").is_file()
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == cfg


def test_resume_after_crash_is_exact_and_has_no_duplicate_step(tiny_overrides, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides)
    ref = tmp_path / "ref"
    assert fit(cfg, ref, progress=False) == EXIT_DONE
    run = tmp_path / "crash"
    monkeypatch.setenv("TWINFLOW_FAULT_AT_STEP", "7")  # checkpoints at 4 and 8: dies after the one at 4
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    st = read_status(run)
    assert st["state"] == "failed" and "injected fault at step 7" in st["reason"]
    assert max(_train_steps(run)) == 6
    monkeypatch.delenv("TWINFLOW_FAULT_AT_STEP")
    assert fit(cfg, run, progress=False) == EXIT_DONE
    assert _train_steps(run) == list(range(1, 13))
    a, b = _final_params(ref), _final_params(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ref_loss = {r["step"]: r["loss/total"] for r in iter_metrics(ref / "metrics.jsonl") if r["kind"] == "train"}
    run_loss = {r["step"]: r["loss/total"] for r in iter_metrics(run / "metrics.jsonl") if r["kind"] == "train"}
    assert ref_loss == pytest.approx(run_loss, rel=1e-6)


def test_bad_configs_fail_before_anything_is_written(tiny_overrides, tmp_path):
    run = tmp_path / "never"
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        fit(load_config(None, tiny_overrides + [f"teacher.checkpoint={tmp_path / 'missing.pt'}"]), run, progress=False)
    assert not run.exists()
    for bad, needle in ((["data.batch_size=2"], "data.batch_size"), (["optim.lr=-1"], "optim.lr"),
                        (["model.hiden=3"], "unknown key 'hiden'"), (["run.steps=ten"], "run.steps")):
        r = run_cli(["fit", "--run-dir", str(run), *tiny_overrides, *bad])
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not run.exists()


def test_existing_run_with_other_config_is_refused(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["run.steps=4", "run.val_every=0", "run.ckpt_every=0"])
    run = tmp_path / "r"
    assert fit(cfg, run, progress=False) == EXIT_DONE
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="different config"):
        fit(load_config(None, tiny_overrides + ["run.steps=5"]), run, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_nonfinite_loss_stops_as_diverged(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["optim.lr=1e6", "optim.max_grad_norm=1e12", "run.nonfinite=stop",
                                               "run.steps=40", "run.val_every=0"])
    run = tmp_path / "boom"
    code = fit(cfg, run, progress=False)
    st = read_status(run)
    assert code == EXIT_DIVERGED and st["state"] == "diverged" and "non-finite" in st["reason"]
    last = [r for r in iter_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert last["event/nonfinite"] == 1 and f"step {last['step']}" in st["reason"]
    assert st["step"] == last["step"] - 1  # the last step that completed


@pytest.mark.distributed
def test_two_processes_follow_one_process(tiny_overrides, tmp_path):
    over = tiny_overrides + ["run.steps=6", "run.val_every=0", "run.ckpt_every=0", "eval.teacher=false"]
    one = tmp_path / "one"
    r = run_cli(["fit", "--no-progress", "--run-dir", str(one), *over, "data.grad_accum=2"])
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twinflow_train.cli", "fit", "--no-progress", "--run-dir", str(two), *over]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = [r["loss/total"] for r in iter_metrics(one / "metrics.jsonl") if r["kind"] == "train"]
    l2 = [r["loss/total"] for r in iter_metrics(two / "metrics.jsonl") if r["kind"] == "train"]
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-6)
    g1 = [r["grad_norm/total"] for r in iter_metrics(one / "metrics.jsonl") if r["kind"] == "train"]
    g2 = [r["grad_norm/total"] for r in iter_metrics(two / "metrics.jsonl") if r["kind"] == "train"]
    assert g1 == pytest.approx(g2, rel=1e-4)

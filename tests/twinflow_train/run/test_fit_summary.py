"""How ``twinflow-train fit`` ends: a summary of the run, and a finished run is said to be complete, not re-entered."""

from __future__ import annotations

import pytest

from twinflow_train.cli import main as train_main

pytestmark = pytest.mark.slow


def test_fit_ends_with_a_summary_and_a_rerun_says_the_run_was_already_complete(tiny_overrides, tmp_path, capsys,
                                                                                monkeypatch):
    run = tmp_path / "run"
    over = [*tiny_overrides, "run.steps=6", "run.val_every=6", "run.ckpt_every=6"]
    assert train_main(["fit", "--run-dir", str(run), "--no-progress", *over]) == 0
    out = capsys.readouterr().out
    assert f"twinflow-train: done, 6 steps in {run}" in out
    assert "final val loss " in out and "(step 6)" in out
    lines = out.splitlines()
    i = lines.index("  FD at step 6, student beside the teacher (Euler at the same NFE):")
    for line, nfe in zip(lines[i + 1:i + 3], (1, 2)):  # the tiny config evaluates 1 and 2 NFE; both measured
        assert line.startswith(f"    NFE {nfe}: ") and "  teacher " in line and "-" not in line
    assert "teacher FD " in out and f"samples: {run / 'samples'}" in out and f"metrics: {run / 'metrics.jsonl'}" in out

    before = {p.name: p.read_bytes() for p in (run / "status.json", run / "metrics.jsonl")}
    import twinflow_train.run.trainer

    def no_training(*a, **k):
        raise AssertionError("a complete run must not enter the trainer (process group, W&B run, status rewrite)")

    monkeypatch.setattr(twinflow_train.run.trainer, "fit", no_training)
    assert train_main(["fit", "--run-dir", str(run), "--no-progress", *over]) == 0
    out = capsys.readouterr().out
    assert f"twinflow-train: {run} was already complete (6/6 steps); nothing was trained" in out
    assert "final val loss " in out
    assert {p.name: p.read_bytes() for p in (run / "status.json", run / "metrics.jsonl")} == before
    # more steps asked of the same run directory is not "complete": the trainer decides (here: refuses the change)
    with pytest.raises(AssertionError, match="must not enter the trainer"):
        train_main(["fit", "--run-dir", str(run), "--no-progress", *over[:-3], "run.steps=8", "run.val_every=6",
                    "run.ckpt_every=6"])


def test_fit_without_config_says_which_config_it_uses(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert train_main(["fit", "--run-dir", str(tmp_path / "file")]) == 2  # stops at the bad run dir, after the note
    err = capsys.readouterr().err
    assert "twinflow-train fit: no --config: using the built-in defaults of twinflow_train/config.py" in err
    assert "teacher.steps 6000" in err and "configs/digits.yaml" in err
    (tmp_path / "c.yaml").write_text("run: {steps: 3}\n")
    train_main(["fit", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "file")])
    assert "no --config" not in capsys.readouterr().err

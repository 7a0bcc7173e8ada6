"""One damaged run directory never stops a grid (the real trainer, a tiny grid).

- a run whose ``checkpoints/latest/meta.json`` is torn, left ``running`` by a killed
  harness: the grid plans it, it resumes from ``last_good`` (an event says so), the
  other runs go on;
- a bad line in the middle of another run's metrics.jsonl: ``grid status`` and
  ``grid collect`` show the whole grid and name the problem of that run;
- a corrupted cached teacher: ``grid run`` rebuilds it instead of loading it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.collect import collect_grid, run_statuses
from harness.store import read_record, read_status, write_status
from twinflow_train import rundir

from .conftest import TINY_BASE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

BODY = """\
seeds: [0]
overrides: {{run.steps: 12, run.log_every: 1, run.ckpt_every: 4, run.val_every: 6}}
arms:
{arms}"""
ARMS = {"a": "  a: {}\n", "b": "  b: {method.rect_weight: 0.5}\n", "c": "  c: {method.rect_weight: 0.25}\n"}


def _matrix(tmp_path: Path, arms: str) -> Path:
    (tmp_path / "base.yaml").write_text(TINY_BASE)
    path = tmp_path / "faults.yaml"
    path.write_text("name: faults\nbase: base.yaml\n" + BODY.format(arms="".join(ARMS[a] for a in arms)))
    return path


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run / "metrics.jsonl").records if r.get("kind") == "train"]


def test_damaged_runs_are_handled_alone_and_the_rest_of_the_grid_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWINFLOW_LAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    grid = root / "faults"
    a, b, c = (grid / x / "seed-0" for x in "abc")

    # 1. arms a and b; b dies at step 11 (checkpoints at 4 and 8)
    from harness.grid import run_grid
    from harness.launchers import LocalLauncher
    from harness.matrix import load_matrix
    import io

    first = run_grid(load_matrix(_matrix(tmp_path, "ab"), root=root), launcher=LocalLauncher(workers=2),
                     stream=io.StringIO(), tty=False, run_env={"b": {"TWINFLOW_FAULT_AT_STEP": "11"}})
    assert first.outcomes == {"a/seed-0": "done", "b/seed-0": "failed"}

    # 2. damage: b's latest metadata torn and its status left `running` with a dead pid (a killed harness);
    #    a bad line in the middle of a's metrics; the cached teacher corrupted
    (b / "checkpoints" / "latest" / "meta.json").write_text('{"step": 8, "form')
    write_status(b, "running", step=10, pid=2**22 + 4321)
    lines = (a / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[5] = lines[5][: len(lines[5]) // 2] + "\n"
    (a / "metrics.jsonl").write_text("".join(lines))
    (teacher,) = (tmp_path / "cache").glob("teacher-*/weights.pt")
    data = bytearray(teacher.read_bytes())
    data[len(data) // 2] ^= 0xFF
    teacher.write_bytes(bytes(data))

    # 3. status and collect show the whole grid and name a's problem
    matrix = _matrix(tmp_path, "abc")  # arm c joins the matrix
    assert main(["grid", "status", str(matrix), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    offset = sum(len(line) for line in lines[:5])
    assert f"a/seed-0 problem: {a / 'metrics.jsonl'}: the line at byte {offset} is not a JSON object" in out
    assert "interrupted" in out  # b
    assert main(["grid", "collect", str(matrix), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "problem in a/seed-0:" in out and "line 6 is not valid JSON" in out
    df = collect_grid(grid, on_bad_line="skip")
    assert set(df["arm"]) == {"a", "b"} and str(a) in df.attrs["problems"]
    with pytest.raises(ValueError, match="line 6 is not valid JSON"):
        collect_grid(grid)  # the strict default (reports) still refuses a damaged file, naming it
    st = run_statuses(grid).set_index("arm")
    assert "is not a JSON object" in st.loc["a", "problem"] and pd.isna(st.loc["b", "problem"])

    # 4. the grid runs again as a subprocess (the real command line): b resumes from last_good, c runs, a is done
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "harness.cli", "grid", "run", str(matrix), "--root", str(root),
                        "--workers", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    teacher_log = (grid / ".harness" / "teacher.log").read_text()
    assert "does not match its record" in teacher_log and "rebuilding" in teacher_log
    assert len(list(teacher.parent.glob("weights.pt.corrupt-*"))) == 1
    for run in (b, c):
        assert read_status(run)["state"] == "done"
        assert _train_steps(run) == list(range(1, 13))
    attempts = read_record(b).attempts
    assert attempts[-1].outcome == "done" and attempts[-1].start_step == 8  # last_good's step
    events = [rec for rec in rundir.read_metrics(b / "metrics.jsonl").records if rec.get("kind") == "event"]
    assert [(e["event"], e["checkpoint"], e["step"]) for e in events] == [
        ("checkpoint_fallback", "checkpoints/last_good", 8)]
    assert "meta.json unreadable" in events[0]["reason"]
    log = (b / attempts[-1].log).read_text()
    assert "checkpoint_fallback at step 8 from checkpoints/last_good" in log
    assert len(read_record(a).attempts) == 1  # done: not run again despite its damaged metrics
    assert json.loads((a / "status.json").read_text())["state"] == "done"

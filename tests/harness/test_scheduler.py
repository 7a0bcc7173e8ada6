"""The scheduler's own logic with a scripted stand-in process (the real trainer is in test_grid_e2e.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from harness.grid import GridError, plan_grid, run_grid
from harness.identity import wandb_run_id
from harness.launchers import LocalLauncher
from harness.matrix import load_matrix
from harness.store import read_record, read_status, write_record
from twinflow_train import rundir

REPO = Path(__file__).resolve().parents[2]
STANDIN = "tests.harness.scripted_run"


@pytest.fixture
def grid_file(tiny_base, write):
    return write("g.yaml", """\
        name: sched
        base: base.yaml
        seeds: [0, 1]
        arms:
          ok: {}
          bad: {optim.lr: 2.0e-4}
          dead: {optim.lr: 3.0e-4}
        """)


def _trace(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setenv("SCRIPT_SLEEP", "0.1")


def _launcher(workers: int) -> LocalLauncher:
    return LocalLauncher(workers=workers, threads=1, module=STANDIN)


def test_slots_outcomes_and_reasons(grid_file, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the stand-in module is importable from the repository root
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("SCRIPT_TRACE", str(trace))
    grid = load_matrix(grid_file, root=tmp_path / "runs")
    env = {"bad": {"SCRIPT_MODE": "fail"}, "dead": {"SCRIPT_MODE": "sigkill"},
           "ok/seed-1": {"SCRIPT_MODE": "silent_crash"}}
    out = io.StringIO()
    result = run_grid(grid, launcher=_launcher(2), run_env=env, stream=out, tty=False, poll_s=0.02)
    assert result.outcomes == {"ok/seed-0": "done", "ok/seed-1": "failed", "bad/seed-0": "failed",
                               "bad/seed-1": "failed", "dead/seed-0": "failed", "dead/seed-1": "failed"}
    assert result.exit_code == 3
    runs = grid.grid_dir
    assert read_status(runs / "bad" / "seed-0")["reason"] == "RuntimeError: scripted failure"
    dead = read_status(runs / "dead" / "seed-0")
    assert dead["state"] == "failed" and dead["reason"].startswith("killed by SIGKILL")
    crash = read_status(runs / "ok" / "seed-1")
    assert crash["state"] == "failed" and "exit code 1" in crash["reason"] and "ImportError" in crash["reason"]
    # never more than 2 in flight, threads set, a deterministic W&B id per run
    attempts = [a for s in grid.runs for a in read_record(s.run_dir).attempts]
    assert len(attempts) == 6 and all(a.ended is not None for a in attempts)
    events = sorted([(a.started, 1) for a in attempts] + [(a.ended, -1) for a in attempts])
    level, peak = 0, 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 2
    starts = [e for e in _trace(trace) if e["event"] == "start"]
    assert {e["threads"] for e in starts} == {"1"}
    by_run = {e["run"]: e["wandb"] for e in starts}
    spec = next(s for s in grid.runs if s.key == "ok/seed-0")
    assert by_run[str(spec.run_dir.resolve())] == wandb_run_id(spec.identity)
    assert sum(1 for e in _trace(trace) if e["event"] == "teacher") == 1  # shared assets prepared once
    assert "dead/seed-0 failed" in out.getvalue()


def test_rerun_skips_done_and_retries_failed_up_to_the_count(grid_file, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("SCRIPT_TRACE", str(trace))
    grid = load_matrix(grid_file, root=tmp_path / "runs")
    env = {"bad": {"SCRIPT_MODE": "fail"}, "dead": {"SCRIPT_MODE": "contradict"}}
    r1 = run_grid(grid, launcher=_launcher(2), run_env=env, stream=io.StringIO(), tty=False, poll_s=0.02,
                  retries=1)
    # each failing run is tried twice (1 retry) in the first invocation
    bad = read_record(grid.grid_dir / "bad" / "seed-0")
    assert [a.outcome for a in bad.attempts] == ["failed", "failed"]
    contradict = read_status(grid.grid_dir / "dead" / "seed-0")
    # status "done" with exit code 1: the harness believes neither and records a failure with the exit code
    assert contradict["state"] == "failed" and contradict["reason"].startswith("exit code 1")
    assert r1.launched.count("bad/seed-0") == 2
    n_starts = len([e for e in _trace(trace) if e["event"] == "start"])
    # the same retry budget again: nothing is left to do
    r2 = run_grid(grid, launcher=_launcher(2), run_env=env, stream=io.StringIO(), tty=False, poll_s=0.02,
                  retries=1)
    assert r2.launched == [] and len([e for e in _trace(trace) if e["event"] == "start"]) == n_starts
    assert r2.outcomes["ok/seed-0"] == "done" and r2.outcomes["bad/seed-0"] == "failed"
    # a larger budget retries the failed runs once more, never the done ones
    r3 = run_grid(grid, launcher=_launcher(2), run_env={}, stream=io.StringIO(), tty=False, poll_s=0.02,
                  retries=2)
    assert sorted(r3.launched) == ["bad/seed-0", "bad/seed-1", "dead/seed-0", "dead/seed-1"]
    assert all(v == "done" for v in r3.outcomes.values())


def test_changed_run_is_refused_or_superseded(grid_file, tmp_path, monkeypatch, write):
    monkeypatch.chdir(REPO)
    grid = load_matrix(grid_file, root=tmp_path / "runs")
    run_grid(grid, launcher=_launcher(2), stream=io.StringIO(), tty=False, poll_s=0.02)
    write("g.yaml", grid_file.read_text().replace("bad: {optim.lr: 2.0e-4}", "bad: {optim.lr: 5.0e-4}"))
    changed = load_matrix(grid_file, root=tmp_path / "runs")
    plans = {p.spec.key: p for p in plan_grid(changed)}
    assert plans["ok/seed-0"].action == "skip" and plans["bad/seed-0"].action == "changed"
    assert "optim.lr: 0.0002 -> 0.0005" in plans["bad/seed-0"].note
    before = (grid.grid_dir / "bad" / "seed-0" / "harness.json").read_text()
    with pytest.raises(GridError, match=r"bad/seed-0 has a different identity.*optim.lr"):
        run_grid(changed, launcher=_launcher(2), stream=io.StringIO(), tty=False)
    assert (grid.grid_dir / "bad" / "seed-0" / "harness.json").read_text() == before  # untouched
    # the trainer's code changing is a change of identity too
    other_code = load_matrix(grid_file, root=tmp_path / "runs", code_version="0" * 16)
    assert "trainer code changed" in {p.spec.key: p for p in plan_grid(other_code)}["ok/seed-0"].note
    result = run_grid(changed, launcher=_launcher(2), stream=io.StringIO(), tty=False, poll_s=0.02,
                      on_changed="supersede")
    assert sorted(result.launched) == ["bad/seed-0", "bad/seed-1"]
    old = read_record(grid.grid_dir / ".superseded" / "bad" /
                      f"seed-0-{next(s.identity for s in grid.runs if s.key == 'bad/seed-0')}")
    assert old is not None and old.overrides == {"optim.lr": 2.0e-4}
    assert read_record(grid.grid_dir / "bad" / "seed-0").overrides == {"optim.lr": 5.0e-4}


def test_interrupted_attempt_is_closed_and_resumed(grid_file, tmp_path, monkeypatch):
    """A run left 'running' by a killed harness (no live process) is started again."""
    monkeypatch.chdir(REPO)
    grid = load_matrix(grid_file, root=tmp_path / "runs")
    run_grid(grid, launcher=_launcher(2), stream=io.StringIO(), tty=False, poll_s=0.02)
    d = grid.grid_dir / "ok" / "seed-0"
    record = read_record(d)
    record.attempts[-1].ended = None
    record.attempts[-1].outcome = None
    write_record(d, record)
    rundir.write_status(d, "running", step=3, pid=2**22 + 7)  # a trainer that died without a word
    assert {p.spec.key: p.action for p in plan_grid(grid)}["ok/seed-0"] == "new"  # no checkpoint to resume from
    result = run_grid(grid, launcher=_launcher(2), stream=io.StringIO(), tty=False, poll_s=0.02)
    assert result.launched == ["ok/seed-0"]
    attempts = read_record(d).attempts
    assert [a.outcome for a in attempts] == ["interrupted", "done"]


def test_unreadable_run_files_are_that_run_s_problem_not_a_traceback(grid_file, tmp_path, monkeypatch, capsys):
    """A torn status.json: that run alone resumes. A torn harness.json: refused like a run of unknown origin,
    named, with the way out (nothing launched). A torn checkpoint meta.json: planned from the next checkpoint."""
    from harness.cli import main
    from twinflow_train import rundir

    monkeypatch.chdir(REPO)
    grid = load_matrix(grid_file, root=tmp_path / "runs")
    run_grid(grid, launcher=_launcher(2), stream=io.StringIO(), tty=False, poll_s=0.02)
    ok, bad = grid.grid_dir / "ok" / "seed-0", grid.grid_dir / "bad" / "seed-1"
    (ok / "status.json").write_text('{"state": "do')
    for name, step in (("latest", 12), ("last_good", 8)):
        ck = ok / "checkpoints" / name
        ck.mkdir(parents=True)
        (ck / "state.pt").write_bytes(b"x")
        rundir.write_checkpoint_meta(ck, step=step, fmt="full")
    (ok / "checkpoints" / "latest" / "meta.json").write_text('{"step": 1')
    plans = {p.spec.key: p for p in plan_grid(grid)}
    assert plans["ok/seed-0"].action == "resume" and "status.json: not valid JSON" in plans["ok/seed-0"].note
    assert plans["ok/seed-0"].note.endswith("resumes from step 8")
    assert {p.action for k, p in plans.items() if k != "ok/seed-0"} == {"skip"}

    (bad / "harness.json").write_text('{"identity": ')
    assert main(["grid", "status", str(grid_file), "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "ok/seed-0 problem:" in out and "bad/seed-1 problem:" in out and "harness.json: not valid JSON" in out
    assert main(["grid", "run", str(grid_file), "--root", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "run bad/seed-1 has a different identity: its harness.json does not load" in err
    assert "--supersede-changed" in err and "Traceback" not in err

"""The grad-norm divergence rule (``run.diverge_grad_norm`` / ``run.diverge_steps``): the rule itself, and runs
forced to explode (``TWINFLOW_FAULT_GRAD_SCALE``) that stop as ``diverged`` at the step it names, in the gated
and the per-step host paths, with the records up to the stop; a healthy run is not stopped."""

import math

import pytest

from twinflow_train.config import ConfigError, load_config
from twinflow_train.rundir import iter_metrics, read_status
from twinflow_train.run.divergence import GradNormRule
from twinflow_train.run.trainer import EXIT_DIVERGED, EXIT_DONE, EXIT_FAILED, fit

_TIMES = ("time/step_s", "time/wall_s", "time/train_s")
# the host path: the spike policy is on (it reads every norm) but can never fire
HOST = ["schedule.spike.enabled=true", "schedule.spike.k=1e9", "schedule.spike.window=5"]


def test_rule_counts_consecutive_finite_steps_above_the_bound():
    rule = GradNormRule(bound=1000.0, steps=3)
    seq = [(1, 2.0), (2, 5e3), (3, 7e3), (4, 900.0), (5, 1e4), (6, 1e5)]
    assert [rule.observe(s, n) for s, n in seq] == [None] * 6  # step 4 broke the first run of two
    assert rule.observe(7, 1e7) == "pre-clip grad norm above 1000 for 3 consecutive steps (steps 5-7; last 1e+07)"
    assert rule.observe(8, 1000.0) is None and rule.in_a_row == 0  # at the bound is not above it
    with pytest.raises(ValueError, match="non-finite rule's"):
        rule.observe(9, math.nan)
    assert GradNormRule(bound=None, steps=1).observe(1, 1e30) is None  # off
    assert "steps 1-4, non-finite steps between them not counted" in GradNormRule(
        bound=1.0, steps=3, in_a_row=2, since=1).observe(4, 2.0)
    with pytest.raises(ConfigError, match="diverge_steps must be >= 1"):
        load_config(None, ["run.diverge_steps=0"])
    with pytest.raises(ConfigError, match="diverge_grad_norm must be > 0 or null"):
        load_config(None, ["run.diverge_grad_norm=0"])
    assert load_config(None, ["run.diverge_grad_norm=null"]).run.diverge_grad_norm is None


def _train(run_dir):
    return [r for r in iter_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_exploding_run_stops_as_diverged_at_the_named_step(tiny_overrides, tmp_path, monkeypatch):
    """Gradients x1e6 from step 5 (the clipped updates stay finite), 3 steps above 1000 end it at step 7, not
    later: in the gated path (no host read between log steps; found at the step-10 replay) and the host path alike,
    with the same status, the same records (up to and including step 7) and the same reason."""
    over = tiny_overrides + ["run.steps=14", "run.log_every=5", "run.val_every=0", "run.ckpt_every=0",
                             "eval.teacher=false", "run.diverge_steps=3"]
    monkeypatch.setenv("TWINFLOW_FAULT_GRAD_SCALE", "5:1e6")
    seen = {}
    for name, extra in (("gated", []), ("host", HOST)):
        run = tmp_path / name
        assert fit(load_config(None, over + extra), run, progress=False) == EXIT_DIVERGED
        st = read_status(run)
        rows = [{k: v for k, v in r.items() if k not in _TIMES} for r in _train(run)]
        seen[name] = (st["state"], st["step"], st["reason"], rows)
    assert seen["gated"] == seen["host"]
    state, step, reason, rows = seen["gated"]
    assert (state, step) == ("diverged", 7)
    assert reason.startswith("pre-clip grad norm above 1000 for 3 consecutive steps (steps 5-7; last ")
    assert [r["step"] for r in rows] == [5, 7]  # the log step before the stop, then the step that ended the run
    assert rows[0]["grad_norm/total"] > 1000 and rows[0]["grad_norm/max"] == rows[0]["grad_norm/total"]
    last = rows[-1]
    assert last["event/diverged"] == 1 and last["grad_norm/total"] > 1000 and last["grad_norm/max"] > 1000
    assert last["count/nonfinite"] == 0 and all(math.isfinite(v) for k, v in last.items() if k != "kind")


@pytest.mark.slow
def test_resumed_run_keeps_its_count_and_a_healthy_run_is_not_stopped(tiny_overrides, tmp_path, monkeypatch):
    over = tiny_overrides + ["run.steps=12", "run.val_every=0", "run.ckpt_every=6", "eval.teacher=false",
                             "run.diverge_steps=4"]
    healthy = tmp_path / "healthy"
    assert fit(load_config(None, over), healthy, progress=False) == EXIT_DONE
    assert read_status(healthy)["state"] == "done"
    assert max(r["grad_norm/max"] for r in _train(healthy)) < 1000  # the default bound is far above a healthy run
    # steps 5 and 6 are above the bound and checkpointed with the count; the crash at 7 resumes from step 6
    run = tmp_path / "boom"
    monkeypatch.setenv("TWINFLOW_FAULT_GRAD_SCALE", "5:1e6")
    monkeypatch.setenv("TWINFLOW_FAULT_AT_STEP", "7")
    assert fit(load_config(None, over), run, progress=False) == EXIT_FAILED
    monkeypatch.delenv("TWINFLOW_FAULT_AT_STEP")
    assert fit(load_config(None, over), run, progress=False) == EXIT_DIVERGED
    st = read_status(run)
    assert st["step"] == 8 and "4 consecutive steps (steps 5-8;" in st["reason"]
    assert [r["step"] for r in _train(run)] == list(range(1, 9))

"""The teacher's step-0 metrics: computed once per key in the asset cache, read back bit-identical by every run."""

import json
import os
import subprocess
import sys

import pytest

from twinflow_train.config import load_config
from twinflow_train.distributed.parallel import init_distributed, shutdown
from twinflow_train.evaluation.evaluate import Evaluator
from twinflow_train.evaluation.teacher_cache import METRICS_FILE
from twinflow_train.rundir import iter_metrics
from twinflow_train.run import trainer

pytestmark = pytest.mark.slow


def _teacher_record(run_dir):
    recs = [r for r in iter_metrics(run_dir / "metrics.jsonl") if r["kind"] == "teacher"]
    assert len(recs) == 1
    return recs[0]


def _entries(cache):
    return sorted(cache.glob(f"teachermetrics-*/{METRICS_FILE}"))


def test_teacher_metrics_are_computed_once_and_read_back_bit_identical(tiny_overrides, tiny_cache, tmp_path,
                                                                       monkeypatch):
    # an evaluation seed no other test uses: the first run computes the entry
    over = tiny_overrides + ["run.steps=2", "run.val_every=0", "run.ckpt_every=0", "eval.seed=4321"]
    before = set(_entries(tiny_cache))
    assert trainer.fit(load_config(None, over), tmp_path / "a", progress=False) == trainer.EXIT_DONE
    new = set(_entries(tiny_cache)) - before
    assert len(new) == 1
    (entry,) = new
    first = _teacher_record(tmp_path / "a")
    assert json.loads(entry.read_text()) == {k: v for k, v in first.items() if k not in ("step", "kind")}

    # another seed and another E2 initialisation read the entry: no teacher forward runs at all
    calls = []
    real = Evaluator.teacher_metrics

    def counted(self, teacher):
        calls.append(1)
        return real(self, teacher)

    monkeypatch.setattr(Evaluator, "teacher_metrics", counted)
    other = over + ["run.seed=5", "model.tt_init=normal"]
    assert trainer.fit(load_config(None, other), tmp_path / "b", progress=False) == trainer.EXIT_DONE
    assert calls == [] and set(_entries(tiny_cache)) - before == {entry}
    assert _teacher_record(tmp_path / "b") == first

    # bit-identical to computing them in that run (the values, and their JSON text as metrics.jsonl holds it)
    cfg = load_config(None, other)
    d = init_distributed(cfg.run, cfg.parallel)
    try:
        run = trainer.build_run(cfg, d, trainer.preflight_teacher(cfg))
        computed = real(run.evaluator, run.teacher)
    finally:
        shutdown()
    cached = {k: v for k, v in first.items() if k not in ("step", "kind")}
    assert computed == cached and json.dumps(computed, sort_keys=True) == json.dumps(cached, sort_keys=True)

    # a setting the numbers depend on makes a new entry; a corrupt entry is set aside and computed again
    assert trainer.fit(load_config(None, over + ["teacher.sample_steps=7"]), tmp_path / "c",
                       progress=False) == trainer.EXIT_DONE
    assert len(set(_entries(tiny_cache)) - before) == 2 and len(calls) == 1
    entry.write_text(entry.read_text().replace('"teacher/fd": ', '"teacher/fd": 1'))
    assert trainer.fit(load_config(None, over), tmp_path / "d", progress=False) == trainer.EXIT_DONE
    assert len(calls) == 2 and _teacher_record(tmp_path / "d") == first
    assert list(entry.parent.glob(f"{METRICS_FILE}.corrupt-*"))


@pytest.mark.distributed
def test_two_processes_share_the_cached_teacher_metrics(tiny_overrides, tiny_cache, tmp_path):
    over = tiny_overrides + ["run.steps=2", "run.val_every=0", "run.ckpt_every=0", "eval.seed=4322"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    before = set(_entries(tiny_cache))
    records = []
    for name in ("a", "b"):  # the first computes (both ranks, rank 0 stores), the second reads
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "twinflow_train.cli", "fit", "--no-progress", "--run-dir", str(tmp_path / name), *over]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        records.append(_teacher_record(tmp_path / name))
        assert len(set(_entries(tiny_cache)) - before) == 1
    assert records[0] == records[1] and records[0]["teacher/fd"] > 0

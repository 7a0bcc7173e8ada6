"""The trainer's RL clip: in place on one-micro-batch steps without telemetry, split on log steps."""

from __future__ import annotations

import pytest

from twinflow_train.config import load_config
from twinflow_train.run import grads
from twinflow_train.run.trainer import EXIT_DONE, fit
from twinflow_train.rundir import iter_metrics


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_param_clip_steps_split_only_where_both_terms_are_read(tiny_overrides, tmp_path, monkeypatch, accum):
    starts: list[tuple[bool, bool]] = []
    real = grads.TermGradients.start

    def start(self, *, split, clip_in_place=False):
        starts.append((split, clip_in_place))
        return real(self, split=split, clip_in_place=clip_in_place)

    monkeypatch.setattr(grads.TermGradients, "start", start)
    over = tiny_overrides + ["run.steps=4", "run.log_every=2", "run.val_every=0", "run.ckpt_every=0",
                             "eval.teacher=false", "rl.enabled=true", "rl.reward=digits", "rl.warmup=0",
                             "rl.clip=param", "rl.clip_norm=1e-3", f"data.grad_accum={accum}", "rl.grad_stash=host"]
    assert fit(load_config(None, over), tmp_path / "run", progress=False) == EXIT_DONE
    if accum == 1:  # steps 1 and 3 clip in place; the log steps 2 and 4 split for the telemetry
        assert starts == [(False, True), (True, False), (False, True), (True, False)]
    else:  # accumulating micro-batches: every step splits
        assert starts == [(True, False)] * 4
    train = [r for r in iter_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(0 < r["rl/clip_coef"] < 1 and "grad_cos/twinflow_rl" in r for r in train)

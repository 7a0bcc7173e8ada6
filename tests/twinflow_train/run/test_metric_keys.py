"""``rundir.metric_keys(cfg)`` is what a run of ``cfg`` writes: a claim may name exactly these keys.

One short run per feature that changes the record (two steps, each logged, one validation, the teacher line);
the keys written to metrics.jsonl must be the listed ones, less those only a run that ends diverged writes.
"""

from __future__ import annotations

import pytest

from twinflow_train.config import load_config
from twinflow_train.run.trainer import EXIT_DONE, fit
from twinflow_train.rundir import iter_metrics, metric_keys, metrics_file

SHORT = ["run.steps=2", "run.log_every=1", "run.val_every=2", "run.ckpt_every=0", "eval.n_samples=20"]
RL = ["rl.enabled=true", "rl.reward=digits", "rl.warmup=0"]  # the RL weight is non-zero from step 1

MODES = {
    "rl_off": [],
    "rl_clip_none": RL,
    "rl_clip_param": RL + ["rl.clip=param", "rl.clip_norm=1e-3"],
    "rl_clip_output": RL + ["rl.clip=output"],
    # accumulated micro-batches with the param clip split every step; the RL gradient waits in host memory
    "rl_grad_stash_host": RL + ["rl.clip=param", "rl.clip_norm=1e-3", "data.grad_accum=2", "rl.grad_stash=host"],
    "renoise": ["renoise.schedule=blog_linear", "renoise.steps=2"],
}

ONLY_WHEN_DIVERGED = {"event/diverged"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_written_keys_are_the_listed_keys(tiny_overrides, tmp_path, mode):
    cfg = load_config(None, tiny_overrides + SHORT + MODES[mode])
    assert fit(cfg, tmp_path / "run", progress=False) == EXIT_DONE
    records = list(iter_metrics(metrics_file(tmp_path / "run")))
    assert {r["kind"] for r in records} == {"teacher", "train", "val"}
    written = set().union(*records) - {"step", "kind"}
    listed = metric_keys(cfg)
    assert sorted(written - listed) == [], "written but not in metric_keys"
    assert sorted(listed - ONLY_WHEN_DIVERGED - written) == [], "in metric_keys but never written"

"""ablations/blog-qwen.yaml resolves, arm by arm, to valid trainer configs with the report's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

MATRIX = Path(__file__).resolve().parents[2] / "ablations" / "blog-qwen.yaml"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from harness.matrix import load_matrix  # the harness's own resolution (twinflow_train.config.load_config)
    return load_matrix(MATRIX, root=tmp_path_factory.mktemp("runs"), code_version="test")


def _configs(grid):
    return {run.arm: run.config for run in grid.runs}


def test_every_arm_resolves_and_the_ladder_adds_one_change_at_a_time(grid):
    cfgs = _configs(grid)
    assert list(cfgs) == ["vanilla", "renoise", "rl_hard", "rl_sigmoid", "rl_clip", "spike_decay"]
    v, r, h, s, c, d = (cfgs[k] for k in cfgs)
    assert v.renoise.schedule == "off" and not v.rl.enabled
    assert r.renoise.schedule == "blog_linear" and (r.renoise.start, r.renoise.end, r.renoise.steps) == (4.0, 1.0, 3000)
    assert r.renoise.applies_to == ["main"]  # explicit: the report's renoise drew the main time of every row
    assert h.rl.enabled and h.rl.reward == "hpsv2" and h.rl.weight == 0.05
    assert h.rl.schedule == "hard" and h.rl.warmup == 2000
    assert s.rl.schedule == "sigmoid" and s.rl.center == s.rl.warmup  # same onset as the hard switch
    assert c.rl.clip == "param" and s.rl.clip == "none"
    assert d.schedule.spike.enabled and not c.schedule.spike.enabled


def test_the_reports_settings_reach_every_arm(grid):
    for cfg in _configs(grid).values():
        assert cfg.model.family == "qwen_image" and cfg.codec.kind == "qwen_vae"
        assert cfg.data.dataset == "latent_shards" and cfg.data.shards.endswith("qwen-1328")
        assert cfg.optim.lr == 1e-4 and cfg.optim.max_grad_norm == 10.0
        assert 8 in cfg.eval.nfe
        assert cfg.parallel.mixed_precision == "bf16" and cfg.checkpoint.format == "dcp"
        assert cfg.sampler.tt_mode in ("few", "mul")  # exportable to a stock diffusers pipeline


def test_the_bucket_set_named_by_the_matrix_exists():
    from twinflow_train.data.encode import parse_buckets

    buckets = parse_buckets("qwen-1328")
    assert buckets[0] == (1328, 1328) and len(buckets) == 7

"""The digits gold score, its learned proxy, the ``proxy`` reward, and the gold/proxy evaluation keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twinflow_train.assets.auxiliary import (DigitsProxyReward, centring, entry_record, get_proxy_net, gold_score,
                                      stroke_weight)
from twinflow_train.config import ConfigError, load_config
from twinflow_train.data.digits import load_digits_split
from twinflow_train.rundir import iter_metrics
from twinflow_train.run.trainer import EXIT_DONE, fit


def _split():
    return load_digits_split(val_fraction=0.1, split_seed=0)


# --------------------------------------------------------------------------- the gold score


def test_attributes_on_hand_made_images():
    blank = -torch.ones(1, 1, 8, 8)
    dot = blank.clone()
    dot[0, 0, 1, 6] = 1.0  # one inked pixel, top right
    full = torch.ones(1, 1, 8, 8)
    assert float(stroke_weight(blank)) == 0.0 and float(stroke_weight(full)) == 1.0
    assert abs(float(stroke_weight(dot)) - 1 / 64) < 1e-7
    assert abs(float(centring(dot)) + (2.5 ** 2 + 2.5 ** 2) ** 0.5) < 1e-5  # (6 - 3.5, 1 - 3.5) from the centre
    assert abs(float(centring(full))) < 1e-5
    # out-of-range pixels count as the valid image a viewer sees (clamped): pushing past 1 earns nothing
    assert torch.equal(gold_score(full * 3.0, {"labels": torch.tensor([1])}),
                       gold_score(full, {"labels": torch.tensor([1])}))


def test_gold_score_has_a_wide_spread_on_real_digits():
    s = _split()
    g = gold_score(s.train_images, {"labels": s.train_labels})
    assert g.shape == (s.train_images.shape[0],) and torch.isfinite(g).all()
    p10, p90 = np.percentile(g.numpy(), [10, 90])
    assert p90 - p10 > 2.0 * float(g.std()) * 0.9  # not concentrated: the top decile is far from the bottom


# --------------------------------------------------------------------------- the proxy


@pytest.mark.slow
def test_proxy_tracks_the_gold_score_on_held_out_digits_and_is_cached(tmp_path):
    cfg = load_config(None, [f"aux.cache_dir={tmp_path}", "aux.proxy_steps=600"])
    net = get_proxy_net(cfg)
    s = _split()
    reward = DigitsProxyReward(net)
    with torch.no_grad():
        p = reward(s.val_images, {"labels": s.val_labels})
    g = gold_score(s.val_images, {"labels": s.val_labels})
    corr = float(torch.corrcoef(torch.stack([p.double(), g.double()]))[0, 1])
    assert corr > 0.8, corr  # noisy labels, held-out images: close to, not equal to, the gold
    # differentiable in the images, frozen weights
    x = s.val_images[:4].clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(reward(x, {"labels": s.val_labels[:4]}).sum(), x)
    assert float(gx.abs().max()) > 0 and not any(q.requires_grad for q in net.parameters())
    # cached: one entry whose record says how well it fits; a second call loads the same weights
    (entry,) = list(tmp_path.glob("proxy-*"))
    info = entry_record(entry / "weights.pt")["info"]
    assert info["val_corr"] == pytest.approx(corr, abs=1e-6)
    again = get_proxy_net(cfg)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="prompt classes"):
        reward(s.val_images[:2], {"labels": torch.tensor([0, 10])})


def test_proxy_reward_is_selectable_and_digits_only():
    assert load_config(None, ["rl.enabled=true", "rl.reward=proxy"]).rl.reward == "proxy"
    with pytest.raises(ConfigError, match="rl.reward 'proxy'.*digits"):
        load_config(None, ["rl.enabled=true", "rl.reward=proxy", "data.dataset=latent_shards",
                           "data.shards=/nonexistent"])


# --------------------------------------------------------------------------- evaluation keys, RL on the proxy


@pytest.mark.slow
def test_runs_report_gold_and_proxy_for_the_student_and_the_teacher(tiny_overrides, tmp_path):
    over = tiny_overrides + ["run.steps=6", "run.val_every=3", "run.ckpt_every=0", "rl.enabled=true",
                             "rl.reward=proxy", "rl.warmup=2", "rl.weight=1.0"]
    run = tmp_path / "run"
    assert fit(load_config(None, over), run, progress=False) == EXIT_DONE
    recs = list(iter_metrics(run / "metrics.jsonl"))
    (teacher,) = [r for r in recs if r["kind"] == "teacher"]
    assert np.isfinite(teacher["teacher/gold"]) and np.isfinite(teacher["teacher/proxy"])
    vals = [r for r in recs if r["kind"] == "val"]
    for nfe in (1, 2):
        assert all(np.isfinite(r[f"val/gold_nfe{nfe}"]) and np.isfinite(r[f"val/proxy_nfe{nfe}"]) for r in vals)
    trains = [r for r in recs if r["kind"] == "train" and r["step"] >= 2]
    assert trains and all(np.isfinite(r["rl/reward"]) and r["rl/weight"] == 1.0 for r in trains)
    assert all(r["grad_norm/rl"] > 0 for r in trains)  # the proxy's gradient reached the student

"""Reward factory, start-up checks and the differentiable CLIP preprocessing (no open_clip needed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from twinflow_train.config import ConfigError, load_config
from twinflow_train.rl.rewards import MissingExtraError, build_reward, check_reward_config, clip_preprocess

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def hps_cfg(tmp_path, *over):
    return load_config(None, ["rl.enabled=true", "rl.reward=hpsv2", *over])


def test_rl_without_reward_is_rejected_at_load():
    with pytest.raises(ConfigError, match=r"rl\.reward"):
        load_config(None, ["rl.enabled=true", "rl.reward=none"])


def test_hpsv2_checkpoint_unset_or_missing_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint must be set"):
        check_reward_config(hps_cfg(tmp_path))
    missing = tmp_path / "nope" / "HPS_v2.1_compressed.pt"
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint: no file at .*HPS_v2\.1_compressed\.pt"):
        check_reward_config(hps_cfg(tmp_path, f"rl.hpsv2_checkpoint={missing}"))
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint"):
        build_reward(hps_cfg(tmp_path, f"rl.hpsv2_checkpoint={missing}"))


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed here; the missing-extra error cannot occur")
def test_missing_extra_is_a_startup_error_naming_it(tmp_path):
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(MissingExtraError, match=r"twinflow-lab\[hpsv2\]") as info:
        check_reward_config(hps_cfg(tmp_path, f"rl.hpsv2_checkpoint={ckpt}"))
    assert isinstance(info.value, ImportError) and isinstance(info.value, ConfigError)
    assert "rl.reward 'hpsv2'" in str(info.value)


def test_digits_reward_needs_digits_data():
    with pytest.raises(ConfigError, match=r"rl\.reward 'digits'.*data\.dataset"):
        load_config(None, ["rl.enabled=true", "rl.reward=digits", "data.dataset=latent_shards", "data.shards=/x",
                           "codec.kind=identity"])
    check_reward_config(load_config(None, ["rl.enabled=true", "rl.reward=digits"]))  # the default is fine


def test_rl_needs_e2e_rows():
    """Refused when the config is read, so a matrix arm like this never launches (tests/harness/test_matrix.py)."""
    with pytest.raises(ConfigError, match=r"method\.group_ratios\[0\]"):
        load_config(None, ["rl.enabled=true", "rl.reward=digits", "method.group_ratios=[0,1,1,1]"])
    # every term on every row: the e2e rows are all rows
    assert load_config(None, ["rl.enabled=true", "rl.reward=digits", "method.group_ratios=[0,1,1,1]",
                              "method.layout=tutorial"]).rl.enabled
    assert not load_config(None, ["method.group_ratios=[0,1,1,1]"]).rl.enabled  # no RL: no e2e rows needed


def test_build_reward_none_is_an_error():
    with pytest.raises(ConfigError, match=r"rl\.reward is 'none'"):
        build_reward(load_config(None, []))


@pytest.mark.slow
def test_digits_reward_is_differentiable_and_prefers_the_prompted_class(tmp_path):
    from twinflow_train.data.digits import load_digits_split

    cfg = load_config(None, ["rl.enabled=true", "rl.reward=digits", "aux.reward_steps=30",
                             f"aux.cache_dir={tmp_path}"])
    reward = build_reward(cfg)
    assert not any(p.requires_grad for p in reward.parameters())
    split = load_digits_split(val_fraction=0.1, split_seed=0)
    images = split.val_images[:64].clone().requires_grad_(True)
    labels = split.val_labels[:64]
    right = reward(images, {"labels": labels})
    wrong = reward(images.detach(), {"labels": (labels + 1) % 10})
    assert right.shape == (64,) and torch.isfinite(right).all()
    assert float(right.detach().mean()) > float(wrong.mean()) + 1.0  # log-probabilities: right class far likelier
    right.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# --------------------------------------------------------------------------- preprocessing


def test_clip_preprocess_constant_image_and_shapes():
    grey = torch.zeros(2, 1, 8, 8)  # mid-grey: 0.5 in [0, 1]
    out = clip_preprocess(grey, size=(32, 32), mean=MEAN, std=STD)
    assert out.shape == (2, 3, 32, 32)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.full((2, 32, 32), (0.5 - MEAN[c]) / STD[c]), atol=1e-5)


def test_clip_preprocess_shortest_side_and_centre_crop():
    x = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 8, 16).contiguous()
    out = clip_preprocess(x, size=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3)
    assert out.shape == (1, 3, 8, 8)
    # the crop keeps the middle of the horizontal ramp
    assert 0.2 < float(out[0, 0, 0, 0]) < 0.3 and 0.7 < float(out[0, 0, 0, -1]) < 0.8
    squash = clip_preprocess(x, size=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3, resize_mode="squash")
    assert float(squash[0, 0, 0, 0]) < 0.1 and float(squash[0, 0, 0, -1]) > 0.9
    with pytest.raises(ValueError, match="resize_mode"):
        clip_preprocess(x, size=(8, 8), mean=MEAN, std=STD, resize_mode="longest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected"):
        clip_preprocess(torch.zeros(1, 2, 8, 8), size=(8, 8), mean=MEAN, std=STD)


def test_clip_preprocess_gradient_flows_inside_range_only():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.5  # out of range: clipped, no gradient
    x.requires_grad_(True)
    clip_preprocess(x, size=(8, 8), mean=MEAN, std=STD).sum().backward()
    assert x.grad[0, 0, 0, 0] == 0
    assert (x.grad[0, 0, 1:, 1:] != 0).all()

"""The real HPSv2 scorer path on a tiny random-weight open_clip model (needs the ``hpsv2`` extra).

Run with ``.ci/hpsv2-tests`` (creates the environment with torch 2.14.1 + torchvision 0.29.1
+ open-clip-torch). In an environment without open_clip every test here is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip", reason="needs the hpsv2 extra (open_clip + torchvision); run .ci/hpsv2-tests")

from twinflow_train.config import ConfigError, load_config  # noqa: E402
from twinflow_train.rl.rewards import (HPS_TOKENS_KEY, HPSv2Reward, build_reward, check_reward_config,  # noqa: E402
                                    clip_preprocess, hpsv2_tokenize, load_hpsv2)
from twinflow_train.rl.guidance import RewardGuidance  # noqa: E402

pytestmark = pytest.mark.hpsv2

ARCH = "HPS-tiny-test"
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of a cat", "a watercolor of a lighthouse at dusk", "a red cube"]


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("clip_cfg")
    (d / f"{ARCH}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / f"{ARCH}.json")
    assert ARCH in open_clip.list_models()
    return ARCH


@pytest.fixture(scope="module")
def checkpoint(tiny_arch, tmp_path_factory):
    """A fake HPS checkpoint: a random-weight tiny open_clip model, saved like HPS's {'state_dict': ...}."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "hps_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model.eval()


def cfg_for(path, *over):
    return load_config(None, ["rl.enabled=true", "rl.reward=hpsv2", f"rl.hpsv2_arch={ARCH}",
                              f"rl.hpsv2_checkpoint={path}", *over])


def test_loads_checkpoint_weights_exactly(checkpoint):
    path, ref = checkpoint
    reward = load_hpsv2(arch=ARCH, checkpoint=path)
    assert isinstance(reward, HPSv2Reward)
    ours = reward.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert not any(p.requires_grad for p in reward.parameters())
    assert reward.size == (32, 32)


def test_score_is_100_cosine_as_open_clip_computes_it(checkpoint):
    path, ref = checkpoint
    reward = load_hpsv2(arch=ARCH, checkpoint=path)
    tokens = hpsv2_tokenize(PROMPTS, arch=ARCH)
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    score = reward(images, {HPS_TOKENS_KEY: tokens})
    pixels = clip_preprocess(images, size=(32, 32), mean=reward.mean, std=reward.std)
    with torch.no_grad():
        image_features, text_features, _ = ref(pixels, tokens)  # open_clip's own forward: normalised features
        expected = 100.0 * torch.diagonal(image_features @ text_features.T)
    assert torch.allclose(score, expected, rtol=1e-5, atol=1e-5)
    assert score.abs().max() <= 100.0


def test_preprocessing_matches_open_clip_transform_at_native_size(checkpoint):
    from PIL import Image

    path, ref = checkpoint
    reward = load_hpsv2(arch=ARCH, checkpoint=path)
    preprocess = open_clip.image_transform(32, is_train=False, mean=reward.mean, std=reward.std)
    u8 = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    pil = Image.fromarray(u8.numpy())
    theirs = preprocess(pil)
    images = (u8.permute(2, 0, 1).float() / 255.0) * 2 - 1
    ours = clip_preprocess(images[None], size=(32, 32), mean=reward.mean, std=reward.std)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_score_backpropagates_to_pixels(checkpoint):
    path, _ = checkpoint
    reward = load_hpsv2(arch=ARCH, checkpoint=path)
    tokens = hpsv2_tokenize(PROMPTS[:2], arch=ARCH)
    for shape in [(2, 3, 32, 32), (2, 1, 8, 8), (2, 3, 48, 40)]:  # native, grey digits, resized + cropped
        images = (torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8).requires_grad_(True)
        reward(images, {HPS_TOKENS_KEY: tokens}).sum().backward()
        assert torch.isfinite(images.grad).all(), shape
        assert images.grad.abs().sum() > 0, shape


def test_reward_guidance_end_to_end_through_hpsv2(checkpoint):
    """The RL term on an identity codec (pixel-space latents): a real gradient reaches a generator."""
    from twinflow_train.models.codecs import IdentityCodec

    path, _ = checkpoint
    cfg = cfg_for(path, "rl.warmup=0")
    check_reward_config(cfg)
    reward = build_reward(cfg)
    gen = torch.nn.Linear(3 * 16 * 16, 3 * 16 * 16)
    z = torch.randn(2, 3 * 16 * 16)
    x_gen = (z - gen(z)).view(2, 3, 16, 16)
    guidance = RewardGuidance(cfg.rl, codec=IdentityCodec(pixel_shape=(3, 16, 16)), reward=reward)
    term = guidance.term(x_gen=x_gen, cond={HPS_TOKENS_KEY: hpsv2_tokenize(PROMPTS[:2], arch=ARCH)}, step=1)
    term.loss.backward()
    assert term.reward.shape == (2,) and torch.isfinite(gen.weight.grad).all() and gen.weight.grad.abs().sum() > 0


def test_mismatched_checkpoints_are_errors(checkpoint, tmp_path):
    path, ref = checkpoint
    sd = ref.state_dict()
    dropped = dict(sd)
    dropped.pop(next(k for k in sd if k.startswith("visual.")))
    torch.save({"state_dict": dropped}, tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint.*1 missing keys"):
        load_hpsv2(arch=ARCH, checkpoint=tmp_path / "missing.pt")
    torch.save({"state_dict": {**sd, "score_head.weight": torch.zeros(2)}}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint.*1 unexpected keys"):
        load_hpsv2(arch=ARCH, checkpoint=tmp_path / "extra.pt")
    wrong = dict(sd)
    wrong["text_projection"] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint.*does not fit"):
        load_hpsv2(arch=ARCH, checkpoint=tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_checkpoint: cannot read"):
        load_hpsv2(arch=ARCH, checkpoint=tmp_path / "junk.pt")
    # a plain state dict, and one saved from a DDP wrapper ('module.' prefix), both load
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    load_hpsv2(arch=ARCH, checkpoint=tmp_path / "ddp.pt")


def test_startup_check_names_arch_and_missing_tokens(checkpoint):
    path, _ = checkpoint
    check_reward_config(cfg_for(path))
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_arch"):
        check_reward_config(cfg_for(path, "rl.hpsv2_arch=ViT-Nope-99"))
    reward = load_hpsv2(arch=ARCH, checkpoint=path)
    with pytest.raises(KeyError, match=HPS_TOKENS_KEY):
        reward(torch.zeros(1, 3, 32, 32), {"labels": torch.zeros(1, dtype=torch.long)})


def test_arch_given_as_a_model_config_file_is_registered_where_it_is_used(checkpoint, tmp_path):
    """A fresh process knows only open_clip's own architectures: a .json path registers the scorer's shape."""
    path, ref = checkpoint
    cfg_file = tmp_path / "HPS-tiny-file.json"
    cfg_file.write_text(json.dumps(TINY))
    code = textwrap.dedent(f"""
        import torch
        from twinflow_train.config import load_config
        from twinflow_train.rl.rewards import check_reward_config, load_hpsv2
        cfg = load_config(None, ["rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_arch={cfg_file}",
                                 "rl.hpsv2_checkpoint={path}"])
        check_reward_config(cfg)
        reward = load_hpsv2(arch=cfg.rl.hpsv2_arch, checkpoint=cfg.rl.hpsv2_checkpoint)
        torch.save(reward.model.state_dict(), "{tmp_path / 'loaded.pt'}")
        print(reward.arch)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "HPS-tiny-file"
    loaded = torch.load(tmp_path / "loaded.pt")
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    # a path that is no model config is named, as is a missing one
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 16}))
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_arch: .*missing 'vision_cfg', 'text_cfg'"):
        check_reward_config(cfg_for(path, f"rl.hpsv2_arch={tmp_path / 'bad.json'}"))
    with pytest.raises(ConfigError, match=r"rl\.hpsv2_arch: no open_clip model-config file"):
        check_reward_config(cfg_for(path, f"rl.hpsv2_arch={tmp_path / 'none.json'}"))

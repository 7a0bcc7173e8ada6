"""Building what a run needs besides the network (``data.Setup``): codec, latent data, prompts, metrics.

The embedded default encodes the whole digits split once with the cached codec;
the scale path plugs its own data (pre-encoded shards) in the same shape.
"""

from __future__ import annotations

from functools import partial

import torch

from ..assets.auxiliary import (DigitsProxyReward, DigitsReward, get_eval_net, get_gold_score, get_proxy_net,
                                get_reward_classifier)
from ..assets.latents import digits_latents
from ..config import Config
from ..data.batches import Setup
from ..data.digits import NUM_CLASSES, eval_prompts
from ..data.shards import shard_data
from ..evaluation.metrics import SampleScorer
from ..models.base import Cond
from ..rl.rewards import HPS_TOKENS_KEY, hpsv2_tokenize


def build_setup(cfg: Config, *, device: torch.device) -> Setup:
    if cfg.data.dataset == "digits":
        return _digits_setup(cfg, device=device)
    if cfg.data.dataset == "latent_shards":
        return _shard_setup(cfg, device=device)
    raise ValueError(f"unknown data.dataset {cfg.data.dataset!r}")


def reference_images(cfg: Config, split) -> torch.Tensor:
    """The real digits FD and KID compare with (``eval.reference``)."""
    if cfg.eval.reference == "train":
        return split.train_images
    if cfg.eval.reference == "held_out":
        return split.val_images
    raise ValueError(f"unknown eval.reference {cfg.eval.reference!r}")


def _digits_setup(cfg: Config, *, device: torch.device) -> Setup:
    split, codec, data = digits_latents(cfg, device=device)
    reward = DigitsReward(get_reward_classifier(cfg)).to(device).eval()
    proxy = DigitsProxyReward(get_proxy_net(cfg)).to(device).eval()
    eval_net = get_eval_net(cfg).to(device).eval()
    gold = get_gold_score(cfg, judge=eval_net).to(device)
    scorer = SampleScorer(eval_net=eval_net, reward=reward,
                          reference_images=reference_images(cfg, split).to(device),
                          extra={"gold": lambda x, y: gold(x, {"labels": y}),
                                 "proxy": lambda x, y: proxy(x, {"labels": y})})

    def eval_cond(n: int) -> Cond:
        return {"labels": (torch.arange(n, device=device) % NUM_CLASSES)}

    return Setup(codec=codec, data=data, num_classes=NUM_CLASSES, eval_cond=eval_cond,
                 sample_cond={"labels": eval_prompts(per_class=4).to(device)}, scorer=scorer)


def _shard_setup(cfg: Config, *, device: torch.device) -> Setup:
    """The trainer's ``Setup`` for ``data.dataset: latent_shards`` (Qwen-Image VAE as the codec)."""
    from ..models.qwen_vae import QwenVAECodec  # lazy: optional dependency diffusers (the qwen extra)

    if cfg.codec.kind != "qwen_vae":
        raise ValueError(f"codec.kind must be 'qwen_vae' for data.dataset 'latent_shards' (got {cfg.codec.kind!r})")
    caption_tokens = None
    if cfg.rl.enabled and cfg.rl.reward == "hpsv2":  # HPSv2 scores the caption's own text
        caption_tokens = (HPS_TOKENS_KEY, partial(hpsv2_tokenize, arch=cfg.rl.hpsv2_arch))
    data = shard_data(cfg, device=device, caption_tokens=caption_tokens)
    vae_path = cfg.codec.path if cfg.codec.path is not None else data.manifest["pipeline"]
    ref = next(b for b in data.manifest["buckets"] if b["name"] == data.reference.name)
    codec = QwenVAECodec.from_pretrained(vae_path, image_size=(ref["height"], ref["width"])).to(device).eval()
    codec.requires_grad_(False)
    if codec.config_fingerprint() != data.manifest["vae"]:
        raise ValueError(f"codec.path: the VAE at {vae_path} differs from the one that encoded {cfg.data.shards} "
                         "(z_dim, scale factor or latent mean/std)")
    if tuple(data.latent_shape) != tuple(codec.latent_shape):
        raise ValueError(f"{cfg.data.shards}: reference bucket latent {data.latent_shape} "
                         f"!= codec's {codec.latent_shape}")

    def eval_cond(n: int) -> Cond:
        _, cond = data.val_prompts(n)
        return {"labels": torch.arange(n, device=device), **cond}

    k = min(8, sum(len(b.val) for b in data.val_buckets))
    _, cond = data.val_prompts(k)
    # 'labels' first: sample files record the prompt's index into these held-out captions
    sample_cond = {"labels": torch.arange(k, device=device), **cond}
    return Setup(codec=codec, data=data, num_classes=None, eval_cond=eval_cond, sample_cond=sample_cond, scorer=None)

"""Building what a run needs besides the network (``data.Setup``): codec, latent data, prompts, metrics.

The embedded default encodes the whole digits split once with the cached codec;
the scale path plugs its own data (pre-encoded shards) in the same shape.
"""

from __future__ import annotations

import torch

from .config import Config
from .data import Setup, TensorData, TrainData
from .models.base import Cond
from .shards import build_shard_setup


def build_setup(cfg: Config, *, device: torch.device) -> Setup:
    if cfg.data.dataset == "digits":
        return _digits_setup(cfg, device=device)
    if cfg.data.dataset == "latent_shards":
        return build_shard_setup(cfg, device=device)
    raise ValueError(f"unknown data.dataset {cfg.data.dataset!r}")


@torch.no_grad()
def encode_all(codec: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([codec.encode(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def build_train_data(cfg: Config, *, device: torch.device) -> tuple[TrainData, int | None]:
    """The latent training data and the number of prompt classes, without the reward model and the
    evaluation network where they can be left out (what the teacher needs)."""
    if cfg.data.dataset == "digits":
        from .digits import NUM_CLASSES
        return _digits_data(cfg, device=device)[2], NUM_CLASSES
    setup = build_setup(cfg, device=device)
    return setup.data, setup.num_classes


def _digits_data(cfg: Config, *, device: torch.device):
    from .auxiliary import get_codec
    from .digits import load_digits_split

    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    codec = get_codec(cfg).to(device).eval()
    train_lat = encode_all(codec, split.train_images.to(device))
    val_lat = encode_all(codec, split.val_images.to(device))
    data = TensorData(train_latents=train_lat, train_cond={"labels": split.train_labels.to(device)},
                      val_latents=val_lat, val_cond={"labels": split.val_labels.to(device)},
                      batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    return split, codec, data


def _digits_setup(cfg: Config, *, device: torch.device) -> Setup:
    from .auxiliary import DigitsProxyReward, DigitsReward, get_eval_net, get_proxy_net, get_reward_classifier, gold_score
    from .digits import NUM_CLASSES, eval_prompts
    from .metrics import SampleScorer

    split, codec, data = _digits_data(cfg, device=device)
    reward = DigitsReward(get_reward_classifier(cfg)).to(device).eval()
    proxy = DigitsProxyReward(get_proxy_net(cfg)).to(device).eval()
    scorer = SampleScorer(eval_net=get_eval_net(cfg).to(device).eval(), reward=reward,
                          reference_images=split.val_images.to(device),
                          extra={"gold": lambda x, y: gold_score(x, {"labels": y}),
                                 "proxy": lambda x, y: proxy(x, {"labels": y})})

    def eval_cond(n: int) -> Cond:
        return {"labels": (torch.arange(n, device=device) % NUM_CLASSES)}

    return Setup(codec=codec, data=data, num_classes=NUM_CLASSES, eval_cond=eval_cond,
                 sample_cond={"labels": eval_prompts(per_class=4).to(device)}, scorer=scorer)

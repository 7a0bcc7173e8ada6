"""Training latents: the digits split through the cached codec, or the pre-encoded shards.

What the teacher trains on and what a run's ``Setup`` wraps (``run.setup``); it needs the
codec, so it sits with the cached networks.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..data.batches import TensorData, TrainData
from ..data.digits import NUM_CLASSES, DigitsSplit, load_digits_split
from ..data.shards import shard_data
from .auxiliary import get_codec


@torch.no_grad()
def encode_all(codec: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([codec.encode(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def digits_latents(cfg: Config, *, device: torch.device) -> tuple[DigitsSplit, torch.nn.Module, TensorData]:
    """The digits split, its cached codec and the split's latents as training data."""
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    codec = get_codec(cfg).to(device).eval()
    data = TensorData(train_latents=encode_all(codec, split.train_images.to(device)),
                      train_cond={"labels": split.train_labels.to(device)},
                      val_latents=encode_all(codec, split.val_images.to(device)),
                      val_cond={"labels": split.val_labels.to(device)},
                      batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    return split, codec, data


def train_latents(cfg: Config, *, device: torch.device) -> tuple[TrainData, int | None]:
    """The latent training data and the number of prompt classes (None for captions): what the teacher needs,
    without the reward model, the evaluation network or the shards' VAE."""
    if cfg.data.dataset == "digits":
        return digits_latents(cfg, device=device)[2], NUM_CLASSES
    if cfg.data.dataset == "latent_shards":
        return shard_data(cfg, device=device), None
    raise ValueError(f"unknown data.dataset {cfg.data.dataset!r}")

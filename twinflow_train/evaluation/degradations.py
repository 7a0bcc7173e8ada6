"""Controlled degradations of real digits, the ways a few-step generator fails.

Each function maps real images ``[N, 1, 8, 8]`` in [-1, 1] (and their labels) to a degraded set of the same
size, with a strength of 0 returning the input unchanged. The degradation tests
(tests/twinflow_train/evaluation/test_degradations.py) check that the sample metrics grow with the strength;
docs/reward.md records how much.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

BACKGROUND = -1.0
"""Pixel value of the digits' background (no ink)."""


def _check(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images [N, 1, H, W], got {list(images.shape)}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] (got {list(labels.shape)})")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with a Gaussian of std ``sigma`` pixels (kernel radius ceil(3 sigma)), background outside the image.

    The blur of a generator that averages over the modes it cannot separate in one step.
    """
    _check(images)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (got {sigma})")
    if sigma == 0:
        return images.clone()
    r = max(1, math.ceil(3 * sigma))
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (ax / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    x = images - BACKGROUND  # zero background, so zero padding pads with background
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))
    return x + BACKGROUND


def additive_noise(images: torch.Tensor, std: float, *, seed: int = 0) -> torch.Tensor:
    """Add i.i.d. Gaussian pixel noise of std ``std`` (data range is 2), drawn from ``seed``."""
    _check(images)
    if std < 0:
        raise ValueError(f"std must be >= 0 (got {std})")
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=images.dtype)
    return images + std * noise


def shrink_to_class_mean(images: torch.Tensor, labels: torch.Tensor, amount: float) -> torch.Tensor:
    """``mean_c + (1 - amount) (x - mean_c)`` per class ``c``: per-pixel variance within each class scaled by
    ``(1 - amount)^2``; 1 gives every image its class mean (the mode-averaging of a one-step regression)."""
    _check(images, labels)
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1] (got {amount})")
    out = images.clone()
    if amount == 0:
        return out  # exactly the input (the arithmetic below would round)
    for c in labels.unique().tolist():
        rows = labels == c
        mean = images[rows].mean(0, keepdim=True)
        out[rows] = mean + (1.0 - amount) * (images[rows] - mean)
    return out


def shrink_to_data_mean(images: torch.Tensor, amount: float) -> torch.Tensor:
    """``mean + (1 - amount) (x - mean)`` with the mean over all images: loses class identity as well."""
    _check(images)
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1] (got {amount})")
    if amount == 0:
        return images.clone()
    mean = images.mean(0, keepdim=True)
    return mean + (1.0 - amount) * (images - mean)


def drop_classes(images: torch.Tensor, labels: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``keep`` classes (in sorted order) and refill to the same size by cycling through their
    images: a generator that collapsed onto some modes, with as many samples as before."""
    _check(images, labels)
    classes = labels.unique().tolist()
    if not 1 <= keep <= len(classes):
        raise ValueError(f"keep must be in [1, {len(classes)}] (got {keep})")
    rows = torch.isin(labels, torch.tensor(classes[:keep], dtype=labels.dtype)).nonzero().squeeze(1)
    idx = rows[torch.arange(images.shape[0]) % rows.shape[0]]
    return images[idx].clone(), labels[idx].clone()


def drop_modes(images: torch.Tensor, labels: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Within each class keep the share ``keep`` of images nearest the class mean (pixel L2) and refill the class
    to its size by cycling through them: the same classes, the atypical modes of each lost."""
    _check(images, labels)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1] (got {keep})")
    idx = torch.empty(images.shape[0], dtype=torch.long)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        x = images[rows].flatten(1)
        dist = (x - x.mean(0, keepdim=True)).pow(2).sum(1)
        kept = rows[dist.argsort()[:max(1, round(keep * rows.shape[0]))]]
        idx[rows] = kept[torch.arange(rows.shape[0]) % kept.shape[0]]
    return images[idx].clone(), labels[idx].clone()

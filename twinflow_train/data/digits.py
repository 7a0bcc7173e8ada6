"""The embedded dataset: scikit-learn's 8x8 digits, with class-label prompts.

The data ships inside scikit-learn (1,797 images, 10 classes), so nothing is
downloaded. Pixels (integers 0..16) are scaled to [-1, 1]; prompts are the class
labels 0..9, and label ``NULL_LABEL`` (10) is the empty prompt used for
classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
"""Prompt classes (the digits 0..9)."""
NULL_LABEL = 10
"""The null (unconditional) prompt: one past the last class."""
PIXEL_MAX = 16.0
"""scikit-learn's digits pixels are integers in [0, 16]."""


@dataclass
class DigitsSplit:
    """A deterministic, stratified, disjoint train/validation split.

    Images are float32 ``[N, 1, 8, 8]`` in [-1, 1]; labels are int64 ``[N]``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    train_index: np.ndarray
    """Row numbers of the training images in ``sklearn.datasets.load_digits()``."""
    val_index: np.ndarray
    """Row numbers of the validation images in ``sklearn.datasets.load_digits()``."""


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn (~1 s to import), only where the digits are read

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """scikit-learn pixel values (0..16) to the model's data range [-1, 1]."""
    return (pixels / PIXEL_MAX * 2.0 - 1.0).astype(np.float32)


def stratified_indices(labels: np.ndarray, *, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices: each class contributes round(val_fraction * its count) validation rows.

    A per-class permutation from one seeded generator makes the split depend on
    the seed and the labels only; both index sets are returned sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    rng = np.random.default_rng(split_seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * rows.size))
        if n_val < 1 or n_val >= rows.size:
            raise ValueError(f"val_fraction {val_fraction} leaves class {int(c)} ({rows.size} rows) "
                             f"with an empty train or validation part")
        val.append(rng.permutation(rows)[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def load_digits_split(*, val_fraction: float, split_seed: int) -> DigitsSplit:
    """scikit-learn's digits, scaled to [-1, 1], split deterministically by ``split_seed``."""
    images, labels = _raw_digits()
    train_idx, val_idx = stratified_indices(labels, val_fraction=val_fraction, split_seed=split_seed)
    x = torch.from_numpy(to_model_range(images)).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.from_numpy(labels.copy())
    t, v = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return DigitsSplit(train_images=x[t].contiguous(), train_labels=y[t].contiguous(),
                       val_images=x[v].contiguous(), val_labels=y[v].contiguous(),
                       train_index=train_idx, val_index=val_idx)


def eval_prompts(*, per_class: int) -> torch.Tensor:
    """Labels 0..9, each repeated ``per_class`` times in order: ``[0]*per_class + [1]*per_class + ...``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 (got {per_class})")
    return torch.arange(NUM_CLASSES, dtype=torch.int64).repeat_interleave(per_class)

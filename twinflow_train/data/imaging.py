"""Sample files: arrays (``.npz``) and image grids (``.png``), written atomically.

The ``.npz`` keeps exactly what was generated (float32, pixel space on the
[-1, 1] data scale, ``[N, C, H, W]``; not clipped, so an over-range or
non-finite sample stays visible as evidence). The PNG is for eyes: values are
clipped to [-1, 1] and non-finite pixels are drawn red.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..rundir import atomic_path


def _as_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3 (got shape {list(arr.shape)})")
    if arr.shape[0] == 0:
        raise ValueError("images is empty")
    return arr.astype(np.float32, copy=False)


def grid_rgb(images: torch.Tensor | np.ndarray, *, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 RGB grid ``[H', W', 3]``: ``nrow`` images per row, each upscaled ``scale`` x by pixel repetition."""
    arr = _as_array(images)
    if nrow < 1 or scale < 1 or pad < 0:
        raise ValueError(f"nrow and scale must be >= 1 and pad >= 0 (got nrow={nrow}, scale={scale}, pad={pad})")
    n, c, h, w = arr.shape
    bad = ~np.isfinite(arr).all(axis=1)                                   # [N, H, W]
    pix = ((np.clip(np.nan_to_num(arr, nan=-1.0), -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)
    pix = np.repeat(pix, 3, axis=1) if c == 1 else pix
    pix = pix.transpose(0, 2, 3, 1).copy()                                # [N, H, W, 3]
    pix[bad] = (255, 0, 0)
    pix = pix.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = math.ceil(n / nrow)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, nrow * cell_w + pad, 3), 96, dtype=np.uint8)  # grey separators
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * cell_h, pad + col * cell_w
        canvas[y:y + h * scale, x:x + w * scale] = pix[i]
    return canvas


def save_grid_png(images: torch.Tensor | np.ndarray, path: str | Path, *, nrow: int, scale: int = 4) -> Path:
    """Write a PNG grid of ``images`` ([N, C, H, W] on the [-1, 1] scale) to ``path`` atomically."""
    path = Path(path)
    canvas = grid_rgb(images, nrow=nrow, scale=scale)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def _default_nrow(labels: np.ndarray) -> int:
    """Images per prompt when prompts come in equal consecutive runs (one class per row), else a square."""
    n = labels.shape[0]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    runs = np.diff(np.r_[starts, n])
    if runs.size > 1 and (runs == runs[0]).all():
        return int(runs[0])
    return max(1, math.ceil(math.sqrt(n)))


def save_samples(path_stem: str | Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *,
                 nrow: int | None = None, scale: int = 4,
                 png_rows: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (``images`` float32 [N, C, H, W], ``labels`` int64 [N]) and ``<stem>.png``.

    ``nrow`` defaults to the number of images per prompt when the prompts come
    in equal runs (``eval_prompts`` order: one class per row). ``png_rows``
    selects the rows the PNG shows (default: all; the .npz always has all).
    Returns both paths.
    """
    arr = _as_array(images)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.shape != (arr.shape[0],):
        raise ValueError(f"labels must have shape [{arr.shape[0]}] (got {list(lab.shape)})")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers (got dtype {lab.dtype})")
    stem = Path(path_stem)
    npz, png = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, images=arr, labels=lab.astype(np.int64))
    if png_rows is not None:
        arr, lab = arr[np.asarray(png_rows)], lab[np.asarray(png_rows)]
    save_grid_png(arr, png, nrow=nrow if nrow is not None else _default_nrow(lab), scale=scale)
    return npz, png

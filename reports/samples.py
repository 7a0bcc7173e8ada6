"""The sample grid: the teacher and every arm at every NFE, on the same noise and prompts.

Rows: the teacher at its full step count, then each arm at each NFE; columns:
the same sample index (hence the same noise and prompt, fixed by ``eval.seed``)
in every row. One grid for the final weights and one for the best weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from .data import GridDataError
from .plots import FigureOut, fixed_margins, new_figure

Which = Literal["final", "best"]
MAX_CELL_PX = 128


@dataclass(frozen=True, slots=True)
class SampleRow:
    label: str
    arm: str | None
    nfe: int | None
    seed: int | None
    path: Path | None
    """None: no file (the row is drawn blank and listed as missing)."""


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        if "images" not in z or "labels" not in z:
            raise GridDataError(f"{path}: expected arrays 'images' and 'labels' (found {sorted(z.files)})")
        images, labels = z["images"], z["labels"]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise GridDataError(f"{path}: 'images' must be [N, C, H, W] with C in (1, 3) (got shape {images.shape})")
    if labels.shape[:1] != images.shape[:1]:
        raise GridDataError(f"{path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


def _columns(labels: np.ndarray, max_cols: int) -> np.ndarray:
    """Sample indices shown: the first sample of each prompt class when prompts are a few classes,
    else the first ``max_cols`` samples."""
    flat = labels.reshape(labels.shape[0], -1)
    if flat.shape[1] == 1:
        classes, first = np.unique(flat[:, 0], return_index=True)
        if len(classes) <= max_cols:
            return np.sort(first)
    return np.arange(min(max_cols, labels.shape[0]))


def _to_cells(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, h, w, 3] in [0, 1], block-averaged down to at most MAX_CELL_PX."""
    x = np.clip((images.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    f = max(1, math.ceil(max(x.shape[2:]) / MAX_CELL_PX))
    if f > 1:
        h, w = (x.shape[2] // f) * f, (x.shape[3] // f) * f
        x = x[:, :, :h, :w].reshape(x.shape[0], 3, h // f, f, w // f, f).mean(axis=(3, 5))
    return x.transpose(0, 2, 3, 1)


def plan_rows(runs: pd.DataFrame, *, arms: Sequence[str], nfe: Sequence[int], which: Which,
              seed: int | None = None) -> tuple[list[SampleRow], int | None]:
    """Choose one run per arm and the file of each row.

    Runs: columns arm, seed, run_dir. The shown seed is ``seed`` if given, else the
    lowest seed whose files exist in the most arms; an arm without that seed's
    files falls back to its own lowest seed with files (the row label says so).
    """
    if which not in ("final", "best"):
        raise ValueError(f"which must be 'final' or 'best' (got {which!r})")
    have: dict[tuple[str, int], Path] = {}
    for arm, sd, rd in runs[["arm", "seed", "run_dir"]].itertuples(index=False):  # one per run, not per record
        if rd is None or (isinstance(rd, float) and math.isnan(rd)):
            continue
        d = Path(rd) / "samples"
        if all((d / f"{which}-nfe{n}.npz").is_file() for n in nfe):
            have[(str(arm), int(sd))] = d
    seeds = sorted({int(s) for s in runs["seed"]})
    if seed is None and have:
        seed = max(seeds, key=lambda s: (sum((a, s) in have for a in arms), -s))
    rows: list[SampleRow] = []
    teacher_dir = next((have[(a, seed)] for a in arms if (a, seed) in have), None)
    if teacher_dir is None:  # the teacher file is written even when the student's are not
        for rd in runs["run_dir"]:
            if isinstance(rd, str) and (Path(rd) / "samples" / "teacher.npz").is_file():
                teacher_dir = Path(rd) / "samples"
                break
    rows.append(SampleRow("teacher", None, None, seed, teacher_dir / "teacher.npz" if teacher_dir else None))
    for arm in arms:
        sd = seed if (arm, seed) in have else next((s for s in seeds if (arm, s) in have), None)
        for n in nfe:
            label = f"{arm} · {n} NFE" + ("" if sd == seed or sd is None else f" (seed {sd})")
            path = have[(arm, sd)] / f"{which}-nfe{n}.npz" if sd is not None else None
            rows.append(SampleRow(label, arm, n, sd, path))
    return rows, seed


def sample_grid_figure(runs: pd.DataFrame, *, arms: Sequence[str], nfe: Sequence[int], which: Which,
                       teacher_steps: float | None = None, max_cols: int = 10, seed: int | None = None
                       ) -> FigureOut | None:
    """The grid image; None when no run has sample files for ``which``."""
    rows, seed = plan_rows(runs, arms=arms, nfe=nfe, which=which, seed=seed)
    if not any(r.path is not None and r.arm is not None for r in rows):
        return None
    if teacher_steps is not None and math.isfinite(teacher_steps):
        rows[0] = SampleRow(f"teacher ({int(teacher_steps)} steps)", None, None, rows[0].seed, rows[0].path)
    ref_labels = None
    ref_path = None
    loaded: list[np.ndarray | None] = []
    for r in rows:
        if r.path is None:
            loaded.append(None)
            continue
        images, labels = _load(r.path)
        if ref_labels is None:
            ref_labels, ref_path = labels, r.path
        elif labels.shape != ref_labels.shape or not np.array_equal(labels, ref_labels):
            # same prompts in every cell is the point of the grid; different ones would mislead
            raise GridDataError(f"{r.path}: prompts (labels) differ from those of {ref_path}; "
                             f"sample files of one grid must share eval.seed and prompts")
        loaded.append(images)
    cols = _columns(ref_labels, max_cols)
    cells = [None if im is None else _to_cells(im[cols]) for im in loaded]
    shape = next(c for c in cells if c is not None).shape[1:3]
    for r, c in zip(rows, cells):
        if c is not None and c.shape[1:3] != shape:
            raise GridDataError(f"{r.path}: image size {c.shape[1:3]} differs from the grid's {shape}")
    h, w = shape
    pad = max(1, h // 8)
    mosaic = np.ones((len(rows) * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), np.float32)
    mosaic[:] = 0.85
    for i, c in enumerate(cells):
        y = pad + i * (h + pad)
        if c is None:
            mosaic[y:y + h, pad:-pad] = 0.6  # missing: a flat grey band, listed in the caption
            continue
        for j in range(len(cols)):
            x = pad + j * (w + pad)
            mosaic[y:y + h, x:x + w] = c[j]
    cell_in = 0.42  # inches per cell row; columns keep the images' aspect
    label_in, top_in, pad_in = 1.9, 0.6, 0.15
    grid_w = cell_in * (len(cols) * (w + pad) + pad) / (h + pad)
    grid_h = cell_in * (len(rows) * (h + pad) + pad) / (h + pad)
    fig = new_figure(width=label_in + grid_w + pad_in, height=top_in + grid_h + pad_in)
    fixed_margins(fig, left=label_in, right=pad_in, top=top_in, bottom=pad_in)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))], [r.label for r in rows], fontsize=7)
    flat = ref_labels.reshape(ref_labels.shape[0], -1)
    col_names = [str(int(flat[i, 0])) if flat.shape[1] == 1 else f"#{i}" for i in cols]
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(cols))], col_names, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    missing = [r.label for r in rows if r.path is None]
    fig.suptitle(f"{which} weights, seed {seed}: columns share noise and prompt (column label = prompt)", fontsize=9)
    caption = (f"Samples from each arm's {which} weights (run seed {seed}) at {', '.join(map(str, nfe))} NFE, and the "
               f"teacher at its full step count; every column is the same noise and prompt "
               f"(sample indices {', '.join(map(str, cols.tolist()))})."
               + (f" No file for: {'; '.join(missing)}." if missing else ""))
    meta = {"rows": [r.label for r in rows], "row_arms": [r.arm for r in rows], "row_nfe": [r.nfe for r in rows],
            "files": [None if r.path is None else str(r.path) for r in rows], "missing": missing,
            "columns": cols.tolist(), "seed": seed}
    return FigureOut(f"samples_{which}", f"Samples ({which} weights)", caption, fig, meta, dpi=110)

"""Sampling and evaluation of a finished (or running) run's weights, and samples for external scoring.

``twinflow-train sample --run-dir D`` writes the run's fixed sample files (40
prompts, the same noise as the files the trainer writes). With ``--n N`` it
writes N samples instead: prompts balanced over the classes (in class order),
noise and sampler randomness fixed by ``eval.seed`` (override it as
``eval.seed=K``), one ``.npz`` (all N images and labels) and one PNG grid per
NFE. ``--teacher`` samples the base model instead, at ``teacher.sample_steps``
Euler steps and the comparison guidance ``Config.teacher_cfg_scale`` (the
guidance the student is distilled toward). The noise is the same for the
student and the teacher at the same N and seed, so the two files pair row by row.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..config import Config
from ..data.batches import step_generator
from ..data.imaging import save_samples
from ..distributed import checkpoint as ckpt
from ..distributed.parallel import init_distributed, shutdown
from ..evaluation.evaluate import Evaluator
from ..models.registry import parallelize, place_frozen
from ..rundir import (atomic_write_text, best_weights, checkpoint_step, eval_result, latest_checkpoint, sample_stem,
                      samples_dir)
from .setup import build_setup
from .trainer import build_base, preflight_teacher


def _student(cfg: Config, run_dir: Path, which: str):
    tpath = preflight_teacher(cfg)
    d = init_distributed(cfg.run, cfg.parallel)
    setup = build_setup(cfg, device=d.device)
    base = build_base(cfg, setup, tpath)
    model = parallelize(base.to(d.device), d.mesh, cfg)
    if which == "best":
        path = best_weights(run_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (no validation has run yet)")
        ckpt.load_weights(path, model)
    elif which == "final":
        latest = latest_checkpoint(run_dir)
        if checkpoint_step(latest) is None:
            raise FileNotFoundError(f"{latest} holds no checkpoint")
        if cfg.eval.ema_decay > 0:  # the evaluation EMA is what the run validated and sampled
            ckpt.load_checkpoint(latest, model=copy.deepcopy(model), optimizer=None, extra_modules={"eval_ema": model})
        else:
            ckpt.load_checkpoint(latest, model=model, optimizer=None, extra_modules={})
    else:
        raise ValueError(f"unknown --which {which!r}; valid: 'final', 'best'")
    return d, setup, model.eval(), base


def sample_run(cfg: Config, run_dir: Path, *, which: str, nfe: list[int] | None, out_dir: Path | None) -> list[Path]:
    run_dir = Path(run_dir)
    try:
        d, setup, model, _ = _student(cfg, run_dir, which)
        ev = Evaluator(cfg, setup, device=d.device)
        out_dir = Path(out_dir) if out_dir is not None else samples_dir(run_dir)
        labels = next(iter(setup.sample_cond.values())).cpu()
        written = []
        for n in nfe or cfg.eval.nfe:
            images = ev.sample_files_student(model, n)
            if d.is_main:
                stem = sample_stem(out_dir, which, n)
                save_samples(stem, images.cpu(), labels)
                written.append(stem.with_suffix(".npz"))
        return written
    finally:
        shutdown()


COUNT_NOISE = 6
"""Purpose id of the ``--n`` noise generator (distinct from the evaluator's purposes 1-5)."""
PNG_PER_CLASS = 100
"""Above this many samples per class, the PNG shows the first this-many of each class (the .npz has all)."""


def count_prompts(n: int, num_classes: int) -> "torch.Tensor":
    """``n`` class labels balanced over the classes and sorted (one class per PNG row when n divides evenly)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1 (got {n})")
    return torch.sort(torch.arange(n) % num_classes, stable=True).values


def _count_inputs(cfg: Config, setup, n: int, device):
    if setup.num_classes is None:
        raise ValueError("--n needs class prompts (the digits data); this data has no class list")
    labels = count_prompts(n, setup.num_classes)
    noise = torch.randn((n, *setup.data.latent_shape), generator=step_generator(cfg.eval.seed, COUNT_NOISE))
    return noise.to(device), {"labels": labels.to(device)}


def _png_rows(labels: "torch.Tensor") -> "torch.Tensor":
    """Indices of the samples the PNG shows: all, or the first PNG_PER_CLASS of each class."""
    keep = [torch.nonzero(labels == c).flatten()[:PNG_PER_CLASS] for c in torch.unique(labels)]
    return torch.cat(keep)


def _save_count(stem: Path, images, labels) -> Path:
    npz, _ = save_samples(stem, images, labels, png_rows=_png_rows(labels).numpy())
    return npz


def _teacher(cfg: Config):
    tpath = preflight_teacher(cfg)
    d = init_distributed(cfg.run, cfg.parallel)
    setup = build_setup(cfg, device=d.device)
    base = build_base(cfg, setup, tpath)
    return d, setup, place_frozen(base.to(d.device), d.mesh, cfg)


def sample_count(cfg: Config, run_dir: Path, *, n: int, which: str, nfe: list[int] | None, out_dir: Path | None,
                 teacher: bool) -> list[Path]:
    """N fixed-seed samples per NFE of the run's student (or the teacher) to ``.npz`` + PNG (module docstring)."""
    run_dir = Path(run_dir)
    if n < 1:
        raise ValueError(f"--n must be >= 1 (got {n})")
    try:
        if teacher:
            d, setup, net = _teacher(cfg)
        else:
            d, setup, net, _ = _student(cfg, run_dir, which)
        ev = Evaluator(cfg, setup, device=d.device)
        z, cond = _count_inputs(cfg, setup, n, d.device)
        labels = cond["labels"].cpu()
        out_dir = Path(out_dir) if out_dir is not None else samples_dir(run_dir)
        seed = cfg.eval.seed
        written = []
        if teacher:
            steps, scale = cfg.teacher.sample_steps, cfg.teacher_cfg_scale
            images = ev.decode(ev.teacher_latents(net, steps=steps, cfg_scale=scale, z=z, cond=cond).float())
            if d.is_main:
                written.append(_save_count(out_dir / f"teacher-n{n}-seed{seed}-steps{steps}-cfg{scale:g}",
                                           images.cpu(), labels))
            return written
        for k in nfe or cfg.eval.nfe:
            images = ev.decode(ev.student_latents(net, nfe=k, z=z, cond=cond).float())
            if d.is_main:
                written.append(_save_count(out_dir / f"{which}-n{n}-seed{seed}-nfe{k}", images.cpu(), labels))
        return written
    finally:
        shutdown()


def eval_run(cfg: Config, run_dir: Path, *, which: str) -> dict[str, float]:
    run_dir = Path(run_dir)
    try:
        d, setup, model, _ = _student(cfg, run_dir, which)
        ev = Evaluator(cfg, setup, device=d.device)
        result = {"val/loss": ev.val_loss(model), **ev.student_metrics(model)}
        if d.is_main:
            atomic_write_text(eval_result(run_dir, which), json.dumps(result, indent=1) + "\n")
        return result
    finally:
        shutdown()

"""Sampling and evaluation of a finished (or running) run's weights."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as ckpt
from .config import Config
from .evaluate import Evaluator
from .imaging import save_samples
from .parallel import init_distributed, shutdown
from .setup import build_setup
from .rundir import atomic_write_text, checkpoint_step


def _student(cfg: Config, run_dir: Path, which: str):
    from .models import parallelize
    from .trainer import build_base, preflight_teacher

    tpath = preflight_teacher(cfg)
    d = init_distributed(cfg.run, cfg.parallel)
    setup = build_setup(cfg, device=d.device)
    base = build_base(cfg, setup, tpath)
    model = parallelize(base.to(d.device), d.mesh, cfg)
    if which == "best":
        path = run_dir / "checkpoints" / "best" / "weights.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (no validation has run yet)")
        ckpt.load_weights(path, model)
    elif which == "final":
        latest = run_dir / "checkpoints" / "latest"
        if checkpoint_step(latest) is None:
            raise FileNotFoundError(f"{latest} holds no checkpoint")
        if cfg.eval.ema_decay > 0:  # the evaluation EMA is what the run validated and sampled
            import copy
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
        out_dir = Path(out_dir) if out_dir is not None else run_dir / "samples"
        labels = next(iter(setup.sample_cond.values())).cpu()
        written = []
        for n in nfe or cfg.eval.nfe:
            images = ev.sample_files_student(model, n)
            if d.is_main:
                stem = out_dir / f"{which}-nfe{n}"
                save_samples(stem, images.cpu(), labels)
                written.append(stem.with_suffix(".npz"))
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
            atomic_write_text(run_dir / f"eval-{which}.json", json.dumps(result, indent=1) + "\n")
        return result
    finally:
        shutdown()

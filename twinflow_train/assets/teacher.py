"""The base model ("teacher"): conditional flow matching on codec latents.

Trained once per configuration and cached; TwinFlow starts the student from
these weights and samples them at full step count for comparison.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import time
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..data.batches import step_generator
from ..models.base import FlowModel
from ..models.codecs import single_thread
from ..models.registry import base_weights_in_model, build_model, model_family
from ..progress import progress_range
from .auxiliary import (WEIGHTS, cache_entry, eval_key, get_eval_net, get_proxy_net, get_reward_classifier, is_complete,
                        proxy_key, reward_key, train_or_load_file)
from .latents import train_latents

_NULL_DROP, _TIMES, _NOISE = 1, 2, 3


def teacher_key(cfg: Config) -> dict:
    """Everything the teacher's weights depend on (not its sampling settings)."""
    t = to_dict(cfg.teacher)
    for k in ("checkpoint", "sample_steps", "cfg_scale"):
        t.pop(k)
    return {"teacher": t, "model": to_dict(cfg.model) | {"tt_init": None, "sign_embedding": None},
            "codec": to_dict(cfg.codec), "data": {"dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction,
                                                  "split_seed": cfg.data.split_seed, "shards": cfg.data.shards}}


def teacher_path(cfg: Config) -> Path:
    """Where the teacher weights are: the cache entry for ``auto``, else the configured path."""
    if cfg.teacher.checkpoint == "auto":
        return cache_entry(cfg, kind="teacher", key=teacher_key(cfg)) / WEIGHTS
    return Path(cfg.teacher.checkpoint)


def teacher_lr(step: int, *, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to 1% of it at ``steps`` (1-based)."""
    if warmup and step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_teacher_model(cfg: Config, model: FlowModel, latents: torch.Tensor, labels: torch.Tensor,
                        *, null_label: int, progress: bool = True) -> FlowModel:
    """Flow matching with prompt dropout (so CFG works), fused AdamW with warm-up and cosine decay;
    the EMA weights are returned."""
    tc = cfg.teacher
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0, fused=True)
    ema = copy.deepcopy(model)
    ema_params = [p.detach() for p in ema.parameters()]
    n = latents.shape[0]
    for step in progress_range(tc.steps, desc="teacher", progress=progress, start=1):
        gen = step_generator(tc.seed, step)
        idx = torch.randint(0, n, (tc.batch_size,), generator=gen)
        x, y = latents[idx], labels[idx].clone()
        y[torch.rand(tc.batch_size, generator=gen) < tc.cond_dropout] = null_label
        # logit-normal times put capacity where flow matching is hardest (mid noise)
        t = torch.sigmoid(torch.randn(tc.batch_size, generator=gen))
        z = torch.randn(x.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = tb * z + (1 - tb) * x
        loss = (model(x_t, t, t, {"labels": y}) - (z - x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        for g in opt.param_groups:
            g["lr"] = teacher_lr(step, steps=tc.steps, peak=tc.lr, warmup=tc.warmup_steps)
        opt.step()
        d = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
    model.load_state_dict(ema.state_dict())
    return model


def get_teacher(cfg: Config, *, progress: bool = True) -> Path | None:
    """Train (once, process-safe) and cache the teacher for ``cfg``; returns the weights path (the transformer
    directory, or None for a random-init architecture, where the model builder makes the base itself)."""
    if base_weights_in_model(cfg):
        # the base model is the model's own pretrained weights: nothing to train or cache
        return model_family(cfg).check_weights(cfg)
    path = teacher_path(cfg)
    if cfg.teacher.checkpoint != "auto":
        if not path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint: {path} does not exist")
        return path

    def make(dst: Path) -> dict:
        # the latents only: the classifiers are not needed here (``prepare`` builds them beside this)
        data, num_classes = train_latents(cfg, device=torch.device("cpu"))
        torch.manual_seed(cfg.teacher.seed)
        model = build_model(cfg, latent_shape=data.latent_shape, num_classes=num_classes)
        labels = data.train_cond["labels"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        # one thread, like the codec and the classifiers: ops of this size gain little from a second one, and on
        # a busy machine its spin-waiting made the fit many times slower (86 of 1,000 steps in 20 minutes)
        with single_thread():
            train_teacher_model(cfg, model, data.train_latents, labels, null_label=num_classes, progress=progress)
        torch.save(model.state_dict(), dst)
        return {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}

    return train_or_load_file(path, make, key=teacher_key(cfg))


def _build_classifiers(cfg: Config) -> None:
    """Child process of ``prepare``: the reward classifier, the evaluation network and the proxy reward (cached)."""
    torch.set_num_threads(1)
    get_reward_classifier(cfg)
    get_eval_net(cfg)
    get_proxy_net(cfg)


def prepare(cfg: Config, *, progress: bool = True, workers: int = 2) -> Path:
    """The teacher and every auxiliary network of ``cfg``, cached; returns the teacher's weights path.

    From a cold digits cache the networks are prepared in ``workers`` processes: the
    classifiers (reward, evaluation net) and the proxy reward do not depend on anything else and are built in
    a second process while this one trains the codec and then the teacher on its latents,
    which is the longest chain. The cache's per-entry locks make the two processes safe
    together (a build asked for twice runs once).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    child = None
    if workers > 1 and cfg.data.dataset == "digits":
        needed = [cache_entry(cfg, kind=k, key=key(cfg)) / WEIGHTS
                  for k, key in (("reward", reward_key), ("evalnet", eval_key), ("proxy", proxy_key))]
        if not all(is_complete(p) for p in needed):
            child = multiprocessing.get_context("spawn").Process(target=_build_classifiers, args=(cfg,),
                                                                 name="twinflow-classifiers")
            child.start()
    try:
        path = get_teacher(cfg, progress=progress)
    finally:
        if child is not None:
            child.join()
    if child is not None and child.exitcode != 0:
        raise RuntimeError(f"building the reward classifier, evaluation network and proxy reward failed (exit {child.exitcode})")
    return path


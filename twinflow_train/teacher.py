"""The base model ("teacher"): conditional flow matching on codec latents.

Trained once per configuration and cached; TwinFlow starts the student from
these weights and samples them at full step count for comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config, to_dict
from .data import step_generator
from .models import build_model
from .models.base import FlowModel

_NULL_DROP, _TIMES, _NOISE = 1, 2, 3


def teacher_key(cfg: Config) -> dict:
    """Everything the teacher's weights depend on (not its sampling settings)."""
    t = to_dict(cfg.teacher)
    for k in ("checkpoint", "sample_steps", "cfg_scale"):
        t.pop(k)
    return {"teacher": t, "model": to_dict(cfg.model) | {"tt_init": None, "sign_embedding": None},
            "codec": to_dict(cfg.codec), "data": {"dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction,
                                                  "split_seed": cfg.data.split_seed, "shards": cfg.data.shards}}


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def base_weights_in_model(cfg: Config) -> bool:
    """Qwen-Image takes its base weights from its model directory (diffusers ``from_pretrained`` layout,
    loaded by the model builder) when ``teacher.checkpoint`` is ``auto`` or names that same directory:
    there is no teacher file and nothing to train."""
    if cfg.model.family != "qwen_image":
        return False
    if cfg.teacher.checkpoint == "auto":
        return True
    pretrained = cfg.model.qwen.pretrained
    return pretrained is not None and _same_path(cfg.teacher.checkpoint, pretrained)


def check_base_model_dir(cfg: Config) -> Path | None:
    """The transformer directory the base weights come from (checked: config.json and safetensors), or None
    for a random-init architecture (``model.qwen.tiny`` / class defaults). Raises ``ConfigError`` naming the key."""
    from .config import ConfigError

    pretrained = cfg.model.qwen.pretrained
    if pretrained is None:
        return None
    named_twice = cfg.teacher.checkpoint != "auto" and base_weights_in_model(cfg)
    key = "teacher.checkpoint / model.qwen.pretrained" if named_twice else "model.qwen.pretrained"
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}: {pretrained} is not a directory (a diffusers model directory with "
                          "transformer/config.json and its safetensors is expected)")
    for cand in (root / "transformer", root):
        if (cand / "config.json").is_file():
            if not any(cand.glob("*.safetensors")):
                raise ConfigError(f"{key}: no .safetensors weights in {cand}")
            return cand
    raise ConfigError(f"{key}: no transformer config.json under {root} (nor {root / 'transformer'})")


def teacher_path(cfg: Config) -> Path:
    """Where the teacher weights are: the cache entry for ``auto``, else the configured path."""
    if cfg.teacher.checkpoint == "auto":
        from .auxiliary import cache_entry
        return cache_entry(cfg, kind="teacher", key=teacher_key(cfg)) / "weights.pt"
    return Path(cfg.teacher.checkpoint)


def train_teacher_model(cfg: Config, model: FlowModel, latents: torch.Tensor, labels: torch.Tensor,
                        *, null_label: int, progress: bool = True) -> FlowModel:
    """Flow matching with prompt dropout (so CFG works), AdamW with cosine decay, EMA weights returned."""
    tc = cfg.teacher
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.steps, eta_min=tc.lr * 0.01)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = latents.shape[0]
    for step in tqdm(range(1, tc.steps + 1), desc="teacher", disable=not progress, mininterval=2.0):
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - d) if v.is_floating_point() else ema[k].copy_(v)
    model.load_state_dict(ema)
    return model


def get_teacher(cfg: Config, *, progress: bool = True) -> Path | None:
    """Train (once, process-safe) and cache the teacher for ``cfg``; returns the weights path (the transformer
    directory, or None for a random-init architecture, where the model builder makes the base itself)."""
    from .auxiliary import train_or_load_file
    from .setup import build_setup

    if base_weights_in_model(cfg):
        # the base model is the pretrained transformer: nothing to train or cache
        return check_base_model_dir(cfg)
    path = teacher_path(cfg)
    if cfg.teacher.checkpoint != "auto":
        if not path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint: {path} does not exist")
        return path

    def make(dst: Path) -> None:
        setup = build_setup(cfg, device=torch.device("cpu"))
        data = setup.data
        torch.manual_seed(cfg.teacher.seed)
        model = build_model(cfg, latent_shape=data.latent_shape, num_classes=setup.num_classes)
        labels = data.train_cond["labels"]
        train_teacher_model(cfg, model, data.train_latents, labels, null_label=setup.num_classes, progress=progress)
        torch.save(model.state_dict(), dst)

    return train_or_load_file(path, make, key=teacher_key(cfg))

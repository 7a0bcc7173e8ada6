"""Model families: one ``ModelFamily`` entry per ``model.family`` value.

An entry says everything the trainer, the teacher cache and ``export`` need to know about a
family: how to build it, how to place it under FSDP2 (trainable, or a frozen no-grad copy),
whether its base weights come from the model itself (a pretrained model directory) rather than
a trained teacher file, how to read them sharded when no host holds a whole copy, and how to
export a run. Nothing outside this module branches on the family name: adding a family (Flux,
SD3, ...) is a ``FlowModel`` subclass in ``models/`` and one entry in ``FAMILIES``.

Heavy family modules (diffusers) are imported only when an entry's function runs, so reading
a config, planning a grid or checking a run directory never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import Config, ConfigError, ParallelConfig
from ..distributed.parallel import place_plain, shard_blocks_then_root, use_fsdp
from .base import FlowModel
from .mlp import MLPFlowModel


class Copies(NamedTuple):
    """The modules a run trains and reads: student, frozen base model, EMA target (or None)."""

    student: nn.Module
    teacher: nn.Module
    ema: nn.Module | None


def _never(cfg: Config) -> bool:
    return False


def _no_model_weights(cfg: Config) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    name: str
    """The ``model.family`` value."""
    build: Callable[..., FlowModel]
    """``(cfg, *, latent_shape, num_classes) -> FlowModel`` on the host, with the family's own pretrained
    weights loaded where the config names them."""
    parallelize: Callable[..., nn.Module]
    """``(model, mesh, par, *, frozen) -> module``: FSDP2 placement of a trainable model (``frozen=False``)
    or of a no-grad copy (base model, EMA target)."""
    fsdp_in_one_process: bool = False
    """``parallel.fsdp: auto`` wraps this family with FSDP2 even in one fp32 process."""
    base_weights_in_model: Callable[[Config], bool] = _never
    """Whether the base model is the model's own pretrained weights (no teacher file to train or load)."""
    check_weights: Callable[[Config], Path | None] = _no_model_weights
    """Preflight of the model's own weights named by the config (raises ``ConfigError`` naming the key);
    the directory they come from, or None."""
    sharded_copies: Callable[..., Copies | None] | None = None
    """``(cfg, *, mesh, device, latent_shape, with_ema) -> Copies``, each copy read sharded from the model's
    own weights (no host ever holds a whole one); None where this config builds its copies on a host.
    Used only where ``base_weights_in_model``."""
    export: Callable[..., Path | None] | None = None
    """``(cfg, *, run_dir, out, which, tt_mode, base_pipeline) -> Path`` (None on ranks > 0): a run's weights
    as a directory other tools load; None where the family has no export format."""
    teacher_dir_hint: str = "expected a weights file"
    """What ``teacher.checkpoint`` naming a directory means for this family (the preflight error)."""


# --------------------------------------------------------------------------- mlp (the embedded default)


def _build_mlp(cfg: Config, *, latent_shape: tuple[int, int, int], num_classes: int | None) -> FlowModel:
    if num_classes is None:
        raise ValueError("model.family 'mlp' needs the number of prompt classes")
    return MLPFlowModel(shape=latent_shape, num_classes=num_classes, hidden=cfg.model.hidden, depth=cfg.model.depth,
                        time_dim=cfg.model.time_dim, sign_embedding=cfg.model.sign_embedding)


def _parallelize_mlp(model: FlowModel, mesh: DeviceMesh, par: ParallelConfig, *, frozen: bool) -> nn.Module:
    return shard_blocks_then_root(model, model.shard_blocks(), mesh, par, frozen=frozen)


# --------------------------------------------------------------------------- qwen_image (diffusers)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _qwen_base_weights_in_model(cfg: Config) -> bool:
    """Qwen-Image takes its base weights from its model directory (diffusers ``from_pretrained`` layout,
    loaded by the model builder) when ``teacher.checkpoint`` is ``auto`` or names that same directory."""
    if cfg.teacher.checkpoint == "auto":
        return True
    pretrained = cfg.model.qwen.pretrained
    return pretrained is not None and _same_path(cfg.teacher.checkpoint, pretrained)


def check_qwen_model_dir(cfg: Config) -> Path | None:
    """The transformer directory the weights come from (checked: config.json and safetensors), or None for a
    random-init architecture (``model.qwen.tiny`` / class defaults)."""
    pretrained = cfg.model.qwen.pretrained
    if pretrained is None:
        return None
    named_twice = cfg.teacher.checkpoint != "auto" and _qwen_base_weights_in_model(cfg)
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


def _build_qwen(cfg: Config, *, latent_shape: tuple[int, int, int], num_classes: int | None) -> FlowModel:
    from .qwen_image import build_qwen_image  # lazy: optional dependency diffusers (the qwen extra)

    return build_qwen_image(cfg, latent_shape=latent_shape)


def _parallelize_qwen(model: FlowModel, mesh: DeviceMesh, par: ParallelConfig, *, frozen: bool) -> nn.Module:
    from .qwen_image import parallelize_qwen_image  # lazy: optional dependency diffusers (the qwen extra)

    return parallelize_qwen_image(model, mesh, par, frozen=frozen)  # type: ignore[arg-type]


def _qwen_sharded_copies(cfg: Config, *, mesh: DeviceMesh, device: torch.device, latent_shape: tuple[int, int, int],
                         with_ema: bool) -> Copies | None:
    if cfg.model.qwen.pretrained is None:
        return None  # a random-init architecture has nothing to read; the host path builds it
    from .qwen_image import build_sharded_copies  # lazy: optional dependency diffusers (the qwen extra)

    c = build_sharded_copies(cfg, mesh=mesh, device=device, latent_shape=latent_shape, with_ema=with_ema)
    return Copies(student=c.student, teacher=c.teacher, ema=c.ema)


def _export_qwen(cfg: Config, **kwargs: Any) -> Path | None:
    from ..run.export import export_qwen_image_run  # lazy: layer: run sits above models (LATE_BINDING)

    return export_qwen_image_run(cfg, **kwargs)


# --------------------------------------------------------------------------- the registry


FAMILIES: dict[str, ModelFamily] = {
    "mlp": ModelFamily(name="mlp", build=_build_mlp, parallelize=_parallelize_mlp),
    "qwen_image": ModelFamily(
        name="qwen_image", build=_build_qwen, parallelize=_parallelize_qwen,
        # its root keeps times fp32 and its base model is read sharded: one code path at every world size
        fsdp_in_one_process=True,
        base_weights_in_model=_qwen_base_weights_in_model, check_weights=check_qwen_model_dir,
        sharded_copies=_qwen_sharded_copies, export=_export_qwen,
        teacher_dir_hint="a Qwen-Image model directory is the base model only when model.qwen.pretrained "
                         "names the same directory"),
}


def model_family(cfg: Config) -> ModelFamily:
    try:
        return FAMILIES[cfg.model.family]
    except KeyError:
        raise ConfigError(f"model.family: unknown family {cfg.model.family!r}; "
                          f"valid: {', '.join(map(repr, FAMILIES))}") from None


def base_weights_in_model(cfg: Config) -> bool:
    """The base model is the model's own pretrained weights: no teacher file to train, cache or load."""
    return model_family(cfg).base_weights_in_model(cfg)


def build_model(cfg: Config, *, latent_shape: tuple[int, int, int], num_classes: int | None = None) -> FlowModel:
    return model_family(cfg).build(cfg, latent_shape=latent_shape, num_classes=num_classes)


def uses_fsdp(cfg: Config, *, world: int) -> bool:
    """Whether this run wraps its modules with FSDP2 (``parallel.fsdp`` and the family's answer)."""
    return use_fsdp(cfg.parallel, world=world, fsdp_in_one_process=model_family(cfg).fsdp_in_one_process)


def _place(model: FlowModel, mesh: DeviceMesh, cfg: Config, *, frozen: bool) -> nn.Module:
    if not uses_fsdp(cfg, world=mesh.size()):
        return place_plain(model, cfg.parallel, frozen=frozen)
    return model_family(cfg).parallelize(model, mesh, cfg.parallel, frozen=frozen)


def parallelize(model: FlowModel, mesh: DeviceMesh, cfg: Config) -> nn.Module:
    """Place the trainable model: the family's FSDP2 wrap, or the plain module where ``parallel.fsdp``
    does not ask for FSDP2 (``uses_fsdp``)."""
    return _place(model, mesh, cfg, frozen=False)


def place_frozen(model: FlowModel, mesh: DeviceMesh, cfg: Config) -> nn.Module:
    """Place a copy that is never optimised (base model, EMA target): no gradients, sharded like the student
    so local shards correspond (the EMA update lerps them), every unit resharded after its forward."""
    model.requires_grad_(False)
    return _place(model, mesh, cfg, frozen=True).eval()

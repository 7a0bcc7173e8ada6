"""Model factory: one builder and one ``parallelize_<family>`` per family."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import Config, ParallelConfig
from .base import Cond, FlowModel, cond_cat, cond_len, cond_rows
from .mlp import MLPFlowModel

__all__ = ["Cond", "FlowModel", "build_model", "parallelize", "cond_cat", "cond_len", "cond_rows"]


def build_model(cfg: Config, *, latent_shape: tuple[int, int, int], num_classes: int | None = None) -> FlowModel:
    if cfg.model.family == "mlp":
        if num_classes is None:
            raise ValueError("model.family 'mlp' needs the number of prompt classes")
        return MLPFlowModel(shape=latent_shape, num_classes=num_classes, hidden=cfg.model.hidden,
                            depth=cfg.model.depth, time_dim=cfg.model.time_dim,
                            sign_embedding=cfg.model.sign_embedding)
    if cfg.model.family == "qwen_image":
        from .qwen_image import build_qwen_image
        return build_qwen_image(cfg, latent_shape=latent_shape)
    raise ValueError(f"unknown model.family {cfg.model.family!r}")


def parallelize_mlp(model: MLPFlowModel, mesh: DeviceMesh, cfg: ParallelConfig) -> nn.Module:
    from ..parallel import shard_blocks_then_root
    return shard_blocks_then_root(model, model.shard_blocks(), mesh, cfg)


def parallelize(model: FlowModel, mesh: DeviceMesh, cfg: Config, *, frozen: bool = False) -> nn.Module:
    """Shard a trainable model (``frozen=False``) or a no-grad copy of one (EMA, base model);
    plain modules where ``parallel.fsdp`` does not ask for FSDP2 (``parallel.use_fsdp``)."""
    from ..parallel import place_plain, use_fsdp
    if not use_fsdp(cfg.parallel, family=cfg.model.family, world=mesh.size()):
        return place_plain(model, model.shard_blocks(), cfg.parallel, frozen=frozen)
    if frozen:
        from ..parallel import place_frozen
        if cfg.model.family == "qwen_image":
            from .qwen_image import place_frozen as place_frozen_qwen
            return place_frozen_qwen(model, mesh, cfg.parallel)
        return place_frozen(model, model.shard_blocks(), mesh, cfg.parallel)
    if cfg.model.family == "mlp":
        return parallelize_mlp(model, mesh, cfg.parallel)  # type: ignore[arg-type]
    if cfg.model.family == "qwen_image":
        from .qwen_image import parallelize_qwen_image
        return parallelize_qwen_image(model, mesh, cfg.parallel)
    raise ValueError(f"unknown model.family {cfg.model.family!r}")

"""Export a trained Qwen-Image student as a diffusers directory.

Layout::

    OUT/transformer/   TwinFlowQwenImageTransformer2DModel.save_pretrained (safetensors + config.json)
                       + twinflow_transformer.py, the class's own source (models/qwen_transformer.py)
    OUT/scheduler/     TwinFlowUCGMScheduler.save_pretrained (scheduler_config.json)
                       + twinflow_scheduler.py, the class's own source (method/scheduler.py)
    OUT/twinflow.json  what was exported: source run, sampler settings, target-time handling
    OUT/model_index.json, vae/, text_encoder/, tokenizer/   only with ``base_pipeline``: a complete
                       pipeline directory; the other components are hard-linked (copied across filesystems)

The target-time embedding E2 (``target_time_embed.*``) and the optional sign embedding
(``sign_embed``) live in the transformer's own state dict. Loading the folder with the
stock ``QwenImageTransformer2DModel`` works too (diffusers warns about, and ignores, those
keys); that model is the student at tt = t only. For 1-4 NFE sampling load the subclass,
which a full pipeline directory does by itself, through diffusers' own mechanism for custom
components: ``model_index.json`` names ``["twinflow_transformer", ...]`` and ``["twinflow_scheduler", ...]``,
modules that ship in the component folders, and diffusers imports them under ``trust_remote_code=True``.
The shipped files import only torch, numpy and diffusers, so a process that never imports this project
loads and samples the student::

    pipe = DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)
    image = pipe(prompt, num_inference_steps=2, true_cfg_scale=1.0).images[0]

The transformer's ``default_target_time`` makes the stock pipeline's calls use the
exported sampler's target time (``zero`` for tt_mode ``few``, ``same`` for ``mul``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..config import SamplerConfig
from ..data.shards import reference_latent_shape
from ..distributed import checkpoint as ckpt
from ..rundir import atomic_dir, best_weights, checkpoint_step, latest_checkpoint

ExportMode = Literal["few", "mul"]

#: (component folder, shipped module name): the module files diffusers imports under ``trust_remote_code``
TRANSFORMER_MODULE = ("transformer", "twinflow_transformer")
SCHEDULER_MODULE = ("scheduler", "twinflow_scheduler")


def _ship_module(module, folder: Path, name: str) -> None:
    """Copy ``module``'s source file into ``folder`` as ``name``.py (diffusers' custom-component layout)."""
    source = Path(module.__file__)
    shutil.copyfile(source, folder / f"{name}.py")


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict on rank 0 (None elsewhere); a collective under FSDP."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return sd


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def export_diffusers(model: nn.Module, out: str | Path, *, sampler: SamplerConfig, tt_mode: ExportMode | None = None,
                     base_pipeline: str | Path | None = None, source: dict | None = None) -> Path | None:
    """Write ``model`` (a QwenImageFlowModel, plain or FSDP-sharded) to ``out``; collective, rank 0 writes.

    ``tt_mode`` defaults to ``sampler.tt_mode``; ``any`` cannot be exported for a stock pipeline
    (it needs a per-step target time the pipeline does not pass) and is an error.
    """
    # lazy: optional dependency diffusers (the qwen extra)
    from ..method import scheduler as scheduler_module
    from ..method.scheduler import TwinFlowUCGMScheduler
    from ..models import qwen_transformer as transformer_module
    from ..models.qwen_image import QwenImageFlowModel, TwinFlowQwenImageTransformer2DModel

    inner = getattr(model, "transformer", None)
    if not isinstance(model, QwenImageFlowModel) or inner is None:
        raise TypeError(f"export_diffusers expects a QwenImageFlowModel, got {type(model).__name__}")
    mode = tt_mode or sampler.tt_mode
    if mode not in ("few", "mul"):
        raise ValueError(f"tt_mode {mode!r} cannot be exported for a diffusers pipeline (the pipeline passes no "
                         "per-step target time); export with tt_mode 'few' or 'mul'")
    out = Path(out)
    sd = _full_state_dict(model)
    if sd is None:
        return None
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new directory (nothing is overwritten)")
    with atomic_dir(out) as tmp:
        arch = {k: v for k, v in inner.config.items() if not k.startswith("_")}
        arch["default_target_time"] = {"few": "zero", "mul": "same"}[mode]
        with torch.device("meta"):
            export = TwinFlowQwenImageTransformer2DModel(**arch)
        prefix = "transformer."
        weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        export.load_state_dict(weights, strict=True, assign=True)  # strict: any missing or extra key is an error
        export.save_pretrained(str(tmp / "transformer"), safe_serialization=True, max_shard_size="5GB")
        scheduler = TwinFlowUCGMScheduler(gaps=tuple(sampler.gaps), kumaraswamy=tuple(sampler.kumaraswamy),
                                          stochastic_ratio=sampler.stochastic_ratio, tt_mode=mode)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        _ship_module(transformer_module, tmp / TRANSFORMER_MODULE[0], TRANSFORMER_MODULE[1])
        _ship_module(scheduler_module, tmp / SCHEDULER_MODULE[0], SCHEDULER_MODULE[1])
        if base_pipeline is not None:
            base = Path(base_pipeline)
            index_path = base / "model_index.json"
            if not index_path.is_file():
                raise FileNotFoundError(f"base pipeline {base} has no model_index.json")
            index = json.loads(index_path.read_text())
            for name, spec in index.items():
                if name.startswith("_") or name in ("transformer", "scheduler") or not isinstance(spec, list):
                    continue
                if spec[0] is not None and (base / name).is_dir():
                    _link_tree(base / name, tmp / name)
            index["transformer"] = [TRANSFORMER_MODULE[1], TwinFlowQwenImageTransformer2DModel.__name__]
            index["scheduler"] = [SCHEDULER_MODULE[1], TwinFlowUCGMScheduler.__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        info = {"tt_mode": mode, "default_target_time": arch["default_target_time"],
                "sampler": {"gaps": list(sampler.gaps), "kumaraswamy": list(sampler.kumaraswamy),
                            "stochastic_ratio": sampler.stochastic_ratio},
                "target_time_embedding": "transformer state dict keys target_time_embed.* (gated by t - tt)",
                "sign_embedding": "sign_embed" if inner.sign_embed is not None else None,
                "base_pipeline": str(Path(base_pipeline).resolve()) if base_pipeline is not None else None,
                "source": source or {}}
        (tmp / "twinflow.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def load_run_weights(cfg, run_dir: Path, *, which: Literal["final", "best", "ema"]) -> nn.Module:
    """Build the adapter for ``cfg`` on this host and load a run's weights into it (one process)."""
    from ..models.qwen_image import build_qwen_image  # lazy: optional dependency diffusers (the qwen extra)

    if cfg.data.dataset != "latent_shards":
        raise ValueError("export needs data.dataset 'latent_shards' (the null prompt and latent shape come from it)")
    model = build_qwen_image(cfg, latent_shape=reference_latent_shape(cfg.data.shards))
    run_dir = Path(run_dir)
    if which == "best":
        path = best_weights(run_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        ckpt.load_weights(path, model)
    elif which in ("final", "ema"):
        latest = latest_checkpoint(run_dir)
        if checkpoint_step(latest) is None:
            raise FileNotFoundError(f"{latest} holds no checkpoint")
        if which == "final":
            ckpt.load_checkpoint(latest, model=model, optimizer=None, extra_modules={})
        else:
            ema = copy.deepcopy(model)
            ckpt.load_checkpoint(latest, model=model, optimizer=None, extra_modules={"target": ema})
            model = ema
    else:
        raise ValueError(f"unknown which {which!r}; valid: 'final', 'best', 'ema'")
    return model


def export_qwen_image_run(cfg, *, run_dir: Path, out: Path, which: Literal["final", "best", "ema"],
                          tt_mode: ExportMode | None, base_pipeline: Path | None) -> Path | None:
    """The ``qwen_image`` family's export (``models.registry``): a run's weights as a diffusers directory."""
    model = load_run_weights(cfg, run_dir, which=which)
    return export_diffusers(model, out, sampler=cfg.sampler, tt_mode=tt_mode, base_pipeline=base_pipeline,
                            source={"run_dir": str(Path(run_dir).resolve()), "which": which})

"""Qwen-Image (diffusers' ``QwenImageTransformer2DModel``) behind the ``FlowModel`` interface.

Two layers:

* ``TwinFlowQwenImageTransformer2DModel`` (defined in ``qwen_transformer``, which imports only torch
  and diffusers so that ``export`` can ship it inside the exported directory): a subclass of the
  diffusers class that adds the gated target-time embedding of docs/method.md §1, ``temb = E1(t) + E2(tt) * (t - tt)``
  (+ an optional zero-initialised sign embedding where t < 0). It keeps the parent's
  forward signature (packed tokens, ``img_shapes``), so a stock ``QwenImagePipeline``
  can call it, and it is what ``export`` saves with ``save_pretrained``. At tt = t the
  gate is exactly zero and the output equals the parent class with the same weights.
* ``QwenImageFlowModel``: the trainer's ``F(x, t, tt, cond)`` on ``[B, C, H, W]``
  latents; it packs 2x2 patches, builds ``img_shapes`` and handles the prompt
  condition ``{"prompt_embeds": [B, L, D], "prompt_mask": [B, L]}``; the null condition
  is the pipeline's empty-prompt embedding.

Velocity convention: Qwen-Image is trained as rectified flow with
``x_t = sigma*noise + (1 - sigma)*x`` and its scheduler steps ``x += (sigma' - sigma)*out``,
so the transformer output is ``noise - x``, our ``v = z - x``; the pipeline feeds
``timestep = sigma`` (in [0, 1]; the sinusoid multiplies by 1000). No conversion is needed
(tested against diffusers' ``FlowMatchEulerDiscreteScheduler``).

Placement: ``parallelize_qwen_image`` (FSDP2 per block, then the root; ``frozen=True``
for the base model and the EMA target), and a meta-device path for models too
large for host memory: ``build_qwen_image(..., device="meta")`` ->
``parallelize_qwen_image`` -> ``materialize_qwen_image`` (``to_empty`` + every rank
reads only its own slice of each tensor from the safetensors files).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from diffusers import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks the base class up in this module)
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformer2DModel
from safetensors import safe_open

from ..distributed.parallel import shard_blocks_then_root
from .base import Cond, FlowModel
from .qwen_transformer import TwinFlowQwenImageTransformer2DModel

if TYPE_CHECKING:
    from ..config import Config, ParallelConfig

#: A tiny random-weight configuration of the same class (tests, CPU smoke runs).
TINY_CONFIG: dict[str, Any] = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


# --------------------------------------------------------------------------- packing


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), 4C], the token layout of QwenImagePipeline._pack_latents."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing (got {h}x{w})")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height x width``."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens into a {height}x{width} latent")
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)




def _last_block_text_outputs(transformer: QwenImageTransformer2DModel) -> list[tuple[str, nn.Parameter]]:
    last = transformer.transformer_blocks[-1]
    return [(f"{prefix}.{n}", p) for prefix, mod in (("attn.to_add_out", last.attn.to_add_out),
                                                      ("txt_mlp", last.txt_mlp)) for n, p in mod.named_parameters()]


def declared_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes named by the model's own ``_no_split_modules`` declaration."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its blocks")
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"{type(model).__name__}: no submodule of the declared block types {sorted(names)}")
    return tuple(sorted(found, key=lambda c: c.__name__))


# --------------------------------------------------------------------------- the FlowModel adapter


class QwenImageFlowModel(FlowModel):
    """F(x, t, tt, cond) on [B, C, H, W] latents for TwinFlow, over a TwinFlowQwenImageTransformer2DModel."""

    def __init__(self, transformer: TwinFlowQwenImageTransformer2DModel, *,
                 null_prompt_embeds: torch.Tensor | None):
        super().__init__()
        if not isinstance(transformer, TwinFlowQwenImageTransformer2DModel):
            raise TypeError(f"expected a TwinFlowQwenImageTransformer2DModel, got {type(transformer).__name__}")
        self.transformer = transformer
        self.block_types = declared_block_types(transformer)
        # The model returns only the image stream, so the last block's text-stream output projection and
        # text MLP never influence F. Frozen, they get no optimizer state (whose absence would otherwise
        # differ between a saved and a freshly initialised optimizer) and no weight decay.
        self.unused_parameters = [f"transformer.transformer_blocks.{len(transformer.transformer_blocks) - 1}.{n}"
                                  for n, _ in _last_block_text_outputs(transformer)]
        for _, p in _last_block_text_outputs(transformer):
            p.requires_grad_(False)
        self.latent_channels = transformer.config.in_channels // 4
        text_dim = transformer.config.joint_attention_dim
        if null_prompt_embeds is not None:
            if null_prompt_embeds.dim() != 2 or null_prompt_embeds.shape[1] != text_dim:
                raise ValueError(f"null_prompt_embeds must be [L, {text_dim}] (got {tuple(null_prompt_embeds.shape)})")
            null_prompt_embeds = null_prompt_embeds.detach().float().cpu()
        # data, not weights: a plain attribute keeps it out of state dicts, FSDP and the meta device
        self._null_prompt = null_prompt_embeds
        self._null_cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"x must be [B, {self.latent_channels}, H, W] (got {tuple(x.shape)})")
        b, _, h, w = x.shape
        embeds, mask = cond["prompt_embeds"], cond.get("prompt_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # unmasked attention keeps the fast SDPA kernels (this is a host sync, once per call)
        out = self.transformer(hidden_states=pack_latents(x), encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, timestep=t.to(x.dtype),
                               target_timestep=tt.to(x.dtype), img_shapes=[[(1, h // 2, w // 2)]] * b,
                               return_dict=False)[0]
        if not torch.is_grad_enabled():
            # FSDP2 keeps the last block gathered for a backward that a no-grad forward never runs;
            # reshard it now so parameters are shards again for the EMA update, checkpoints and loads
            _reshard_last_block(self)
        return unpack_latents(out, height=h, width=w).to(x.dtype)

    def enable_activation_checkpointing(self) -> None:
        """The transformer's forward checkpoints each block itself: it calls them with keyword arguments, and
        recomputation re-enters the block's FSDP2 hooks."""
        self.transformer.activation_checkpointing = True

    def null_cond(self, cond: Cond) -> Cond:
        """The empty prompt, zero-padded to the condition's text length (other keys copied)."""
        if self._null_prompt is None:
            raise ValueError("this QwenImageFlowModel was built without the empty-prompt embedding "
                             "(pass null_prompt_embeds, or build from shards that store it)")
        embeds = cond["prompt_embeds"]
        b, length = embeds.shape[0], embeds.shape[1]
        n = self._null_prompt.shape[0]
        if length < n:
            raise ValueError(f"prompt batch has {length} text tokens, fewer than the empty prompt's {n}; "
                             "pad prompt batches to at least the null length")
        null = self._null_cache.get(embeds.device)
        if null is None:
            null = self._null_cache.setdefault(embeds.device, self._null_prompt.to(embeds.device))
        out = dict(cond)
        padded = embeds.new_zeros((b, length, embeds.shape[2]))
        padded[:, :n] = null.to(embeds.dtype)
        mask = torch.zeros((b, length), dtype=torch.bool, device=embeds.device)
        mask[:, :n] = True
        out["prompt_embeds"], out["prompt_mask"] = padded, mask
        return out

    def init_target_time_embedding(self, mode: str, generator: torch.Generator | None = None) -> None:
        self.transformer.init_target_time_embedding(mode, generator)  # type: ignore[arg-type]

    @property
    def null_prompt_embeds(self) -> torch.Tensor | None:
        return self._null_prompt


# --------------------------------------------------------------------------- building and loading


def _transformer_dir(path: str | Path) -> Path:
    """A diffusers pipeline directory (its ``transformer/``) or the transformer directory itself."""
    p = Path(path)
    for cand in (p / "transformer", p):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(f"model.qwen.pretrained: no transformer config.json under {p} (nor {p / 'transformer'})")


def transformer_config(cfg: Config) -> dict[str, Any]:
    """Architecture of the transformer: the pretrained config, the tiny config, or the class defaults."""
    q = cfg.model.qwen
    if q.pretrained is not None and q.tiny:
        raise ValueError("model.qwen.tiny and model.qwen.pretrained are both set; choose one architecture source")
    if q.pretrained is not None:
        raw = json.loads((_transformer_dir(q.pretrained) / "config.json").read_text())
        ours = ("sign_embedding", "default_target_time")  # set from model.* below, not from an export's config
        arch = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ours}
    elif q.tiny:
        arch = dict(TINY_CONFIG)
    else:
        arch = {}  # the class defaults are Qwen-Image's architecture (60 blocks, 24 heads x 128, text dim 3584)
    if q.num_layers is not None:
        arch["num_layers"] = q.num_layers
    return arch


def build_qwen_image(cfg: Config, *, latent_shape: tuple[int, int, int],
                     null_prompt_embeds: torch.Tensor | None = None,
                     device: torch.device | str | None = None) -> QwenImageFlowModel:
    """The adapter for ``cfg.model``: pretrained weights (if ``model.qwen.pretrained``) or random init.

    ``device="meta"`` builds the structure only; call ``parallelize_qwen_image`` and then
    ``materialize_qwen_image`` to load sharded weights. The empty-prompt embedding comes from
    ``null_prompt_embeds`` or from ``data.shards`` (written there by ``twinflow-train encode``).
    """
    arch = transformer_config(cfg)
    if latent_shape[0] * 4 != arch.get("in_channels", 64):
        raise ValueError(f"latent_shape {tuple(latent_shape)} has {latent_shape[0]} channels but the transformer "
                         f"takes {arch.get('in_channels', 64)} packed channels (= 4 x latent channels)")
    if null_prompt_embeds is None and cfg.data.dataset == "latent_shards" and cfg.data.shards is not None:
        from ..data.shards import read_null_prompt  # lazy: layer: data sits above models (LATE_BINDING)
        null_prompt_embeds = read_null_prompt(cfg.data.shards)
    meta = device is not None and torch.device(device).type == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        transformer = TwinFlowQwenImageTransformer2DModel(**arch, sign_embedding=cfg.model.sign_embedding)
    model = QwenImageFlowModel(transformer, null_prompt_embeds=null_prompt_embeds)
    if not meta:
        if cfg.model.qwen.pretrained is not None:
            load_transformer_weights(transformer, cfg.model.qwen.pretrained)
        # E2 must equal its init whatever the source weights held, so the tt = t behaviour is the pretrained one
        transformer.init_target_time_embedding(cfg.model.tt_init, generator=torch.Generator().manual_seed(cfg.run.seed))
        if device is not None:
            model.to(device)
    return model


def _safetensors_index(directory: Path) -> dict[str, Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                index[key] = f
    return index


def _local_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The local tensor of ``param`` and the index of the global tensor it holds."""
    if isinstance(param, DTensor):
        # lazy: a private torch module, loaded only for a sharded parameter
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return param, tuple(slice(0, s) for s in param.shape)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(handle: Any) -> tuple[dict[str, Any], int]:
    """The JSON header of an open safetensors file and where its data starts."""
    handle.seek(0)
    size = int.from_bytes(handle.read(8), "little")
    return json.loads(handle.read(size)), 8 + size


def _read_rows(handle: Any, info: dict[str, Any], data_start: int, idx: tuple[slice, ...],
               local: torch.Tensor) -> bool:
    """Read a slice of whole rows (dim 0 of a row-major tensor: what FSDP2 holds) straight from the file into
    ``local`` with one positioned read of exactly its bytes; False where the slice is not whole rows."""
    shape = info["shape"]
    if not idx or any((s.start, s.stop) != (0, n) for s, n in zip(idx[1:], shape[1:])):
        return False
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    handle.seek(data_start + info["data_offsets"][0] + idx[0].start * row_bytes)
    if local.device.type == "cpu" and local.dtype == dtype and local.is_contiguous():
        buffer = local.view(torch.uint8).reshape(-1).numpy()  # the parameter's own memory: no copy
        if handle.readinto(buffer) != buffer.nbytes:
            raise ValueError(f"{handle.name}: file ends inside a tensor")
        return True
    raw = bytearray(local.numel() * dtype.itemsize)
    if handle.readinto(raw) != len(raw):
        raise ValueError(f"{handle.name}: file ends inside a tensor")
    local.copy_(torch.frombuffer(raw, dtype=dtype).view(local.shape))
    return True


@torch.no_grad()
def load_transformer_weights(transformer: TwinFlowQwenImageTransformer2DModel, path: str | Path) -> dict[str, int]:
    """Load diffusers safetensors weights into ``transformer`` (plain or FSDP-sharded).

    Each rank reads only the slice of each tensor it holds: FSDP2 shards are whole rows, read with one
    positioned read each straight into the parameter (no mapping of the file, whose page-granular faults
    would touch neighbouring rows); any other slice through safetensors' own slicing. A sharded model
    therefore never materialises the full weights on one host. Keys for blocks beyond ``num_layers`` are
    skipped; the TwinFlow-only parameters (target-time and sign embeddings) may be absent from a stock
    checkpoint.
    """
    directory = _transformer_dir(path)
    index = _safetensors_index(directory)
    optional = ("target_time_embed.", "sign_embed")
    wanted = dict(transformer.named_parameters())
    wanted.update(dict(transformer.named_buffers()))
    missing = [k for k in wanted if k not in index and not k.startswith(optional)]
    if missing:
        raise KeyError(f"{directory}: weights missing for {len(missing)} tensors, e.g. {missing[:5]}")
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        if k in index:
            by_file.setdefault(index[k], []).append(k)
    for f, keys in by_file.items():
        with open(f, "rb") as handle:
            header, data_start = _safetensors_header(handle)
            others = []
            for k in keys:
                if tuple(header[k]["shape"]) != tuple(wanted[k].shape):
                    raise ValueError(f"{f}: {k} has shape {tuple(header[k]['shape'])}, "
                                     f"model expects {tuple(wanted[k].shape)}")
                local, idx = _local_slice(wanted[k])
                if local.numel() and not _read_rows(handle, header[k], data_start, idx, local):
                    others.append(k)
        if others:
            with safe_open(str(f), framework="pt") as h:
                for k in others:
                    local, idx = _local_slice(wanted[k])
                    src = h.get_slice(k)
                    local.copy_(src[idx] if idx else src[:])
    return {"loaded": sum(len(v) for v in by_file.values()), "skipped": len(set(index) - set(wanted))}


def materialize_qwen_image(model: QwenImageFlowModel, *, device: torch.device | str, pretrained: str | Path,
                           tt_init: str, seed: int = 0) -> QwenImageFlowModel:
    """Meta-device path: allocate (sharded) storage, load each rank's weight slices, init E2."""
    tr = model.transformer
    model.to_empty(device=device)
    # the RoPE tables are plain attributes built at __init__ (meta tensors there); rebuild them for real
    tr.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(tr.config.axes_dims_rope), scale_rope=True)
    load_transformer_weights(tr, pretrained)
    tr.init_target_time_embedding(tt_init, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return model


@dataclass
class ShardedCopies:
    student: QwenImageFlowModel
    teacher: QwenImageFlowModel
    """The frozen base model (also the target under ``method.target: frozen``)."""
    ema: QwenImageFlowModel | None
    """The EMA target (``method.target: ema``), else None."""


def build_sharded_copies(cfg: Config, *, mesh: DeviceMesh, device: torch.device | str,
                         latent_shape: tuple[int, int, int], with_ema: bool,
                         base_in_compute_dtype: bool = True) -> ShardedCopies:
    """Student, frozen base and EMA target, each built on the meta device, sharded, then materialised from
    ``model.qwen.pretrained``: every rank reads only its slices of each tensor from the memory-mapped
    safetensors, so host memory per rank is O(params / world) per copy and no full copy of the base model
    ever exists on a host (a 20B model is 80 GB in fp32; three host copies per rank would not fit).

    Under ``parallel.mixed_precision: bf16`` the frozen base stores its shards in bf16
    (``base_in_compute_dtype``, default): FSDP2 would round its fp32 shards to bf16 before every all-gather
    anyway, and the weights are loaded (rounded) once instead, so its outputs are bit-identical at half the
    memory. The EMA target stays fp32 (the EMA update accumulates into it), as does the student."""
    pretrained = cfg.model.qwen.pretrained
    if pretrained is None:
        raise ValueError("build_sharded_copies needs model.qwen.pretrained (the weights to materialise from)")

    def one(*, frozen: bool, dtype: torch.dtype | None = None) -> QwenImageFlowModel:
        model = build_qwen_image(cfg, latent_shape=latent_shape, device="meta")
        if frozen:
            model.requires_grad_(False)
        if dtype is not None:
            for p in model.parameters():  # parameters only: the adapter's data (null prompt, RoPE) stays as built
                p.data = p.data.to(dtype)
        model = parallelize_qwen_image(model, mesh, cfg.parallel, frozen=frozen)
        model = materialize_qwen_image(model, device=device, pretrained=pretrained, tt_init=cfg.model.tt_init,
                                       seed=cfg.run.seed)
        return model.eval() if frozen else model

    bf16_base = base_in_compute_dtype and cfg.parallel.mixed_precision == "bf16"
    teacher = one(frozen=True, dtype=torch.bfloat16 if bf16_base else None)
    student = one(frozen=False)
    return ShardedCopies(student=student, teacher=teacher, ema=one(frozen=True) if with_ema else None)


# --------------------------------------------------------------------------- placement


def parallelize_qwen_image(model: QwenImageFlowModel, mesh: DeviceMesh, cfg: ParallelConfig, *,
                           frozen: bool = False) -> QwenImageFlowModel:
    """``parallel.shard_blocks_then_root`` over the declared blocks, with a root that casts no inputs:
    the adapter casts them itself, so times and the tt gate stay fp32 (bf16 cannot resolve t - tt near t = 1).

    The last block of a trainable model keeps its parameters after a forward with grad (backward
    needs them first); after a no-grad forward the adapter reshards it itself. A ``frozen`` copy
    (base model, EMA target) reshards every block.
    """
    if not isinstance(model, QwenImageFlowModel):
        raise TypeError(f"parallelize_qwen_image expects a QwenImageFlowModel, got {type(model).__name__}")
    return shard_blocks_then_root(model, model.shard_blocks(), mesh, cfg, frozen=frozen, cast_root_inputs=False)


def compile_blocks(model: QwenImageFlowModel, **compile_kwargs: Any) -> QwenImageFlowModel:
    """``torch.compile`` every transformer block in place (``nn.Module.compile``: the module object, its FSDP2
    hooks and activation checkpointing stay outside the compiled region). Numerics equal the eager blocks
    (tested with the ``aot_eager`` backend on CPU)."""
    for block in model.transformer.transformer_blocks:
        block.compile(**compile_kwargs)
    return model


def _reshard_last_block(model: QwenImageFlowModel) -> None:
    last = model.transformer.transformer_blocks[-1]
    if isinstance(last, FSDPModule):
        last.reshard()


def flops_per_token(config: dict[str, Any] | Any, *, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward per image token (2 x MACs), for MFU estimates.

    Per block and token: img and txt streams each have q, k, v, out (4 D^2), an MLP
    (2 x 4 D^2) and a 6D modulation per sample (ignored); joint attention adds
    2 x 2 x S x D per token over the joint sequence S.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    d = get("num_attention_heads", 24) * get("attention_head_dim", 128)
    layers = get("num_layers", 60)
    s = image_tokens + text_tokens
    linear_per_token = 2 * 12 * d * d  # 4 attn projections + 8 D^2 MLP (4x expansion, two matrices)
    attn_per_token = 2 * 2 * s * d
    total = layers * (s * linear_per_token + s * attn_per_token)
    total += image_tokens * 2 * (get("in_channels", 64) * d + d * 4 * get("out_channels", 16))
    total += text_tokens * 2 * get("joint_attention_dim", 3584) * d
    return total / image_tokens


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

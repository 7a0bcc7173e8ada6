"""Per-rank GPU memory plan of a Qwen-Image run, from meta tensors: no weights, no GPU.

``twinflow-train plan --config CONFIG [overrides] --world N --gpu-mem-gib M`` (and ``twinflow-lab grid plan``
for every arm of a matrix). The transformer is diffusers' class built on the meta device with the run's
architecture (the model directory's ``config.json``, or ``--arch qwen-image``: the published Qwen-Image
configuration, 60 blocks x 3072 wide, text dim 3584, which are the class defaults). What a rank holds under
the trainer's placement (FSDP2 per block, fp32 master weights, ``parallel.mixed_precision`` compute):

- sharded (FSDP2 splits every tensor along dim 0, padded): fp32 master weights, fp32 gradients, AdamW's two
  fp32 moments (trainable parameters only), the EMA target (``method.target: ema``) and the frozen base
  model (always built: the teacher of the comparison samples, and the target under ``frozen``; in bf16
  under bf16 compute when it is read sharded from the model directory, as the trainer stores it);
- gathered compute copies: the root's own parameters for the whole step, plus three blocks at once (the one
  running, the one prefetched, and the last block, kept for backward) with ``reshard_after_forward``, else
  every block; one block's unsharded gradient (compute dtype, then fp32 for the reduce-scatter) in backward;
- activations of the one forward with grad, at the per-rank micro-batch (``data.batch_size / (world x
  grad_accum)``) and the configured image size and prompt length. Measured, not modelled: the real model
  runs forward on meta tensors and every tensor autograd saves for backward is counted (storages once,
  parameters excluded). Attention is counted as flash attention saves it (q, k, v, output, fp32 log-sum-exp),
  which is what SDPA runs on a GPU at these sizes, not the S x S matrix of the math fallback. With
  activation checkpointing a block keeps only its inputs, and one block's activations exist again while it
  is recomputed in backward (the backward phases only). The no-grad target forwards keep nothing between
  blocks;
- RL arms (``rl.enabled``): the reward model and the VAE (fp32, replicated on every rank, as the trainer
  loads them; frozen, as the trainer freezes the codec) and, for ``rl.estimator: exact``, the peak of the
  decode with its backward from the reward to the latents, for the e2e rows of the micro-batch (the rows
  whose one-step output the reward scores), in ``rl.decoder_dtype``. The trainer's decode
  (``decoder="checkpointed"``, ``models/qwen_decode.py``) keeps each decoder segment's input; while
  segment s is back-propagated, the inputs of segments 0..s, s's recomputed saved tensors and two
  gradient buffers of s's largest map (in a half-precision decode three fp32 ones: the RMS norms
  normalise in fp32) are live: the peak is the max over s. The plain ``vae.decode``
  (``decoder="plain"``, for comparison) keeps every saved tensor plus its ``feat_cache`` clones of the
  causal-conv inputs (not saved tensors: they live until the decode returns) and the output. Saved
  tensors and cache clones are measured on meta tensors like the transformer's. The HPSv2 scorer (open_clip
  ViT-H-14) is counted from its architecture; its activations at 224 px use the 16-bit transformer
  estimate ``s*b*h*(34 + 5*a*s/h)`` bytes per layer (Korthikanti et al., 2022) at fp32 (x2) with flash
  attention (the ``a*s/h`` term dropped).

Phases. Not everything is live at once, so the plan adds each item only to the phases where it lives and
reports the peak of each; the binding phase is the largest:

- ``forward``: at the end of the grad forward, while the RL term takes the reward gradient (decoder and
  reward activations); the transformer's gradients exist only with ``data.grad_accum`` > 1 (the earlier
  micro-batches' sum; the trainer starts every step with ``.grad`` = None);
- ``backward``: the gradient set, the activations, the recomputed block and one block's unsharded
  gradients (all of them at once: a bound, since backward frees activations as gradients land);
- ``split forward`` / ``split backward`` (RL arms: every log step, and every step under ``rl.clip:
  param`` with ``grad_accum`` > 1; with one micro-batch that clip is applied in place; ``run/grads.py``):
  the RL term's gradient is stashed while the TwinFlow backward fills a fresh ``.grad``, so with
  ``rl.grad_stash: device`` a second sharded fp32 gradient set is live in the backward (and, with
  ``grad_accum`` > 1, in the later micro-batches' forwards); ``host`` keeps it off the device.

"Fits" means the binding phase fits, leaving ``headroom`` (default 10%) of the card for the CUDA context,
NCCL buffers, allocator fragmentation and kernel workspaces, which no tensor count sees.
``MemoryPlan.sum_all`` is the old bound that adds every item.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ..config import Config, ConfigError
from ..models.qwen_decode import decoder_segments

GIB = 2**30
Arch = Literal["config", "qwen-image"]
#: the Qwen-Image VAE's spatial factor and the transformer's 2x2 packing: image pixels per token side
PIXELS_PER_TOKEN_SIDE = 16
VAE_FACTOR = 8

#: open_clip ViT-H-14 (the HPSv2 scorer): vision and text towers
VIT_H_14 = dict(embed_dim=1024, image_size=224, patch_size=14, vision_width=1280, vision_layers=32,
                vision_heads=16, text_width=1024, text_layers=24, context_length=77, vocab_size=49408)


PHASES = ("forward", "backward", "split forward", "split backward")
ALL_PHASES = frozenset(PHASES)
BACKWARD = frozenset({"backward", "split backward"})
FORWARD = frozenset({"forward", "split forward"})
Decoder = Literal["checkpointed", "plain"]


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    note: str = ""
    phases: frozenset[str] = ALL_PHASES
    """The phases (``PHASES``) in which it is live."""


@dataclass(frozen=True)
class MemoryPlan:
    world: int
    gpu_mem_gib: float
    headroom: float
    params: int
    """Parameters of the transformer (student), TwinFlow's target-time embedding included."""
    trainable: int
    micro_batch: int
    image: tuple[int, int]
    text_tokens: int
    checkpointing: bool
    items: list[PlanItem]
    activations: dict[str, int] = field(default_factory=dict)
    """Grad-forward activations with and without checkpointing (``ckpt``, ``no_ckpt``), for the table."""
    warnings: list[str] = field(default_factory=list)
    phase_names: tuple[str, ...] = ("forward", "backward")
    """The phases this run has (the split ones for RL arms only)."""

    @property
    def phases(self) -> dict[str, int]:
        """Peak bytes of each phase."""
        return {ph: sum(i.bytes for i in self.items if ph in i.phases) for ph in self.phase_names}

    @property
    def binding(self) -> str:
        """The phase with the largest peak."""
        ph = self.phases
        return max(self.phase_names, key=lambda k: ph[k])

    @property
    def total(self) -> int:
        """Peak bytes per rank: the binding phase's."""
        return self.phases[self.binding]

    @property
    def sum_all(self) -> int:
        """Every item added, whatever its phase (a bound: some never coexist)."""
        return sum(i.bytes for i in self.items)

    @property
    def budget(self) -> int:
        return int(self.gpu_mem_gib * GIB * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def as_dict(self) -> dict[str, Any]:
        return {"world": self.world, "gpu_mem_gib": self.gpu_mem_gib, "headroom": self.headroom,
                "params": self.params, "trainable": self.trainable, "micro_batch": self.micro_batch,
                "image": f"{self.image[0]}x{self.image[1]}", "text_tokens": self.text_tokens,
                "checkpointing": self.checkpointing, "items": {i.name: i.bytes for i in self.items},
                "item_phases": {i.name: sorted(i.phases) for i in self.items},
                "activations": self.activations, "phases": self.phases, "binding": self.binding,
                "total": self.total, "sum_all": self.sum_all, "budget": self.budget, "fits": self.fits,
                "warnings": self.warnings}

    def table(self) -> str:
        lines = [f"params {self.params / 1e9:.2f} B ({self.trainable / 1e9:.2f} B trainable); world {self.world}; "
                 f"micro-batch {self.micro_batch} rows/rank at {self.image[0]}x{self.image[1]} + "
                 f"{self.text_tokens} text tokens; checkpointing {'on' if self.checkpointing else 'off'}",
                 f"{'per rank':<44} {'GiB':>9}  note"]
        short = {"forward": "F", "backward": "B", "split forward": "sF", "split backward": "sB"}
        lines += [f"{i.name:<44} {i.bytes / GIB:>9.2f}  "
                  f"[{' '.join(short[p] for p in self.phase_names if p in i.phases)}] {i.note}".rstrip()
                  for i in self.items]
        ph = self.phases
        lines += [f"{'peak: ' + p:<44} {ph[p] / GIB:>9.2f}  {'binding' if p == self.binding else ''}".rstrip()
                  for p in self.phase_names]
        lines.append(f"{'total (binding phase)':<44} {self.total / GIB:>9.2f}  budget {self.budget / GIB:.1f} GiB "
                     f"({self.gpu_mem_gib:g} GiB less {self.headroom:.0%} headroom): "
                     f"{'FITS' if self.fits else 'DOES NOT FIT'}; every item added: {self.sum_all / GIB:.2f}")
        other = "no_ckpt" if self.checkpointing else "ckpt"
        lines.append(f"(grad-forward activations with checkpointing {'off' if self.checkpointing else 'on'}: "
                     f"{self.activations[other] / GIB:.2f} GiB)")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- counting on meta tensors


class _FlashAttentionStandIn(torch.autograd.Function):
    """SDPA as flash attention saves it for backward: q, k, v, the output and the fp32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # pragma: no cover - never run: only forwards are counted
        raise RuntimeError("the memory plan's attention stand-in has no backward")


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or is_causal or dropout_p:
        raise ValueError("the memory plan counts unmasked, non-causal attention only")
    return _FlashAttentionStandIn.apply(query, key, value)


@contextmanager
def _flash_attention() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def saved_activation_bytes(module: nn.Module, run: Any) -> int:
    """Bytes autograd keeps for backward while ``run()`` does one forward with grad (each storage once, over
    the byte range its saved views span; the module's parameters not at all); works on meta tensors, so
    nothing is allocated. Counting spans, not whole storages, keeps a small view of a large constant table
    (the RoPE frequencies) from counting as the table."""
    param_storages = {p.untyped_storage()._cdata for p in module.parameters()}
    spans: dict[int, tuple[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_storages and t.numel():
            size = t.element_size()
            start = t.storage_offset() * size
            end = start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * size
            lo, hi = spans.get(key, (start, end))
            spans[key] = (min(lo, start), max(hi, end))
        return t

    with torch.enable_grad(), _flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(hi - lo for lo, hi in spans.values())


# --------------------------------------------------------------------------- the transformer


def _architecture(cfg: Config, arch: Arch) -> dict[str, Any]:
    from ..models.qwen_image import transformer_config  # lazy: optional dependency diffusers (the qwen extra)

    if arch == "qwen-image":
        out: dict[str, Any] = {}  # the class defaults are Qwen-Image's published configuration
        if cfg.model.qwen.num_layers is not None:
            out["num_layers"] = cfg.model.qwen.num_layers
        return out
    if arch != "config":
        raise ValueError(f"unknown arch {arch!r}; valid: 'config', 'qwen-image'")
    try:
        return transformer_config(cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; use --arch qwen-image to plan with the published Qwen-Image configuration") from None


def meta_transformer(cfg: Config, *, arch: Arch = "config", dtype: torch.dtype = torch.float32):
    """The run's ``QwenImageFlowModel`` on the meta device (structure and shapes only)."""
    # lazy: optional dependency diffusers (the qwen extra)
    from ..models.qwen_image import QwenImageFlowModel, TwinFlowQwenImageTransformer2DModel

    with torch.device("meta"):
        tf = TwinFlowQwenImageTransformer2DModel(**_architecture(cfg, arch), sign_embedding=cfg.model.sign_embedding)
    return QwenImageFlowModel(tf.to(dtype), null_prompt_embeds=None)


def sharded_bytes(tensors: list[torch.Tensor] | Iterator[torch.Tensor], *, world: int, bytes_per: int) -> int:
    """Bytes of the largest (rank-0) FSDP2 shard of these tensors: dim 0 split in ceil(n / world) rows."""
    total = 0
    for t in tensors:
        rows = t.shape[0] if t.dim() else 1
        total += math.ceil(rows / world) * (t.numel() // max(rows, 1)) * bytes_per
    return total


def _transformer_activations(model, *, rows: int, image: tuple[int, int], text_tokens: int,
                             checkpointing: bool, dtype: torch.dtype) -> tuple[int, int]:
    """(activation bytes of one grad forward of the whole model, of one block), at ``rows`` rows; with
    checkpointing the first excludes the block recomputed in backward."""
    tf = model.transformer
    h, w = image[0] // VAE_FACTOR, image[1] // VAE_FACTOR
    latent_channels = tf.config.in_channels // 4
    text_dim = tf.config.joint_attention_dim

    def inputs():
        x = torch.empty(rows, latent_channels, h, w, device="meta", dtype=dtype)
        t = torch.empty(rows, device="meta")
        cond = {"prompt_embeds": torch.empty(rows, text_tokens, text_dim, device="meta", dtype=dtype)}
        return x, t, cond

    def whole():
        x, t, cond = inputs()
        model(x, t, t, cond)

    # blocks and the rest separately: one block with its real inputs, the model with its blocks skipped
    block = tf.transformer_blocks[0]
    d = tf.inner_dim
    img_tokens = (h // 2) * (w // 2)

    def one_block():
        from ..models.qwen_image import QwenEmbedRope  # lazy: optional dependency diffusers (the qwen extra)
        rope = QwenEmbedRope(theta=10000, axes_dim=list(tf.config.axes_dims_rope), scale_rope=True)
        freqs = rope([[(1, h // 2, w // 2)]] * rows, max_txt_seq_len=text_tokens, device="cpu")
        freqs = tuple(f.to("meta") for f in freqs)
        block(hidden_states=torch.empty(rows, img_tokens, d, device="meta", dtype=dtype),
              encoder_hidden_states=torch.empty(rows, text_tokens, d, device="meta", dtype=dtype),
              encoder_hidden_states_mask=None, temb=torch.empty(rows, d, device="meta", dtype=dtype),
              image_rotary_emb=freqs)

    per_block = saved_activation_bytes(block, one_block)
    blocks = tf.transformer_blocks
    tf.transformer_blocks = nn.ModuleList()
    try:
        rest = saved_activation_bytes(model, whole)
    finally:
        tf.transformer_blocks = blocks
    n = len(blocks)
    if not checkpointing:
        return rest + n * per_block, per_block
    # each block keeps its inputs (the image and text streams in the compute dtype, and temb); one block's
    # activations exist again while it is recomputed in backward (the plan's "recomputed block" item)
    elem = torch.empty((), dtype=dtype).element_size()
    kept = rows * (img_tokens + text_tokens + 1) * d * elem
    return rest + n * kept, per_block


# --------------------------------------------------------------------------- RL: reward model and VAE


def vit_params(*, embed_dim: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
               vision_heads: int, text_width: int, text_layers: int, context_length: int, vocab_size: int) -> int:
    """Parameters of an open_clip CLIP model with a ViT image tower (pre-norm blocks, 4x MLP)."""
    del vision_heads

    def layer(w: int) -> int:  # in_proj 3w^2 + 3w, out_proj w^2 + w, 2 LayerNorms 4w, MLP 8w^2 + 5w
        return 12 * w * w + 13 * w

    tokens = (image_size // patch_size) ** 2 + 1
    vision = (vision_layers * layer(vision_width) + 3 * patch_size ** 2 * vision_width + vision_width
              + tokens * vision_width + 4 * vision_width + vision_width * embed_dim)
    text = (text_layers * layer(text_width) + vocab_size * text_width + context_length * text_width
            + 2 * text_width + text_width * embed_dim)
    return vision + text + 1  # + logit_scale


def vit_activation_bytes(*, rows: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
                         bytes_per: int = 4, **_: Any) -> int:
    """Grad-forward activations of the image tower: ``34*s*b*h`` 16-bit bytes per layer (flash attention),
    scaled to ``bytes_per``."""
    s = (image_size // patch_size) ** 2 + 1
    return vision_layers * 34 * s * rows * vision_width * bytes_per // 2


def _vae(cfg: Config):
    """The run's VAE on the meta device, frozen as the trainer freezes the codec (a trainable one would also
    save the norm outputs that only its weight gradients need)."""
    from diffusers import AutoencoderKLQwenImage  # lazy: optional dependency diffusers (the qwen extra)

    path = cfg.codec.path
    with torch.device("meta"):
        if path is not None and Path(path).is_dir():
            from ..models.qwen_vae import vae_dir  # lazy: optional dependency diffusers (the qwen extra)
            config = AutoencoderKLQwenImage.load_config(str(vae_dir(path)))
            vae = AutoencoderKLQwenImage.from_config(config)
        else:
            vae = AutoencoderKLQwenImage()  # the class defaults are the Qwen-Image VAE
    return vae.eval().requires_grad_(False)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def feat_cache_bytes(vae: nn.Module, z: torch.Tensor) -> int:
    """Bytes of the ``feat_cache`` clones a plain ``vae.decode`` of the one-frame clip ``z`` holds until it
    returns (counted from the cache itself after the decoder ran; works on meta tensors)."""
    vae.clear_cache()
    try:
        with torch.no_grad():
            vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])
        seen: dict[int, int] = {}
        for t in vae._feat_map:
            if isinstance(t, torch.Tensor):
                seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return sum(seen.values())
    finally:
        vae.clear_cache()


def decode_peak_bytes(vae: nn.Module, z: torch.Tensor, *, decoder: Decoder) -> dict[str, int]:
    """Peak live bytes of a decode of ``z [B, C, 1, h, w]`` and its backward to ``z`` (module docstring), and
    its parts: ``saved`` (plain: every saved tensor; checkpointed: all kept segment inputs),
    ``kept_at_peak`` (checkpointed: the inputs still kept while the binding segment is back-propagated),
    ``cache`` (plain: the ``feat_cache`` clones), ``segment`` (checkpointed: the binding segment's
    recomputed saved tensors and its gradient buffers), ``output`` and ``peak``. Meta tensors work (nothing is allocated)."""
    if decoder == "plain":
        zz = z.detach().requires_grad_(True)
        box: dict[str, torch.Tensor] = {}
        saved = saved_activation_bytes(vae, lambda: box.setdefault("out", vae.decode(zz).sample))
        cache = feat_cache_bytes(vae, z)
        out = _nbytes(box["out"])
        # the cache lives until decode returns; backward starts after it is gone (saved + gradients then)
        return {"saved": saved, "kept_at_peak": saved, "cache": cache, "segment": 0, "output": out,
                "peak": saved + cache + out}
    if decoder != "checkpointed":
        raise ValueError(f"unknown decoder {decoder!r}; valid: 'checkpointed', 'plain'")
    x = z.detach()
    kept = peak = binding = kept_then = 0
    for _, fn in decoder_segments(vae):
        xin = x.detach().requires_grad_(True)
        box = {}
        seg = saved_activation_bytes(vae, lambda: box.setdefault("y", fn(xin)))
        y = box["y"]
        kept += _nbytes(x)  # checkpoint keeps this segment's input until its backward is done
        # + two gradient buffers of its largest map; in a half-precision decode the RMS norms normalise in
        # fp32, so their backward holds three fp32 maps (the incoming gradient, the normalise's and its cast)
        n = max(x.numel(), y.numel())
        here = seg + (2 * n * x.element_size() if x.element_size() >= 4 else 3 * n * 4)
        if kept + here > peak:
            peak, binding, kept_then = kept + here, here, kept
        x = y.detach()
    return {"saved": kept, "kept_at_peak": kept_then, "cache": 0, "segment": binding, "output": _nbytes(x),
            "peak": peak}


def _rl_items(cfg: Config, *, micro: int, image: tuple[int, int], decoder: Decoder) -> list[PlanItem]:
    if cfg.rl.reward != "hpsv2":
        raise ConfigError(f"rl.reward: the memory plan knows the 'hpsv2' scorer only (got {cfg.rl.reward!r})")
    if cfg.rl.hpsv2_arch != "ViT-H-14":
        raise ConfigError(f"rl.hpsv2_arch: the memory plan knows 'ViT-H-14' only (got {cfg.rl.hpsv2_arch!r})")
    vae = _vae(cfg)
    # lazy: the method (~15 ms): '--help' imports this module for the plan's arguments
    from ..method.twinflow import group_sizes

    e2e_rows = micro if cfg.method.layout == "tutorial" else group_sizes(batch=micro, ratios=cfg.method.group_ratios)[0]
    items = [PlanItem("reward model (HPSv2 ViT-H-14, fp32)", 4 * vit_params(**VIT_H_14), "replicated"),
             PlanItem("VAE (fp32)", 4 * sum(p.numel() for p in vae.parameters()), "replicated")]
    reward_act = vit_activation_bytes(rows=e2e_rows, **VIT_H_14)
    if cfg.rl.estimator == "exact":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.rl.decoder_dtype]
        if dtype != torch.float32:
            dec = [vae.post_quant_conv, vae.decoder]
            items.append(PlanItem(f"VAE decoder copy ({cfg.rl.decoder_dtype})",
                                  2 * sum(p.numel() for m in dec for p in m.parameters()), "rl.decoder_dtype"))
            vae = vae.to(dtype)
        h, w = image[0] // VAE_FACTOR, image[1] // VAE_FACTOR
        z = torch.empty(e2e_rows, vae.config.z_dim, 1, h, w, device="meta", dtype=dtype)
        d = decode_peak_bytes(vae, z, decoder=decoder)
        parts = (f"kept block inputs {d['kept_at_peak'] / GIB:.2f} + binding block {d['segment'] / GIB:.2f}"
                 if decoder == "checkpointed" else
                 f"saved {d['saved'] / GIB:.2f} + feat_cache {d['cache'] / GIB:.2f} + output {d['output'] / GIB:.2f}")
        items.append(PlanItem(f"RL: decode + backward ({decoder}, {cfg.rl.decoder_dtype})", d["peak"],
                              f"{e2e_rows} e2e row(s) at {image[0]}x{image[1]}: {parts}", FORWARD))
    items.append(PlanItem("RL: reward activations", reward_act, f"{e2e_rows} row(s) at 224 px", FORWARD))
    return items


# --------------------------------------------------------------------------- live bytes of real tensors


class LiveBytes:
    """Live and peak bytes of the tensors that ops create while it is active (a ``TorchDispatchMode``):
    every op's new outputs are recorded by storage and dropped once the storage is freed; tensors that
    existed before (weights, inputs) and their views are not counted, nor a kernel's internal workspaces. For checking the plan
    against real tensors on CPU: ``with LiveBytes() as live: ...; live.peak``."""

    def __init__(self) -> None:
        # lazy: private torch modules, loaded only when live bytes are traced
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        live: dict[int, tuple[Any, int]] = {}
        probe = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # a view or an in-place result shares an input's storage: it allocates nothing
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in inputs and (key not in live or live[key][0].expired()):
                            live[key] = (StorageWeakRef(st), st.nbytes())
                for k in [k for k, (ref, _) in live.items() if ref.expired()]:
                    del live[k]
                probe.current = sum(n for _, n in live.values())
                probe.peak = max(probe.peak, probe.current)
                return out

        self._mode = _Mode()
        self.current = 0
        self.peak = 0

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


# --------------------------------------------------------------------------- the plan


def reference_image(cfg: Config) -> tuple[int, int] | None:
    """The largest bucket (most tokens) of ``data.shards``'s manifest, or None where there is no manifest."""
    if cfg.data.shards is None:
        return None
    manifest = Path(cfg.data.shards) / "manifest.json"
    if not manifest.is_file():
        return None
    buckets = json.loads(manifest.read_text())["buckets"]
    ref = max(buckets, key=lambda b: b["height"] * b["width"])
    return int(ref["height"]), int(ref["width"])


def plan_memory(cfg: Config, *, world: int, gpu_mem_gib: float, image: tuple[int, int] | None = None,
                text_tokens: int = 256, arch: Arch = "config", headroom: float = 0.1,
                decoder: Decoder = "checkpointed") -> MemoryPlan:
    """Per-rank memory of ``cfg`` on ``world`` GPUs of ``gpu_mem_gib`` each (module docstring)."""
    if cfg.model.family != "qwen_image":
        raise ConfigError(f"model.family: the memory plan is for 'qwen_image' (got {cfg.model.family!r})")
    if world < 1:
        raise ValueError(f"world must be >= 1 (got {world})")
    if not gpu_mem_gib > 0:
        raise ValueError(f"gpu_mem_gib must be > 0 (got {gpu_mem_gib})")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1) (got {headroom})")
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1 (got {text_tokens})")
    if decoder not in ("checkpointed", "plain"):
        raise ValueError(f"unknown decoder {decoder!r}; valid: 'checkpointed', 'plain'")
    per_step = world * cfg.data.grad_accum
    if cfg.data.batch_size % per_step:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) does not split into world ({world}) x "
                          f"data.grad_accum ({cfg.data.grad_accum}) micro-batches")
    micro = cfg.data.batch_size // per_step
    image = image or reference_image(cfg)
    if image is None:
        raise ConfigError(f"data.shards: no manifest at {cfg.data.shards} to read the image size from; "
                          "give the size (--image HxW)")
    if image[0] % PIXELS_PER_TOKEN_SIDE or image[1] % PIXELS_PER_TOKEN_SIDE:
        raise ValueError(f"image {image[0]}x{image[1]}: height and width must be multiples of "
                         f"{PIXELS_PER_TOKEN_SIDE} (VAE factor 8 x 2x2 patches)")
    par = cfg.parallel
    compute = torch.bfloat16 if par.mixed_precision == "bf16" else torch.float32
    c = torch.empty((), dtype=compute).element_size()

    model = meta_transformer(cfg, arch=arch)
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    blocks = list(model.transformer.transformer_blocks)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    root_params = sum(p.numel() for p in params if id(p) not in block_ids)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    shard = sharded_bytes(params, world=world, bytes_per=4)
    shard_trainable = sharded_bytes(trainable, world=world, bytes_per=4)
    gathered_blocks = 3 if par.reshard_after_forward else len(blocks)

    act, recompute = {}, {}
    compute_model = model.to(compute)  # meta: a change of dtype allocates nothing
    for ckpt in (True, False):
        key = "ckpt" if ckpt else "no_ckpt"
        act[key], per_block = _transformer_activations(
            compute_model, rows=micro, image=image, text_tokens=text_tokens, checkpointing=ckpt, dtype=compute)
        recompute[key] = per_block if ckpt else 0
    mine = "ckpt" if par.activation_checkpointing else "no_ckpt"
    accumulating = cfg.data.grad_accum > 1  # .grad holds the earlier micro-batches' sum during a forward
    grad_phases = ALL_PHASES if accumulating else BACKWARD

    # the frozen base read sharded from the model directory stores bf16 shards under bf16 compute
    # (models/qwen_image.py build_sharded_copies: bit-identical outputs); a host-built base stays fp32
    from ..models.registry import model_family  # lazy: the registry loads FSDP (~1 s): '--help' imports this module

    family = model_family(cfg)
    bf16_base = (compute == torch.bfloat16 and family.base_weights_in_model(cfg)
                 and family.sharded_copies is not None)
    base_item = (PlanItem("frozen base model (bf16, sharded)", sharded_bytes(params, world=world, bytes_per=2),
                          "teacher samples; target under 'frozen'; stored in the compute dtype")
                 if bf16_base else
                 PlanItem("frozen base model (fp32, sharded)", shard, "teacher samples; target under 'frozen'"))
    items = [
        PlanItem("parameters (fp32 master, sharded)", shard, f"{len(params)} tensors / {world}"),
        PlanItem("gradients (fp32, sharded)", shard_trainable, "" if accumulating else
                 "backward only: .grad is None until the step's backward (grad_accum 1)", grad_phases),
        PlanItem("AdamW moments (2 x fp32, sharded)", 2 * shard_trainable),
        base_item,
    ]
    if cfg.method.target == "ema":
        items.append(PlanItem("EMA target (fp32, sharded)", shard))
    items += [
        PlanItem(f"compute copies ({str(compute).removeprefix('torch.')}, gathered)",
                 c * (root_params + gathered_blocks * block_params),
                 f"root + {gathered_blocks} block(s) of {block_params / 1e6:.0f} M"),
        PlanItem("unsharded grads of one block", (c + 4) * block_params, "backward, before reduce-scatter", BACKWARD),
        PlanItem("activations (grad forward)", act[mine],
                 f"{'checkpointed: block inputs' if par.activation_checkpointing else 'every block'}; "
                 f"{per_block / GIB:.2f} GiB per block"),
    ]
    if recompute[mine]:
        items.append(PlanItem("recomputed block (backward)", recompute[mine], "activation checkpointing", BACKWARD))
    phase_names: tuple[str, ...] = ("forward", "backward")
    if cfg.rl.enabled:
        items += _rl_items(cfg, micro=micro, image=image, decoder=decoder)
        # split steps: the RL term's gradient is stashed while the TwinFlow backward fills a fresh .grad
        # (rl.grad_stash 'host': in host memory, nothing on the device)
        if cfg.rl.grad_stash == "device":
            items.append(PlanItem("RL gradient stash (fp32, sharded)", shard_trainable,
                                  "split steps (log steps; rl.clip 'param' with grad_accum > 1)",
                                  frozenset({"split backward"} | ({"split forward"} if accumulating else set()))))
        phase_names = PHASES
    warnings = []
    if cfg.method.layout == "partitioned":
        # lazy: the method (~15 ms): '--help' imports this module for the plan's arguments
        from ..method.twinflow import GROUPS, group_sizes

        empty = [g for g, n, r in zip(GROUPS, group_sizes(batch=micro, ratios=cfg.method.group_ratios),
                                      cfg.method.group_ratios) if n == 0 and r > 0]
        if empty:  # each rank partitions its own micro-batch: too few rows drop whole TwinFlow terms
            warnings.append(f"a micro-batch of {micro} row(s) per rank leaves the {', '.join(empty)} group(s) empty; "
                            f"raise data.batch_size to {world * cfg.data.grad_accum * len(GROUPS)} or more")
    return MemoryPlan(world=world, gpu_mem_gib=gpu_mem_gib, headroom=headroom,
                      params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
                      micro_batch=micro, image=image, text_tokens=text_tokens,
                      checkpointing=par.activation_checkpointing, items=items, activations=act,
                      warnings=warnings, phase_names=phase_names)


def parse_image(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image must look like HEIGHTxWIDTH, e.g. 1328x1328 (got {text!r})") from None
    return h, w


def add_plan_arguments(p: Any) -> None:
    """Options shared by ``twinflow-train plan`` and ``twinflow-lab grid plan``."""
    p.add_argument("--world", type=int, required=True, help="GPUs (ranks) of the run")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU in GiB (H100 80 GB = 74.5, "
                   "H200 141 GB = 131.3)")
    p.add_argument("--image", type=parse_image, default=None, help="HxW of the reference bucket (default: the "
                   "largest bucket of data.shards' manifest)")
    p.add_argument("--text-tokens", type=int, default=256, help="prompt embedding length (default 256)")
    p.add_argument("--arch", choices=("config", "qwen-image"), default="config", help="architecture: the model "
                   "directory's config.json, or the published Qwen-Image configuration (no model directory needed)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of the card kept free (default 0.1)")
    p.add_argument("--decoder", choices=("checkpointed", "plain"), default="checkpointed", help="the exact "
                   "estimator's decode: the trainer's checkpointed cache-free one (default), or a plain vae.decode "
                   "(for comparison); its precision is rl.decoder_dtype")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_from_args(cfg: Config, args: Any) -> MemoryPlan:
    return plan_memory(cfg, world=args.world, gpu_mem_gib=args.gpu_mem_gib, image=args.image,
                       text_tokens=args.text_tokens, arch=args.arch, headroom=args.headroom,
                       decoder=args.decoder)


__all__ = ["MemoryPlan", "PlanItem", "PHASES", "plan_memory", "saved_activation_bytes", "sharded_bytes",
           "meta_transformer", "vit_params", "decode_peak_bytes", "feat_cache_bytes", "LiveBytes",
           "add_plan_arguments", "plan_from_args"]

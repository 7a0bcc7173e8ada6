"""The Qwen-Image VAE (diffusers' ``AutoencoderKLQwenImage``) as the latent codec.

Latents at the codec boundary are normalised per channel exactly as QwenImagePipeline
does: ``(z - latents_mean) / latents_std`` on encode and the inverse before decode,
so the transformer sees the same distribution it was trained on. The VAE is a video
VAE: images travel as one-frame clips ``[B, C, 1, H, W]`` inside this class only.

Both directions are differentiable (no ``no_grad`` inside): the exact RL gradient
flows from a reward on pixels back through ``decode``. diffusers clamps decoded pixels
to [-1, 1], so saturated pixels pass no gradient. ``grad_decode`` is the same function for the exact
reward gradient, run without the causal cache and with every decoder block checkpointed
(``models/qwen_decode.py``: bitwise the same gradient, a fraction of the memory), optionally with a
bf16 copy of the decoder (an approximation, ``rl.decoder_dtype``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from diffusers import AutoencoderKLQwenImage
from diffusers.pipelines import pipeline_utils

from .qwen_decode import decode_single_frame


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained`` dtype keyword: ``dtype`` where diffusers accepts it (it deprecates ``torch_dtype``)."""
    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def vae_dir(path: str | Path) -> Path:
    """A pipeline directory (its ``vae/``) or the VAE directory itself."""
    p = Path(path)
    for cand in (p / "vae", p):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(f"codec.path: no VAE config.json under {p} (nor {p / 'vae'})")


class QwenVAECodec(nn.Module):
    """encode(pixels in [-1, 1], [B, 3, H, W]) -> normalised latents [B, C, H/s, W/s]; decode the inverse."""

    def __init__(self, vae: AutoencoderKLQwenImage, *, image_size: tuple[int, int] | None = None):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.scale_factor = 2 ** len(cfg.temperal_downsample)
        if len(cfg.latents_mean) != self.latent_channels or len(cfg.latents_std) != self.latent_channels:
            raise ValueError(f"VAE latents_mean/std have {len(cfg.latents_mean)}/{len(cfg.latents_std)} entries, "
                             f"z_dim is {self.latent_channels}")
        c = self.latent_channels
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        self.image_size = tuple(image_size) if image_size is not None else None
        if self.image_size is not None:
            self.latent_shape_for(*self.image_size)  # validates divisibility now, not at first use

    @classmethod
    def from_pretrained(cls, path: str | Path, *, image_size: tuple[int, int] | None = None,
                        dtype: torch.dtype = torch.float32) -> "QwenVAECodec":
        vae = AutoencoderKLQwenImage.from_pretrained(str(vae_dir(path)), **dtype_kwarg(dtype))
        return cls(vae.eval(), image_size=image_size)

    # ---- the codec interface

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Latent shape of the reference image size (the codec serves every bucket; see ``latent_shape_for``)."""
        if self.image_size is None:
            raise ValueError("QwenVAECodec built without image_size has no single latent_shape; use latent_shape_for")
        return self.latent_shape_for(*self.image_size)

    def latent_shape_for(self, height: int, width: int) -> tuple[int, int, int]:
        step = 2 * self.scale_factor  # the transformer packs 2x2 latent patches
        if height % step or width % step:
            raise ValueError(f"image size {height}x{width} must be divisible by {step} "
                             f"(VAE factor {self.scale_factor} x 2x2 patches)")
        return (self.latent_channels, height // self.scale_factor, width // self.scale_factor)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean (deterministic), normalised; fp32 out whatever the VAE's dtype."""
        if pixels.dim() != 4 or pixels.shape[1] != self.vae.config.input_channels:
            raise ValueError(f"pixels must be [B, {self.vae.config.input_channels}, H, W] (got {tuple(pixels.shape)})")
        self.latent_shape_for(pixels.shape[-2], pixels.shape[-1])
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(dtype).unsqueeze(2)).latent_dist
        z = posterior.mode()[:, :, 0].float()
        return (z - self.latents_mean) / self.latents_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1], fp32."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w] (got {tuple(latents.shape)})")
        dtype = next(self.vae.parameters()).dtype
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(dtype).unsqueeze(2)).sample[:, :, 0].float()

    def grad_decode(self, latents: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``decode`` for a backward to the latents: single frame, no ``feat_cache``, each decoder block under
        ``torch.utils.checkpoint``. ``dtype`` float32 is exactly ``decode``'s function and gradient for an fp32
        VAE; bfloat16 runs a bf16 copy of ``post_quant_conv`` and the decoder (made once per device; an
        approximation of the fp32 gradient). fp32 pixels out."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w] (got {tuple(latents.shape)})")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"grad_decode dtype must be torch.float32 or torch.bfloat16 (got {dtype})")
        z = latents.float() * self.latents_std + self.latents_mean
        vae = self.vae
        if dtype != next(vae.decoder.parameters()).dtype:
            vae = self._decoder_copy(dtype, z.device)
        return decode_single_frame(vae, z.to(dtype).unsqueeze(2))[:, :, 0].float()

    def _decoder_copy(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        key = (dtype, device)
        cache = self.__dict__.setdefault("_decoder_copies", {})  # not a submodule: no state_dict entries
        if key not in cache:
            holder = nn.Module()
            holder.post_quant_conv = copy.deepcopy(self.vae.post_quant_conv)
            holder.decoder = copy.deepcopy(self.vae.decoder)
            cache[key] = holder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cache[key]

    def config_fingerprint(self) -> dict:
        """What must agree between the VAE that encoded shards and the one decoding them."""
        cfg = self.vae.config
        return {"z_dim": int(cfg.z_dim), "scale_factor": self.scale_factor,
                "latents_mean": [float(v) for v in cfg.latents_mean],
                "latents_std": [float(v) for v in cfg.latents_std]}

"""Latent codecs: the map between pixels and the latents the flow model works on.

``encode`` and ``decode`` are plain differentiable fp32 functions, so the
reward gradient can flow from pixels back to latents (docs/method.md §5, exact estimator).
The flow model's noise is N(0, I), so a codec hands out latents that are
roughly zero-mean and unit-variance per channel.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..progress import progress_range


class Codec(nn.Module):
    """Pixels ``[B, C, H, W]`` in [-1, 1] <-> latents ``[B, *latent_shape]``."""

    latent_shape: tuple[int, int, int]
    """Shape of one latent (channels, height, width)."""
    pixel_shape: tuple[int, int, int]
    """Shape of one image (channels, height, width)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor, shape: tuple[int, int, int], what: str) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"{type(self).__name__}.{what}: expected [B, {', '.join(map(str, shape))}], "
                             f"got {list(x.shape)}")


class IdentityCodec(Codec):
    """Pixel space: the latents are the images themselves."""

    def __init__(self, *, pixel_shape: tuple[int, int, int] = (1, 8, 8)):
        super().__init__()
        self.pixel_shape = tuple(pixel_shape)  # type: ignore[assignment]
        self.latent_shape = self.pixel_shape

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check(pixels, self.pixel_shape, "encode")
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_shape, "decode")
        return latents


class DigitsAutoencoder(Codec):
    """A small conv autoencoder, 8x8x1 pixels <-> ``[latent_channels, 4, 4]`` latents.

    ``encode`` returns the raw code standardised by per-channel statistics that
    are measured on the training split after fitting (buffers ``latent_mean`` and
    ``latent_std``, saved with the weights); ``decode`` undoes the
    standardisation first. The decoder's output layer is linear, not tanh: a
    saturating output would make the pixel-to-latent gradient vanish on the
    background (most of a digit), which is exactly where reward guidance must be
    able to draw. Decoded pixels are therefore on the [-1, 1] scale up to
    reconstruction error, not clipped to it.
    """

    def __init__(self, *, latent_channels: int, hidden: int):
        super().__init__()
        if latent_channels < 1 or hidden < 4:
            raise ValueError(f"latent_channels must be >= 1 and hidden >= 4 (got {latent_channels}, {hidden})")
        self.pixel_shape = (1, 8, 8)
        self.latent_shape = (latent_channels, 4, 4)
        h, q = hidden, max(hidden // 4, 4)
        # The wide layers sit at 4x4 and are 1x1 / 2x2 / 3x3-from-C only; the 3x3 convs
        # on 8x8 maps are narrow (q channels). On CPU a step of convs this small is
        # dominated by per-layer overhead, so few layers is what keeps the fit to
        # seconds on 2 cores; the latent (C*16 values for 64 pixels) still
        # reconstructs almost exactly.
        self.encoder = nn.Sequential(
            nn.Conv2d(1, q, 3, padding=1), nn.SiLU(),
            nn.Conv2d(q, h, 2, stride=2), nn.SiLU(),                 # 8x8 -> 4x4, non-overlapping 2x2 cells
            nn.Conv2d(h, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, h, 3, padding=1), nn.SiLU(),  # mixes neighbouring latent cells
            nn.ConvTranspose2d(h, q, 2, stride=2), nn.SiLU(),        # 4x4 -> 8x8
            nn.Conv2d(q, 1, 3, padding=1),
        )
        self.register_buffer("latent_mean", torch.zeros(1, latent_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, latent_channels, 1, 1))

    # raw (unnormalised) maps, used while fitting
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def decode_raw(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check(pixels, self.pixel_shape, "encode")
        return (self.encode_raw(pixels.float()) - self.latent_mean) / self.latent_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_shape, "decode")
        return self.decode_raw(latents.float() * self.latent_std + self.latent_mean)

    @torch.no_grad()
    def set_latent_stats(self, pixels: torch.Tensor, *, batch: int = 1024) -> None:
        """Measure per-channel mean/std of the raw code on ``pixels`` (the training split)."""
        code = torch.cat([self.encode_raw(pixels[i:i + batch].float()) for i in range(0, pixels.shape[0], batch)])
        mean = code.mean(dim=(0, 2, 3), keepdim=True)
        std = code.std(dim=(0, 2, 3), keepdim=True)
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError(f"autoencoder latent statistics are degenerate "
                             f"(std per channel: {std.flatten().tolist()})")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, then restore the previous count.

    Every op of these tiny networks takes tens of microseconds, so a second
    thread only adds synchronisation; on a shared 2-core machine the spin-waiting
    threads made a fit about ten times slower than one thread (measured).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_autoencoder(model: DigitsAutoencoder, images: torch.Tensor, *, steps: int, lr: float, seed: int,
                    batch_size: int = 32, latent_noise: float = 0.1, progress: bool | None = None) -> list[float]:
    """Fit ``model`` to reconstruct ``images`` (MSE), then set its latent statistics.

    During fitting the decoder sees the code plus Gaussian noise of
    ``latent_noise`` times the batch's code scale: generated latents are never
    exact encodings, and a decoder trained only on exact ones can map small
    latent errors to large pixel errors. A tiny L2 penalty on the code keeps its
    scale from drifting (the noise would otherwise be escaped by inflating it).
    Returns the per-step reconstruction losses.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)
    n = images.shape[0]
    losses: list[float] = []
    model.train()
    with single_thread():
        for _ in progress_range(steps, desc="codec (autoencoder)", progress=progress):
            x = images[torch.randint(0, n, (min(batch_size, n),), generator=gen)]
            code = model.encode_raw(x)
            scale = code.detach().std().clamp_min(1e-6)
            noisy = code + latent_noise * scale * torch.randn(code.shape, generator=gen)
            recon = F.mse_loss(model.decode_raw(noisy), x)
            loss = recon + 1e-4 * code.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(recon.detach()))
        model.eval()
        model.set_latent_stats(images)
    return losses


@torch.no_grad()
def reconstruction_mse(codec: Codec, images: torch.Tensor, *, batch: int = 1024) -> float:
    """Mean squared pixel error of ``decode(encode(images))``."""
    total = 0.0
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        total += float((codec.decode(codec.encode(x)) - x).pow(2).sum())
    return total / images.numel()

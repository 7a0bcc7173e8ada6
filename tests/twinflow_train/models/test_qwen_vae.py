"""The Qwen-Image VAE codec: normalisation as the pipeline does it, shapes, differentiability."""

from __future__ import annotations

import pytest
import torch

from twinflow_train.models.qwen_vae import QwenVAECodec

from ..test_qwen_fixtures import LATENT_CHANNELS, tiny_vae


def test_encode_normalises_like_the_pipeline_and_decode_inverts_it():
    vae = tiny_vae()
    codec = QwenVAECodec(vae, image_size=(16, 24))
    assert codec.latent_shape == (LATENT_CHANNELS, 8, 12)
    pixels = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        lat = codec.encode(pixels)
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        assert torch.allclose(lat, (raw - mean) / std, atol=1e-6)
        # decode applies the inverse before the VAE decoder, as QwenImagePipeline does after sampling
        ref = vae.decode((lat * std + mean).unsqueeze(2)).sample[:, :, 0]
        assert torch.allclose(codec.decode(lat), ref, atol=1e-6)
    assert lat.shape == (2, LATENT_CHANNELS, 8, 12) and lat.dtype == torch.float32


def test_decode_is_differentiable_with_respect_to_latents():
    codec = QwenVAECodec(tiny_vae()).requires_grad_(False)
    lat = torch.randn(1, LATENT_CHANNELS, 4, 4, requires_grad=True)
    img = codec.decode(lat)
    assert img.shape == (1, 3, 8, 8)
    img.square().sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    # finite-difference check of one latent entry (the exact RL gradient goes through this path)
    eps = 1e-3
    with torch.no_grad():
        bumped = lat.detach().clone()
        bumped[0, 1, 2, 3] += eps
        fd = (codec.decode(bumped).square().sum() - codec.decode(lat.detach()).square().sum()) / eps
    assert fd.item() == pytest.approx(lat.grad[0, 1, 2, 3].item(), rel=0.05, abs=1e-3)


def test_bad_sizes_fail_with_the_reason():
    codec = QwenVAECodec(tiny_vae())
    with pytest.raises(ValueError, match="divisible by 4"):
        codec.latent_shape_for(10, 16)
    with pytest.raises(ValueError, match="no single latent_shape"):
        codec.latent_shape
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(torch.randn(1, LATENT_CHANNELS + 1, 4, 4))


def test_loads_from_a_pipeline_directory(tmp_path):
    vae = tiny_vae(seed=3)
    vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    codec = QwenVAECodec.from_pretrained(tmp_path / "pipe", image_size=(8, 8))
    assert codec.config_fingerprint()["latents_std"] == pytest.approx(list(vae.config.latents_std))
    with pytest.raises(FileNotFoundError, match="codec.path"):
        QwenVAECodec.from_pretrained(tmp_path / "nowhere")

import pytest
import torch

from twinflow_train.assets.auxiliary import get_codec
from twinflow_train.models.codecs import DigitsAutoencoder, IdentityCodec, fit_autoencoder, reconstruction_mse
from twinflow_train.config import load_config
from twinflow_train.data.digits import load_digits_split

FIT_STEPS = 600  # a shortened fit; the default codec.steps is checked in test_auxiliary's slow test


@pytest.fixture(scope="module")
def split():
    return load_digits_split(val_fraction=0.1, split_seed=0)


@pytest.fixture(scope="module")
def fitted(split):
    torch.manual_seed(11)
    model = DigitsAutoencoder(latent_channels=4, hidden=64)
    losses = fit_autoencoder(model, split.train_images, steps=FIT_STEPS, lr=2e-3, seed=11, progress=False)
    return model, losses


def test_identity_codec_round_trip_and_shape_check():
    codec = IdentityCodec()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert codec.latent_shape == (1, 8, 8)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        codec.encode(torch.zeros(5, 64))


def test_autoencoder_shapes_and_gradient_to_latents():
    model = DigitsAutoencoder(latent_channels=3, hidden=16)
    assert model.latent_shape == (3, 4, 4)
    lat = model.encode(torch.zeros(2, 1, 8, 8))
    assert lat.shape == (2, 3, 4, 4)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = model.decode(z)
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.float32
    (g,) = torch.autograd.grad(out.square().sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="decode"):
        model.decode(torch.zeros(2, 4, 4, 4))


def test_fitted_autoencoder_reconstructs_held_out_digits(fitted, split):
    model, losses = fitted
    assert losses[-1] < losses[0] / 10
    val_mse = reconstruction_mse(model, split.val_images)
    # the data's own variance is ~0.5: the error is a small fraction of it on unseen digits
    assert val_mse < 0.015, val_mse
    assert val_mse < 0.05 * float(split.val_images.var())


def test_latents_are_standardised_on_unseen_data(fitted, split):
    model, _ = fitted
    with torch.no_grad():
        lat = model.encode(split.val_images)
        # the statistics were measured on the training split only
        train_lat = model.encode(split.train_images)
    per_channel_mean = lat.mean(dim=(0, 2, 3))
    per_channel_std = lat.std(dim=(0, 2, 3))
    assert per_channel_mean.abs().max() < 0.2
    assert ((per_channel_std > 0.8) & (per_channel_std < 1.25)).all(), per_channel_std
    assert torch.allclose(train_lat.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(train_lat.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    # decode undoes the standardisation: the buffers travel with the weights
    assert set(model.state_dict()) >= {"latent_mean", "latent_std"}


def test_decoder_is_tolerant_to_small_latent_errors(fitted, split):
    model, _ = fitted
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lat = model.encode(split.val_images)
        noisy = model.decode(lat + 0.1 * torch.randn(lat.shape, generator=gen))
    assert float((noisy - split.val_images).pow(2).mean()) < 2.5 * reconstruction_mse(model, split.val_images) + 0.01


def test_get_codec_kinds(tmp_path):
    ident = get_codec(load_config(None, ["codec.kind=identity", f"aux.cache_dir={tmp_path}"]))
    assert isinstance(ident, IdentityCodec)
    with pytest.raises(ValueError, match=r"qwen_vae.*twinflow_train\.models\.qwen_vae"):
        get_codec(load_config(None, ["codec.kind=qwen_vae", f"aux.cache_dir={tmp_path}"]))
    assert list(tmp_path.iterdir()) == []  # neither kind trains or writes anything


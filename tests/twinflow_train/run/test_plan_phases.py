"""The memory plan against real tensors on CPU (tiny configs): decoder saved tensors, live bytes of the
decode with its backward, gradient sets of a split step; and the plan's phases at the real scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinflow_train.models.qwen_decode import decode_single_frame
from twinflow_train.run.grads import TermGradients
from twinflow_train.run.plan import GIB, LiveBytes, decode_peak_bytes, saved_activation_bytes, sharded_bytes

from ..models.test_qwen_decode import tiny_vae_3d


def _vae(device: str = "cpu"):
    """A tiny VAE wide enough that its maps, not per-op overheads, dominate (base_dim 16, factor 4)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, True])
    return vae.eval().requires_grad_(False)


def _measure(vae, z: torch.Tensor, *, checkpointed: bool | None) -> int:
    """Peak live bytes of the decode of z and autograd.grad to z (None: plain vae.decode)."""
    zz = z.clone().requires_grad_(True)
    with LiveBytes() as live:
        out = vae.decode(zz).sample if checkpointed is None else decode_single_frame(vae, zz, checkpointed=checkpointed)
        (g,) = torch.autograd.grad(out.sum(), zz)
    assert g.abs().sum() > 0
    return live.peak


def test_live_bytes_counts_what_ops_create_while_alive():
    with LiveBytes() as live:
        a = torch.ones(1000, 1000)  # 4 MB
        b = torch.ones(2000, 1000)  # 8 MB
        del a
        c = b * 2  # 8 MB while b lives
    assert live.peak == 16_000_000 and c.sum() > 0


@pytest.mark.parametrize("decoder,dtype", [("plain", torch.float32), ("checkpointed", torch.float32),
                                           ("plain", torch.bfloat16), ("checkpointed", torch.bfloat16)])
def test_plan_decode_peak_matches_live_bytes_of_real_tensors(decoder, dtype):
    real, meta = _vae().to(dtype), _vae("meta").to(dtype)
    z = torch.randn(1, 4, 1, 24, 20).to(dtype)
    plan = decode_peak_bytes(meta, z.to("meta"), decoder=decoder)
    measured = _measure(real, z, checkpointed=None if decoder == "plain" else True)
    assert plan["peak"] == pytest.approx(measured, rel=0.10), (plan, measured)
    if decoder == "plain" and dtype == torch.float32:
        # saved tensors of the frozen VAE, counted on real tensors, are the plan's (E1: no weight-gradient saves)
        zz = z.clone().requires_grad_(True)
        assert saved_activation_bytes(real, lambda: real.decode(zz)) == plan["saved"]
        trainable = _vae().requires_grad_(True)
        assert saved_activation_bytes(trainable, lambda: trainable.decode(zz)) > 1.1 * plan["saved"]
        assert plan["cache"] > 0.1 * plan["saved"]  # E2: the feat_cache clones are real and not saved tensors


def test_checkpointed_decode_needs_a_fraction_of_the_plain_one():
    vae = _vae()
    z = torch.randn(1, 4, 1, 24, 24)
    plain, ckpt = _measure(vae, z, checkpointed=None), _measure(vae, z, checkpointed=True)
    cache_free = _measure(vae, z, checkpointed=False)
    assert ckpt < 0.45 * plain and cache_free < plain  # without the cache clones, and checkpointed


class _Stack(nn.Module):
    """Weights dominate: four 256x256 layers and a one-row input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("split", [False, True])
def test_a_split_step_holds_two_gradient_sets(split):
    torch.manual_seed(0)
    model = _Stack()
    one_set = sharded_bytes([p for p in model.parameters()], world=1, bytes_per=4)
    terms = TermGradients(model)
    x = torch.randn(1, 256)
    terms.start(split=split)
    with LiveBytes() as live:
        y = model(x)
        terms.backward(twinflow=y.square().mean(), rl=0.5 * y.mean())
    terms.finish()
    sets = 2 if split else 1  # the plan's "gradients" item, plus its "RL gradient stash" on split steps
    assert live.peak == pytest.approx(sets * one_set, rel=0.10), (live.peak, one_set)


def test_decode_peak_of_the_real_vae_on_meta_tensors():
    from twinflow_train.run.plan import _vae as plan_vae
    from twinflow_train.config import load_config

    vae = plan_vae(load_config(None, ["model.family=qwen_image", "codec.kind=qwen_vae"]))
    assert not any(p.requires_grad for p in vae.parameters())
    z = torch.empty(1, 16, 1, 166, 166, device="meta")
    plain = decode_peak_bytes(vae, z, decoder="plain")
    ckpt = decode_peak_bytes(vae, z, decoder="checkpointed")
    assert 40.0 * GIB < plain["saved"] < 41.0 * GIB  # frozen (E1); a trainable VAE saves 48.1
    assert 7.4 * GIB < plain["cache"] < 7.7 * GIB  # E2
    assert 4.5 * GIB < ckpt["saved"] < 4.7 * GIB and ckpt["peak"] < 12 * GIB
    with pytest.raises(ValueError, match="decoder"):
        decode_peak_bytes(vae, z, decoder="tiled")


def test_tiny_vae_fixture_has_the_real_layout():
    names = [type(m).__name__ for m in tiny_vae_3d().decoder.modules()]
    assert "QwenImageAttentionBlock" in names and "QwenImageResample" in names

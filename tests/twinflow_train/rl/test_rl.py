"""Reward guidance: weight schedules, latent reward gradients, surrogate loss, output-space clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from twinflow_train.models.codecs import DigitsAutoencoder
from twinflow_train.config import ConfigError, RlConfig, load_config
from twinflow_train.rl.guidance import (RewardGuidance, exact_latent_grad, output_clip_scale, reencode_latent_grad,
                               rl_weight, rms_normalize, surrogate_loss, surrogate_output_grad)

LATENT = (2, 3, 3)
PIXELS = (1, 6, 6)


class TinyCodec(nn.Module):
    """A non-linear decoder latents [2,3,3] -> pixels [1,6,6], and an encoder back."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dec = nn.Parameter(torch.randn(36, 18, generator=g) / 4)
        self.enc = nn.Parameter(torch.randn(18, 36, generator=g) / 6)

    def decode(self, z):
        return torch.tanh(z.flatten(1) @ self.dec.T.to(z.dtype)).view(-1, *PIXELS)

    def encode(self, p):
        return (p.flatten(1) @ self.enc.T.to(p.dtype)).view(-1, *LATENT)


class LinearCodec(nn.Module):
    """D(x) = c * Q x, E(p) = Q^T p / c + b with Q orthogonal: E's Jacobian is D's transpose / c^2,
    and E(D(x)) = x + b, a round-trip residual the re-encode estimator must cancel."""

    def __init__(self, c: float = 2.0, bias: float = 0.3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(18, 18, generator=g, dtype=torch.float64))
        self.register_buffer("q", q)
        self.c = c
        self.b = bias

    def decode(self, z):
        return (self.c * z.flatten(1).to(self.q.dtype) @ self.q.T).view(-1, 2, 3, 3)

    def encode(self, p):
        return (p.flatten(1).to(self.q.dtype) @ self.q / self.c + self.b).view(-1, *LATENT)


class TinyReward(nn.Module):
    """log p(prompted class) of a small random conv classifier: a stand-in for the digits reward."""

    def __init__(self, channels: int = 1, classes: int = 3, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.LazyLinear(classes)

    def forward(self, images, prompts):
        h = torch.tanh(self.conv(images)).flatten(1)
        return torch.log_softmax(self.head(h), dim=-1).gather(1, prompts["labels"][:, None]).squeeze(1)


def _reward(channels: int, dtype=torch.float64) -> TinyReward:
    """Pixels are [1, 6, 6] from TinyCodec, [2, 3, 3] from LinearCodec."""
    r = TinyReward(channels)
    side = 6 if channels == 1 else 3
    r(torch.zeros(1, channels, side, side), {"labels": torch.zeros(1, dtype=torch.long)})  # materialise the lazy layer
    r = r.to(dtype).eval()
    for p in r.parameters():
        p.requires_grad_(False)
    return r


def _rl(**over) -> RlConfig:
    base = dict(enabled=True, reward="digits", schedule="hard", warmup=0, weight=0.5, normalize="none", clip="none")
    base.update(over)
    return RlConfig(**base)


def _cond(n: int) -> dict:
    return {"labels": torch.arange(n) % 3}


# --------------------------------------------------------------------------- schedules


def test_hard_and_linear_schedules():
    hard = _rl(schedule="hard", warmup=10, weight=0.2)
    assert [rl_weight(k, hard) for k in (0, 9, 10, 11, 10_000)] == [0.0, 0.0, 0.2, 0.2, 0.2]
    lin = _rl(schedule="linear", warmup=10, ramp=20, weight=0.2)
    assert rl_weight(10, lin) == 0.0 and rl_weight(5, lin) == 0.0
    assert math.isclose(rl_weight(20, lin), 0.1)
    assert rl_weight(30, lin) == 0.2 and rl_weight(99, lin) == 0.2
    ws = [rl_weight(k, lin) for k in range(0, 40)]
    assert all(a <= b for a, b in zip(ws, ws[1:]))


def test_disabled_weight_is_zero():
    cfg = RlConfig(enabled=False, reward="none", schedule="hard", warmup=0, weight=1.0)
    assert rl_weight(10**6, cfg) == 0.0


@pytest.mark.parametrize("center", [100.0, 100.5])
def test_sigmoid_width_to_zero_is_the_hard_switch(center):
    hard = _rl(schedule="hard", warmup=math.ceil(center), weight=0.3)
    for width in (1e-3, 1e-6, 1e-12):
        sig = _rl(schedule="sigmoid", center=center, width=width, weight=0.3)
        for k in list(range(0, 200)) + [10**9]:
            if k == center:
                assert math.isclose(rl_weight(k, sig), 0.15)  # exactly at the centre: half
            else:
                assert math.isclose(rl_weight(k, sig), rl_weight(k, hard), abs_tol=1e-12), (width, k)
    # a wide sigmoid is a smooth ramp: half at the centre, monotone, never above the peak
    wide = _rl(schedule="sigmoid", center=center, width=20.0, weight=0.3)
    ws = [rl_weight(k, wide) for k in range(0, 300)]
    assert all(a < b for a, b in zip(ws, ws[1:])) and max(ws) < 0.3 and min(ws) > 0
    assert math.isclose(rl_weight(center, wide), 0.15)


# --------------------------------------------------------------------------- latent gradients


def test_exact_latent_gradient_matches_finite_differences():
    codec, reward = TinyCodec().double(), _reward(1)
    x = torch.randn(3, *LATENT, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cond = _cond(3)
    g, r = exact_latent_grad(x=x, cond=cond, codec=codec, reward=reward)
    assert g.shape == x.shape and r.shape == (3,)
    eps = 1e-6
    fd = torch.zeros_like(x)
    flat = fd.view(3, -1)
    with torch.no_grad():
        for j in range(flat.shape[1]):
            e = torch.zeros_like(x).view(3, -1)
            e[:, j] = eps
            up = reward(codec.decode(x + e.view_as(x)), cond)
            down = reward(codec.decode(x - e.view_as(x)), cond)
            flat[:, j] = (up - down) / (2 * eps)
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-9), (g - fd).abs().max()
    assert g.abs().max() > 1e-3  # not trivially zero


def test_exact_gradient_leaves_module_grads_alone():
    codec, reward = TinyCodec(), _reward(1, torch.float32)
    x = torch.randn(2, *LATENT, requires_grad=True)
    g, _ = exact_latent_grad(x=x, cond=_cond(2), codec=codec, reward=reward)
    assert x.grad is None and codec.dec.grad is None and not g.requires_grad


def test_reencode_with_orthogonal_linear_codec_equals_exact_up_to_scale():
    codec, reward_img = LinearCodec(c=2.0, bias=0.3), _reward(2)
    x = torch.randn(4, *LATENT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cond = _cond(4)
    g_ex, r_ex = exact_latent_grad(x=x, cond=cond, codec=codec, reward=reward_img)
    for step in (1e-3, 1.0, 10.0):  # linear codec: independent of the pixel step; the bias cancels
        g_re, r_re = reencode_latent_grad(x=x, cond=cond, codec=codec, reward=reward_img, step=step)
        assert torch.allclose(g_re, g_ex / 4.0, rtol=1e-9, atol=1e-12)  # J_E = J_D^T / c^2
        assert torch.allclose(rms_normalize(g_re), rms_normalize(g_ex), rtol=1e-9, atol=1e-12)
        assert torch.equal(r_re, r_ex)
    # the report's form x - E(D(x) - s*g) is not zero even for a zero reward gradient: it carries the
    # round-trip residual (-b here), which E(D(x) + s*g) - E(D(x)) cancels
    with torch.no_grad():
        blog_at_zero_gradient = x - codec.encode(codec.decode(x))
    assert torch.allclose(blog_at_zero_gradient, torch.full_like(x, -0.3))


def test_reencode_with_a_nonlinear_codec_tracks_the_encoder_jacobian():
    # g_re -> J_E g_pix as the step shrinks (a directional finite difference, in fp32/fp64)
    codec, reward = TinyCodec().double(), _reward(1)
    x = torch.randn(2, *LATENT, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    cond = _cond(2)
    g_small, _ = reencode_latent_grad(x=x, cond=cond, codec=codec, reward=reward, step=1e-4)
    pix = codec.decode(x).detach().requires_grad_(True)
    (g_pix,) = torch.autograd.grad(reward(pix, cond).sum(), pix)
    expected = codec.encode(g_pix)  # E is linear in the tiny codec: J_E g = E(g)
    assert torch.allclose(g_small, expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ConfigError, match="rl.reencode_step"):
        reencode_latent_grad(x=x, cond=cond, codec=codec, reward=reward, step=0.0)


def test_rms_normalize():
    g = torch.randn(3, 2, 2, 2)
    g[1] = 0.0
    out = rms_normalize(g)
    rms = out.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms[[0, 2]], torch.ones(2))
    assert torch.equal(out[1], torch.zeros(2, 2, 2))
    g[2, 0, 0, 0] = float("nan")
    assert torch.isnan(rms_normalize(g)[2]).all()  # propagated, not hidden


# --------------------------------------------------------------------------- surrogate


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = nn.Sequential(nn.Linear(18, 32), nn.Tanh(), nn.Linear(32, 18))

    def forward(self, z):
        return (z.flatten(1) - self.net(z.flatten(1))).view_as(z)  # x_gen = z - F(z)


def test_surrogate_parameter_gradient_is_the_pulled_back_reward_gradient():
    codec, reward = TinyCodec().double(), _reward(1)
    gen = Generator().double()
    z = torch.randn(5, *LATENT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cond = _cond(5)
    guidance = RewardGuidance(_rl(), codec=codec, reward=reward)
    term = guidance.term(x_gen=gen(z), cond=cond, step=1)
    assert term.weight == 0.5
    assert torch.equal(term.loss.detach(), term.weight * term.stats["loss/rl"])  # the term comes weighted
    params = list(gen.parameters())
    ours = torch.autograd.grad(term.loss, params)
    # per element: the weight times the pulled-back reward gradient divided by the latent size D
    D = math.prod(LATENT)
    direct = torch.autograd.grad(-term.weight * reward(codec.decode(gen(z)), cond).mean() / D, params)
    for a, b in zip(ours, direct):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert max(float(a.abs().max()) for a in ours) > 1e-4
    assert torch.allclose(term.reward, reward(codec.decode(gen(z)), cond))


def test_surrogate_with_the_project_autoencoder():
    torch.manual_seed(0)
    codec = DigitsAutoencoder(latent_channels=4, hidden=16).eval()
    reward = _Digits8x8()
    gen = nn.Linear(64, 64)
    z = torch.randn(6, 4, 4, 4)
    x_gen = (z.flatten(1) - gen(z.flatten(1))).view_as(z)
    cond = _cond(6)
    term = RewardGuidance(_rl(), codec=codec, reward=reward).term(x_gen=x_gen, cond=cond, step=0)
    ours = torch.autograd.grad(term.loss, list(gen.parameters()))
    x2 = (z.flatten(1) - gen(z.flatten(1))).view_as(z)
    direct = torch.autograd.grad(-term.weight * reward(codec.decode(x2), cond).mean() / 64,
                                 list(gen.parameters()))
    for a, b in zip(ours, direct):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert not any(p.grad is not None for p in codec.parameters())


class _Digits8x8(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(64, 3)

    def forward(self, images, prompts):
        return torch.log_softmax(self.fc(images.flatten(1)), -1).gather(1, prompts["labels"][:, None]).squeeze(1)


def test_surrogate_loss_gradient_and_dtype():
    x = torch.randn(4, 2, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(4, 2, 2, 2)
    loss = surrogate_loss(x_gen=x, direction=d)
    assert loss.dtype == torch.float32
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.allclose(gx.float(), (-d / (4 * 8)).bfloat16().float())
    assert torch.allclose(surrogate_output_grad(direction=d, weight=2.0), -2.0 * d / 32)


def test_rms_normalised_direction_has_unit_rms():
    codec, reward = TinyCodec().double(), _reward(1)
    x = torch.randn(4, *LATENT, dtype=torch.float64, requires_grad=True)
    term = RewardGuidance(_rl(normalize="rms"), codec=codec, reward=reward).term(x_gen=x, cond=_cond(4), step=0)
    (gx,) = torch.autograd.grad(term.loss, x)
    used = -gx * 4 * math.prod(LATENT) / term.weight
    assert torch.allclose(used.flatten(1).pow(2).mean(1).sqrt(), torch.ones(4, dtype=torch.float64))
    raw, _ = exact_latent_grad(x=x, cond=_cond(4), codec=codec, reward=reward)
    cos = torch.nn.functional.cosine_similarity(used.flatten(1), raw.flatten(1))
    assert torch.allclose(cos, torch.ones(4, dtype=torch.float64))
    assert math.isclose(float(term.stats["rl/grad_rms"]), float(raw.flatten(1).pow(2).mean(1).sqrt().mean()))


# --------------------------------------------------------------------------- output-space clipping


def test_output_clip_bounds_the_rl_gradient_by_the_rectification_gradient():
    codec, reward = TinyCodec().double(), _reward(1)
    n, w, tau = 6, 2.0, 0.5
    x = torch.randn(n, *LATENT, dtype=torch.float64, requires_grad=True)
    rect = torch.randn(n, *LATENT, dtype=torch.float64) / (n * math.prod(LATENT))
    rect[:3] *= 1e-3  # weak rectification push: these rows must be clipped
    rect[3:] *= 100.0  # strong: left alone
    cfg = _rl(normalize="rms", clip="output", clip_tau=tau, weight=w)
    term = RewardGuidance(cfg, codec=codec, reward=reward).term(x_gen=x, cond=_cond(n), rect_grad=rect, step=0)
    (gx,) = torch.autograd.grad(term.loss, x)  # the RL term's actual gradient on the output (weight included)
    rms = lambda t: t.flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    assert torch.allclose(rms(gx[:3]), tau * rms(rect[:3]), rtol=1e-9)
    unclipped = torch.full((3,), w / (n * math.prod(LATENT)), dtype=torch.float64)  # unit-RMS g, weight w, / (B*D)
    assert torch.allclose(rms(gx[3:]), unclipped, rtol=1e-9)
    assert math.isclose(float(term.stats["rl/clip_frac"]), 0.5)
    scale = output_clip_scale(rl_grad=torch.zeros(2, 3), rect_grad=torch.ones(2, 3), tau=1.0)
    assert torch.equal(scale, torch.ones(2))
    with pytest.raises(ValueError, match="rect_grad"):
        RewardGuidance(cfg, codec=codec, reward=reward).term(x_gen=x, cond=_cond(n), step=0)


def test_output_clip_yardstick_is_the_barron_gradient_not_dv():
    """Scaling dV by 100 barely changes the Barron rectification gradient, so the clip must not follow dV."""
    from twinflow_train.method.twinflow import TwinFlow
    from twinflow_train.method.timesamplers import build_time_samplers

    cfg = load_config(None, ["method.rect_weight=0.5"])
    method = TwinFlow(cfg.method, time_samplers=build_time_samplers(cfg.renoise))
    F = torch.randn(4, *LATENT, dtype=torch.float64, requires_grad=True)
    dv = 0.05 * torch.randn(4, *LATENT, dtype=torch.float64)
    grads = []
    for scale in (1.0, 100.0):
        loss = cfg.method.rect_weight * method._rho(F, F.detach() - scale * dv).mean()
        (ref,) = torch.autograd.grad(loss, F)
        ours = method._rect_output_grad(F, scale * dv)
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-7)  # float32 inside
        grads.append(ours.flatten(1).pow(2).mean(1).sqrt())
    assert torch.allclose(grads[0], grads[1], rtol=0.02)  # ~ 2 * rect_weight / (B * D), whatever dV's size


# --------------------------------------------------------------------------- weight 0, bad input


def test_zero_weight_computes_the_reward_only():
    codec, reward = TinyCodec().double(), _reward(1)
    guidance = RewardGuidance(_rl(warmup=100), codec=codec, reward=reward)
    x = torch.randn(3, *LATENT, dtype=torch.float64, requires_grad=True)
    term = guidance.term(x_gen=x, cond=_cond(3), step=5)
    assert term.weight == 0.0 and not term.loss.requires_grad and float(term.loss) == 0.0
    assert torch.allclose(term.reward, reward(codec.decode(x), _cond(3)))
    assert "rl/grad_rms" not in term.stats and "rl/reward" in term.stats


def test_bad_input_names_the_field():
    with pytest.raises(ConfigError, match=r"rl\.reward"):
        load_config(None, ["rl.enabled=true"])  # RL without a reward model
    with pytest.raises(ConfigError, match=r"rl\.clip_norm"):
        load_config(None, ["rl.enabled=true", "rl.reward=digits", "rl.clip_norm=0"])
    with pytest.raises(ConfigError, match=r"rl\.clip_tau"):
        load_config(None, ["rl.enabled=true", "rl.reward=digits", "rl.clip_tau=-1"])
    with pytest.raises(ConfigError, match=r"rl\.estimator"):
        load_config(None, ["rl.estimator=zeroth_order"])
    with pytest.raises(ConfigError, match=r"rl\.reward"):
        RewardGuidance(_rl(), codec=TinyCodec(), reward=None)
    bad = _Digits8x8()
    bad.forward = lambda images, prompts: torch.zeros(images.shape[0], 1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="one reward per sample"):
        exact_latent_grad(x=torch.randn(2, 4, 4, 4), cond=_cond(2),
                          codec=DigitsAutoencoder(latent_channels=4, hidden=8), reward=bad)


def test_guidance_state_is_empty_and_strict():
    g = RewardGuidance(_rl(), codec=TinyCodec(), reward=_reward(1))
    assert g.state_dict() == {}
    g.load_state_dict({})
    with pytest.raises(ValueError):
        g.load_state_dict({"x": 1})
    assert RewardGuidance(_rl(clip="param", clip_norm=0.3), codec=TinyCodec(), reward=_reward(1)).param_clip_norm == 0.3
    assert g.param_clip_norm is None


# --------------------------------------------------------------------------- with the real method


def test_term_on_the_twinflow_method_output_with_per_term_gradients():
    """method.loss -> guidance.term -> grads.TermGradients: the trainer's wiring, on the real objects."""
    from twinflow_train.run.grads import TermGradients
    from twinflow_train.method.twinflow import TwinFlow
    from twinflow_train.models.mlp import MLPFlowModel
    from twinflow_train.method.timesamplers import build_time_samplers

    cfg = load_config(None, ["rl.enabled=true", "rl.reward=digits", "rl.warmup=0", "rl.weight=0.5",
                             "rl.clip=output", "rl.clip_tau=0.5"])
    torch.manual_seed(0)
    model = MLPFlowModel(shape=(4, 4, 4), num_classes=3, hidden=32, depth=2, time_dim=16)
    with torch.no_grad():  # off the adaLN-zero init, where F ignores time and dV = 0 (which clips RL to 0)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.init_target_time_embedding("copy")
    method = TwinFlow(cfg.method, time_samplers=build_time_samplers(cfg.renoise))
    codec = DigitsAutoencoder(latent_channels=4, hidden=16).eval().requires_grad_(False)
    guidance = RewardGuidance(cfg.rl, codec=codec, reward=_Digits8x8().requires_grad_(False))
    x, cond = torch.randn(16, 4, 4, 4), _cond(16)
    gen = torch.Generator().manual_seed(1)
    out = method.loss(model=model, target=model, x=x, cond=cond, generator=gen, step=1)
    term = guidance.term(x_gen=out.x_gen, cond=out.cond_gen, rect_grad=out.rect_grad, step=1)
    assert term.reward.shape == (out.x_gen.shape[0],) and term.loss.requires_grad
    rl_ref = torch.autograd.grad(term.loss, list(model.parameters()), retain_graph=True, allow_unused=True)
    terms = TermGradients(model, rl_clip_norm=None)
    terms.start(split=True)
    terms.backward(twinflow=out.loss, rl=term.loss)
    stats = terms.finish()
    ref_norm = torch.sqrt(sum((g ** 2).sum() for g in rl_ref if g is not None))
    assert math.isclose(float(stats["grad_norm/rl"]), float(ref_norm), rel_tol=1e-5)
    assert float(stats["grad_norm/rl"]) > 0 and float(stats["grad_norm/twinflow"]) > 0
    assert all(torch.isfinite(v).all() for v in {**stats, **term.stats}.values())
    assert float(out.rect_grad.abs().max()) > 0
    assert {"loss/rl", "rl/weight", "rl/reward", "rl/grad_rms", "rl/clip_frac", "rl/clip_scale"} <= set(term.stats)

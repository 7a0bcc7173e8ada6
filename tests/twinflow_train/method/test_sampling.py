"""Samplers (docs/method.md §3) and the one-output estimates x_hat / z_hat (docs/method.md §1)."""

import pytest
import torch

from twinflow_train.config import SamplerConfig
from twinflow_train.models.base import Cond, FlowModel
from twinflow_train.method.sampling import euler_sample, ucgm_grid, ucgm_sample, x_hat, z_hat

from ..tiny import SHAPE, tiny_model


class PointMass(FlowModel):
    """The exact velocity field of data concentrated at x0: v(x, t) = (x - x0) / |t|, for any tt and prompt."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, tt, cond):
        self.calls.append((x.shape[0], t.clone(), tt.clone()))
        return (x - self.x0) / t.abs().view(-1, *([1] * (x.dim() - 1)))

    def null_cond(self, cond: Cond) -> Cond:
        return {"labels": torch.full_like(cond["labels"], 3)}

    def init_target_time_embedding(self, mode, generator=None):
        pass


def labels(n: int) -> Cond:
    return {"labels": torch.arange(n) % 3}


def test_x_hat_and_z_hat_invert_the_interpolation():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, *SHAPE, generator=g), torch.randn(6, *SHAPE, generator=g)
    t = torch.rand(6, generator=g)
    x_t = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x
    F = z - x
    assert torch.allclose(x_hat(x_t, t, F), x, atol=1e-6)
    assert torch.allclose(z_hat(x_t, t, F), z, atol=1e-6)
    # the twin branch uses |t|
    assert torch.allclose(x_hat(x_t, -t, F), x, atol=1e-6)
    assert torch.allclose(z_hat(x_t, -t, F), z, atol=1e-6)
    # a scalar time works the same way
    assert torch.allclose(x_hat(z, 1.0, F), x, atol=1e-6)


def test_grid_matches_the_public_defaults():
    s2 = ucgm_grid(nfe=2, cfg=SamplerConfig(gaps=[0.001, 0.6]))
    assert torch.allclose(s2, torch.tensor([0.999, 0.6, 0.0], dtype=torch.float64), atol=1e-12)
    s4 = ucgm_grid(nfe=4, cfg=SamplerConfig(gaps=[0.001, 0.5]))
    u = torch.linspace(0.001, 0.5, 4, dtype=torch.float64)
    assert torch.allclose(s4, torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)]))
    s0 = ucgm_grid(nfe=2, cfg=SamplerConfig(gaps=[0.0, 0.0]))  # g1 = 0: linspace(0, 1, 3) minus its last point
    assert torch.allclose(s0, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    warped = ucgm_grid(nfe=2, cfg=SamplerConfig(gaps=[0.0, 0.0], kumaraswamy=[2.0, 1.0, 1.0]))
    assert torch.allclose(warped, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))  # u -> u^2
    for nfe in (1, 3, 8):
        s = ucgm_grid(nfe=nfe, cfg=SamplerConfig(kumaraswamy=[1.5, 2.0, 0.7]))
        assert s.shape == (nfe + 1,) and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    with pytest.raises(ValueError, match="nfe"):
        ucgm_grid(nfe=0, cfg=SamplerConfig())


@pytest.mark.parametrize("mode,tt", [("few", 0.0), ("any", 0.0), ("mul", 1.0)])
def test_one_nfe_from_pure_noise_returns_x_hat(mode, tt):
    m = tiny_model()
    z = torch.randn(5, *SHAPE)
    cfg = SamplerConfig(tt_mode=mode, gaps=[0.0, 0.3], stochastic_ratio=1.0)
    out = ucgm_sample(model=m, z=z, cond=labels(5), nfe=1, cfg=cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        F = m(z, torch.ones(5), torch.full((5,), tt), labels(5))
    assert torch.allclose(out, x_hat(z, 1.0, F), atol=1e-5)


@pytest.mark.parametrize("nfe,r", [(1, 0.0), (2, 1.0), (4, 0.3), (3, 0.0)])
def test_an_exact_field_is_sampled_exactly_at_any_nfe(nfe, r):
    x0 = torch.randn(1, *SHAPE)
    model = PointMass(x0)
    z = torch.randn(4, *SHAPE)
    out = ucgm_sample(model=model, z=z, cond=labels(4), nfe=nfe, cfg=SamplerConfig(stochastic_ratio=r),
                      generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0.expand_as(out), atol=1e-5)
    assert len(model.calls) == nfe


def test_tt_modes_pass_the_right_target_times():
    cfg = SamplerConfig(gaps=[0.001, 0.5])
    sigma = ucgm_grid(nfe=3, cfg=cfg).float()
    for mode, expect in [("few", torch.zeros(3)), ("mul", sigma[:3]), ("any", sigma[1:])]:
        model = PointMass(torch.zeros(1, *SHAPE))
        ucgm_sample(model=model, z=torch.randn(2, *SHAPE), cond=labels(2), nfe=3,
                    cfg=SamplerConfig(tt_mode=mode, gaps=[0.001, 0.5]), generator=torch.Generator())
        assert torch.allclose(torch.stack([c[1][0] for c in model.calls]), sigma[:3])
        assert torch.allclose(torch.stack([c[2][0] for c in model.calls]), expect)


def test_stochastic_ratio_uses_only_the_generator():
    m = tiny_model()
    z = torch.randn(3, *SHAPE)
    cfg = SamplerConfig(stochastic_ratio=0.5)
    state = torch.get_rng_state()
    a = ucgm_sample(model=m, z=z, cond=labels(3), nfe=3, cfg=cfg, generator=torch.Generator().manual_seed(5))
    b = ucgm_sample(model=m, z=z, cond=labels(3), nfe=3, cfg=cfg, generator=torch.Generator().manual_seed(5))
    c = ucgm_sample(model=m, z=z, cond=labels(3), nfe=3, cfg=cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # r = 0 is deterministic: the generator is not consumed
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    ucgm_sample(model=m, z=z, cond=labels(3), nfe=3, cfg=SamplerConfig(stochastic_ratio=0.0), generator=g)
    assert torch.equal(g.get_state(), before)


def test_euler_follows_an_exact_field_to_the_data():
    x0 = torch.randn(1, *SHAPE)
    model = PointMass(x0)
    out = euler_sample(model=model, z=torch.randn(4, *SHAPE), cond=labels(4), steps=5, cfg_scale=1.0)
    assert torch.allclose(out, x0.expand_as(out), atol=1e-6)
    assert [c[0] for c in model.calls] == [4] * 5  # unguided: B rows per step
    assert all(bool((c[1] == c[2]).all()) for c in model.calls)  # tt = t


def test_euler_guidance_is_one_2b_forward_with_the_cfg_combination():
    m = tiny_model(1)
    z = torch.randn(3, *SHAPE)
    scale = 2.5
    out = euler_sample(model=m, z=z, cond=labels(3), steps=1, cfg_scale=scale)
    with torch.no_grad():
        ones = torch.ones(3)
        v_c = m(z, ones, ones, labels(3))
        v_u = m(z, ones, ones, m.null_cond(labels(3)))
    assert torch.allclose(out, z - (v_u + scale * (v_c - v_u)), atol=1e-5)
    unguided = euler_sample(model=m, z=z, cond=labels(3), steps=1, cfg_scale=1.0)
    assert torch.allclose(unguided, z - v_c, atol=1e-5)
    rec = PointMass(torch.zeros(1, *SHAPE))
    euler_sample(model=rec, z=z, cond=labels(3), steps=2, cfg_scale=scale)
    assert [c[0] for c in rec.calls] == [6, 6]
    with pytest.raises(ValueError, match="cfg_scale"):
        euler_sample(model=m, z=z, cond=labels(3), steps=1, cfg_scale=-1.0)

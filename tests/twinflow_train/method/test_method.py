"""The TwinFlow objective (docs/method.md §2): groups, targets, weights, losses, layouts, randomness."""

import copy
import math

import pytest
import torch

from twinflow_train.config import MethodConfig, RenoiseConfig
from twinflow_train.method import twinflow as method_module
from twinflow_train.method.twinflow import (TwinFlow, enhanced_velocity, group_sizes, per_sample_loss, rcgm_target,
                                   rectify_delta, tan_weight)
from twinflow_train.models.base import Cond, FlowModel
from twinflow_train.method.timesamplers import build_time_samplers

from ..tiny import SHAPE, tiny_model


def labels(n: int) -> Cond:
    return {"labels": torch.arange(n) % 3}


def method(**kw) -> TwinFlow:
    return TwinFlow(MethodConfig(**kw), time_samplers=build_time_samplers(RenoiseConfig()))


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, Cond]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), labels(n)


class PointMass(FlowModel):
    """The exact field of data at x0: v(x, t) = (x - x0) / |t| for any tt (straight paths)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, tt, cond):
        return (x - self.x0) / t.abs().view(-1, *([1] * (x.dim() - 1)))

    def null_cond(self, cond):
        return {"labels": torch.full_like(cond["labels"], 3)}

    def init_target_time_embedding(self, mode, generator=None):
        pass


class Recorder(FlowModel):
    """Wraps a model and records every call: rows, t, tt, and whether grad was enabled."""

    def __init__(self, inner: FlowModel):
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, x, t, tt, cond):
        self.calls.append({"rows": x.shape[0], "t": t.detach().clone(), "tt": tt.detach().clone(),
                           "grad": torch.is_grad_enabled()})
        return self.inner(x, t, tt, cond)

    def null_cond(self, cond):
        return self.inner.null_cond(cond)

    def init_target_time_embedding(self, mode, generator=None):
        pass


# --------------------------------------------------------------------------- groups, weights, losses


@pytest.mark.parametrize("B,ratios,expect", [
    (4, [1, 1, 1, 1], [1, 1, 1, 1]),
    (10, [1, 1, 1, 1], [3, 3, 2, 2]),  # quotas 2.5 each: ties to the earlier groups
    (7, [1, 0, 0, 0], [7, 0, 0, 0]),
    (6, [0, 1, 1, 0], [0, 3, 3, 0]),
    (128, [2, 1, 1, 0], [64, 32, 32, 0]),
    (9, [0.5, 1, 1, 1.5], [1, 2, 2, 4]),  # quotas 1.125, 2.25, 2.25, 3.375
])
def test_group_sizes(B, ratios, expect):
    assert group_sizes(batch=B, ratios=ratios) == expect


@pytest.mark.parametrize("B", [1, 4, 5, 17, 128, 1001])
@pytest.mark.parametrize("ratios", [[1, 1, 1, 1], [3, 1, 0, 2], [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 1]])
def test_group_sizes_sum_to_the_batch_and_follow_the_quotas(B, ratios):
    sizes = group_sizes(batch=B, ratios=ratios)
    assert sum(sizes) == B
    for size, r in zip(sizes, ratios):
        assert abs(size - B * r / sum(ratios)) < 1
        if r == 0:
            assert size == 0


def test_group_sizes_reject_bad_ratios():
    with pytest.raises(ValueError, match="group_ratios"):
        group_sizes(batch=4, ratios=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="group_ratios"):
        group_sizes(batch=4, ratios=[1, 1, 1])


def test_tan_weight_endpoints_and_monotonicity():
    assert float(tan_weight(torch.tensor([1.0]), torch.tensor([0.0]))) == pytest.approx(1.0, abs=1e-6)
    t = torch.rand(50)
    assert torch.allclose(tan_weight(t, t), torch.full((50,), math.tan(0.4 * math.pi) + 1))
    assert torch.allclose(tan_weight(-t, -t), tan_weight(t, t))  # |t| - |tt|
    gaps = torch.linspace(0, 1, 101)
    w = tan_weight(gaps, torch.zeros(101))
    assert bool((w[1:] < w[:-1]).all())


def test_barron_is_about_the_per_sample_rmse_for_large_errors():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, *SHAPE, generator=g), torch.randn(8, *SHAPE, generator=g)
    rmse = (pred - target).pow(2).flatten(1).mean(1).sqrt()
    rho = per_sample_loss(pred, target, kind="barron", c=1e-3)
    assert torch.allclose(rho, rmse, rtol=1e-5)
    # the weight is stop-gradient: the gradient is grad(m) / sqrt(m), i.e. twice the RMSE's gradient
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    per_sample_loss(p1, target, kind="barron", c=1e-3).sum().backward()
    (p2 - target).pow(2).flatten(1).mean(1).sqrt().sum().backward()
    assert torch.allclose(p1.grad, 2 * p2.grad, rtol=1e-4, atol=1e-9)
    # for errors << c it is L2 / c
    small = target + 1e-6
    assert torch.allclose(per_sample_loss(small, target, kind="barron", c=1e-3),
                          per_sample_loss(small, target, kind="l2") / 1e-3, rtol=1e-5)


# --------------------------------------------------------------------------- targets


def test_rcgm_target_is_the_flow_matching_target_when_the_gap_is_below_D():
    g = torch.Generator().manual_seed(1)
    n, D = 16, 0.01
    t = 0.05 + 0.9 * torch.rand(n, generator=g)
    tt = t - D * torch.rand(n, generator=g) * 0.99  # 0 <= t - tt < D
    x_t = torch.randn(n, *SHAPE, generator=g)
    v_enh = torch.randn(n, *SHAPE, generator=g)
    F = v_enh + 0.5 * (torch.rand(n, *SHAPE, generator=g) - 0.5)  # |F - v_enh| < clamp
    out = rcgm_target(target=tiny_model(), F=F, x_t=x_t, t=t, tt=tt, cond=labels(n), v_enh=v_enh, order=2,
                      delta_t=D, clamp=1.0)
    assert torch.allclose(out, v_enh, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_rcgm_residual_vanishes_for_an_exact_straight_field(order):
    """With T and F both the exact field of straight paths, the roll-out reproduces (t - tt) F: target = F."""
    g = torch.Generator().manual_seed(2)
    n = 32
    x0 = torch.randn(1, *SHAPE, generator=g)
    exact = PointMass(x0)
    t = 0.2 + 0.8 * torch.rand(n, generator=g)
    tt = t * torch.rand(n, generator=g) * 0.7  # t - tt >= D for every row here
    assert bool((t - tt >= 0.01).all())
    z = torch.randn(n, *SHAPE, generator=g)
    x_t = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x0
    v = z - x0
    F = exact(x_t, t, tt, labels(n))
    out = rcgm_target(target=exact, F=F, x_t=x_t, t=t, tt=tt, cond=labels(n), v_enh=v, order=order,
                      delta_t=0.01, clamp=1.0)
    assert torch.allclose(out, F, atol=2e-3)
    # a wrong F is pulled back toward the consistent one, by at most the clamp per element
    bent = F + 0.3
    out2 = rcgm_target(target=exact, F=bent, x_t=x_t, t=t, tt=tt, cond=labels(n), v_enh=v, order=order,
                       delta_t=0.01, clamp=1.0)
    assert bool(((out2 - bent).abs() <= 1.0 + 1e-6).all())
    assert bool(((out2 - bent) < 0).all())


def test_cfg_enhanced_target_applies_only_inside_the_open_range():
    m = tiny_model(3)
    t = torch.tensor([0.2, 0.3, 0.45, 0.5, 0.7, 0.9])
    n = t.numel()
    g = torch.Generator().manual_seed(4)
    x_t, v = torch.randn(n, *SHAPE, generator=g), torch.randn(n, *SHAPE, generator=g)
    out = enhanced_velocity(target=m, x_t=x_t, t=t, v=v, cond=labels(n), ratio=0.7, lo=0.3, hi=0.7)
    with torch.no_grad():
        diff = m(x_t, t, t, labels(n)) - m(x_t, t, t, m.null_cond(labels(n)))
    inside = torch.tensor([False, False, True, True, False, False])
    assert torch.allclose(out[inside], v[inside] + 0.7 * diff[inside], atol=1e-6)
    assert torch.equal(out[~inside], v[~inside])
    assert diff[inside].abs().max() > 1e-3  # the test has something to see
    assert torch.equal(enhanced_velocity(target=m, x_t=x_t, t=t, v=v, cond=labels(n), ratio=0.0, lo=0, hi=1), v)


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("layout", ["partitioned", "tutorial"])
@pytest.mark.parametrize("loss", ["barron", "l2"])
def test_loss_is_finite_and_gradients_reach_the_parameters(layout, loss):
    model, x_c = tiny_model(), batch()
    target = copy.deepcopy(model)  # an EMA-like copy that still requires grad: it must get none
    out = method(layout=layout, loss=loss).loss(model=model, target=target, x=x_c[0], cond=x_c[1],
                                                 generator=torch.Generator().manual_seed(0), step=0)
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    assert float(out.loss_rect.detach()) > 0
    assert torch.allclose(out.loss, out.loss_main + out.loss_rect)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None for p in target.parameters())
    assert out.x_gen.requires_grad
    assert not out.rect_grad.requires_grad and out.rect_grad.shape == out.x_gen.shape


def test_student_as_its_own_target():
    model, (x, c) = tiny_model(), batch()
    out = method(target="student").loss(model=model, target=model, x=x, cond=c,
                                        generator=torch.Generator().manual_seed(0), step=0)
    out.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_the_groups_get_the_times_of_spec_2():
    rec = Recorder(tiny_model())
    x, c = batch(16)
    out = method(mul_gap=0.05).loss(model=rec, target=tiny_model(1), x=x, cond=c,
                                    generator=torch.Generator().manual_seed(3), step=0)
    assert out.group_sizes == {"e2e": 4, "mul": 4, "any": 4, "adv": 4}
    grad_calls = [k for k in rec.calls if k["grad"]]
    assert len(grad_calls) == 1 and grad_calls[0]["rows"] == 16  # one forward with grad, on all rows
    t, tt = grad_calls[0]["t"], grad_calls[0]["tt"]
    assert torch.equal(t[:4], torch.ones(4)) and torch.equal(tt[:4], torch.zeros(4))
    gap = (t[4:8] - tt[4:8]) / t[4:8]
    assert bool((gap >= 0).all()) and bool((gap <= 0.05 + 1e-6).all())
    assert bool((tt[8:12] >= 0).all()) and bool((tt[8:12] <= t[8:12]).all())
    assert bool((t[12:] < 0).all()) and torch.equal(t[12:], tt[12:])
    # the adv fakes are one-step outputs of the student, without grad: a call at (1, 0) on 4 rows
    fakes = [k for k in rec.calls if not k["grad"] and k["rows"] == 4 and bool((k["t"] == 1).all())]
    assert fakes and torch.equal(fakes[0]["tt"], torch.zeros(4))
    # the rectify pair: (-s, -s) and (s, s) in one forward of 2 * n_e2e rows
    rect = [k for k in rec.calls if not k["grad"] and k["rows"] == 8]
    assert rect and torch.equal(rect[-1]["t"][:4], -rect[-1]["t"][4:]) and bool((rect[-1]["t"][4:] > 0).all())


def test_forward_rows_of_the_two_layouts():
    x, c = batch(16)
    N = 2
    p = method(layout="partitioned", estimate_order=N).loss(model=tiny_model(), target=tiny_model(1), x=x, cond=c,
                                                             generator=torch.Generator().manual_seed(0), step=0)
    tut = method(layout="tutorial", estimate_order=N).loss(model=tiny_model(), target=tiny_model(1), x=x, cond=c,
                                                            generator=torch.Generator().manual_seed(0), step=0)
    e2e, mul, any_, adv = 4, 4, 4, 4
    assert p.forward_rows["grad"] == 16 and tut.forward_rows["grad"] == 4 * 16
    lower = adv + 2 * e2e + N * e2e  # fakes, rectify, the e2e roll-outs (always t - tt = 1 >= D)
    upper = adv + 2 * (mul + any_) + N * (e2e + mul + any_) + 2 * e2e
    assert lower <= p.forward_rows["no_grad"] <= upper
    assert 2 * 16 + N * 16 + 2 * 16 <= tut.forward_rows["no_grad"] <= (4 + 2 * N) * 16


def test_the_number_of_forward_calls_depends_only_on_the_config():
    """FSDP2 needs every rank to run the same forwards, whatever its random times."""
    x, c = batch(8)
    counts = set()
    for seed in range(6):
        rec, tgt = Recorder(tiny_model()), Recorder(tiny_model(1))
        method(enhanced_range=[0.4, 0.6]).loss(model=rec, target=tgt, x=x, cond=c,
                                               generator=torch.Generator().manual_seed(seed), step=0)
        counts.add((len(rec.calls), len(tgt.calls)))
    assert len(counts) == 1


@pytest.mark.parametrize("ratios", [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [2, 0, 1, 1]])
def test_empty_groups_are_allowed(ratios):
    model, (x, c) = tiny_model(), batch(8)
    out = method(group_ratios=ratios).loss(model=model, target=tiny_model(1), x=x, cond=c,
                                           generator=torch.Generator().manual_seed(0), step=0)
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    assert sum(out.group_sizes.values()) == 8
    if ratios[0] == 0:
        assert out.x_gen is None and out.rect_grad is None and out.cond_gen is None and float(out.loss_rect) == 0.0
    else:
        n = out.group_sizes["e2e"]
        assert out.x_gen.shape == (n, *SHAPE) and torch.equal(out.cond_gen["labels"], c["labels"][:n])


def test_only_the_passed_generator_is_consumed():
    x, c = batch()
    m = method()
    losses = []
    for seed in (5, 5, 6):
        model, target = tiny_model(), tiny_model(1)  # (tiny_model seeds the global RNG; the method must not use it)
        before = torch.get_rng_state()
        out = m.loss(model=model, target=target, x=x, cond=c, generator=torch.Generator().manual_seed(seed), step=0)
        assert torch.equal(torch.get_rng_state(), before)
        out.loss.backward()
        losses.append((float(out.loss.detach()), model.out.weight.grad.clone()))
    assert losses[0][0] == losses[1][0] and torch.equal(losses[0][1], losses[1][1])
    assert losses[0][0] != losses[2][0]


def test_rect_weight_scales_only_the_rectification():
    x, c = batch()
    a = method(rect_weight=1.0).loss(model=tiny_model(), target=tiny_model(1), x=x, cond=c,
                                     generator=torch.Generator().manual_seed(0), step=0)
    b = method(rect_weight=3.0).loss(model=tiny_model(), target=tiny_model(1), x=x, cond=c,
                                     generator=torch.Generator().manual_seed(0), step=0)
    assert torch.allclose(a.loss_main, b.loss_main) and torch.allclose(a.loss_rect, b.loss_rect)
    assert torch.allclose(b.loss, b.loss_main + 3.0 * b.loss_rect)


def test_rectification_gradient_is_the_velocity_difference(monkeypatch):
    """With L2, d L_rect / d F_e2e = 2 dV / (n * numel): the generator moves along -dV."""
    seen = []

    def spy(**kw):
        seen.append(rectify_delta(**kw))
        return seen[-1]

    monkeypatch.setattr(method_module, "rectify_delta", spy)
    model, (x, c) = tiny_model(), batch(8)
    m = method(loss="l2", group_ratios=[1, 0, 0, 0], rect_weight=1.0)
    out = m.loss(model=model, target=tiny_model(1), x=x, cond=c, generator=torch.Generator().manual_seed(0), step=0)
    (dv,) = seen
    # the output bias enters F row by row: d L / d bias = sum over rows of d L / d F
    grad = torch.autograd.grad(out.loss_rect, model.out.bias)[0]
    numel = dv[0].numel()
    assert torch.allclose(grad, (2 * dv / (8 * numel)).flatten(1).sum(0), atol=1e-8)
    assert torch.allclose(out.rect_grad, 2 * dv / (8 * numel), atol=1e-8)  # the output-space clip's yardstick
    assert float(dv.abs().max()) > 1e-4  # the twin branches differ at this init
    assert float(dv.abs().max()) <= 1.0


def test_rectify_delta_is_the_clamped_twin_branch_difference():
    model, (x, c) = tiny_model(), batch(6)
    g = torch.Generator().manual_seed(3)
    s, noise = torch.rand(6, generator=g), torch.randn(x.shape, generator=g)
    dv = rectify_delta(model=model, x_gen=x, cond=c, s=s, noise=noise, clamp=0.05)
    col = s.view(-1, 1, 1, 1)
    y = col * noise + (1 - col) * x
    with torch.no_grad():
        by_hand = model(y, -s, -s, c) - model(y, s, s, c)
    assert float(by_hand.abs().max()) > 0.05  # the clamp is active somewhere
    assert torch.allclose(dv, by_hand.clamp(-0.05, 0.05), atol=1e-6)


def test_unknown_strings_are_errors_at_construction():
    # a section refuses an unknown option however it is built, so TwinFlow can trust its config
    with pytest.raises(ValueError, match="layout: unknown value 'interleaved'; valid: 'partitioned', 'tutorial'"):
        MethodConfig(layout="interleaved")
    with pytest.raises(ValueError, match="loss: unknown value 'huber'"):
        MethodConfig(loss="huber")
    with pytest.raises(ValueError, match="time_samplers"):
        TwinFlow(MethodConfig(), time_samplers={"main": build_time_samplers(RenoiseConfig())["main"]})


def test_cond_rows_must_match_the_batch():
    x, _ = batch(8)
    with pytest.raises(ValueError, match="cond has 3 rows"):
        method().loss(model=tiny_model(), target=tiny_model(), x=x, cond=labels(3),
                      generator=torch.Generator(), step=0)

"""Time samplers and Dynamic Renoise Sampling (docs/method.md §4): distributions, schedules, generator use."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from twinflow_train.config import RenoiseConfig, TimeDistConfig
from twinflow_train.method.timesamplers import (EPS, BlogLinearSampler, DmdrCosineSampler, StaticTimeSampler,
                                         build_time_samplers, dynamic_value, sample_beta)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("a,b", [(4.0, 1.5), (0.5, 0.5), (2.0, 5.0), (0.3, 3.0), (1.0, 2.5), (3.0, 1.0)])
def test_beta_sampler_matches_the_beta_distribution(a, b):
    n = 20000
    x = sample_beta(a, b, n, generator=gen(int(a * 10 + b * 100))).numpy()
    ks = stats.kstest(x, stats.beta(a, b).cdf).statistic
    assert ks < 0.015, f"Beta({a},{b}) KS statistic {ks:.4f}"  # ~0.001-level critical value at n = 20000


def test_static_kinds_stay_in_the_open_interval_and_are_float32():
    for cfg in [TimeDistConfig(), TimeDistConfig(kind="beta", a=0.2, b=0.2),
                TimeDistConfig(kind="logit_normal", mean=0.0, std=8.0)]:
        t = StaticTimeSampler(cfg).sample(5000, generator=gen(1), step=0)
        assert t.shape == (5000,) and t.dtype == torch.float32
        assert bool((t > 0).all()) and bool((t < 1).all())
        assert float(t.min()) >= EPS * 0.999 and float(t.max()) <= 1 - EPS * 0.999


def test_logit_normal_has_the_configured_location_and_scale():
    t = StaticTimeSampler(TimeDistConfig(kind="logit_normal", mean=0.5, std=0.7)).sample(50000, generator=gen(2), step=0)
    logit = torch.log(t.double() / (1 - t.double()))
    assert abs(float(logit.mean()) - 0.5) < 0.02
    assert abs(float(logit.std()) - 0.7) < 0.02


def test_blog_linear_has_the_stated_means_at_its_ends():
    s = BlogLinearSampler(start=4.0, end=1.0, steps=3000)
    n = 200000
    m0 = float(s.sample(n, generator=gen(3), step=0).double().mean())
    mK = float(s.sample(n, generator=gen(4), step=3000).double().mean())
    m_after = float(s.sample(n, generator=gen(5), step=9000).double().mean())
    assert abs(m0 - 0.8) < 3e-3  # Beta(4, 1): 4/5
    assert abs(mK - 0.5) < 3e-3  # Beta(1, 1)
    assert abs(m_after - 0.5) < 3e-3  # constant after the schedule
    mid = float(s.sample(n, generator=gen(6), step=1500).double().mean())
    assert abs(mid - 2.5 / 3.5) < 3e-3
    assert s.value(0) == 4.0 and s.value(3000) == 1.0 and s.value(10**6) == 1.0


def test_dmdr_cosine_has_the_stated_means_at_its_ends():
    s = DmdrCosineSampler(steps=1000)
    n = 200000
    m0 = float(s.sample(n, generator=gen(7), step=0).double().mean())
    mK = float(s.sample(n, generator=gen(8), step=1000).double().mean())
    assert abs(m0 - 4.0 / 5.5) < 3e-3  # Beta(4, 1.5)
    assert abs(mK - 0.5) < 3e-3
    assert s.params(0) == ("beta", (4.0, 1.5))
    kind, (a, b) = s.params(500)  # c = 1/2
    assert kind == "beta" and a == pytest.approx(2.5) and b == pytest.approx(1.25)
    # variance too, so a sampler with the right mean but the wrong shape fails
    x = s.sample(n, generator=gen(9), step=0).double()
    var = 4 * 1.5 / (5.5 ** 2 * 6.5)
    assert abs(float(x.var()) - var) < 0.03 * var


@pytest.mark.parametrize("start,end", [(4.0, 1.0), (0.8, 0.2), (1.0, 3.0)])
def test_blog_schedule_is_monotone(start, end):
    s = BlogLinearSampler(start=start, end=end, steps=300)
    ks = list(range(0, 700, 7))
    bias = np.array([s.value(k) for k in ks])
    means = np.array([s.mean(k) for k in ks])
    sign = np.sign(end - start)
    assert np.all(sign * np.diff(bias) >= 0) and np.all(sign * np.diff(means) >= -1e-12)
    assert bias[0] == start and bias[-1] == end


def test_dmdr_schedule_is_monotone_toward_uniform():
    s = DmdrCosineSampler(steps=300)
    ks = list(range(0, 700, 7))
    a = np.array([s.params(k)[1][0] if s.params(k)[0] == "beta" else 1.0 for k in ks])
    b = np.array([s.params(k)[1][1] if s.params(k)[0] == "beta" else 1.0 for k in ks])
    means = np.array([s.mean(k) for k in ks])
    assert np.all(np.diff(a) <= 0) and np.all(np.diff(b) <= 0) and np.all(np.diff(means) <= 1e-12)
    assert means[-1] == 0.5 and s.value(0) == 4.0 and s.value(300) == 1.0


def test_sampling_uses_only_the_generator():
    s = DmdrCosineSampler(steps=100)
    state = torch.get_rng_state()
    a = s.sample(1000, generator=gen(11), step=10)
    b = s.sample(1000, generator=gen(11), step=10)
    c = s.sample(1000, generator=gen(12), step=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_build_time_samplers_routes_the_dynamic_schedule():
    cfg = RenoiseConfig(schedule="blog_linear", start=4.0, end=1.0, steps=100, applies_to=["rect", "main"],
                        adv=TimeDistConfig(kind="beta", a=2.0, b=2.0))
    s = build_time_samplers(cfg)
    assert set(s) == {"main", "adv", "rect"}
    assert s["main"].value(0) == 4.0 and s["rect"].value(50) == 2.5
    assert s["adv"].value(0) is None and s["adv"].params(0) == ("beta", (2.0, 2.0))
    assert dynamic_value(s, 100) == 1.0
    off = build_time_samplers(RenoiseConfig())
    assert all(v.value(0) is None for v in off.values()) and dynamic_value(off, 0) is None


def test_unknown_schedule_is_an_error():
    cfg = RenoiseConfig()
    object.__setattr__(cfg, "schedule", "exponential")
    with pytest.raises(ValueError, match="renoise.schedule"):
        build_time_samplers(cfg)
    with pytest.raises(ValueError, match="start and end"):
        BlogLinearSampler(start=0.0, end=1.0, steps=10)


def test_beta_of_tiny_shapes_does_not_produce_nan():
    x = sample_beta(0.01, 0.02, 5000, generator=gen(13))
    assert bool(torch.isfinite(x).all()) and bool((x >= 0).all()) and bool((x <= 1).all())
    expected = 1.0 - stats.beta(0.01, 0.02).cdf(0.5)  # ~ a / (a + b): the mass piles up at the ends
    assert math.isclose(float((x > 0.5).double().mean()), expected, abs_tol=0.02)

"""Learning-rate policies: base schedules, plateau, decay-on-spike, exact resume."""

from __future__ import annotations

import math
import random

import pytest

from twinflow_train.config import ConfigError, ScheduleConfig, SpikeConfig, load_config
from twinflow_train.run.lr_policy import LrPolicy, median_mad


def policy(*, base_lr=1e-3, total=1000, **kw) -> LrPolicy:
    spike = kw.pop("spike", None)
    cfg = ScheduleConfig(**kw, spike=SpikeConfig(**spike) if spike else SpikeConfig())
    return LrPolicy(cfg, base_lr=base_lr, total_steps=total)


def smooth_noisy(n: int, seed: int = 0) -> list[float]:
    """A decaying grad-norm curve with 5% multiplicative noise, the normal state of training."""
    rng = random.Random(seed)
    return [(0.5 + 1.5 * math.exp(-k / 400)) * (1 + 0.05 * rng.gauss(0, 1)) for k in range(n)]


# --------------------------------------------------------------------------- base schedules


def test_constant_with_warmup():
    p = policy(policy="constant", warmup_steps=10)
    assert math.isclose(p.lr(1), 1e-4) and math.isclose(p.lr(5), 5e-4)
    assert all(p.lr(k) == 1e-3 for k in (10, 11, 500, 1000))


def test_cosine_ends():
    p = policy(policy="cosine", warmup_steps=100, min_lr=1e-5, total=1100)
    assert math.isclose(p.lr(100), 1e-3)
    assert math.isclose(p.lr(600), (1e-3 + 1e-5) / 2)
    assert math.isclose(p.lr(1100), 1e-5)
    lrs = [p.lr(k) for k in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(p.lr(50), 0.5e-3)


def test_bad_input_names_the_field():
    # the rules across sections (schedule vs optim and run) belong to the config, checked once at load
    with pytest.raises(ConfigError, match=r"schedule\.min_lr \(0\.01\) must be <= optim\.lr"):
        load_config(None, ["optim.lr=1.0e-3", "schedule.min_lr=1.0e-2"])
    for policy_name in ("constant", "cosine", "plateau"):
        with pytest.raises(ConfigError, match=r"schedule\.warmup_steps \(1000\) must be < run\.steps \(1000\)"):
            load_config(None, ["run.steps=1000", "schedule.warmup_steps=1000", f"schedule.policy={policy_name}"])
    assert load_config(None, ["run.steps=1000", "schedule.warmup_steps=999"]).schedule.warmup_steps == 999
    with pytest.raises(ValueError, match="window"):
        SpikeConfig(window=2)
    with pytest.raises(ValueError, match="gamma"):
        SpikeConfig(gamma=1.5)


# --------------------------------------------------------------------------- plateau


def test_plateau_decays_after_patience_and_floors():
    p = policy(policy="plateau", plateau_factor=0.1, plateau_patience=2, min_lr=2e-6)
    events = [p.observe_val(v)["event/plateau_decay"] for v in (1.0, 0.9, 0.95, 0.91, 0.92)]
    assert events == [0, 0, 0, 0, 1]  # three bad validations > patience 2
    assert math.isclose(p.lr(500), 1e-4)
    assert p.observe_val(0.5)["event/plateau_decay"] == 0  # improvement resets the count
    for _ in range(3):
        p.observe_val(0.6)
    assert math.isclose(p.lr(500), 1e-5)
    for _ in range(12):
        p.observe_val(float("nan"))  # non-finite counts as bad
    assert math.isclose(p.lr(500), 2e-6)  # never below min_lr


def test_plateau_is_inert_for_other_policies():
    p = policy(policy="constant")
    for _ in range(10):
        assert p.observe_val(1.0)["event/plateau_decay"] == 0
    assert p.lr(10) == 1e-3


# --------------------------------------------------------------------------- spikes


SPIKE = dict(enabled=True, window=50, k=6.0, floor=0.0, gamma=0.5, cooldown=20)


def test_median_mad():
    assert median_mad([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 1.0)
    assert median_mad([1.0, 3.0]) == (2.0, 1.0)


def test_no_spike_on_a_smooth_noisy_series():
    p = policy(spike=SPIKE, total=3000)
    fired = [k for k, v in enumerate(smooth_noisy(3000), start=1) if p.observe_grad_norm(k, v)["event/spike"]]
    assert fired == []
    assert p.lr(3000) == 1e-3


def test_decay_on_injected_spike_then_cooldown():
    p = policy(spike=dict(SPIKE, skip_update=True), total=1000)
    series = smooth_noisy(400)
    series[199] *= 20   # step 200: spike -> decay
    series[209] *= 20   # step 210: spike inside the cooldown -> no decay, still skipped
    series[299] *= 20   # step 300: after the cooldown -> decay again
    out = {k: p.observe_grad_norm(k, v) for k, v in enumerate(series, start=1)}
    spikes = [k for k, e in out.items() if e["event/spike"]]
    decays = [k for k, e in out.items() if e["event/decay"]]
    skips = [k for k, e in out.items() if e["event/skipped"]]
    assert spikes == [200, 210, 300] and decays == [200, 300] and skips == [200, 210, 300]
    assert math.isclose(p.lr(301), 0.25e-3)
    assert p.last_threshold < series[299] and p.last_threshold > 0


def test_no_skip_unless_asked_and_floor_blocks_small_spikes():
    p = policy(spike=dict(SPIKE, floor=100.0))
    series = smooth_noisy(100)
    series[79] *= 20  # a relative spike, but below the absolute floor
    assert not any(p.observe_grad_norm(k, v)["event/spike"] for k, v in enumerate(series, start=1))
    q = policy(spike=SPIKE)
    series = smooth_noisy(100)
    series[79] *= 20
    events = [q.observe_grad_norm(k, v) for k, v in enumerate(series, start=1)]
    assert events[79] == {"event/spike": 1, "event/decay": 1, "event/skipped": 0}


def test_spike_needs_a_full_window_and_ignores_nonfinite():
    p = policy(spike=SPIKE)
    assert p.observe_grad_norm(1, 1.0)["event/spike"] == 0
    assert p.observe_grad_norm(2, 1e9)["event/spike"] == 0  # window not full yet
    n = len(p.window)
    assert p.observe_grad_norm(3, float("inf")) == {"event/spike": 0, "event/decay": 0, "event/skipped": 0}
    assert p.observe_grad_norm(4, float("nan"))["event/spike"] == 0
    assert len(p.window) == n  # non-finite norms are not window values


def test_repeated_spikes_floor_at_min_lr():
    p = policy(spike=dict(SPIKE, cooldown=0, gamma=0.1), min_lr=1e-6)
    k = 0
    for _ in range(6):
        for v in [1.0] * 50:
            k += 1
            p.observe_grad_norm(k, v)
        k += 1
        assert p.observe_grad_norm(k, 1e3)["event/decay"] == 1
    assert math.isclose(p.lr(k + 1), 1e-6)


def test_spike_decay_composes_with_cosine_and_warmup():
    p = policy(policy="cosine", warmup_steps=10, total=200, min_lr=0.0, spike=dict(SPIKE, window=5))
    for k in range(1, 20):
        p.observe_grad_norm(k, 1.0 + 0.01 * (k % 3))
    assert p.observe_grad_norm(20, 50.0)["event/decay"] == 1
    assert math.isclose(p.lr(21), 0.5 * p.base(21))


# --------------------------------------------------------------------------- resume


def test_state_dict_resumes_exactly():
    kw = dict(policy="plateau", plateau_patience=1, spike=dict(SPIKE, skip_update=True))
    series = smooth_noisy(300, seed=3)
    for k in (120, 125, 260):
        series[k] *= 30
    vals = [1.0, 0.9, 0.95, 0.97, 0.99]

    def drive(p, steps, out):
        for k in steps:
            out.append((p.lr(k), tuple(p.observe_grad_norm(k, series[k - 1]).values())))
            if k % 50 == 0:
                p.observe_val(vals[(k // 50) % len(vals)])

    full, resumed = [], []
    a = policy(**kw)
    drive(a, range(1, 301), full)
    b = policy(**kw)
    drive(b, range(1, 151), resumed)
    state = b.state_dict()
    c = policy(**kw)
    c.load_state_dict(state)
    drive(c, range(151, 301), resumed)
    assert resumed == full
    assert any(e[1][0] for e in full)  # the run really had spikes
    with pytest.raises(ValueError, match="keys"):
        c.load_state_dict({"scale": 1.0})

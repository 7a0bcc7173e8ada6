"""Training-time distributions and Dynamic Renoise Sampling (docs/method.md §4).

A ``TimeSampler`` turns an explicit ``torch.Generator`` into ``n`` times in the
open interval (0, 1). Nothing here touches the global RNG: Beta variates are
built from generator-driven Gamma variates (Marsaglia-Tsang), because
``torch.distributions.Beta`` cannot take a generator.

Static kinds: uniform, Beta(a, b), logit-normal. Dynamic schedules (their
parameter depends on the optimizer step ``k``):

- ``blog_linear``: ``Beta(bias, 1)`` with ``bias`` linear from ``start`` to
  ``end`` over ``steps`` and constant afterwards. ``Beta(b, 1)`` has density
  ``b * t^(b-1)``, so ``b > 1`` leans toward pure noise (t = 1).
- ``dmdr_cosine``: DMDR's DynaRS, ``Beta(1 + 3c, 1 + 0.5c)`` with
  ``c = (1 + cos(pi * min(k / K, 1))) / 2``: Beta(4, 1.5) at k = 0, Beta(1, 1)
  from k = K on.

Which times a dynamic schedule replaces (main t, adv s, rectify s) is
``RenoiseConfig.applies_to``; the others keep their static distribution.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

from ..config import RenoiseConfig, TimeDistConfig

#: Samples are kept in [EPS, 1 - EPS]. Why: a time of exactly 0 makes the twin branch
#: F(x, -0, -0) indistinguishable from the real branch (-0.0 == 0.0 for the sign test
#: and the sinusoidal features), and the contract of every sampler is the open interval.
#: 1e-6 is far below any resolution the method uses (D = 0.01) and is exact in float32.
EPS = 1e-6

TIME_KEYS: tuple[str, ...] = ("main", "adv", "rect")


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


def _log_gamma_variates(shape: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """log of ``n`` Gamma(shape, 1) variates from ``generator`` (Marsaglia & Tsang, 2000).

    For shape < 1 the boost ``G(k) = G(k + 1) * U^(1/k)`` is used; everything stays in
    log space so that tiny shapes do not underflow to 0 (which would make Beta 0/0).
    The rejection loop only redraws the rejected entries, so the draw sequence is a
    pure function of the generator state.
    """
    if shape <= 0:
        raise ValueError(f"gamma shape must be > 0 (got {shape})")
    k = shape + 1.0 if shape < 1.0 else shape
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=generator.device)
    todo = torch.arange(n, device=generator.device)
    while todo.numel():
        m = todo.numel()
        x = torch.randn(m, generator=generator, dtype=torch.float64, device=generator.device)
        u = _uniform(m, generator)
        v = (1.0 + c * x) ** 3
        ok = v > 0
        logv = torch.log(torch.where(ok, v, torch.ones_like(v)))
        # the squeeze-free acceptance test; log(u) = -inf accepts, which is correct (u = 0 has measure 0)
        ok &= torch.log(u) < 0.5 * x * x + d - d * v + d * logv
        out[todo[ok]] = math.log(d) + logv[ok]
        todo = todo[~ok]
    if shape < 1.0:
        # U in (0, 1]: 1 - rand avoids log(0)
        out = out + torch.log1p(-_uniform(n, generator)) / shape
    return out


def sample_beta(a: float, b: float, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """``n`` Beta(a, b) variates (float64, on the generator's device), unclamped."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be > 0 (got a={a}, b={b})")
    if b == 1.0:
        # exact inverse CDF: P(T <= t) = t^a
        return (1.0 - _uniform(n, generator)) ** (1.0 / a)
    if a == 1.0:
        return 1.0 - (1.0 - _uniform(n, generator)) ** (1.0 / b)
    lx = _log_gamma_variates(a, n, generator)
    ly = _log_gamma_variates(b, n, generator)
    return torch.sigmoid(lx - ly)  # X / (X + Y) computed from logs


def _finish(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(EPS, 1.0 - EPS).to(torch.float32)


class TimeSampler(ABC):
    """Draws training times in (0, 1) from an explicit generator."""

    @abstractmethod
    def params(self, step: int) -> tuple[str, tuple[float, ...]]:
        """The distribution in force at optimizer ``step``: (kind, parameters)."""

    @abstractmethod
    def value(self, step: int) -> float | None:
        """The dynamic parameter at ``step`` (telemetry ``renoise/bias``); None for a static sampler."""

    def sample(self, n: int, *, generator: torch.Generator, step: int) -> torch.Tensor:
        """``n`` float32 times in (0, 1) on the generator's device."""
        if n < 0:
            raise ValueError(f"n must be >= 0 (got {n})")
        kind, p = self.params(step)
        if kind == "uniform":
            t = _uniform(n, generator)
        elif kind == "beta":
            t = sample_beta(p[0], p[1], n, generator=generator)
        elif kind == "logit_normal":
            t = torch.sigmoid(p[0] + p[1] * torch.randn(n, generator=generator, dtype=torch.float64,
                                                        device=generator.device))
        else:  # params() is ours; an unknown kind is a bug, not a config error
            raise AssertionError(f"unknown distribution kind {kind!r}")
        return _finish(t)

    def mean(self, step: int) -> float:
        """Analytic mean at ``step`` (logit-normal has none in closed form: NaN)."""
        kind, p = self.params(step)
        if kind == "uniform":
            return 0.5
        if kind == "beta":
            return p[0] / (p[0] + p[1])
        return math.nan


class StaticTimeSampler(TimeSampler):
    def __init__(self, cfg: TimeDistConfig):
        kind = cfg.kind
        if kind == "uniform":
            self._params: tuple[str, tuple[float, ...]] = ("uniform", ())
        elif kind == "beta":
            self._params = ("beta", (float(cfg.a), float(cfg.b)))
        elif kind == "logit_normal":
            self._params = ("logit_normal", (float(cfg.mean), float(cfg.std)))
        else:
            raise ValueError(f"kind: unknown time distribution {kind!r}; valid: 'uniform', 'beta', 'logit_normal'")

    def params(self, step: int) -> tuple[str, tuple[float, ...]]:
        return self._params

    def value(self, step: int) -> float | None:
        return None


class BlogLinearSampler(TimeSampler):
    """Beta(bias, 1), bias linear from ``start`` (step 0) to ``end`` (step ``steps`` and after)."""

    def __init__(self, *, start: float, end: float, steps: int):
        if start <= 0 or end <= 0:
            raise ValueError(f"start and end must be > 0 (got start={start}, end={end})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def bias(self, step: int) -> float:
        progress = min(max(step, 0) / self.steps, 1.0)
        # this form is exactly ``end`` at progress 1 (start + (end - start) * 1 may round off it)
        return self.start * (1.0 - progress) + self.end * progress

    def params(self, step: int) -> tuple[str, tuple[float, ...]]:
        b = self.bias(step)
        return ("uniform", ()) if b == 1.0 else ("beta", (b, 1.0))

    def value(self, step: int) -> float | None:
        return self.bias(step)


class DmdrCosineSampler(TimeSampler):
    """DMDR DynaRS: Beta(1 + 3c, 1 + 0.5c), c = (1 + cos(pi * min(k / K, 1))) / 2."""

    def __init__(self, *, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        self.steps = int(steps)

    def strength(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0) / self.steps, 1.0)))

    def params(self, step: int) -> tuple[str, tuple[float, ...]]:
        c = self.strength(step)
        a, b = 1.0 + 3.0 * c, 1.0 + 0.5 * c
        return ("uniform", ()) if c == 0.0 else ("beta", (a, b))

    def value(self, step: int) -> float | None:
        # the Beta's first parameter, as for blog_linear (whose bias is that parameter too)
        return 1.0 + 3.0 * self.strength(step)


def build_dynamic_sampler(*, schedule: Literal["blog_linear", "dmdr_cosine"], start: float, end: float,
                          steps: int) -> TimeSampler:
    if schedule == "blog_linear":
        return BlogLinearSampler(start=start, end=end, steps=steps)
    if schedule == "dmdr_cosine":
        return DmdrCosineSampler(steps=steps)
    raise ValueError(f"renoise.schedule: unknown schedule {schedule!r}; valid: 'off', 'blog_linear', 'dmdr_cosine'")


def build_time_samplers(cfg: RenoiseConfig) -> dict[str, TimeSampler]:
    """Samplers for the main t, the adv s and the rectify s; the dynamic schedule replaces ``applies_to``."""
    samplers: dict[str, TimeSampler] = {}
    for key in TIME_KEYS:
        try:
            samplers[key] = StaticTimeSampler(getattr(cfg, key))
        except ValueError as e:
            raise ValueError(f"renoise.{key}.{e}") from None
    if cfg.schedule == "off":
        return samplers
    for key in cfg.applies_to:
        if key not in TIME_KEYS:
            raise ValueError(f"renoise.applies_to: unknown time {key!r}; valid: {', '.join(map(repr, TIME_KEYS))}")
    dynamic = build_dynamic_sampler(schedule=cfg.schedule, start=cfg.start, end=cfg.end, steps=cfg.steps)
    for key in cfg.applies_to:
        samplers[key] = dynamic
    return samplers


def dynamic_value(samplers: dict[str, TimeSampler], step: int) -> float | None:
    """The one dynamic parameter of a sampler set (they share one schedule), or None."""
    for key in TIME_KEYS:
        v = samplers[key].value(step)
        if v is not None:
            return v
    return None


"""Samplers and the one-output estimates shared with the method (docs/method.md §1 and §3).

Linear transport: ``x_t = t*z + (1-t)*x``, velocity ``v = z - x``, t = 1 is noise.
From one network output F at (signed) time t:
``x_hat = x_t - |t|*F`` (the data estimate) and ``z_hat = x_t + (1-|t|)*F`` (the
noise estimate); both are exact when F is the true velocity of the pair (x, z).
"""

from __future__ import annotations

import torch

from ..config import SamplerConfig
from ..models.base import Cond, FlowModel, cond_cat, cond_len


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-row time [B] viewed as [B, 1, ..., 1] against ``like``; a float passes through."""
    if isinstance(t, torch.Tensor):
        return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return t


def x_hat(x_t: torch.Tensor, t: torch.Tensor | float, F: torch.Tensor) -> torch.Tensor:
    """Data estimate from one output (docs/method.md §1): ``x_t - |t| * F``."""
    a = _bcast(t, F)
    return x_t - (a.abs() if isinstance(a, torch.Tensor) else abs(a)) * F


def z_hat(x_t: torch.Tensor, t: torch.Tensor | float, F: torch.Tensor) -> torch.Tensor:
    """Noise estimate from one output (docs/method.md §1): ``x_t + (1 - |t|) * F``."""
    a = _bcast(t, F)
    return x_t + (1 - (a.abs() if isinstance(a, torch.Tensor) else abs(a))) * F


def ucgm_grid(*, nfe: int, cfg: SamplerConfig, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``nfe + 1`` times sigma_0 > ... > sigma_nfe = 0 of the few-step sampler (docs/method.md §3).

    ``u = linspace(g0, 1 - g1, S)`` (with g1 = 0: ``linspace(g0, 1, S + 1)`` without
    its last point, so that no step starts at t = 0), warped by Kumaraswamy
    ``(1 - (1 - u^a)^b)^c``, and ``sigma = [1 - u, 0]``.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1 (got {nfe})")
    g0, g1 = cfg.gaps
    if g1 == 0.0:
        u = torch.linspace(g0, 1.0, nfe + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, nfe, dtype=torch.float64)
    a, b, c = cfg.kumaraswamy
    u = (1.0 - (1.0 - u ** a) ** b) ** c
    sigma = torch.cat([1.0 - u, torch.zeros(1, dtype=torch.float64)])
    return sigma.to(device=device, dtype=dtype)


def _rows(value: float, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), float(value), dtype=torch.float32, device=device)


@torch.no_grad()
def ucgm_sample(*, model: FlowModel, z: torch.Tensor, cond: Cond, nfe: int, cfg: SamplerConfig,
                generator: torch.Generator) -> torch.Tensor:
    """Few-step sampler of the student (UCGM, docs/method.md §3); ``nfe`` network calls, no guidance.

    Step i: ``F = model(x, sigma_i, tt)`` with tt = 0 (few), sigma_i (mul) or
    sigma_{i+1} (any); then ``x <- (1 - s')*x_hat + s'*(sqrt(1-r)*z_hat + sqrt(r)*eps)``
    with ``s' = sigma_{i+1}`` and r the stochastic ratio. The last step has s' = 0,
    so it returns the last x_hat (1 NFE: the one-step output).
    """
    n = z.shape[0]
    sigma = ucgm_grid(nfe=nfe, cfg=cfg)
    r = float(cfg.stochastic_ratio)
    # the running state in float64 keeps the re-noising mix exact; the network sees z's dtype
    x = z.to(torch.float64)
    for i in range(nfe):
        s, s_next = float(sigma[i]), float(sigma[i + 1])
        tt = {"few": 0.0, "mul": s, "any": s_next}[cfg.tt_mode]
        F = model(x.to(z.dtype), _rows(s, n, z.device), _rows(tt, n, z.device), cond).to(torch.float64)
        xh, zh = x_hat(x, s, F), z_hat(x, s, F)
        if s_next == 0.0:
            x = xh
            continue
        noise = zh
        if r > 0.0:
            eps = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=generator.device)
            noise = (1.0 - r) ** 0.5 * zh + r ** 0.5 * eps.to(device=z.device, dtype=torch.float64)
        x = (1.0 - s_next) * xh + s_next * noise
    return x.to(z.dtype)


@torch.no_grad()
def euler_sample(*, model: FlowModel, z: torch.Tensor, cond: Cond, steps: int, cfg_scale: float) -> torch.Tensor:
    """Teacher sampler (docs/method.md §3): Euler on ``t = linspace(1, 0, steps + 1)`` at tt = t.

    With ``cfg_scale != 1`` the velocity is ``v_u + cfg_scale * (v_c - v_u)``, the
    conditional and null rows evaluated as one forward of 2B rows; ``cfg_scale = 1``
    is the plain conditional model (one forward of B rows).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (got {cfg_scale})")
    n = z.shape[0]
    guided = cfg_scale != 1.0
    if guided:
        both = cond_cat([cond, model.null_cond(cond)])
        if cond_len(both) != 2 * n:
            raise ValueError(f"cond has {cond_len(cond)} rows for a batch of {n}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = z.to(torch.float64)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if guided:
            xx = x.to(z.dtype).repeat(2, *([1] * (z.dim() - 1)))
            tv = _rows(t, 2 * n, z.device)
            v_c, v_u = model(xx, tv, tv, both).to(torch.float64).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            tv = _rows(t, n, z.device)
            v = model(x.to(z.dtype), tv, tv, cond).to(torch.float64)
        x = x - (t - t_next) * v
    return x.to(z.dtype)

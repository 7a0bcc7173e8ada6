"""The RL weight schedule ``w_rl(k)`` (docs/method.md §5), without torch: the harness reads it too."""

from __future__ import annotations

import math

from ..config import RlConfig

__all__ = ["rl_weight", "rl_onset"]


def _sigmoid(u: float) -> float:
    # split by sign so exp never overflows for steps far from the centre
    if u >= 0:
        return 1.0 / (1.0 + math.exp(-u))
    e = math.exp(u)
    return e / (1.0 + e)


def rl_weight(step: int | float, cfg: RlConfig) -> float:
    """``w_rl(step)`` of the configured schedule; 0 when ``cfg.enabled`` is false or ``step < cfg.start``."""
    if not cfg.enabled or (cfg.start is not None and step < cfg.start):
        return 0.0
    if cfg.schedule == "hard":
        return cfg.weight if step >= cfg.warmup else 0.0
    if cfg.schedule == "linear":
        return cfg.weight * min(1.0, max(0.0, (step - cfg.warmup) / cfg.ramp))
    return cfg.weight * _sigmoid((step - cfg.center) / cfg.width)


def rl_onset(cfg: RlConfig, *, steps: int) -> int:
    """The first optimizer step (1-based, at most ``steps``) whose weight is not exactly 0; ``steps + 1`` when
    there is none. Read off ``rl_weight`` itself step by step, so it is exact for every schedule (a sigmoid far
    enough before its centre underflows to exactly 0)."""
    for step in range(1, steps + 1):
        if rl_weight(step, cfg) != 0.0:
            return step
    return steps + 1

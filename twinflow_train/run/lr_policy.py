"""Learning-rate policies (docs/method.md §6): constant, cosine, ReduceLROnPlateau, and decay-on-spike on top.

``lr(step) = base(step) * scale``, floored for decays:

- ``base``: linear warm-up over ``warmup_steps`` (``base_lr * min(1, step / warmup_steps)``),
  then constant (``constant``, ``plateau``) or cosine from ``base_lr`` to ``min_lr``
  at ``total_steps`` (``cosine``). ``step`` is the trainer's 1-based optimizer step.
- ``scale``: starts at 1; every decay (plateau or spike) multiplies it by its
  factor. A decayed lr never goes below ``min_lr`` (``lr = max(base * scale,
  min(min_lr, base))``: the floor holds for decays but does not lift the warm-up
  or the cosine's own end).

ReduceLROnPlateau (``policy: plateau``), fed by ``observe_val(loss)`` with the
deterministic validation loss: a loss strictly below the best so far resets the
count of bad validations (no relative threshold: the validation is deterministic,
so any decrease is real); after more than ``plateau_patience`` bad validations in
a row, ``scale *= plateau_factor`` and the count restarts. A non-finite
validation loss counts as a bad validation.

Decay-on-spike (``schedule.spike``), fed by ``observe_grad_norm(step, norm)`` with
every step's pre-clip global grad norm:

- a spike is ``norm > median(W) + k * MAD(W)`` and ``norm > floor``, where W is the
  rolling window of the last ``window`` finite norms; no spike is called until the
  window is full. Every finite norm enters the window, spikes included (median
  and MAD are robust to isolated spikes, and a lasting change of level is
  absorbed instead of being a spike forever).
- on a spike outside a cooldown: ``lr = max(gamma * lr, min_lr)`` from the next
  step on (``scale *= gamma``), then no further decay for ``cooldown`` steps.
- with ``skip_update``, every spike (cooldown or not) also asks the trainer to
  skip that step's optimizer update.
- a non-finite norm is neither a spike nor a window value: it belongs to the
  trainer's non-finite policy, which skips the step before this is consulted.

Events returned per step are ``{'event/spike', 'event/decay', 'event/skipped'}``
as 0/1 ints. ``state_dict()`` / ``load_state_dict()`` restore everything for an
exact resume.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..config import ConfigError, ScheduleConfig

__all__ = ["LrPolicy", "median_mad"]


def median_mad(values: list[float]) -> tuple[float, float]:
    """Median and median absolute deviation (unscaled) of a non-empty list."""
    if not values:
        raise ValueError("median_mad of an empty window")

    def median(v: list[float]) -> float:
        s = sorted(v)
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    m = median(values)
    return m, median([abs(v - m) for v in values])


class LrPolicy:
    """The configured learning-rate policy; see the module docstring for the exact rules."""

    def __init__(self, cfg: ScheduleConfig, *, base_lr: float, total_steps: int):
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.scale = 1.0
        # plateau
        self.best_val = math.inf
        self.bad_vals = 0
        # spikes
        self.window: deque[float] = deque(maxlen=cfg.spike.window)
        self.cooldown_until = 0  # decays allowed again from this step on
        self.last_threshold = math.nan  # the spike threshold of the last observed step (telemetry)

    # ------------------------------------------------------------------ lr

    def base(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, step / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        if c.policy == "cosine":
            span = self.total_steps - c.warmup_steps
            progress = min(1.0, max(0.0, (step - c.warmup_steps) / span))
            return warm * (c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))
        return warm * self.base_lr

    def lr(self, step: int) -> float:
        b = self.base(step)
        return max(b * self.scale, min(self.cfg.min_lr, b))

    def _decay(self, factor: float) -> None:
        # keep the scale itself bounded by the floor, so later decays start from the floor, not below it
        self.scale = max(self.scale * factor, self.cfg.min_lr / self.base_lr)

    # ------------------------------------------------------------------ plateau

    def observe_val(self, loss: float) -> dict[str, int]:
        """Feed a validation loss; returns ``{'event/plateau_decay': 0/1}`` (always 0 unless policy is plateau)."""
        if self.cfg.policy != "plateau":
            return {"event/plateau_decay": 0}
        loss = float(loss)
        if math.isfinite(loss) and loss < self.best_val:
            self.best_val = loss
            self.bad_vals = 0
            return {"event/plateau_decay": 0}
        self.bad_vals += 1
        if self.bad_vals > self.cfg.plateau_patience:
            self._decay(self.cfg.plateau_factor)
            self.bad_vals = 0
            return {"event/plateau_decay": 1}
        return {"event/plateau_decay": 0}

    # ------------------------------------------------------------------ spikes

    def observe_grad_norm(self, step: int, norm: float) -> dict[str, int]:
        """Feed this step's pre-clip grad norm; returns the step's spike events (0/1)."""
        events = {"event/spike": 0, "event/decay": 0, "event/skipped": 0}
        sp = self.cfg.spike
        norm = float(norm)
        if not sp.enabled or not math.isfinite(norm):
            return events
        if len(self.window) == sp.window:
            med, mad = median_mad(list(self.window))
            self.last_threshold = med + sp.k * mad
            if norm > self.last_threshold and norm > sp.floor:
                events["event/spike"] = 1
                if step >= self.cooldown_until:
                    self._decay(sp.gamma)
                    self.cooldown_until = step + sp.cooldown + 1
                    events["event/decay"] = 1
                if sp.skip_update:
                    events["event/skipped"] = 1
        self.window.append(norm)
        return events

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best_val": self.best_val, "bad_vals": self.bad_vals,
                "window": list(self.window), "cooldown_until": self.cooldown_until,
                "last_threshold": self.last_threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"scale", "best_val", "bad_vals", "window", "cooldown_until", "last_threshold"}
        if set(state) != keys:
            raise ValueError(f"LrPolicy state has keys {sorted(state)}; expected {sorted(keys)}")
        self.scale = float(state["scale"])
        self.best_val = float(state["best_val"])
        self.bad_vals = int(state["bad_vals"])
        self.window = deque((float(v) for v in state["window"]), maxlen=self.cfg.spike.window)
        self.cooldown_until = int(state["cooldown_until"])
        self.last_threshold = float(state["last_threshold"])

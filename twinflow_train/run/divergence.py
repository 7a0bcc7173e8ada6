"""The grad-norm divergence rule: a run whose pre-clip global grad norm stays above a bound is over.

A healthy run's pre-clip norm is O(1) (the digits ladder's peaks are near 2.2); an exploding
one passes 1e3 within a few hundred steps and keeps climbing while the clipped updates stay
finite, so the non-finite rule alone never ends it. ``run.diverge_grad_norm`` (the bound; None:
off) and ``run.diverge_steps`` (K) end the run as ``diverged`` when K consecutive steps are
above the bound. The trainer applies the rule to every step's norm in order (the gated path
replays them at ``_settle``), and the Optuna search relies on the trainer's ``diverged`` state
instead of a threshold of its own, so both stop a run at the same step for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class GradNormRule:
    """K consecutive pre-clip norms above ``bound`` end the run; ``observe`` one step at a time, in order.

    Only finite steps are observed: a non-finite step is the non-finite rule's (``run.nonfinite``,
    ``run.max_nonfinite``) and neither extends nor breaks the count. ``in_a_row`` and ``since`` (the first
    step of the current count) are checkpointed with the counters, so a resumed run continues the same count."""

    bound: float | None
    steps: int
    in_a_row: int = 0
    since: int = 0

    def __post_init__(self) -> None:
        if self.bound is not None and not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"the divergence bound must be a finite number > 0 or None (got {self.bound!r})")
        if self.steps < 1:
            raise ValueError(f"the divergence rule needs steps >= 1 (got {self.steps})")

    def observe(self, step: int, norm: float) -> str | None:
        """Count finite step ``step``'s pre-clip norm; the reason the run diverged, or None while it has not."""
        if self.bound is None:
            return None
        if not math.isfinite(norm):
            raise ValueError(f"step {step}: a non-finite norm ({norm}) is the non-finite rule's, not this rule's")
        if norm <= self.bound:
            self.in_a_row = 0
            return None
        if self.in_a_row == 0:
            self.since = step
        self.in_a_row += 1
        if self.in_a_row < self.steps:
            return None
        span = f"step {step}" if self.since == step else f"steps {self.since}-{step}"
        if step - self.since + 1 != self.in_a_row:
            span += ", non-finite steps between them not counted"
        return (f"pre-clip grad norm above {self.bound:g} for {self.in_a_row} consecutive "
                f"step{'s' if self.in_a_row > 1 else ''} ({span}; last {norm:.4g})")

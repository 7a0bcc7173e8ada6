"""Paired inference for claims: one interval, four verdicts, error control over a matrix and over looks.

Every statistic a report or a sequential grid states about a pair of arms comes from here, so the same
comparison can never read as decided in one place and as a hint in another.

The numbers of a test are the paired differences ``d_i`` of its seeds (treatment - baseline, or the log
of their ratio). From their count ``n``, mean and sample SD the t-interval at two-sided level ``a`` is
``mean ± t(1 - a/2, n - 1) · SD/√n``.

**Verdicts.** A test predicts a direction; ``margin`` ``m`` is its smallest effect of interest on the
analysis scale (``ln`` of the fold on the log scale). On its decision interval ``[lo, hi]``:

- *no meaningful effect*: ``-m < lo`` and ``hi < m`` (an equivalence test; it wins even where the
  interval excludes zero: a 3% change that is surely there but surely smaller than the margin is no
  meaningful effect);
- *supported*: the interval on the predicted side of zero (and not inside the margin);
- *contradicted*: the interval on the other side of zero (and not inside the margin);
- *inconclusive*: otherwise.

A non-inferiority test (``tolerance`` ``m``: the treatment may be worse by at most ``m``) is *supported*
when the interval's worse end stays inside ``m``, *contradicted* when its better end is beyond ``m``.

**Why one interval decides everything.** Each verdict is a statement the interval implies about the true
effect (sign, or inside/outside the margin), so a wrong verdict needs an interval that misses the true
effect. Intervals that cover all true effects at once with probability >= 1 - alpha therefore make every
verdict right with probability >= 1 - alpha, whatever the effects are and whichever kind of verdict each
test reaches.

**Error control over a matrix: Bonferroni.** Each of the matrix's K tests gets ``alpha / K``. Holm's
step-down would test later hypotheses at up to ``alpha``, but it is valid only where a decided hypothesis
can no longer be wrong; here the same interval can decide a direction or an equivalence, so a test
decided as "supported" at an effect just at the margin still carries the risk of "no meaningful effect",
and passing its alpha on lets the family-wise error exceed alpha (two tests: one at the margin, one at
zero give about 1.25 alpha). Bonferroni intervals are simultaneous; Holm's have no informative
simultaneous form (Strassburger and Bretz 2008).

**Sequential looks: alpha spending.** A test seen at ``n_1 < n_2 < ...`` pairs, out of at most ``n_max``,
spends its ``alpha_k`` over the information fractions ``t_j = n_j / n_max`` (Lan and DeMets 1983): the
Pocock-type function ``alpha ln(1 + (e - 1) t)`` (default: spends early, so large effects stop early) or
the O'Brien-Fleming-type ``2 - 2 Phi(z(1 - alpha/2) / sqrt(t))``. The two-sided boundaries ``c_j`` of the
standardised statistic follow by recursive numerical integration of the Brownian motion of the
cumulative sums; look ``j`` uses the nominal level ``2 (1 - Phi(c_j))`` on the t scale with ``n_j - 1``
degrees of freedom (the usual repeated-confidence-interval construction, Jennison and Turnbull 2000,
ch. 9). The simulation tests check the family-wise error with the looks.

**Futility (non-binding).** A test still open whose interval at ``n_max``, with today's mean and SD and
the fixed-sample level ``alpha_k``, could decide nothing is stopped: more seeds are not expected to
decide it. Stopping early only removes chances to decide, so it cannot raise the error rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
from scipy import stats as sps

Verdict = Literal["supported", "contradicted", "no meaningful effect", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("supported", "contradicted", "no meaningful effect", "inconclusive")
Spending = Literal["pocock", "obrien-fleming"]
SPENDINGS: tuple[Spending, ...] = ("pocock", "obrien-fleming")
ALPHA = 0.05
"""Family-wise error rate of a matrix's verdicts (all tests, all looks)."""
POWER = 0.80
"""Power at which the smallest detectable effect is stated."""

__all__ = ["ALPHA", "POWER", "Paired", "Verdict", "VERDICTS", "Spending", "SPENDINGS", "decide", "nominal_levels",
           "spent", "t_interval", "detectable", "undecidable", "combine"]


# --------------------------------------------------------------------------- paired summaries


@dataclass(frozen=True, slots=True)
class Paired:
    """Count, mean and sample SD (ddof 1) of paired differences; infinite differences are counted apart."""

    n: int
    mean: float
    sd: float
    pos_inf: int = 0
    """Pairs whose difference is +inf (one side's run diverged: the worst outcome, ``harness.verdicts``)."""
    neg_inf: int = 0
    """Pairs whose difference is -inf."""

    @classmethod
    def of(cls, d: Sequence[float] | np.ndarray) -> "Paired":
        d = np.asarray(d, float)
        if np.isnan(d).any():
            raise ValueError("paired differences hold NaN: a missing value must leave its seed out, not enter here")
        pos, neg = int(np.isposinf(d).sum()), int(np.isneginf(d).sum())
        f = d[np.isfinite(d)]
        mean = float(f.mean()) if f.size else math.nan
        sd = float(f.std(ddof=1)) if f.size >= 2 else math.nan
        return cls(n=int(d.size), mean=mean, sd=sd, pos_inf=pos, neg_inf=neg)

    @property
    def finite(self) -> int:
        return self.n - self.pos_inf - self.neg_inf

    @property
    def estimate(self) -> float:
        """The mean difference; ±inf where every pair is infinite one way, nan where both ways."""
        if self.pos_inf and self.neg_inf:
            return math.nan
        if self.finite == 0:
            return math.inf if self.pos_inf else -math.inf if self.neg_inf else math.nan
        if self.pos_inf or self.neg_inf:
            return math.inf if self.pos_inf else -math.inf
        return self.mean


def t_interval(p: Paired, level_alpha: float) -> tuple[float, float]:
    """Two-sided interval at level ``1 - level_alpha``; (nan, nan) with fewer than 2 finite pairs.

    Infinite differences open the interval on their side (the worst outcome is unbounded); the other end
    is the t-interval's end over the finite pairs."""
    if not 0 < level_alpha < 1:
        raise ValueError(f"level_alpha must be in (0, 1) (got {level_alpha})")
    if p.finite < 2:
        if p.pos_inf and not p.neg_inf and p.finite == 0:
            return math.inf, math.inf
        if p.neg_inf and not p.pos_inf and p.finite == 0:
            return -math.inf, -math.inf
        return math.nan, math.nan
    half = float(sps.t.ppf(1 - level_alpha / 2, p.finite - 1)) * p.sd / math.sqrt(p.finite)
    lo, hi = p.mean - half, p.mean + half
    if p.pos_inf:
        hi = math.inf
    if p.neg_inf:
        lo = -math.inf
    return lo, hi


def detectable(p: Paired, level_alpha: float, power: float = POWER) -> float:
    """Smallest effect the two-sided paired t-test at ``level_alpha`` detects with ``power`` at this n and SD
    (central-t approximation): ``(t(1 - a/2, n-1) + t(power, n-1)) · SD/√n``; nan with < 2 finite pairs."""
    if p.finite < 2 or not math.isfinite(p.sd):
        return math.nan
    df = p.finite - 1
    return (float(sps.t.ppf(1 - level_alpha / 2, df)) + float(sps.t.ppf(power, df))) * p.sd / math.sqrt(p.finite)


# --------------------------------------------------------------------------- verdict of an interval


def decide(lo: float, hi: float, *, direction: Literal["increase", "decrease"], margin: float | None,
           tolerance: float | None) -> Verdict:
    """The verdict of interval ``[lo, hi]`` (analysis scale) for a test predicting ``direction``.

    ``margin`` (> 0): the smallest effect of interest, both ways (None: no equivalence verdict, a test read
    from a record made before margins); ``tolerance`` (> 0): non-inferiority instead (the treatment worse by
    at most this). See the module docstring."""
    if direction not in ("increase", "decrease"):
        raise ValueError(f"direction must be 'increase' or 'decrease' (got {direction!r})")
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    sign = 1.0 if direction == "increase" else -1.0
    if tolerance is not None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0 (got {tolerance})")
        worse = sorted((-sign * lo, -sign * hi))  # the effect in the "worse" direction
        if worse[1] < tolerance:
            return "supported"
        if worse[0] > tolerance:
            return "contradicted"
        return "inconclusive"
    if margin is not None and not margin > 0:
        raise ValueError(f"margin must be > 0 (got {margin})")
    if margin is not None and -margin < lo and hi < margin:
        return "no meaningful effect"
    if sign * lo > 0 and sign * hi > 0:
        return "supported"
    if sign * lo < 0 and sign * hi < 0:
        return "contradicted"
    return "inconclusive"


def combine(parts: Sequence[Verdict]) -> Verdict:
    """A claim of several tests: contradicted when any part is; no meaningful effect when a part is (the
    predicted effect is not there); supported when every part is; inconclusive otherwise."""
    if not parts:
        return "inconclusive"
    if "contradicted" in parts:
        return "contradicted"
    if "no meaningful effect" in parts:
        return "no meaningful effect"
    if all(p == "supported" for p in parts):
        return "supported"
    return "inconclusive"


# --------------------------------------------------------------------------- alpha spending


def spent(t: float, alpha: float, kind: Spending) -> float:
    """Cumulative alpha spent by information fraction ``t`` (0 < t <= 1)."""
    t = min(max(float(t), 0.0), 1.0)
    if t == 0:
        return 0.0
    if kind == "pocock":
        return alpha * math.log(1 + (math.e - 1) * t)
    if kind == "obrien-fleming":
        return float(2 - 2 * sps.norm.cdf(sps.norm.ppf(1 - alpha / 2) / math.sqrt(t)))
    raise ValueError(f"spending must be one of {SPENDINGS} (got {kind!r})")


_GRID = 1201  # points per look of the recursive integration (boundary error well below 1e-5 in alpha)


@lru_cache(maxsize=4096)
def _boundaries(fractions: tuple[float, ...], alpha: float, kind: Spending) -> tuple[float, ...]:
    """Two-sided z-boundaries c_j of the looks at ``fractions`` (increasing, in (0, 1])."""
    out: list[float] = []
    prev_t, prev_spent = 0.0, 0.0
    s = w = None  # grid of the cumulative sum S (continuation region) and its sub-density times the weights
    for t in fractions:
        target = spent(t, alpha, kind) - prev_spent
        sigma = math.sqrt(t - prev_t)
        if s is None:
            def tail(b: float) -> float:
                return float(2 * sps.norm.sf(b / sigma))
        else:
            def tail(b: float, s=s, w=w, sigma=sigma) -> float:
                return float(np.sum(w * (sps.norm.sf((b - s) / sigma) + sps.norm.cdf((-b - s) / sigma))))
        mass = tail(0.0)  # the probability of still being in the continuation region
        if target <= 1e-15:
            c = math.inf
        elif target >= mass:
            c = 0.0
        else:
            lo_b, hi_b = 0.0, 40.0 * math.sqrt(t)
            for _ in range(200):  # bisection on the S-scale boundary b = c sqrt(t)
                mid = 0.5 * (lo_b + hi_b)
                if tail(mid) > target:
                    lo_b = mid
                else:
                    hi_b = mid
            c = 0.5 * (lo_b + hi_b) / math.sqrt(t)
        out.append(c)
        prev_spent += target if math.isfinite(c) else 0.0
        # the sub-density of S_t on |S| < c sqrt(t), on a grid, times Simpson-like trapezoid weights
        b = (c if math.isfinite(c) else 12.0) * math.sqrt(t)
        new_s = np.linspace(-b, b, _GRID)
        h = new_s[1] - new_s[0]
        if s is None:
            dens = sps.norm.pdf(new_s / sigma) / sigma
        else:
            dens = (w[None, :] * sps.norm.pdf((new_s[:, None] - s[None, :]) / sigma) / sigma).sum(axis=1)
        tw = np.full(_GRID, h)
        tw[0] = tw[-1] = h / 2
        s, w = new_s, dens * tw
        prev_t = t
    return tuple(out)


def nominal_levels(ns: Sequence[int], n_max: int, alpha: float, kind: Spending) -> list[float]:
    """Two-sided nominal alpha of each look of a test seen at pair counts ``ns`` (strictly increasing, the last
    at most ``n_max``), spending ``alpha`` over fractions ``n / n_max``."""
    ns = [int(n) for n in ns]
    if any(b <= a for a, b in zip(ns, ns[1:])) or not ns or ns[-1] > n_max or ns[0] < 1:
        raise ValueError(f"looks must be increasing pair counts in [1, {n_max}] (got {ns})")
    cs = _boundaries(tuple(n / n_max for n in ns), float(alpha), kind)
    return [float(2 * sps.norm.sf(c)) if math.isfinite(c) else 0.0 for c in cs]


def undecidable(p: Paired, *, n_max: int, alpha: float, direction: Literal["increase", "decrease"],
                margin: float | None, tolerance: float | None) -> bool:
    """Futility: with today's mean and SD, even ``n_max`` pairs at the fixed-sample level ``alpha`` would leave
    the test inconclusive (an optimistic projection: the last look of a sequential test spends less)."""
    if p.finite < 2 or p.pos_inf or p.neg_inf or not math.isfinite(p.sd) or p.finite >= n_max:
        return False
    half = float(sps.t.ppf(1 - alpha / 2, n_max - 1)) * p.sd / math.sqrt(n_max)
    return decide(p.mean - half, p.mean + half, direction=direction, margin=margin,
                  tolerance=tolerance) == "inconclusive"

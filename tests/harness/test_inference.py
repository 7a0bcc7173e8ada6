"""The paired inference of the verdicts: intervals, the four verdicts, alpha spending, and simulated error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.claims import ClaimTest
from harness.inference import (Paired, combine, decide, detectable, nominal_levels, spent, t_interval,
                               undecidable)
from harness.verdicts import Pairs, evaluate


def test_t_interval_and_detectable_effect_by_hand():
    d = np.array([0.1, 0.3, 0.2, 0.4])
    p = Paired.of(d)
    assert p.n == 4 and p.mean == pytest.approx(0.25) and p.sd == pytest.approx(np.std(d, ddof=1))
    half = sps.t.ppf(0.975, 3) * p.sd / 2
    assert t_interval(p, 0.05) == pytest.approx((0.25 - half, 0.25 + half))
    assert detectable(p, 0.05) == pytest.approx((sps.t.ppf(0.975, 3) + sps.t.ppf(0.8, 3)) * p.sd / 2)
    assert all(math.isnan(v) for v in t_interval(Paired.of([0.7]), 0.05))
    with pytest.raises(ValueError, match="NaN"):
        Paired.of([0.1, math.nan])


def test_an_infinite_difference_opens_the_interval_on_its_side_only():
    p = Paired.of([0.5, 0.6, 0.7, math.inf])
    lo, hi = t_interval(p, 0.05)
    assert hi == math.inf and lo == pytest.approx(0.6 - sps.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert p.estimate == math.inf
    assert decide(lo, hi, direction="decrease", margin=0.1, tolerance=None) == "contradicted"
    assert decide(*t_interval(Paired.of([-0.1, 0.2, 0.3, math.inf]), 0.05), direction="decrease", margin=0.1,
                  tolerance=None) == "inconclusive"


@pytest.mark.parametrize("lo, hi, direction, margin, expected", [
    (0.01, 0.05, "increase", 0.1, "no meaningful effect"),   # excludes zero but inside the margin: NME wins
    (-0.05, 0.05, "increase", 0.1, "no meaningful effect"),
    (0.05, 0.3, "increase", 0.1, "supported"),
    (0.05, 0.3, "decrease", 0.1, "contradicted"),
    (-0.3, -0.05, "decrease", 0.1, "supported"),
    (-0.05, 0.3, "increase", 0.1, "inconclusive"),
    (-0.2, 0.05, "increase", 0.1, "inconclusive"),
])
def test_the_four_verdicts(lo, hi, direction, margin, expected):
    assert decide(lo, hi, direction=direction, margin=margin, tolerance=None) == expected


def test_non_inferiority_verdicts():
    # FD may be at most ln(1.5) worse (higher) for a 'decrease' test
    m = math.log(1.5)
    assert decide(0.1, 0.3, direction="decrease", margin=None, tolerance=m) == "supported"
    assert decide(0.5, 0.7, direction="decrease", margin=None, tolerance=m) == "contradicted"
    assert decide(0.3, 0.6, direction="decrease", margin=None, tolerance=m) == "inconclusive"


def test_claim_of_several_parts():
    assert combine(["supported", "supported"]) == "supported"
    assert combine(["supported", "contradicted"]) == "contradicted"
    assert combine(["supported", "no meaningful effect"]) == "no meaningful effect"
    assert combine(["supported", "inconclusive"]) == "inconclusive"


def test_spending_boundaries_match_published_values():
    # Lan-DeMets Pocock-type, 5 equally spaced looks, alpha 0.05: z = 2.438, 2.427, 2.410, 2.397, 2.386
    levels = nominal_levels([1, 2, 3, 4, 5], 5, 0.05, "pocock")
    z = [sps.norm.isf(a / 2) for a in levels]
    assert z == pytest.approx([2.438, 2.427, 2.410, 2.397, 2.386], abs=2e-3)
    # O'Brien-Fleming-type: the first boundary is z(1 - alpha/2) / sqrt(t)
    first = sps.norm.isf(nominal_levels([1, 2], 2, 0.05, "obrien-fleming")[0] / 2)
    assert first == pytest.approx(sps.norm.isf(0.025) / math.sqrt(0.5), rel=1e-6)
    # one look at the maximum is the fixed-sample level
    assert nominal_levels([8], 8, 0.01, "pocock") == pytest.approx([0.01])
    assert spent(1.0, 0.05, "pocock") == pytest.approx(0.05) and spent(1.0, 0.05, "obrien-fleming") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="increasing"):
        nominal_levels([3, 3], 8, 0.05, "pocock")


def test_futility_is_said_only_when_the_largest_design_cannot_decide():
    p = Paired.of([0.3, -0.2, 0.5])  # mean 0.2, SD 0.36: neither direction nor equivalence in reach at n = 8
    assert undecidable(p, n_max=8, alpha=0.01, direction="increase", margin=0.05, tolerance=None)
    p = Paired.of([0.30, 0.32, 0.31])  # a clear effect: more seeds would decide it
    assert not undecidable(p, n_max=8, alpha=0.01, direction="increase", margin=0.05, tolerance=None)


# --------------------------------------------------------------------------- simulated grids


def _test(margin: float) -> ClaimTest:
    return ClaimTest(baseline="a", treatment="b", metric="val/gold_nfe2", direction="increase", margin=margin)


def _simulate(effects: list[float], *, sims: int, first: int, n_max: int, step: int, margin: float,
              seed: int) -> tuple[float, list[float], float]:
    """Family-wise rate of wrong verdicts, per-test rates of a right decision, mean pairs used per test."""
    rng = np.random.default_rng(seed)
    k = len(effects)
    alpha_test = 0.05 / k
    tests = [_test(margin) for _ in effects]
    wrong_grids = 0
    right = np.zeros(k)
    used = 0
    for _ in range(sims):
        data = [rng.normal(e, 1.0, n_max) for e in effects]
        any_wrong = False
        for j, (e, t) in enumerate(zip(effects, tests)):
            looks: tuple[int, ...] = ()
            n = first
            while True:
                d = data[j][:n]
                r = evaluate(t, Pairs(seeds=tuple(range(n)), d=d, excluded=()), claim=j, part=0, text="x",
                             alpha_test=alpha_test, n_max=n_max, spending="pocock", prior_looks=looks)
                looks = r.looks
                if r.state != "open":
                    break
                n = min(n_max, n + step)
            used += n
            v = r.verdict
            wrong = ((v == "supported" and e <= 0) or (v == "contradicted" and e >= 0)
                     or (v == "no meaningful effect" and abs(e) >= margin))
            any_wrong |= wrong
            right[j] += (not wrong) and v != "inconclusive"
        wrong_grids += any_wrong
    return wrong_grids / sims, list(right / sims), used / (sims * k)


def test_simulated_family_wise_error_with_looks_stays_at_the_nominal_level():
    """2,000 simulated grids of six tests, first wave 3, up to 8 seeds, one seed per wave: no effect, effects
    exactly at the margin (where a false "no meaningful effect" is likeliest), and large ones. The rate of grids
    with any wrong verdict stays at or under 5% (with its Monte-Carlo error); the power at the large effect is
    stated."""
    margin = 0.5
    effects = [0.0, 0.0, margin, -margin, 4.0, -4.0]
    fwer, right, used = _simulate(effects, sims=2000, first=3, n_max=8, step=1, margin=margin, seed=1)
    se = math.sqrt(0.05 * 0.95 / 2000)
    print(f"\nfamily-wise wrong-verdict rate {fwer:.4f}; right decisions per test {np.round(right, 3)}; "
          f"mean pairs used per test {used:.2f} of 8")
    assert fwer <= 0.05 + 2 * se
    # power at an effect of 4 SD of the paired difference: decided the right way in most grids
    assert min(right[4], right[5]) >= 0.8


def test_simulated_error_holds_at_the_largest_looks_and_with_obrien_fleming():
    """The same check for a design with many looks (2 to 10 pairs) under the null and at the margin."""
    margin = 0.5
    rng_effects = [0.0, margin, 0.0, -margin]
    fwer, _, _ = _simulate(rng_effects, sims=2000, first=2, n_max=10, step=1, margin=margin, seed=2)
    assert fwer <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000)

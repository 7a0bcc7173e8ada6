import numpy as np
import pandas as pd
import pytest

from reports.plots import curve_stats


def _frame(n_steps: int, seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for s in seeds:
        steps = np.arange(1, n_steps + 1)
        rows.append(pd.DataFrame({"arm": "a", "seed": s, "kind": "train", "step": steps,
                                  "g": 1.0 + s + np.zeros(n_steps)}))
    return pd.concat(rows, ignore_index=True)


def test_downsampling_caps_points_and_max_keeps_a_spike():
    df = _frame(10_000)
    df.loc[(df.seed == 1) & (df.step == 5_001), "g"] = 500.0
    cs = curve_stats(df, "g", kind="train", max_points=100, seed_agg="max")
    assert len(cs) == 100
    assert cs["hi"].max() == 500.0  # the spike survives in the band's top
    assert cs["lo"].min() == 1.0 and cs["n"].min() == 3
    mean_cs = curve_stats(df, "g", kind="train", max_points=100, seed_agg="mean")
    assert mean_cs["mean"].max() < 10  # averaged away within its bin, as expected of a mean


def test_few_steps_are_not_binned_and_band_is_min_max():
    df = _frame(20)
    cs = curve_stats(df, "g", kind="train", max_points=400)
    assert len(cs) == 20
    np.testing.assert_allclose(cs["mean"], 2.0)
    np.testing.assert_allclose(cs["lo"], 1.0)
    np.testing.assert_allclose(cs["hi"], 3.0)


def test_ci95_band_is_a_t_interval():
    from scipy.stats import t

    df = _frame(5)
    cs = curve_stats(df, "g", kind="train", band="ci95")
    half = t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sd of (1, 2, 3) is 1
    np.testing.assert_allclose(cs["hi"] - cs["mean"], half)


def test_nonfinite_values_are_not_drawn():
    df = _frame(10)
    df.loc[df.step == 4, "g"] = np.nan
    df.loc[df.step == 5, "g"] = np.inf
    cs = curve_stats(df, "g", kind="train")
    assert set(cs["x"]) == set(range(1, 11)) - {4, 5}


def test_unknown_band_is_an_error():
    with pytest.raises(ValueError, match="band"):
        curve_stats(_frame(3), "g", kind="train", band="sd")

"""How the report writes its numbers: compact numbers, steps and counts, fold changes and paired differences.

The document stage's vocabulary for numbers (``reports.document``, ``reports.verdict``); ``reports.stats`` computes
them and writes no words.
"""

from __future__ import annotations

import math

import pandas as pd


def fmt_num(x: float | None, *, sig: int = 3, signed: bool = False) -> str:
    """Compact number: 3 significant digits, no exponent for ordinary magnitudes, '—' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x):
        return "—"
    x = float(x)
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    sign = "+" if signed and x > 0 else ""
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{sign}{x:.{sig - 1}e}"
    decimals = max(sig - 1 - int(math.floor(math.log10(a))), 0)
    return f"{sign}{x:.{decimals}f}"


def fmt_int(x: float | None) -> str:
    """A step or count: the integer ('12.5' for a median between two steps), or '—' when missing."""
    if x is None or pd.isna(x) or not math.isfinite(float(x)):
        return "—"
    x = float(x)
    return str(int(x)) if x == int(x) else f"{x:.1f}"


def fmt_fold(r: float) -> str:
    """A fold change: 'x1.02', 'x3.4', 'x21', 'x0.052', 'x3.4e14' (three significant digits near 1, where a
    2% change matters; two elsewhere; within 1% of 1, two significant digits of the change: 'x1.00045',
    'x0.9962')."""
    if r is None or not math.isfinite(r):
        return "—"
    if r <= 0:
        return f"x{fmt_num(r)}"
    if 0 < abs(r - 1) < 0.01:
        # within 1% of no change: enough decimals for two significant digits of the change (x1.00045, not x1)
        if abs(r - 1) < 1e-6:
            return f"x{r:.6f}"
        decimals = max(3, 1 - math.floor(math.log10(abs(r - 1))))
        return f"x{r:.{decimals}f}"
    if 0.1 <= r < 10:
        return f"x{r:.3g}"
    if 10 <= r < 1e4:
        return f"x{float(f'{r:.2g}'):.0f}"
    if 1e-3 <= r < 0.1:
        return f"x{r:.2g}"
    mantissa, exp = f"{r:.1e}".split("e")
    return f"x{mantissa}e{int(exp)}"


FOLD_BEYOND = 10.0
"""A ratio beyond this (or below its inverse) is written as a fold change, not a percentage."""


def _far(ratio: float) -> bool:
    return math.isfinite(ratio) and (ratio >= FOLD_BEYOND or ratio <= 1 / FOLD_BEYOND)


def fmt_diff(row: pd.Series | dict) -> str:
    """'+0.4 [-1.2, 2.0]', '-63% [-71%, -55%]', or fold changes 'x3.4e14 [x12, x8.1e15]' when any of the three
    ratios is beyond 10x (a percentage of +3.4e16% reads as nothing); 'n/a' for the interval with < 2 pairs."""
    est, lo, hi = row["estimate"], row["lo"], row["hi"]
    if row["mode"] == "rel" and any(v is not None and _far(1.0 + v) for v in (est, lo, hi)):
        f = lambda v: "—" if v is None or not math.isfinite(v) else fmt_fold(1.0 + v)  # noqa: E731
    elif row["mode"] == "rel":
        # one decimal below 10%, so that a bound of +0.4% does not print as "+0%" beside an "excludes 0" flag
        f = lambda v: ("—" if v is None or not math.isfinite(v)  # noqa: E731
                       else f"{100 * v:+.0f}%" if abs(v) >= 0.1 else f"{100 * v:+.1f}%")
    else:
        f = lambda v: fmt_num(v, signed=True)  # noqa: E731
    if not math.isfinite(est):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{f(est)} [n/a]"
    return f"{f(est)} [{f(lo)}, {f(hi)}]"

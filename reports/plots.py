"""Curves per arm: mean over seeds with a labelled band, downsampled to a fixed number of points.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly,
so no pyplot state or GUI backend is involved (safe in threads and headless).
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.stats import t as t_dist

from .data import GridData
from .stats import SAMPLE_METRICS, max_grad_column, teacher_values

Band = Literal["minmax", "ci95"]
BANDS: tuple[str, ...] = ("minmax", "ci95")
BAND_LABEL = {"minmax": "band: min-max over seeds", "ci95": "band: 95% t-interval of the mean over seeds"}


@dataclass(frozen=True, slots=True)
class FigureOut:
    slug: str
    """File stem of the PNG."""
    title: str
    caption: str
    figure: Figure
    """The drawn figure; the publish stage renders it (``render``) into the PNG files and the HTML."""
    meta: dict = field(default_factory=dict)
    """Facts about what was drawn (tests and the report text use them)."""
    dpi: int = 100
    """Resolution of the rendered PNG."""


def new_figure(*, width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def fixed_margins(fig: Figure, *, left: float = 0.75, right: float = 0.25, top: float = 0.5, bottom: float = 0.85,
                  wspace: float = 0.25, hspace: float = 0.55) -> None:
    """Margins in inches. A fixed layout, because constrained layout costs a second draw of every figure."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, wspace=wspace,
                        hspace=hspace)


def title_above(fig: Figure, text: str, *, fontsize: float = 10, pad: float = 0.08) -> float:
    """The figure's title in its top margin, ``pad`` inches below the top edge, wrapped to the figure's width;
    returns the inches it takes (pad included), so that the caller sets a top margin that keeps the axes'
    titles clear of it (a title placed as a fraction of the height drops onto them in a tall figure)."""
    w, h = fig.get_size_inches()
    per_line = max(int(w * 72 / (0.56 * fontsize)), 20)  # characters of a line at this size (a generous average)
    lines = textwrap.wrap(text, per_line) or [""]
    fig.suptitle("\n".join(lines), fontsize=fontsize, y=1 - pad / h, va="top")
    return pad + len(lines) * 1.3 * fontsize / 72


AXES_TITLE = 0.3
"""Inches above an axes that its one-line title (9 pt, with its pad) takes."""


def render(fig: Figure, *, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def arm_colors(arms: Sequence[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10"] if len(arms) <= 10 else colormaps["tab20"] if len(arms) <= 20 else colormaps["turbo"]
    n = max(len(arms), 1)
    return {a: cmap(i if len(arms) <= 20 else i / n) for i, a in enumerate(arms)}


# --------------------------------------------------------------------------- aggregation


def curve_stats(metrics: pd.DataFrame, key: str, *, kind: str | None, max_points: int = 400,
                seed_agg: Literal["mean", "max"] = "mean", band: Band = "minmax") -> pd.DataFrame:
    """Per arm and step bin: mean over seeds and the band (columns arm, x, mean, lo, hi, n).

    ``kind``: the record kind to use, or None when ``metrics`` holds one kind only.
    Steps are cut into at most ``max_points`` equal bins over the grid's step range;
    each run is first reduced within a bin (``seed_agg``: mean, or max so a spike
    survives downsampling), then runs are combined. Non-finite values are left out
    (divergence is marked separately, never drawn as a value).
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS} (got {band!r})")
    if key not in metrics.columns:
        return pd.DataFrame(columns=["arm", "x", "mean", "lo", "hi", "n"])
    d = metrics[["arm", "seed", "step", key]]
    if kind is not None:  # None: the caller already split the table by kind (once, not per curve)
        d = d[metrics["kind"].to_numpy() == kind]
    d = d[np.isfinite(d[key].to_numpy(dtype=float))]
    if d.empty:
        return pd.DataFrame(columns=["arm", "x", "mean", "lo", "hi", "n"])
    steps = d["step"].to_numpy()
    s0, s1 = int(steps.min()), int(steps.max())
    if s1 - s0 + 1 <= max_points:
        bins = steps - s0
    else:
        bins = (steps - s0) * max_points // (s1 - s0 + 1)
    d = d.assign(_bin=bins)
    per_run = d.groupby(["arm", "seed", "_bin"], observed=True, sort=False).agg(x=("step", "mean"), v=(key, seed_agg))
    per_arm = per_run.groupby(["arm", "_bin"], observed=True).agg(
        x=("x", "mean"), mean=("v", "mean"), lo=("v", "min"), hi=("v", "max"), sd=("v", "std"), n=("v", "count"))
    if band == "ci95":
        n = per_arm["n"].to_numpy()
        half = np.where(n > 1, t_dist.ppf(0.975, np.maximum(n - 1, 1)) * per_arm["sd"].to_numpy() / np.sqrt(n), 0.0)
        per_arm["lo"] = per_arm["mean"] - half
        per_arm["hi"] = per_arm["mean"] + half
    return per_arm.drop(columns="sd").reset_index().drop(columns="_bin")


def _draw(ax, cs: pd.DataFrame, arms: Sequence[str], colors: dict, *, log: bool = False) -> list[str]:
    drawn = []
    for arm in arms:
        c = cs[cs["arm"] == arm]
        if c.empty:
            continue
        x = c["x"].to_numpy()
        lo, hi = c["lo"].to_numpy(), c["hi"].to_numpy()
        if log:  # a lower band edge at or below 0 cannot be drawn on a log axis; clip it to the mean's floor
            floor = np.nanmin(c["mean"].to_numpy()[c["mean"].to_numpy() > 0], initial=np.inf)
            lo = np.where(lo > 0, lo, floor if math.isfinite(floor) else np.nan)
        ax.fill_between(x, lo, hi, color=colors[arm], alpha=0.18, linewidth=0)
        ax.plot(x, c["mean"].to_numpy(), color=colors[arm], linewidth=1.2, marker="o" if len(c) <= 12 else None,
                markersize=3)
        drawn.append(arm)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return drawn


def _legend(fig: Figure, arms: Sequence[str], colors: dict, extra: Sequence[Line2D] = (), **margins) -> None:
    """Arm legend below the axes; sets the figure margins so that it fits."""
    handles = [Line2D([], [], color=colors[a], linewidth=2, label=a) for a in arms] + list(extra)
    if not handles:
        fixed_margins(fig, bottom=0.5, **margins)
        return
    # as many columns as fit the figure's width: an entry is its handle (~0.45 in) and its label (8 pt text)
    entry = max(0.45 + len(h.get_label()) * 8 * 0.6 / 72 for h in handles)
    ncols = max(1, min(len(handles), 6, int(fig.get_size_inches()[0] / entry)))
    rows = math.ceil(len(handles) / ncols)
    fig.legend(handles=handles, loc="lower center", ncols=ncols, fontsize=8, frameon=False)
    fixed_margins(fig, bottom=0.5 + 0.2 * rows, **margins)


def _auto_log(cs: pd.DataFrame) -> bool:
    """Log axis when every value is positive and they span more than 1.5 decades."""
    if cs.empty:
        return False
    lo, hi = cs["lo"].min(), cs["hi"].max()
    return bool(cs["mean"].min() > 0 and lo > 0 and hi / lo > 10 ** 1.5)


# --------------------------------------------------------------------------- figures


def split_kinds(data: GridData) -> dict[str, pd.DataFrame]:
    """The telemetry table split by record kind, once for all curves."""
    kind = data.metrics["kind"].to_numpy()
    return {k: data.metrics[kind == k] for k in ("train", "val", "teacher")}


def _frames(data: GridData, frames: dict[str, pd.DataFrame] | None) -> dict[str, pd.DataFrame]:
    return frames if frames is not None else split_kinds(data)


def grad_norm_figure(data: GridData, *, band: Band, max_points: int,
                     frames: dict[str, pd.DataFrame] | None = None) -> FigureOut | None:
    gcol = max_grad_column(data)
    if gcol is None:
        return None
    arms, colors = data.arms, arm_colors(data.arms)
    train = _frames(data, frames)["train"]
    cs = curve_stats(train, gcol, kind=None, max_points=max_points, seed_agg="max", band=band)
    fig = new_figure(width=10, height=4.2)
    ax = fig.add_subplot()
    _draw(ax, cs, arms, colors, log=True)
    extra = []
    n_spikes = 0
    if "event/spike" in train.columns:
        sp = train[train["event/spike"] > 0]
        y = sp[gcol].where(np.isfinite(sp[gcol]))
        for arm in arms:
            sel = (sp["arm"] == arm).to_numpy()
            if sel.any():
                ax.scatter(sp["step"].to_numpy()[sel], y.to_numpy()[sel], marker="v", s=22, color=colors[arm],
                           edgecolors="black", linewidths=0.4, zorder=3)
        n_spikes = int(sp["event/spike"].sum())
        extra.append(Line2D([], [], linestyle="none", marker="v", color="grey", markeredgecolor="black",
                            label="spike (event/spike)"))
    dv = data.statuses[data.statuses["state"] == "diverged"]
    if len(dv):
        for arm in arms:
            s = dv.loc[dv["arm"] == arm, "step"].dropna().to_numpy()
            if s.size:
                ax.scatter(s, np.full(s.size, 0.97), marker="X", s=50, color=colors[arm], edgecolors="black",
                           linewidths=0.5, transform=ax.get_xaxis_transform(), zorder=4, clip_on=False)
        extra.append(Line2D([], [], linestyle="none", marker="X", color="grey", markeredgecolor="black",
                            label="run diverged"))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{gcol} (log)")
    how = ("largest pre-clip norm since the previous record" if gcol == "grad_norm/max"
           else "pre-clip norm at logged steps")
    ax.set_title(f"Pre-clip gradient norm: {how}; line: mean over seeds of the per-bin max; {BAND_LABEL[band]}",
                 fontsize=9)
    _legend(fig, arms, colors, extra, left=0.95)  # room for the log axis's labels beside its name
    caption = (f"{gcol}, log axis. Each run is reduced to its maximum within a step bin (at most {max_points} bins), "
               f"then averaged over seeds; {BAND_LABEL[band]}. Triangles: logged spike events ({n_spikes} in all); "
               f"crosses at the top: the step a run was stopped as diverged "
               f"({len(dv)} run{'' if len(dv) == 1 else 's'}).")
    return FigureOut("grad_norm", "Pre-clip gradient norm", caption, fig,
                     {"key": gcol, "spikes": n_spikes, "diverged": len(dv)})


def panels_figure(data: GridData, *, slug: str, title: str, keys: Sequence[str], kind: str, band: Band,
                  max_points: int, ncols: int = 2, log: Literal["auto", "on", "off"] = "auto",
                  seed_agg: Literal["mean", "max"] = "mean", note: str = "",
                  frames: dict[str, pd.DataFrame] | None = None) -> FigureOut | None:
    """One panel per present key, every arm in each panel."""
    keys = [k for k in keys if data.has(k)]
    if not keys:
        return None
    part = _frames(data, frames)[kind]
    arms, colors = data.arms, arm_colors(data.arms)
    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    # a single panel gets the full report width, so its title and legend fit
    fig = new_figure(width=10.0 if ncols == 1 else 5.2 * ncols, height=3.0 * nrows + 0.6 + 0.6 * (ncols == 1))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    drawn: set[str] = set()
    for ax, key in zip(axes.flat, keys):
        cs = curve_stats(part, key, kind=None, max_points=max_points, seed_agg=seed_agg, band=band)
        use_log = log == "on" or (log == "auto" and _auto_log(cs))
        drawn.update(_draw(ax, cs, arms, colors, log=use_log))
        ax.set_title(key + (" (log)" if use_log else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    top = title_above(fig, f"{title}: line = mean over seeds, {BAND_LABEL[band]}") + AXES_TITLE
    # only the arms that logged these keys (per-term gradients exist in RL arms only)
    _legend(fig, [a for a in arms if a in drawn], colors, top=top)
    caption = f"{', '.join(keys)}; line: mean over seeds; {BAND_LABEL[band]}.{(' ' + note) if note else ''}"
    return FigureOut(slug, title, caption, fig, {"keys": keys})


def sample_metrics_figure(data: GridData, *, band: Band, max_points: int,
                          frames: dict[str, pd.DataFrame] | None = None) -> FigureOut | None:
    """FD, reward and accuracy against steps, one column per NFE, the teacher as a dashed reference."""
    nfe = data.nfe
    rows = [w for w in SAMPLE_METRICS if any(data.has(f"val/{w}_nfe{n}") for n in nfe)]
    if not rows or not nfe:
        return None
    teacher = teacher_values(data)
    t_steps = teacher.get("teacher/steps")
    t_label = f"teacher ({int(t_steps)} steps)" if t_steps and math.isfinite(t_steps) else "teacher"
    arms, colors = data.arms, arm_colors(data.arms)
    val = _frames(data, frames)["val"]
    fig = new_figure(width=3.8 * len(nfe), height=2.8 * len(rows) + 0.7)
    axes = fig.subplots(len(rows), len(nfe), squeeze=False, sharey="row")
    refs = euler_refs = 0
    for i, what in enumerate(rows):
        for j, n in enumerate(nfe):
            ax = axes[i, j]
            cs = curve_stats(val, f"val/{what}_nfe{n}", kind=None, max_points=max_points, band=band)
            # FD spans decades between a good student and one pushed off the data (x30 and more): log axis
            _draw(ax, cs, arms, colors, log=what == "fd")
            ref = teacher.get(f"teacher/{what}")
            if ref is not None and math.isfinite(ref):
                ax.axhline(ref, color="black", linestyle="--", linewidth=1)
                refs += 1
            euler = teacher.get(f"teacher/fd_euler{n}") if what == "fd" else None
            if euler is not None and math.isfinite(euler):  # the teacher itself given the student's budget
                ax.axhline(euler, color="dimgray", linestyle=":", linewidth=1.2)
                euler_refs += 1
            ax.set_title(f"{what} @ {n} NFE" + (" (log)" if what == "fd" else ""), fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("step", fontsize=8)
    top = title_above(fig, f"Validation sample metrics: line = mean over seeds, {BAND_LABEL[band]}; "
                           f"dashed = {t_label}") + AXES_TITLE
    extra = [Line2D([], [], color="black", linestyle="--", label=t_label)]
    if euler_refs:
        extra.append(Line2D([], [], color="dimgray", linestyle=":", label="teacher, Euler with n steps"))
    _legend(fig, arms, colors, extra, wspace=0.08, hspace=0.45, top=top)
    caption = (f"Student sample metrics on the fixed validation noise and prompts, per NFE; dashed line: the "
               f"{t_label} on the same prompts"
               + ("; dotted line (FD): the teacher sampled with Euler in as many steps as the student's NFE"
                  if euler_refs else "")
               + ". FD (log axis) and KID are lower-better; reward, accuracy, gold and proxy higher-better.")
    return FigureOut("sample_metrics", "Validation sample metrics", caption, fig,
                     {"rows": rows, "nfe": list(nfe), "teacher_refs": refs, "teacher_euler_refs": euler_refs,
                      "log_rows": [w for i, w in enumerate(rows) if axes[i, 0].get_yscale() == "log"]})


def curve_figures(data: GridData, *, band: Band = "minmax", max_points: int = 400) -> list[FigureOut]:
    """Every curve figure whose telemetry is present, in report order."""
    frames = split_kinds(data)
    figs = [
        grad_norm_figure(data, band=band, max_points=max_points, frames=frames),
        panels_figure(data, slug="grad_terms", title="Per-term gradients (TwinFlow vs RL)",
                      keys=["grad_norm/twinflow", "grad_norm/rl", "grad_cos/twinflow_rl", "rl/share"],
                      kind="train", band=band, max_points=max_points, frames=frames,
                      note="Per-term norms are of each term's own gradient before clipping (runs with RL)."),
        panels_figure(data, slug="loss_terms", title="Training loss terms",
                      keys=["loss/total", "loss/main", "loss/rect", "loss/rl"], kind="train", band=band,
                      max_points=max_points, frames=frames, note="Mean over the step's micro-batches, as logged."),
        panels_figure(data, slug="val_loss", title="Deterministic validation loss", keys=["val/loss"], kind="val",
                      band=band, max_points=max_points, ncols=1, frames=frames,
                      note="Fixed-noise flow-matching loss on the held-out split."),
        sample_metrics_figure(data, band=band, max_points=max_points, frames=frames),
        panels_figure(data, slug="schedules", title="Schedules", keys=["lr", "rl/weight", "renoise/bias", "rl/reward"],
                      kind="train", band=band, max_points=max_points, ncols=2, log="off", frames=frames,
                      note="Learning rate (after warm-up, decays and plateaus), RL weight, renoise Beta bias, "
                           "mean reward of the training batch."),
    ]
    return [f for f in figs if f is not None]

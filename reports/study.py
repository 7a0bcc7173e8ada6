"""The Optuna study section: optimisation history, objective against each parameter,
intermediate values per trial, and the Pareto front of a two-objective study.

``study_section`` takes any ``optuna.Study`` (any storage), so the section works
with whatever storage the search writes; ``find_studies`` opens the journal
files found in a grid directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from harness.search import ATTR_DIVERGED, ATTR_PRUNE, ATTR_RECORDED

from .data import GridDataError
from .plots import FigureOut, fixed_margins, new_figure

if TYPE_CHECKING:
    import optuna

STATE_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red", "RUNNING": "tab:gray",
                "WAITING": "tab:gray"}


@dataclass(frozen=True, slots=True)
class StudySection:
    name: str
    figures: list[FigureOut]
    table: pd.DataFrame
    """One row per trial: number, state, value(s), recorded metrics, parameters, duration, last intermediate step."""
    summary: str
    """Computed sentences: trial counts by state and the best trial(s)."""
    front: pd.DataFrame | None = None
    """Several objectives: the Pareto-optimal trials (sorted by the first objective), else None."""


def trials_table(study: "optuna.Study") -> pd.DataFrame:
    trials = study.get_trials(deepcopy=False)
    names = _objective_names(study)
    rows = []
    for t in trials:
        row = {"trial": t.number, "state": t.state.name}
        values = t.values if t.values is not None else [None] * len(names)
        row.update({n: (math.nan if v is None else float(v)) for n, v in zip(names, values)})
        # metrics the search stored beside the objectives (objective.record), e.g. the gold reward
        recorded = t.user_attrs.get(ATTR_RECORDED) or {}
        row.update({k: (math.nan if v is None else float(v)) for k, v in recorded.items()})
        row.update({f"param:{k}": v for k, v in t.params.items()})
        row["diverged"] = bool(t.user_attrs.get(ATTR_DIVERGED, False))
        row["reason"] = t.user_attrs.get(ATTR_PRUNE) or ""
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else math.nan
        row["last_step"] = max(t.intermediate_values) if t.intermediate_values else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _objective_names(study: "optuna.Study") -> list[str]:
    n = len(study.directions)
    names = getattr(study, "metric_names", None)
    if names and len(names) == n:
        return [str(x) for x in names]
    return ["value"] if n == 1 else [f"value{i}" for i in range(n)]


def _fd_log(ax, name: str, values: pd.Series) -> None:
    """FD on a log axis (a run pushed off the data sits decades above a good one), when every value is positive."""
    if "fd" in name.split("/")[-1] and len(values) and bool((values > 0).all()):
        ax.set_yscale("log")


def _is_log(study: "optuna.Study", param: str) -> bool:
    for t in study.get_trials(deepcopy=False):
        if param in t.distributions:
            return bool(getattr(t.distributions[param], "log", False))
    return False


def study_section(study: "optuna.Study", *, max_param_panels: int = 6) -> StudySection:
    """Figures, trial table and summary of one study."""
    table = trials_table(study)
    names = _objective_names(study)
    dirs = [d.name.lower() for d in study.directions]  # 'minimize' / 'maximize'
    figs: list[FigureOut] = []
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    summary = [f"Study '{study.study_name}': {len(table)} trials ("
               + ", ".join(f"{counts[s]} {s.lower()}" for s in sorted(counts)) + ")."]
    complete = table[table["state"] == "COMPLETE"] if len(table) else table
    params = [c for c in table.columns if c.startswith("param:")][:max_param_panels]

    if len(names) == 1 and len(complete):
        name, d = names[0], dirs[0]
        fig = new_figure(width=6.5, height=3.4)
        fixed_margins(fig, bottom=0.6, top=0.45)
        ax = fig.add_subplot()
        c = complete.sort_values("trial")
        ax.scatter(c["trial"], c[name], s=18, color=STATE_COLORS["COMPLETE"], label="complete trial")
        best = c[name].cummin() if d == "minimize" else c[name].cummax()
        ax.step(c["trial"], best, where="post", color="black", linewidth=1.2, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(name)
        _fd_log(ax, name, c[name])
        ax.set_title(f"Optimisation history ({d})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        figs.append(FigureOut(f"study_{study.study_name}_history", "Optimisation history",
                              f"Objective {name} of each complete trial and the best so far ({d}).", fig))
        bt = study.best_trial
        summary.append(f"Best trial #{bt.number}: {name} = {bt.value:.4g} with "
                       + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                   for k, v in bt.params.items()) + ".")

    if params and len(complete):
        for i, name in enumerate(names):
            fig = new_figure(width=3.6 * len(params), height=3.2)
            fixed_margins(fig, bottom=0.6, top=0.45)
            axes = fig.subplots(1, len(params), squeeze=False)[0]
            for ax, p in zip(axes, params):
                c = complete[complete[p].notna()]
                x = pd.to_numeric(c[p], errors="coerce")
                if x.notna().all():
                    ax.scatter(x, c[name], s=18, c=c["trial"], cmap="viridis")
                    if _is_log(study, p.removeprefix("param:")):
                        ax.set_xscale("log")
                        # within a decade the minor ticks get labels too, written over each other
                        ax.xaxis.set_minor_formatter(NullFormatter())
                else:  # categorical parameter
                    cats = sorted(c[p].astype(str).unique())
                    ax.scatter([cats.index(v) for v in c[p].astype(str)], c[name], s=18, c=c["trial"], cmap="viridis")
                    ax.set_xticks(range(len(cats)), cats, fontsize=7)
                ax.set_xlabel(p.removeprefix("param:"), fontsize=8)
                ax.set_ylabel(name, fontsize=8)
                _fd_log(ax, name, c[name])
                ax.grid(True, alpha=0.3)
            fig.suptitle(f"{name} against each parameter (colour: trial number)", fontsize=9)
            figs.append(FigureOut(f"study_{study.study_name}_slice{i}", f"Objective {name} against parameters",
                                  "Complete trials only; colour = trial number.", fig))

    inter = [(t.number, t.state.name, t.intermediate_values) for t in study.get_trials(deepcopy=False)
             if t.intermediate_values]
    if inter:
        fig = new_figure(width=6.5, height=3.4)
        fixed_margins(fig, bottom=0.6, top=0.45)
        ax = fig.add_subplot()
        for _, state, iv in inter:
            steps = sorted(iv)
            ax.plot(steps, [iv[s] for s in steps], color=STATE_COLORS.get(state, "tab:gray"), alpha=0.7, linewidth=1,
                    marker="." if len(steps) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("reported value")
        ax.grid(True, alpha=0.3)
        present = sorted({s for _, s, _ in inter})
        ax.legend(handles=[Line2D([], [], color=STATE_COLORS.get(s, "tab:gray"), label=s.lower()) for s in present],
                  fontsize=7)
        ax.set_title("Intermediate values per trial (the values pruning acted on)", fontsize=9)
        figs.append(FigureOut(f"study_{study.study_name}_intermediate", "Intermediate values",
                              "Each trial's reported validation values against its step, coloured by final state.",
                              fig))

    front_table = None
    if len(names) >= 2 and len(complete):
        front_table, fig = _pareto(study, table, complete, names, dirs, params)
        if fig is not None:
            figs.append(fig)
        summary.append(f"Pareto front: {len(front_table)} trial(s): "
                       + "; ".join(_front_entry(r, names, params) for _, r in front_table.iterrows()) + ".")
    diverged = table[table["diverged"]] if "diverged" in table.columns else table.iloc[:0]
    if len(diverged):
        summary.append(f"Pruned as diverging ({len(diverged)}; no values, so not on any front): "
                       + "; ".join(f"#{int(r['trial'])} ("
                                   + ", ".join(f"{p.removeprefix('param:')} = {_fmt_param(r[p])}" for p in params)
                                   + ")" for _, r in diverged.iterrows()) + ".")
    if not len(complete):
        summary.append("No complete trial yet, so no best value.")
    return StudySection(study.study_name, figs, table, " ".join(summary), front_table)


def _fmt_param(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _front_entry(row: pd.Series, names: Sequence[str], params: Sequence[str]) -> str:
    ps = ", ".join(f"{p.removeprefix('param:')} = {_fmt_param(row[p])}" for p in params)
    vals = ", ".join(f"{n} = {row[n]:.4g}" for n in names)
    return f"#{int(row['trial'])} ({ps}: {vals})"


def _pareto(study: "optuna.Study", table: pd.DataFrame, complete: pd.DataFrame, names: Sequence[str],
            dirs: Sequence[str], params: Sequence[str]) -> tuple[pd.DataFrame, FigureOut | None]:
    """The Pareto-optimal trials and, for two objectives, the front drawn with every complete trial.

    Points are coloured by the first metric the search recorded beside the objectives (e.g. the gold reward
    when the proxy is optimised), so an over-optimised proxy shows as a front whose colour does not follow it;
    each front point is labelled with its parameter values.
    """
    front_ids = {t.number for t in study.best_trials}
    on = complete["trial"].isin(front_ids)
    recorded = list(dict.fromkeys(k for t in study.get_trials(deepcopy=False)
                                  for k in (t.user_attrs.get(ATTR_RECORDED) or {})))
    front = complete[on].sort_values(names[0])[["trial", *names, *recorded, *params]].reset_index(drop=True)
    if len(names) != 2:
        return front, None
    fig = new_figure(width=6.5, height=4.6)
    fixed_margins(fig, bottom=0.6, top=0.45, right=0.9)
    ax = fig.add_subplot()
    colour_by = recorded[0] if recorded and complete[recorded[0]].notna().any() else None
    kw = {}
    if colour_by is not None:
        kw = {"c": complete[colour_by], "cmap": "viridis", "vmin": complete[colour_by].min(),
              "vmax": complete[colour_by].max()}
    ax.scatter(complete.loc[~on, names[0]], complete.loc[~on, names[1]], s=22, marker="o", alpha=0.8,
                    edgecolors="none", label="dominated",
                    **({**kw, "c": complete.loc[~on, colour_by]} if colour_by else {"color": "tab:gray"}))
    ax.plot(front[names[0]], front[names[1]], color="tab:red", linewidth=1, zorder=1)
    sc = ax.scatter(front[names[0]], front[names[1]], s=60, marker="D", edgecolors="tab:red", linewidths=1.2,
                    label="Pareto front", zorder=2,
                    **({**kw, "c": front[colour_by]} if colour_by else {"color": "tab:red"}))
    for _, r in front.iterrows():
        label = ", ".join(f"{r[p]:.3g}" if isinstance(r[p], float) else str(r[p]) for p in params)
        ax.annotate(label, (r[names[0]], r[names[1]]), textcoords="offset points", xytext=(5, -3), fontsize=7)
    if colour_by is not None:
        fig.colorbar(sc, ax=ax, label=colour_by, fraction=0.05, pad=0.03)
    if "fd" in names[0].split("/")[-1] and complete[names[0]].gt(0).all():
        ax.set_xscale("log")  # FD of a run pushed off the data is orders of magnitude above a good one
    ax.set_xlabel(f"{names[0]} ({dirs[0]})" + (" (log)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"{names[1]} ({dirs[1]})")
    ax.set_title(f"Pareto front; labels: {', '.join(p.removeprefix('param:') for p in params)}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    caption = (f"Complete trials; diamonds joined in red: the non-dominated ones ({len(front)}), labelled with "
               f"their {', '.join(p.removeprefix('param:') for p in params)}"
               + (f"; colour: {colour_by}, recorded from the same evaluation but not optimised" if colour_by else "")
               + ". Trials pruned as diverging have no values and are not drawn (listed in the text).")
    return front, FigureOut(f"study_{study.study_name}_pareto", "Pareto front", caption, fig,
                            {"front": sorted(front_ids), "colour": colour_by,
                             "labels": [[_fmt_param(r[p]) for p in params] for _, r in front.iterrows()]})


def find_studies(grid_dir: str | Path) -> list["optuna.Study"]:
    """Studies stored in journal files (``*.journal``) at the top of a grid directory."""
    paths = sorted(Path(grid_dir).glob("*.journal"))
    if not paths:
        return []
    # lazy: optuna, only for a grid with studies
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = []
    for p in paths:
        storage = JournalStorage(JournalFileBackend(str(p)))
        for name in optuna.get_all_study_names(storage):
            out.append(optuna.load_study(study_name=name, storage=storage))
    return out


def load_studies(storage: str, *, name: str | None = None) -> list["optuna.Study"]:
    """Studies of a storage given as a journal file path or an SQLAlchemy URL (every study, or the one named)."""
    # lazy: optuna, only for a grid with studies
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in storage:
        store: str | JournalStorage = storage
    else:
        if not Path(storage).is_file():
            raise FileNotFoundError(f"study storage {storage} does not exist (a journal file or an SQLAlchemy URL)")
        store = JournalStorage(JournalFileBackend(storage))
    names = optuna.get_all_study_names(store)
    if name is not None:
        if name not in names:
            raise GridDataError(f"study {name!r} is not in {storage}; studies there: {names}")
        names = [name]
    return [optuna.load_study(study_name=n, storage=store) for n in names]

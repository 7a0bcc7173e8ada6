"""Every figure of a report is readable: no two text boxes overlap, and no text is cut off by the figure's edge.

The boxes are matplotlib's rendered extents of the texts a draw really paints (titles, tick labels, axis labels,
legend entries, annotations): ``Text.draw`` is wrapped to record ``get_window_extent`` of each one drawn.
"""

from __future__ import annotations

import optuna
import pytest
from matplotlib.text import Text

from reports.compute import compute
from reports.data import load_grid, prepare
from reports.document import document
from reports.render import figures_of
from reports.synthetic import synthetic_claims, synthetic_grid_frames

from .conftest import ARMS

optuna.logging.set_verbosity(optuna.logging.WARNING)
SLACK = 1.0
"""Pixels two boxes may share (anti-aliasing of touching glyph boxes), and text may pass the edge by."""

CLAIMS = synthetic_claims()


def _studies() -> list[optuna.Study]:
    one = optuna.create_study(study_name="rlw", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        w = trial.suggest_float("rl.weight", 1e-4, 1.0, log=True)
        for step in range(1, 4):
            trial.report((w - 0.01) ** 2 + 1.0 / step, step)
        return (w - 0.01) ** 2

    one.optimize(objective, n_trials=6)
    two = optuna.create_study(study_name="front", directions=["minimize", "maximize"],
                              sampler=optuna.samplers.RandomSampler(seed=1))
    two.optimize(lambda t: ((x := t.suggest_float("rl.weight", 0, 1)) ** 2, x), n_trials=6)
    return [one, two]


def drawn_texts(fig, monkeypatch) -> list[tuple[str, object]]:
    """(text, window extent) of every non-empty text a draw of ``fig`` paints."""
    boxes = []
    original = Text.draw

    def draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            boxes.append((self.get_text(), self.get_window_extent(renderer)))

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", draw)
        fig.canvas.draw()
    return boxes


def text_problems(fig, monkeypatch) -> list[str]:
    boxes = drawn_texts(fig, monkeypatch)
    out = []
    page = fig.bbox
    for text, b in boxes:
        if b.x0 < page.x0 - SLACK or b.y0 < page.y0 - SLACK or b.x1 > page.x1 + SLACK or b.y1 > page.y1 + SLACK:
            out.append(f"{text!r} passes the figure's edge ({b.bounds} in {page.bounds})")
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > SLACK and h > SLACK:
                out.append(f"{ta!r} overlaps {tb!r} ({w:.0f} x {h:.0f} px)")
    return out


@pytest.fixture(scope="module")
def report_figures(disk_grid):
    data = load_grid(grid_dir=disk_grid, arm_order=ARMS)
    doc = document(compute(data, claims=CLAIMS, claims_source="the test", studies=_studies()))
    return {f.slug: f for f in figures_of(doc)}


@pytest.fixture(scope="module")
def five_metric_figures():
    """A grid whose runs also write the gold score and its proxy: five rows of sample metrics, one NFE (the
    narrowest figure, where a long title has to wrap)."""
    m, s = synthetic_grid_frames(arms=ARMS, seeds=[0, 1], steps=60, log_every=5, val_every=20, nfe=(2,))
    val = m["kind"] == "val"
    m.loc[val, "val/gold_nfe2"] = 0.1 + 0.01 * m.loc[val, "step"]
    m.loc[val, "val/proxy_nfe2"] = 0.2 + 0.01 * m.loc[val, "step"]
    m.loc[m["kind"] == "teacher", "teacher/gold"] = 0.5
    doc = document(compute(prepare(name="five", metrics=m, statuses=s), claims=CLAIMS[2:], claims_source="the test"))
    figs = {f.slug: f for f in figures_of(doc)}
    assert figs["sample_metrics"].meta["rows"] == ["fd", "reward", "accuracy", "gold", "proxy"]
    return figs


def test_the_synthetic_report_draws_every_kind_of_figure(report_figures):
    assert {"verdicts", "grad_norm", "grad_terms", "loss_terms", "val_loss", "sample_metrics", "schedules",
            "samples_final", "samples_best", "study_rlw_history", "study_front_pareto"} <= set(report_figures)


def test_no_text_of_a_report_figure_overlaps_another_or_the_edge(report_figures, monkeypatch):
    problems = {slug: p for slug, f in report_figures.items() if (p := text_problems(f.figure, monkeypatch))}
    assert not problems, "\n".join(f"{slug}: {line}" for slug, lines in problems.items() for line in lines[:5])


def test_no_text_overlaps_with_five_rows_of_sample_metrics_at_one_nfe(five_metric_figures, monkeypatch):
    problems = {slug: p for slug, f in five_metric_figures.items() if (p := text_problems(f.figure, monkeypatch))}
    assert not problems, "\n".join(f"{slug}: {line}" for slug, lines in problems.items() for line in lines[:5])


def test_the_overlap_check_sees_an_overlap(monkeypatch):
    """The check itself: a title drawn over an axes title is found."""
    from reports.plots import new_figure

    fig = new_figure(width=4, height=3)
    ax = fig.add_subplot()
    ax.set_title("the axes title", fontsize=9)
    fig.suptitle("a figure title over it", fontsize=10, y=ax.get_position().y1 + 0.01, va="bottom")
    fig.text(0.5, ax.get_position().y1 + 0.02, "pressed onto the title", ha="center", fontsize=9)
    problems = text_problems(fig, monkeypatch)
    assert any("overlaps" in p and "pressed onto the title" in p for p in problems), problems

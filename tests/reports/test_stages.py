"""The report's three stages, each on its own: ``compute`` (numbers), ``document`` (words), ``publish`` (files);
and the numbers written unchanged by the refactoring into stages (CSVs kept from the code before it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest

from harness.claims import Claim, ClaimTest
from reports.compute import compute
from reports.data import prepare
from reports.document import document
from reports.plots import FigureOut, new_figure
from reports.publish import publish
from reports.render import Document, Section, figures_of
from reports.stats import arm_table, compare_all, metric_specs, run_table
from reports.synthetic import synthetic_grid_frames

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
CLAIMS = [Claim("renoise lowers FD", (ClaimTest(baseline="vanilla", treatment="renoise", metric="val/fd_nfe2",
                                                direction="decrease"),))]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _titles(doc: Document) -> list[str]:
    return [s.title for s in doc.sections]


def _section(doc: Document, title: str) -> Section:
    return next(s for s in doc.sections if s.title == title)


# --------------------------------------------------------------------------- compute


def test_compute_holds_the_statistics_of_the_data(small_data):
    n = compute(small_data, claims=CLAIMS, claims_source="the test")
    specs = metric_specs(small_data.nfe, 2)
    runs = run_table(small_data)
    pd.testing.assert_frame_equal(n.runs, runs)
    pd.testing.assert_frame_equal(n.summary, arm_table(runs, small_data.arms, specs))
    pd.testing.assert_frame_equal(n.diffs, compare_all(runs, arms=small_data.arms, baseline="vanilla", specs=specs))
    assert n.baseline == "vanilla" and n.primary_nfe == 2
    assert [(c.arm, c.ref) for c in n.comparisons] == [("renoise", "vanilla"), ("rl_hard", "renoise")]
    assert [r.text for r in n.judgement.results] == ["renoise lowers FD"]
    assert set(n.csv_tables()) == {"summary.csv", "runs.csv", "differences.csv", "verdicts.csv"}


def test_compute_of_a_search_takes_no_baseline_and_compares_no_trial_with_the_one_before(small_data):
    search = dataclasses.replace(small_data, kind="search")
    n = compute(search, claims=[])
    assert n.baseline is None and n.diffs.empty and n.comparisons == ()
    asked = compute(search, claims=[], baseline="renoise")
    assert asked.baseline == "renoise" and set(asked.diffs["ref"]) == {"renoise"} and asked.comparisons == ()


def test_compute_refuses_bad_options(small_data):
    with pytest.raises(ValueError, match="baseline arm 'nope'"):
        compute(small_data, baseline="nope", claims=[])
    with pytest.raises(ValueError, match="band must be one of"):
        compute(small_data, band="iqr", claims=[])


# --------------------------------------------------------------------------- document


def test_document_writes_what_the_numbers_say(small_data):
    """The words come from the numbers given, not from the data again: a changed number is the one shown."""
    n = compute(small_data, claims=CLAIMS, claims_source="the test")
    summary = n.summary.copy()
    summary.loc["renoise", "best_val_loss"] = 123.456
    doc = document(dataclasses.replace(n, summary=summary))
    (caption, reached), (_, went) = _section(doc, "Summary").tables[:2]
    row = reached.set_index("arm").loc["renoise"]
    assert row["best val loss"] == "123"
    assert list(went["arm"]) == ["vanilla (baseline)", "renoise", "rl_hard"]


def test_a_ladder_opens_on_the_verdicts_with_the_forest_plot_under_the_table_and_ends_on_the_method(small_data):
    doc = document(compute(small_data, claims=CLAIMS, claims_source="the test"))
    assert _titles(doc) == ["Verdicts", "Summary", "Findings", "Curves", "Samples", "Runs", "Method",
                            "About this grid"]
    verdicts = _section(doc, "Verdicts")
    assert len(verdicts.lead) == 1 and [f.slug for f in verdicts.lead_figures] == ["verdicts"]
    assert figures_of(doc)[0].slug == "verdicts"
    method = " ".join(_section(doc, "Method").paragraphs)
    assert "Bonferroni" in method and "paired log-ratios" in method
    about = " ".join(_section(doc, "About this grid").paragraphs)
    assert "Baseline arm: vanilla." in about
    assert all("Bonferroni" not in p for p in verdicts.paragraphs)  # the method is not in front of the table


def test_a_study_reads_as_a_study(small_data):
    study = optuna.create_study(study_name="w", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("rl.weight", 1e-3, 1.0, log=True) - 0.05) ** 2, n_trials=4)
    search = dataclasses.replace(small_data, kind="search")
    doc = document(compute(search, claims=[], claims_source="the runs were made by search spec ../s.yaml, which "
                                                            "has no claims", studies=[study]))
    titles = _titles(doc)
    assert titles[0] == "Optuna study 'w'" and titles.index("Optuna study 'w'") < titles.index("Runs")
    assert "Findings" not in titles and titles[-3:] == ["Verdicts", "Method", "About this grid"]
    assert doc.title.startswith("TwinFlow study report")
    text = json.dumps([[s.paragraphs, s.bullets] for s in doc.sections])
    assert "Baseline arm" not in text and "(baseline)" not in json.dumps(
        [t.to_dict() for s in doc.sections for _, t in s.tables])
    assert "No baseline: the study ranks the trials" in text and "Best trial #" in text


def test_findings_of_arms_that_extend_none_say_so(small_data):
    roots = dataclasses.replace(small_data, parents={a: None for a in small_data.arms})
    bullets = _section(document(compute(roots, claims=[])), "Findings").bullets
    assert bullets == ["No arm extends another in the matrix (each of the 3 arms is a root), so there is no step up "
                       "a ladder to compare; the Summary's differences compare each arm with the baseline 'vanilla'."]
    m, s = synthetic_grid_frames(arms=["only"], seeds=[0, 1], steps=20, log_every=5, val_every=10)
    single = document(compute(prepare(name="one", metrics=m, statuses=s), claims=[]))
    assert _section(single, "Findings").bullets == ["A single arm: nothing to compare."]


# --------------------------------------------------------------------------- publish


def _figure(slug: str) -> FigureOut:
    fig = new_figure(width=2, height=1.5)
    fig.add_subplot().plot([0, 1], [1, 0])
    return FigureOut(slug, f"Figure {slug}", "A line.", fig, {"n": 1})


def test_publish_writes_every_file_of_the_document(tmp_path):
    table = pd.DataFrame({"arm": ["a", "b"], "value": ["1.00", "2.00"]})
    doc = Document("T", [], [Section("One", anchor="one", lead=[("", table)], lead_figures=[_figure("f1")],
                                     paragraphs=["Some words."]),
                             Section("Two", anchor="two", figures=[_figure("f 2")])])
    numbers = pd.DataFrame({"x": [1.0, math.nan]}, index=pd.Index(["a", "b"], name="arm"))
    html = publish(doc, tmp_path / "out", csvs={"numbers.csv": (numbers, True)})
    out = tmp_path / "out"
    assert html == out / "report.html"
    assert (out / "f1.png").read_bytes()[:4] == b"\x89PNG" and (out / "f-2.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert md.index("| a | 1.00 |") < md.index("![Figure f1](f1.png)") < md.index("Some words.") < md.index("## Two")
    assert (out / "numbers.csv").read_text() == "arm,x\na,1.0\nb,\n"
    assert [f["file"] for f in json.loads((out / "figures.json").read_text())] == ["f1.png", "f-2.png"]
    text = html.read_text()
    assert text.count("data:image/png;base64,") == 2 and text.index("<table>") < text.index('id="fig-f1"')


def test_publish_refuses_two_figures_of_one_name(tmp_path):
    doc = Document("T", [], [Section("One", figures=[_figure("same"), _figure("same")])])
    with pytest.raises(ValueError, match="two figures share a slug: \\['same'\\]"):
        publish(doc, tmp_path, csvs={})
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------- numbers unchanged


def _csv_diff():
    spec = importlib.util.spec_from_file_location("report_csv_diff", REPO / "benchmarks" / "report_csv_diff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_csvs_equal_those_written_before_the_report_had_stages(tmp_path):
    """tests/reports/golden: the synthetic grid's CSVs as the single-pass write_report wrote them."""
    mod = _csv_diff()
    mod.write_all(tmp_path, [])
    assert mod.compare(GOLDEN, tmp_path) == []


def test_the_csv_comparison_finds_a_changed_number(tmp_path):
    mod = _csv_diff()
    changed = tmp_path / "kept" / "synthetic"
    changed.mkdir(parents=True)
    for name in mod.CSVS:
        (changed / name).write_text((GOLDEN / "synthetic" / name).read_text())
    text = (changed / "summary.csv").read_text()
    (changed / "summary.csv").write_text(text.replace(",3,3,", ",3,2,", 1))
    mod.write_all(tmp_path / "now", [])
    problems = mod.compare(tmp_path / "kept", tmp_path / "now")
    assert len(problems) == 1 and problems[0].startswith("synthetic/summary.csv differs")


def test_a_search_grid_on_disk_reads_as_a_study(tmp_path):
    """The grid manifest's kind 'search' reaches the report: no baseline, no ladder findings, the spec named
    relative to the grid directory."""
    from harness.store import write_grid_manifest
    from reports.build import build_report
    from reports.data import load_grid
    from reports.synthetic import write_synthetic_grid

    grid = write_synthetic_grid(tmp_path / "runs" / "s", arms=["trial-0000", "trial-0001"], seeds=[0, 1], steps=20,
                                log_every=5, val_every=10, per_class=1)
    write_grid_manifest(grid, kind="search", source=tmp_path / "spec.yaml", arms=None, claims=[])
    assert load_grid(grid_dir=grid).kind == "search"
    build_report(grid_dir=grid, out_dir=tmp_path / "report", studies=[], progress=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Baseline arm" not in md and "trial-0001 vs trial-0000" not in md and "## Findings" not in md
    assert "search spec ../../spec.yaml" in md and str(tmp_path) not in md
    assert pd.read_csv(tmp_path / "report" / "summary.csv")["arm"].tolist() == ["trial-0000", "trial-0001"]

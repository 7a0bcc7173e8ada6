import json
import re

import pandas as pd
import pytest

from reports.build import build_report
from reports.cli import add_report_arguments, run_report
from reports.formatting import fmt_diff

from .checks import check_report, md_table
from .conftest import ARMS


@pytest.fixture(scope="module")
def built(disk_grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    html = build_report(grid_dir=disk_grid, out_dir=out, arm_order=ARMS, progress=False)
    return disk_grid, out, html


def test_table_numbers_equal_an_independent_parse_of_the_runs(built):
    grid, out, _ = built
    check_report(grid, out, arms=ARMS, nfe=[1, 2, 4])


def test_html_is_one_self_contained_file(built):
    _, out, html = built
    text = html.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=\"http" not in text and "<script" not in text and "<link" not in text
    for arm in ARMS:
        assert f"<td>{arm}" in text
    assert "fig-samples_final" in text and "fig-grad_norm" in text


def test_markdown_links_pngs_that_exist(built):
    _, out, _ = built
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "grad_norm.png" in links and "samples_final.png" in links and "samples_best.png" in links
    for name in links:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_differences_and_findings(built):
    _, out, _ = built
    diffs = pd.read_csv(out / "differences.csv")
    assert set(diffs["arm"]) == {"renoise", "rl_hard"} and set(diffs["ref"]) == {"vanilla"}
    fd = diffs[(diffs.arm == "rl_hard") & (diffs.key == "fd_nfe2")].iloc[0]
    assert fd["n_pairs"] == 2  # the diverged seed has no final weights
    md = (out / "report.md").read_text()
    rows = {r["metric"]: r for r in md_table(md, "metric | renoise | rl_hard")}
    assert rows["paired seeds"]["rl_hard"] == "3"
    assert "(n=2)" in rows["FD@2"]["rl_hard"] and "(n=2)" not in rows["best val loss"]["rl_hard"]
    assert rows["FD@2"]["rl_hard"].startswith(fmt_diff(fd))
    findings = md.split("## Findings", 1)[1].split("## Curves", 1)[0]
    assert "- renoise vs vanilla (3 paired seeds): max grad norm" in findings
    assert "- rl_hard vs renoise (3 paired seeds):" in findings and "diverged 1/3 vs 0/3" in findings


def test_every_figure_is_drawn_with_what_it_claims(built):
    _, out, _ = built
    figs = {f["slug"]: f for f in json.loads((out / "figures.json").read_text())}
    assert list(figs) == ["grad_norm", "grad_terms", "loss_terms", "val_loss", "sample_metrics", "schedules",
                          "samples_final", "samples_best"]
    assert figs["grad_norm"]["meta"]["diverged"] == 1
    assert figs["sample_metrics"]["meta"]["nfe"] == [1, 2, 4]
    assert figs["sample_metrics"]["meta"]["teacher_refs"] == 9  # a teacher line on every FD/reward/accuracy panel
    assert figs["sample_metrics"]["meta"]["teacher_euler_refs"] == 3  # and its n-step Euler FD on each FD panel
    assert figs["sample_metrics"]["meta"]["log_rows"] == ["fd"]  # FD spans decades: log axis
    for which in ("final", "best"):
        meta = figs[f"samples_{which}"]["meta"]
        assert meta["rows"][0] == "teacher (28 steps)"
        assert [(a, n) for a, n in zip(meta["row_arms"], meta["row_nfe"]) if a] == \
            [(a, n) for a in ARMS for n in (1, 2, 4)]
        assert meta["missing"] == []  # rl_hard seed 2 diverged: its row comes from seed 0 like the others
        assert all(f.endswith(f"samples/{which}-nfe{n}.npz") for f, n in zip(meta["files"][1:], meta["row_nfe"][1:]))


@pytest.mark.parametrize("kwargs,match", [({"baseline": "nope"}, "baseline arm 'nope'"),
                                          ({"arm_order": ["vanilla", "bogus"]}, "bogus"),
                                          ({"arm_order": ["vanilla"]}, "does not list arm"),
                                          ({"band": "sd"}, "band")])
def test_bad_arguments_are_errors_naming_the_value(disk_grid, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_report(grid_dir=disk_grid, out_dir=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "report.html").exists()


def _no_claims(path):
    pytest.fail(f"no --claims was given, yet the claims of {path} were loaded")


def test_cli_hook_with_arm_order_and_baseline(disk_grid, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args([str(disk_grid), "--out", str(tmp_path / "r"), "--arm-order", "rl_hard", "vanilla",
                              "renoise", "--baseline", "vanilla", "--no-progress"])
    assert run_report(args, load_claims=_no_claims) == 0
    html = tmp_path / "r" / "report.html"
    assert capsys.readouterr().out.strip() == str(html)
    summary = pd.read_csv(html.parent / "summary.csv")
    assert list(summary["arm"]) == ["rl_hard", "vanilla", "renoise"]
    assert set(pd.read_csv(html.parent / "differences.csv")["ref"]) == {"vanilla"}
    md = (html.parent / "report.md").read_text()
    assert "vanilla (baseline)" in md and "- vanilla vs rl_hard (" in md and "- renoise vs vanilla (" in md
    args = parser.parse_args([str(tmp_path / "missing"), "--no-progress"])
    assert run_report(args, load_claims=_no_claims) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_bands_match_the_plots():
    from reports import cli, plots

    assert cli.BANDS == plots.BANDS


def test_a_grid_with_training_records_only(tmp_path):
    """Runs that have not validated yet: the report is written, with dashes where nothing was measured."""
    from reports.build import write_report
    from reports.data import prepare
    from reports.synthetic import synthetic_grid_frames

    m, s = synthetic_grid_frames(arms=["only"], seeds=[0], steps=40, log_every=5, val_every=20)
    m = m[m["kind"] == "train"].drop(columns=[c for c in m.columns if c.startswith(("val/", "teacher/"))])
    s = s.assign(state="running", run_dir=str(tmp_path / "no-such-run"))
    html = write_report(prepare(name="early", metrics=m, statuses=s), out_dir=tmp_path, progress=False)
    md = (tmp_path / "report.md").read_text()
    (row,) = md_table(md, "arm | runs done")
    (health,) = md_table(md, "arm | max grad norm")
    assert row["runs done"] == "0/1" and row["best val loss"] == "—" and health["max grad norm"] != "—"
    assert "A single arm: nothing to compare." in md and "No run has sample files" in md
    slugs = [f["slug"] for f in json.loads((tmp_path / "figures.json").read_text())]
    assert "sample_metrics" not in slugs and "val_loss" not in slugs and "grad_norm" in slugs
    assert html.is_file()


def test_report_is_a_command_of_the_twinflow_lab_table(disk_grid, tmp_path, capsys):
    """``twinflow-lab report`` comes from the table above both packages; the harness's own table has no report."""
    from harness import cli as harness_cli
    from twinflow_lab import cli as lab

    assert "report" in lab.COMMANDS and "report" not in harness_cli.COMMANDS
    out = tmp_path / "r"
    rc = lab.main(["report", str(disk_grid), "--out", str(out), "--arm-order", *ARMS, "--max-points", "50", "--no-progress"])
    assert rc == 0 and (out / "report.html").is_file()
    assert capsys.readouterr().out.strip() == str(out / "report.html")


def test_a_study_section_is_added_for_each_study(tmp_path):
    import optuna

    from reports.build import write_report
    from reports.data import prepare
    from reports.synthetic import synthetic_grid_frames

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="rl-weight", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("rl.weight", 1e-3, 1.0, log=True) - 0.05) ** 2, n_trials=5)
    m, s = synthetic_grid_frames(arms=["a"], seeds=[0], steps=20, log_every=5, val_every=10)
    write_report(prepare(name="g", metrics=m, statuses=s), out_dir=tmp_path, studies=[study],
                 max_points=20, progress=False)
    md = (tmp_path / "report.md").read_text()
    assert "## Optuna study 'rl-weight'" in md and "Study 'rl-weight': 5 trials (5 complete)." in md
    assert "![Optimisation history](study_rl-weight_history.png)" in md
    rows = md_table(md, "trial | state")
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3", "4"]

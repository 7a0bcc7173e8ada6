import numpy as np
import pandas as pd
import pytest

from reports.data import prepare
from reports.synthetic import synthetic_grid_frames


@pytest.fixture
def frames():
    return synthetic_grid_frames(arms=["b_arm", "a_arm"], seeds=[0, 1], steps=30, log_every=5, val_every=10)


def test_arm_order_defaults_to_first_appearance_and_can_be_given(frames):
    m, s = frames
    assert prepare(name="g", metrics=m, statuses=s).arms == ("b_arm", "a_arm")
    data = prepare(name="g", metrics=m, statuses=s, arm_order=["a_arm", "b_arm"])
    assert data.arms == ("a_arm", "b_arm") and data.arm_order_source == "order given"
    assert list(data.metrics["arm"].cat.categories) == ["a_arm", "b_arm"]


def test_nonfinite_strings_become_floats_and_other_text_is_an_error(frames):
    m, s = frames
    m = m.astype({"loss/main": object})
    m.loc[m.index[3], "loss/main"] = "nan"
    m.loc[m.index[4], "loss/main"] = "inf"
    out = prepare(name="g", metrics=m, statuses=s).metrics["loss/main"]
    assert np.isnan(out.iloc[3]) and np.isinf(out.iloc[4]) and out.dtype == float
    m.loc[m.index[5], "loss/main"] = "oops"
    with pytest.raises(ValueError, match="column 'loss/main' holds a non-numeric value"):
        prepare(name="g", metrics=m, statuses=s)


@pytest.mark.parametrize("drop,match", [("kind", "lacks column"), ("step", "lacks column")])
def test_missing_columns_are_named(frames, drop, match):
    m, s = frames
    with pytest.raises(ValueError, match=f"{match}.*{drop}"):
        prepare(name="g", metrics=m.drop(columns=drop), statuses=s)


def test_unknown_kind_and_duplicate_runs_are_errors(frames):
    m, s = frames
    bad = m.copy()
    bad.loc[bad.index[0], "kind"] = "eval"
    with pytest.raises(ValueError, match="unknown kind value"):
        prepare(name="g", metrics=bad, statuses=s)
    with pytest.raises(ValueError, match="listed twice"):
        prepare(name="g", metrics=m, statuses=pd.concat([s, s.iloc[:1]]))


def test_nfe_found_from_the_telemetry(frames):
    m, s = frames
    assert prepare(name="g", metrics=m, statuses=s).nfe == (1, 2, 4)


def _runs_with_records(grid_dir, created: dict[str, float]) -> pd.DataFrame:
    from harness.collect import run_statuses
    from harness.store import RunRecord, write_record

    for arm, t in created.items():
        d = grid_dir / arm / "seed-0"
        d.mkdir(parents=True)
        write_record(d, RunRecord(identity="x", config_hash="y", code_version="z", grid=grid_dir.name, arm=arm,
                                  seed=0, matrix="m.yaml", overrides={}, created=t))
    return run_statuses(grid_dir)


def test_arm_order_comes_from_the_grid_manifest_else_creation_order_and_says_why(tmp_path):
    from harness.store import write_grid_manifest
    from reports.data import grid_arm_order

    grid = tmp_path / "grid"
    runs = _runs_with_records(grid, {"trial-0001": 2.0, "trial-0000": 1.0, "trial-0002": 3.0})
    order, source = grid_arm_order(grid, runs)
    assert order == ["trial-0000", "trial-0001", "trial-0002"]
    assert "no grid manifest" in source and "created" in source
    write_grid_manifest(grid, kind="search", source=tmp_path / "s.yaml", arms=None, claims=[])
    order, source = grid_arm_order(grid, runs)
    # the spec is named relative to the grid directory, not by the absolute path of the machine that ran it
    assert order == ["trial-0000", "trial-0001", "trial-0002"] and "search spec ../s.yaml;" in source
    assert str(tmp_path) not in source
    write_grid_manifest(grid, kind="grid", source=tmp_path / "m.yaml", arms=["trial-0002", "x", "trial-0000"],
                        claims=[])
    order, source = grid_arm_order(grid, runs)  # an arm without runs is left out; one the matrix lost goes last
    assert order == ["trial-0002", "trial-0000", "trial-0001"] and "matrix file ../m.yaml (grid manifest)" in source
    (grid / ".harness" / "grid.json").write_text("{")
    order, source = grid_arm_order(grid, runs)
    assert order == ["trial-0000", "trial-0001", "trial-0002"] and "does not load" in source


def test_findings_compare_each_arm_with_the_arm_it_extends():
    """Two arms that both extend the first are each compared with it, not with each other."""
    import dataclasses

    m, s = synthetic_grid_frames(arms=["vanilla", "renoise", "rl_hard"], seeds=[0, 1], steps=30, log_every=5,
                                 val_every=10)
    data = prepare(name="g", metrics=m, statuses=s)
    assert [data.predecessor(a) for a in data.arms] == [None, "vanilla", "renoise"]  # no manifest: ladder order
    branched = dataclasses.replace(data, parents={"vanilla": None, "renoise": "vanilla", "rl_hard": "vanilla"})
    assert [branched.predecessor(a) for a in branched.arms] == [None, "vanilla", "vanilla"]


def test_the_grid_manifest_records_what_each_arm_extends(tmp_path):
    from harness.matrix import load_matrix
    from harness.store import write_grid_manifest
    from reports.data import _manifest_parents

    base = tmp_path / "base.yaml"
    base.write_text("data: {dataset: digits}\n")
    m = tmp_path / "m.yaml"
    m.write_text("name: g\nbase: base.yaml\nseeds: [0]\naxes: {optim.lr: [1.0e-4, 2.0e-4]}\narms:\n  a: {}\n"
                 "  b: {extends: a, run.steps: 20}\n  c: {extends: a, run.steps: 30}\n")
    grid = load_matrix(m, root=tmp_path / "runs")
    parents = {a.name: a.extends for a in grid.arms}
    assert parents == {"a+optim.lr=0.0001": None, "a+optim.lr=0.0002": None,
                       "b+optim.lr=0.0001": "a+optim.lr=0.0001", "b+optim.lr=0.0002": "a+optim.lr=0.0002",
                       "c+optim.lr=0.0001": "a+optim.lr=0.0001", "c+optim.lr=0.0002": "a+optim.lr=0.0002"}
    assert _manifest_parents(tmp_path / "runs" / "g") is None
    write_grid_manifest(tmp_path / "runs" / "g", kind="grid", source=m, arms=list(parents), claims=[],
                        parents=parents)
    assert _manifest_parents(tmp_path / "runs" / "g") == parents

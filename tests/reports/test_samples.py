import numpy as np
import pandas as pd
import pytest

from reports.samples import sample_grid_figure


def _write(d, name, images, labels):
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / name, images=images, labels=labels)


def _runs(tmp_path, arms=("a", "b"), seeds=(0, 1), nfe=(1, 2), skip=()):
    labels = np.repeat(np.arange(10), 2)
    rows = []
    for i, arm in enumerate(arms):
        for s in seeds:
            d = tmp_path / arm / f"seed-{s}" / "samples"
            _write(d, "teacher.npz", np.full((20, 1, 8, 8), -1.0, np.float32), labels)
            if (arm, s) not in skip:
                for n in nfe:
                    for which in ("final", "best"):
                        _write(d, f"{which}-nfe{n}.npz", np.full((20, 1, 8, 8), 0.2 * i + 0.1 * n, np.float32),
                               labels)
            rows.append({"arm": arm, "seed": s, "run_dir": str(tmp_path / arm / f"seed-{s}")})
    return pd.DataFrame(rows)


def test_every_arm_and_nfe_is_a_row(tmp_path):
    runs = _runs(tmp_path, arms=("a", "b", "c"), nfe=(1, 2, 4))
    f = sample_grid_figure(runs, arms=["a", "b", "c"], nfe=[1, 2, 4], which="final", teacher_steps=28)
    assert f.meta["rows"][0] == "teacher (28 steps)"
    assert [(a, n) for a, n in zip(f.meta["row_arms"], f.meta["row_nfe"]) if a] == \
        [(a, n) for a in "abc" for n in (1, 2, 4)]
    assert f.meta["columns"] == list(range(0, 20, 2))  # first sample of each prompt class
    assert f.meta["seed"] == 0 and not f.meta["missing"]
    for arm, n, path in zip(f.meta["row_arms"][1:], f.meta["row_nfe"][1:], f.meta["files"][1:]):
        assert path.endswith(f"{arm}/seed-0/samples/final-nfe{n}.npz")
    assert f.meta["files"][0].endswith("samples/teacher.npz")


def test_an_arm_without_that_seed_falls_back_and_says_so(tmp_path):
    # seed 0 has files in arms a and c, seed 1 in a and b: the tie goes to the lower seed
    runs = _runs(tmp_path, arms=("a", "b", "c"), skip={("b", 0), ("c", 1)})
    f = sample_grid_figure(runs, arms=["a", "b", "c"], nfe=[1, 2], which="best")
    assert f.meta["seed"] == 0
    assert f.meta["rows"][1:] == ["a · 1 NFE", "a · 2 NFE", "b · 1 NFE (seed 1)", "b · 2 NFE (seed 1)",
                                  "c · 1 NFE", "c · 2 NFE"]
    assert all(p is not None for p in f.meta["files"])


def test_missing_files_are_listed_not_invented(tmp_path):
    runs = _runs(tmp_path, skip={("b", 0), ("b", 1)})
    f = sample_grid_figure(runs, arms=["a", "b"], nfe=[1, 2], which="final")
    assert f.meta["missing"] == ["b · 1 NFE", "b · 2 NFE"]
    assert "No file for: b · 1 NFE; b · 2 NFE." in f.caption


def test_different_prompts_are_an_error_naming_the_file(tmp_path):
    runs = _runs(tmp_path)
    bad = tmp_path / "b" / "seed-0" / "samples" / "final-nfe2.npz"
    np.savez(bad, images=np.zeros((20, 1, 8, 8), np.float32), labels=np.arange(20))
    with pytest.raises(ValueError, match="final-nfe2.npz: prompts"):
        sample_grid_figure(runs, arms=["a", "b"], nfe=[1, 2], which="final")


def test_no_sample_files_gives_no_figure(tmp_path):
    runs = pd.DataFrame([{"arm": "a", "seed": 0, "run_dir": str(tmp_path / "nowhere")}])
    assert sample_grid_figure(runs, arms=["a"], nfe=[1], which="final") is None

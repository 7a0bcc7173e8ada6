"""Sequential seeds: waves, looks, seeds only where a claim is open, and a resume that decides the same."""

from __future__ import annotations

import io
import json

import pytest

from harness import grid as grid_mod
from harness.launchers import LocalLauncher
from harness.matrix import MatrixError, load_matrix
from harness.sequential import read_record

STANDIN = "tests.harness.scripted_run"
# per arm, the grad_norm/max of seeds 0..5: 'big' is 1000x 'base' (decided at the first look), 'same' equals
# 'base' on every seed (no meaningful effect at once), 'noisy' is ~1.35x with spread (open at the first look)
VALUES = {
    "base": [1.0, 1.1, 0.9, 1.0, 1.05, 0.95],
    "big": [1000.0, 1150.0, 880.0, 1010.0, 1040.0, 960.0],
    "same": [1.0, 1.1, 0.9, 1.0, 1.05, 0.95],
    "noisy": [1.45, 1.25, 1.5, 1.4, 1.3, 1.35],
}
MATRIX = """\
base: base.yaml
seeds: {first: 3, max: 6, step: 1}
arms:
  base: {}
  big: {optim.lr: 2.0e-4}
  same: {optim.lr: 3.0e-4}
  noisy: {optim.lr: 4.0e-4}
claims:
  - {claim: big spikes, baseline: base, treatment: big, metric: grad_norm/max, reduce: max, direction: increase,
     scale: log}
  - {claim: same spikes, baseline: base, treatment: same, metric: grad_norm/max, reduce: max, direction: increase,
     scale: log}
  - {claim: noisy spikes, baseline: base, treatment: noisy, metric: grad_norm/max, reduce: max,
     direction: increase, scale: log}
"""


def _run(matrix, root):
    g = load_matrix(matrix, root=root, code_version="test")
    env = {arm: {"SCRIPT_MODE": "metrics", "SCRIPT_VALUES": json.dumps(v), "SCRIPT_SLEEP": "0"}
           for arm, v in VALUES.items()}
    res = grid_mod.run_grid(g, launcher=LocalLauncher(workers=2, threads=1, module=STANDIN), run_env=env,
                            stream=io.StringIO(), tty=False, poll_s=0.02, prepare_teacher=False)
    return g, res


def _decisions(grid_dir):
    looks = read_record(grid_dir)["looks"]
    return [(look["targets"], [(r["claim"], r["n"], r["verdict"], r["state"]) for r in look["results"]])
            for look in looks]


def test_seeds_go_only_to_open_claims(tiny_base, write, tmp_path):
    matrix = write("m.yaml", MATRIX)
    g, res = _run(matrix, tmp_path / "runs")
    looks = read_record(g.grid_dir)["looks"]
    first = {(r["claim"]): r for r in looks[0]["results"]}
    assert looks[0]["targets"] == {"base": 3, "big": 3, "same": 3, "noisy": 3}
    assert first[0]["verdict"] == "supported" and first[0]["state"] == "decided" and first[0]["n"] == 3
    assert first[1]["verdict"] == "no meaningful effect" and first[1]["state"] == "decided"
    assert first[2]["state"] == "open" and len(looks) >= 2
    last = {(r["claim"]): r for r in looks[-1]["results"]}
    assert last[2]["state"] != "open" and last[2]["n"] > 3
    # only the open claim's arms got more seeds; the decided arms kept their first wave
    started = set(res.launched)
    assert {f"big/seed-{s}" for s in range(3)} <= started and "big/seed-3" not in started
    assert "same/seed-3" not in started
    assert looks[1]["targets"] == {"base": 4, "big": 3, "same": 3, "noisy": 4}
    assert res.exit_code == 0


def test_an_interrupted_sequential_grid_resumes_to_the_same_decisions(tiny_base, write, tmp_path, monkeypatch):
    matrix = write("m.yaml", MATRIX)
    g_ref, _ = _run(matrix, tmp_path / "ref")
    calls = {"n": 0}
    real = grid_mod._schedule

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second wave: stop the harness as Ctrl-C would
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(grid_mod, "_schedule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(matrix, tmp_path / "cut")
    monkeypatch.setattr(grid_mod, "_schedule", real)
    g_cut, _ = _run(matrix, tmp_path / "cut")
    assert _decisions(g_cut.grid_dir) == _decisions(g_ref.grid_dir)


def test_a_record_that_the_runs_no_longer_give_is_refused(tiny_base, write, tmp_path):
    matrix = write("m.yaml", MATRIX)
    g, _ = _run(matrix, tmp_path / "runs")
    path = g.grid_dir / ".harness" / "sequential.json"
    record = json.loads(path.read_text())
    record["looks"][0]["results"][0]["verdict"] = "contradicted"
    path.write_text(json.dumps(record))
    with pytest.raises(Exception, match="no longer give the recorded decisions"):
        _run(matrix, tmp_path / "runs")


def test_a_plan_needs_claims_and_a_sane_shape(tiny_base, write, tmp_path):
    m = write("a.yaml", "base: base.yaml\nseeds: {first: 3, max: 6}\narms: {a: {}}\n")
    with pytest.raises(MatrixError, match="declares no claims"):
        load_matrix(m, root=tmp_path, code_version="t")
    m = write("b.yaml", MATRIX.replace("first: 3, max: 6", "first: 7, max: 6"))
    with pytest.raises(MatrixError, match=r"first \(7\) must be at most max \(6\)"):
        load_matrix(m, root=tmp_path, code_version="t")
    m = write("c.yaml", MATRIX.replace("step: 1", "step: 1, spending: linear"))
    with pytest.raises(MatrixError, match="key 'spending': unknown value 'linear'"):
        load_matrix(m, root=tmp_path, code_version="t")

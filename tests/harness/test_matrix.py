"""Matrix files: resolution, expressions, axes, identity, and the bad-matrix suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.identity import code_version, run_identity
from harness.matrix import MatrixError, evaluate, load_matrix

REPO = Path(__file__).resolve().parents[2]


def test_arms_resolve_with_extends_vars_and_seeds(tiny_base, write, tmp_path):
    m = write("m.yaml", """\
        name: ladder
        base: base.yaml
        seeds: [0, 2]
        vars: {steps: 40}
        overrides: {run.steps: "${steps}"}
        arms:
          a: {}
          b: {extends: a, optim.lr: 3e-4, rl.warmup: "${steps * 2 // 5}"}
          c: {extends: b, optim: {weight_decay: 0.01}}
        """)
    grid = load_matrix(m, root=tmp_path / "runs", code_version="code0")
    assert [r.key for r in grid.runs] == ["a/seed-0", "a/seed-2", "b/seed-0", "b/seed-2", "c/seed-0", "c/seed-2"]
    c0 = grid.runs[4]
    assert c0.config.run.steps == 40 and c0.config.run.seed == 0
    assert c0.config.optim.lr == pytest.approx(3e-4)  # 3e-4 read as a float, not the string YAML 1.1 makes of it
    assert c0.config.rl.warmup == 16
    assert c0.config.optim.weight_decay == pytest.approx(0.01)
    assert c0.config.telemetry.group == "ladder" and c0.config.telemetry.name == "c-0"
    assert c0.run_dir == tmp_path / "runs" / "ladder" / "c" / "seed-0"
    assert not (tmp_path / "runs").exists()  # loading writes nothing
    # every run is a distinct identity; the same file loads to the same identities
    assert len({r.identity for r in grid.runs}) == 6
    again = load_matrix(m, root=tmp_path / "runs", code_version="code0")
    assert [r.identity for r in again.runs] == [r.identity for r in grid.runs]
    # the code version is part of the identity
    other = load_matrix(m, root=tmp_path / "runs", code_version="code1")
    assert all(x.identity != y.identity for x, y in zip(grid.runs, other.runs))


def test_axes_are_cartesian_over_arms(tiny_base, write, tmp_path):
    m = write("m.yaml", """\
        base: base.yaml
        seeds: [0]
        axes: {optim.lr: [1.0e-4, 2.0e-4], method.rect_weight: [0.5, 1.0]}
        arms: {a: {}, b: {rl.warmup: 7}}
        """)
    grid = load_matrix(m, root=tmp_path)
    assert grid.name == "m"
    names = [a.name for a in grid.arms]
    assert len(names) == 8 and len(set(names)) == 8
    assert "a+optim.lr=0.0001+method.rect_weight=0.5" in names
    lrs = {(r.arm, r.config.optim.lr, r.config.method.rect_weight) for r in grid.runs}
    assert len(lrs) == 8


def test_expressions():
    env = {"steps": 600}
    assert evaluate("${steps // 6}", env) == 100
    assert evaluate("${steps / 4}", env) == 150.0
    assert evaluate("${max(1, steps // 1000)}", env) == 1
    assert evaluate("s${steps}", env) == "s600"
    assert evaluate(["${steps}", 3], env) == [600, 3]
    with pytest.raises(ValueError, match="unknown variable 'stpes'"):
        evaluate("${stpes}", env)
    with pytest.raises(ValueError, match="unsupported"):
        evaluate("${__import__('os')}", env)


def test_code_version_follows_the_source(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    v1 = code_version(pkg)
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    v2 = code_version(pkg)
    assert v1 != v2
    assert run_identity({"run": {"seed": 0}}, v1) != run_identity({"run": {"seed": 1}}, v1)
    assert len(code_version()) == 16  # the real trainer package is found


# --------------------------------------------------------------------------- the bad-matrix suite

BAD = {
    "unknown_key": ("""\
        base: base.yaml
        seeds: [0]
        arms:
          good: {}
          typo: {optim.lrr: 0.1}
        """, ["arm 'typo'", "optim.lrr", "unknown key 'lrr'"]),
    "unknown_section": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {}, b: {optimizer.lr: 0.1}}
        """, ["arm 'b'", "optimizer.lr", "unknown key 'optimizer'"]),
    "wrong_type": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {}, b: {run.steps: many}}
        """, ["arm 'b'", "run.steps", "expected an integer"]),
    "bad_value": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {}, b: {rl.schedule: cosine}}
        """, ["arm 'b'", "rl.schedule", "unknown value 'cosine'"]),
    "missing_base": ("""\
        base: nowhere.yaml
        seeds: [0]
        arms: {a: {}}
        """, ["base", "nowhere.yaml", "does not exist"]),
    "no_base": ("""\
        seeds: [0]
        arms: {a: {}}
        """, ["'base' is missing"]),
    "duplicate_arms": ("""\
        base: base.yaml
        seeds: [0]
        arms:
          a: {optim.lr: 0.001}
          b: {}
          a: {optim.lr: 0.002}
        """, ["duplicate arm name 'a'", "lines 4 and 6"]),
    "duplicate_key_in_arm": ("""\
        base: base.yaml
        seeds: [0]
        arms:
          a:
            optim.lr: 0.001
            optim.lr: 0.002
        """, ["duplicate key 'optim.lr'", "arms.a"]),
    "empty_seeds": ("""\
        base: base.yaml
        seeds: []
        arms: {a: {}}
        """, ["key 'seeds': expected a non-empty list of integers"]),
    "seeds_not_ints": ("""\
        base: base.yaml
        seeds: [0, one]
        arms: {a: {}}
        """, ["key 'seeds[1]': expected an integer, got 'one'"]),
    "yaml_syntax": ("""\
        base: base.yaml
        seeds: [0
        arms: {a: {}}
        """, ["YAML syntax error", "line"]),
    "same_config": ("""\
        base: base.yaml
        seeds: [0]
        arms:
          a: {optim.lr: 1.0e-4}
          b: {}
        """, ["arm 'b'", "same config as arm 'a'"]),
    "reserved_seed": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {run.seed: 3}}
        """, ["arm 'a'", "run.seed", "set by the harness"]),
    "extends_unknown": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {extends: nope}}
        """, ["arm 'a'", "extends", "no arm named 'nope'"]),
    "extends_cycle": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {extends: b, optim.lr: 0.1}, b: {extends: a}}
        """, ["cycle"]),
    "undefined_var": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {run.steps: "${stepz}"}}
        """, ["arm 'a'", "run.steps", "unknown variable 'stepz'"]),
    "unknown_top_key": ("""\
        base: base.yaml
        seed: [0]
        arms: {a: {}}
        """, ["unknown top-level key 'seed'"]),
    "arms_not_mapping": ("""\
        base: base.yaml
        seeds: [0]
        arms: [a, b]
        """, ["key 'arms': expected a non-empty mapping"]),
    "combination_invalid": ("""\
        base: base.yaml
        seeds: [0]
        arms: {a: {}, b: {data.batch_size: 2, method.group_ratios: [1, 1, 1, 1]}}
        """, ["arm 'b'", "data.batch_size", "smaller than the number of non-empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_matrix_is_refused_naming_file_arm_and_key(case, tiny_base, write, tmp_path, capsys):
    text, needles = BAD[case]
    m = write(f"{case}.yaml", text)
    root = tmp_path / "runs"
    rc = main(["grid", "run", str(m), "--root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(m) in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not root.exists(), "a refused matrix must create nothing"


def test_missing_matrix_file(tmp_path, capsys):
    rc = main(["grid", "run", str(tmp_path / "none.yaml"), "--root", str(tmp_path / "runs")])
    assert rc == 2
    assert "none.yaml: matrix file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_every_problem_is_reported_at_once(tiny_base, write, tmp_path):
    m = write("m.yaml", """\
        base: base.yaml
        seeds: [0]
        arms: {a: {optim.lrr: 1}, b: {run.steps: x}, c: {}}
        """)
    with pytest.raises(MatrixError) as info:
        load_matrix(m, root=tmp_path)
    assert len(info.value.problems) == 2
    assert "arm 'a'" in info.value.problems[0] and "arm 'b'" in info.value.problems[1]


def test_console_entry_exits_nonzero(tiny_base, write, tmp_path):
    """The real command line (a subprocess), not just main()."""
    m = write("m.yaml", "base: base.yaml\nseeds: [0]\narms: {a: {optim.lrr: 1}}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "grid", "run", str(m), "--root", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{m}: arm 'a', key 'optim.lrr'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_blog_digits_matrix_is_the_ladder():
    grid = load_matrix(REPO / "ablations" / "blog-digits.yaml", root=Path("/nonexistent"))
    names = [a.name for a in grid.arms]
    ladder = ["vanilla", "renoise", "rl_hard", "rl_sigmoid", "rl_clip", "spike_decay"]
    assert names[:6] == ladder
    weights = [n for n in names if n.startswith("rl_weight_")]
    high = ["rl_weight_high", "rl_sigmoid_high", "rl_clip_high", "spike_decay_high"]  # the stabilisers at 3x
    assert len(weights) >= 2 and "rl_rms" in names
    assert set(names) == set(ladder) | set(weights) | set(high) | {"rl_rms"}
    # sequential seeds: 3 for every arm first, up to 6 for the arms of claims still open
    assert grid.plan is not None and (grid.plan.first, grid.plan.max) == (3, 6)
    assert grid.seeds == (0, 1, 2, 3, 4, 5) and len(grid.runs) == 6 * len(names)
    # each ladder arm adds exactly one kind of change to the arm before it
    by_name = {a.name: a for a in grid.arms}
    for prev, arm in zip(ladder, ladder[1:]):
        assert set(by_name[prev].overrides).issubset(by_name[arm].overrides)
    cfg = {a.name: next(r.config for r in grid.runs if r.arm == a.name) for a in grid.arms}
    assert cfg["vanilla"].renoise.schedule == "off" and not cfg["vanilla"].rl.enabled
    assert cfg["renoise"].renoise.schedule == "blog_linear" and (cfg["renoise"].renoise.start,
                                                                 cfg["renoise"].renoise.end) == (4.0, 1.0)
    assert by_name["renoise"].overrides["renoise.applies_to"] == ["main"]  # explicit: the report's placement
    assert cfg["rl_hard"].rl.enabled and cfg["rl_hard"].rl.schedule == "hard" and cfg["rl_hard"].rl.reward == "proxy"
    assert cfg["rl_sigmoid"].rl.schedule == "sigmoid"
    assert cfg["rl_sigmoid"].rl.center == cfg["rl_hard"].rl.warmup  # same onset, another shape
    assert cfg["rl_clip"].rl.clip == "param" and cfg["rl_sigmoid"].rl.clip == "none"
    assert cfg["spike_decay"].schedule.spike.enabled and not cfg["rl_clip"].schedule.spike.enabled
    # the weight comparison differs from rl_hard in the weight only; rl_rms in the normalisation only
    ws = {cfg["rl_hard"].rl.weight} | {cfg[n].rl.weight for n in weights}
    assert len(ws) == len(weights) + 1 >= 3
    for n in weights:
        assert set(by_name[n].overrides) - set(by_name["rl_hard"].overrides) <= {"rl.weight"}
    assert cfg["rl_rms"].rl.normalize == "rms" and cfg["rl_hard"].rl.normalize == "none"
    # the high-weight rungs repeat the ladder's stabilisers, one change each, at rl_weight_high's weight
    for low, hi in zip(ladder[2:], high):
        assert cfg[hi].rl.weight == cfg["rl_weight_high"].rl.weight == 3 * cfg["rl_hard"].rl.weight
        assert {k: v for k, v in by_name[hi].overrides.items() if k != "rl.weight"} == \
            {k: v for k, v in by_name[low].overrides.items() if k != "rl.weight"}
    # one number sets the length of every arm and every schedule
    steps = cfg["vanilla"].run.steps
    assert all(c.run.steps == steps for c in cfg.values())
    assert cfg["rl_hard"].rl.warmup < steps and cfg["renoise"].renoise.steps <= steps


def test_a_bad_value_under_an_rl_arm_is_one_line_not_a_derived_one(tiny_base, write, tmp_path, capsys):
    """``rl.enabled`` alone lacks a reward, but the arm sets one: only the real problems are named."""
    m = write("m.yaml", """\
        name: g
        base: base.yaml
        seeds: [0]
        arms:
          plain: {}
          rl: {rl.enabled: true, rl.reward: digits, rl.weight: .nan}
          child: {extends: rl, rl.warmup: 5}
          sched: {rl.enabled: true, rl.reward: digits, rl.schedule: cosine-ish}
          reward: {rl.enabled: true, rl.reward: hpsv9}
          lonely: {rl.enabled: true}
        """)
    assert main(["grid", "status", str(m), "--root", str(tmp_path / "runs")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    f = str(m)
    assert sorted(lines) == sorted([
        f"twinflow-lab: {f}: arm 'rl', key 'rl.weight': rl.weight: expected a finite number, got nan",
        f"twinflow-lab: {f}: arm 'child', key 'rl.weight': rl.weight: expected a finite number, got nan",
        f"twinflow-lab: {f}: arm 'sched', key 'rl.schedule': rl.schedule: unknown value 'cosine-ish'; "
        "valid values: 'hard', 'linear', 'sigmoid'",
        f"twinflow-lab: {f}: arm 'reward', key 'rl.reward': rl.reward: unknown value 'hpsv9'; "
        "valid values: 'none', 'digits', 'proxy', 'hpsv2'",
        # an arm that really lacks the reward still hears about it
        f"twinflow-lab: {f}: arm 'lonely', key 'rl.enabled': rl.reward must be set when enabled is true",
    ])
    assert not (tmp_path / "runs").exists()


def test_an_rl_arm_without_e2e_rows_is_refused_before_anything_is_created(tiny_base, write, tmp_path, capsys):
    """The trainer would refuse this arm at start-up; ``grid run`` refuses it first, naming file, arm and keys."""
    m = write("m.yaml", """\
        name: g
        base: base.yaml
        seeds: [0]
        arms:
          plain: {}
          rl: {rl.enabled: true, rl.reward: digits}
          rl_no_e2e: {extends: rl, method.group_ratios: [0, 1, 1, 1]}
        """)
    root = tmp_path / "runs"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = main(["grid", "run", str(m), "--root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"twinflow-lab: {m}: arm 'rl_no_e2e', keys ")
    assert "'method.group_ratios'" in lines[0] and "'rl.enabled'" in lines[0]
    assert "method.group_ratios[0] (e2e) must be > 0" in lines[0]
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no run directory, no cache, nothing

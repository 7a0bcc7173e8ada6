"""Every malformed input the project accepts is refused the same way.

Trainer configs, command-line overrides, ablation matrices (and their base configs),
search specs and the commands' own arguments: each case asserts exit status 2, no
traceback in the output, the file / arm / key named in the message, and not one new
file on disk (the working directory and the auxiliaries cache both live in the test's
temporary directory). The entry points are called in-process; a representative subset
runs as real subprocesses, and the last tests tell an input problem (exit 2, no
traceback) from an internal error (exit 1, traceback kept).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from twinflow_lab.cli import main as lab_main
from twinflow_train.cli import main as train_main

from .harness.conftest import TINY_BASE

REPO = Path(__file__).resolve().parents[1]
BIG = str(2**70)  # 1180591620717411303424
HUGE = "1" + "0" * 400  # 10**400: too large even for a float


# --------------------------------------------------------------------------- inputs


def _matrix(arms: str = "a: {}\n  b: {optim.lr: 3.0e-4}", *, head: str = "") -> str:
    return f"base: base.yaml\nseeds: [0]\n{head}arms:\n  {arms}\n"


SPEC_HEAD = textwrap.dedent("""\
    name: s
    base: base.yaml
    overrides: {rl.enabled: true, rl.reward: digits}
    objective: {metric: val/fd_nfe1, direction: minimize}
    """)
WEIGHT = "parameters:\n  rl.weight: {low: 0.001, high: 1.0, log: true}\n"


def _spec(body: str = WEIGHT) -> str:
    return SPEC_HEAD + body


FIT = ["fit", "--config", "c.yaml", "--run-dir", "run"]
GRID = ["grid", "run", "m.yaml", "--root", "runs"]
SEARCH = ["search", "s.yaml", "--root", "runs", "--no-progress"]
# "billion laughs": nine aliases deep, 9**9 values once expanded
BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
LATIN1 = "# r\xe9glage\n".encode("latin-1")  # a comment saved in Latin-1, not UTF-8

# id -> (files written first, which CLI, argv, substrings every one of which the error output must hold)
CASES: dict[str, tuple[dict[str, str | bytes], str, list[str], list[str]]] = {
    # ---- trainer config files
    "config_inf_lr": ({"c.yaml": "optim: {lr: .inf}\n"}, "train", FIT, ["c.yaml", "optim.lr", "finite"]),
    "config_inf_rl_weight": ({"c.yaml": "rl: {weight: .inf}\n"}, "train", FIT, ["c.yaml", "rl.weight", "finite"]),
    "config_minus_inf": ({"c.yaml": "rl: {weight: -.inf}\n"}, "train", FIT, ["c.yaml", "rl.weight", "finite"]),
    "config_nan": ({"c.yaml": "optim: {lr: .nan}\n"}, "train", FIT, ["c.yaml", "optim.lr", "finite"]),
    "config_1e400": ({"c.yaml": "optim: {lr: 1e400}\n"}, "train", FIT, ["c.yaml", "optim.lr", "finite"]),
    "config_int_too_large_for_float": ({"c.yaml": f"optim: {{lr: {HUGE}}}\n"}, "train", FIT,
                                       ["c.yaml", "optim.lr", "too large for a float"]),
    "config_threads_2_70": ({"c.yaml": f"run: {{threads: {BIG}}}\n"}, "train", FIT,
                            ["c.yaml", "run.threads", "out of range"]),
    "config_threads_too_many": ({"c.yaml": "run: {threads: 100000}\n"}, "train", FIT,
                                ["c.yaml", "run.threads", "[0, 1024]"]),
    "config_steps_huge": ({"c.yaml": f"run: {{steps: {HUGE}}}\n"}, "train", FIT, ["c.yaml", "run.steps", "401 digits"]),
    "config_batch_size_2_40": ({"c.yaml": f"data: {{batch_size: {2**40}}}\n"}, "train", FIT,
                               ["c.yaml", "data.batch_size", "out of range"]),
    "config_negative_seed_huge": ({"c.yaml": f"run: {{seed: -{BIG}}}\n"}, "train", FIT, ["c.yaml", "run.seed"]),
    "config_list_item_inf": ({"c.yaml": "method: {group_ratios: [1, .inf, 1, 1]}\n"}, "train", FIT,
                             ["c.yaml", "method.group_ratios[1]", "finite"]),
    "config_list_item_huge": ({"c.yaml": f"eval: {{nfe: [1, {BIG}]}}\n"}, "train", FIT,
                              ["c.yaml", "eval.nfe[1]", "out of range"]),
    "config_not_utf8": ({"c.yaml": LATIN1 + b"run: {steps: 5}\n"}, "train", FIT, ["c.yaml", "not UTF-8", "line 1"]),
    "config_utf16": ({"c.yaml": "run: {steps: 5}\n".encode("utf-16")}, "train", FIT, ["c.yaml", "not UTF-8"]),
    "config_duplicate_section": ({"c.yaml": "run: {steps: 5}\nrun: {steps: 6}\n"}, "train", FIT,
                                 ["c.yaml", "duplicate key 'run'", "lines 1 and 2"]),
    "config_duplicate_key": ({"c.yaml": "optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n"}, "train", FIT,
                             ["c.yaml", "duplicate key 'lr' in 'optim'"]),
    "config_empty": ({"c.yaml": ""}, "train", FIT, ["c.yaml", "the file is empty"]),
    "config_only_comments": ({"c.yaml": "# tuned later\n"}, "train", FIT, ["c.yaml", "the file is empty"]),
    "config_top_level_list": ({"c.yaml": "- run\n- data\n"}, "train", FIT, ["c.yaml", "top level must be a mapping"]),
    "config_alias_bomb": ({"c.yaml": BOMB}, "train", FIT, ["c.yaml", "aliases"]),
    "config_syntax": ({"c.yaml": "run: {steps: [1, 2\n"}, "train", FIT, ["c.yaml", "YAML syntax error", "line"]),
    "config_python_tag": ({"c.yaml": "run: !!python/object:os.system {}\n"}, "train", FIT,
                          ["c.yaml", "cannot read", "python/object"]),
    "config_nul_in_string": ({"c.yaml": 'telemetry: {name: "a\\0b"}\n'}, "train", FIT,
                             ["c.yaml", "telemetry.name", "NUL"]),
    "config_every_problem_at_once": ({"c.yaml": "optim: {lr: .inf, betaz: 1}\nrun: {steps: many}\n"}, "train", FIT,
                                     ["optim.lr", "unknown key 'betaz'", "run.steps: expected an integer"]),
    "config_is_a_directory": ({"c.yaml/x": "run: {}\n"}, "train", FIT, ["c.yaml", "not a regular file"]),
    "config_missing": ({}, "train", FIT, ["c.yaml", "does not exist"]),
    # ---- command-line overrides (the same checks)
    "override_inf": ({}, "train", ["fit", "--run-dir", "run", "rl.weight=.inf"], ["rl.weight", "finite"]),
    "override_nan": ({}, "train", ["fit", "--run-dir", "run", "optim.lr=.nan"], ["optim.lr", "finite"]),
    "override_threads_2_70": ({}, "train", ["fit", "--run-dir", "run", f"run.threads={BIG}"],
                              ["run.threads", "out of range"]),
    "override_float_for_int": ({}, "train", ["fit", "--run-dir", "run", "run.steps=1e400"],
                               ["run.steps", "expected an integer"]),
    "override_huge_float": ({}, "train", ["fit", "--run-dir", "run", f"optim.lr={HUGE}"], ["optim.lr", "too large for a float"]),
    "override_bad_yaml": ({}, "train", ["fit", "--run-dir", "run", "rl.weight=[0.1"],
                          ["rl.weight=[0.1", "not valid YAML"]),
    "override_no_equals": ({}, "train", ["fit", "--run-dir", "run", "rl.weight"], ["rl.weight", "section.key=value"]),
    "override_on_a_file": ({"c.yaml": "run: {steps: 5}\n"}, "train", FIT + [f"data.batch_size={BIG}"],
                           ["c.yaml", "data.batch_size", "out of range"]),
    "override_teacher": ({}, "train", ["teacher", "optim.lr=-.inf"], ["optim.lr", "finite"]),
    # ---- matrices
    "matrix_arm_inf_lr": ({"m.yaml": _matrix("a: {}\n  b: {optim.lr: .inf}")}, "lab", GRID,
                          ["m.yaml", "arm 'b'", "key 'optim.lr'", "finite"]),
    "matrix_arm_inf_rl_weight": ({"m.yaml": _matrix("a: {}\n  b: {rl.weight: .inf}")}, "lab", GRID,
                                 ["m.yaml", "arm 'b'", "key 'rl.weight'", "finite"]),
    "matrix_threads_2_70": ({"m.yaml": _matrix(f"a: {{}}\n  b: {{run.threads: {BIG}}}")}, "lab", GRID,
                            ["m.yaml", "arm 'b'", "key 'run.threads'", "out of range"]),
    "matrix_expr_overflow": ({"m.yaml": _matrix(head='overrides: {run.steps: "${int(1e400)}"}\n')}, "lab", GRID,
                             ["m.yaml", "overrides", "key 'run.steps'", "overflows"]),
    "matrix_expr_huge_power": ({"m.yaml": _matrix('a: {}\n  b: {run.steps: "${2**10**10}"}')}, "lab", GRID,
                               ["m.yaml", "arm 'b'", "key 'run.steps'", "too large"]),
    "matrix_expr_huge_string": ({"m.yaml": _matrix("a: {}\n  b: {telemetry.project: \"${'ab' * 10**9}\"}")}, "lab",
                                GRID, ["m.yaml", "arm 'b'", "key 'telemetry.project'", "too long"]),
    "matrix_expr_int_into_float": ({"m.yaml": _matrix('a: {}\n  b: {optim.lr: "${10**400}"}')}, "lab", GRID,
                                   ["m.yaml", "arm 'b'", "key 'optim.lr'", "too large for a float"]),
    "matrix_expr_inf_float": ({"m.yaml": _matrix('a: {}\n  b: {rl.weight: "${1e308 * 10}"}')}, "lab", GRID,
                              ["m.yaml", "arm 'b'", "key 'rl.weight'", "finite"]),
    "matrix_var_inf": ({"m.yaml": _matrix('a: {}\n  b: {rl.weight: "${w}"}', head="vars: {w: .inf}\n")}, "lab", GRID,
                       ["m.yaml", "vars, 'w'", "finite"]),
    "matrix_axis_inf": ({"m.yaml": _matrix("a: {}", head="axes: {optim.lr: [1.0e-4, .inf]}\n")}, "lab", GRID,
                        ["m.yaml", "optim.lr", "finite"]),
    "matrix_seed_2_70": ({"m.yaml": f"base: base.yaml\nseeds: [0, {BIG}]\narms: {{a: {{}}}}\n"}, "lab", GRID,
                         ["m.yaml", "key 'seeds[1]'", "out of range [-2147483648, 2147483647]"]),
    "matrix_not_utf8": ({"m.yaml": LATIN1 + _matrix().encode()}, "lab", GRID, ["m.yaml", "not UTF-8"]),
    "matrix_empty": ({"m.yaml": "\n"}, "lab", GRID, ["m.yaml", "the file is empty"]),
    "matrix_duplicate_top_key": ({"m.yaml": _matrix() + "seeds: [1]\n"}, "lab", GRID,
                                 ["m.yaml", "duplicate key 'seeds'"]),
    "matrix_is_a_directory": ({"m.yaml/x": "a\n"}, "lab", GRID, ["m.yaml", "not a regular file"]),
    "matrix_base_duplicate_key": ({"m.yaml": _matrix(), "base.yaml": TINY_BASE + "run: {steps: 3}\n"}, "lab", GRID,
                                  ["m.yaml", "base config", "base.yaml", "duplicate key 'run'"]),
    "matrix_base_empty": ({"m.yaml": _matrix(), "base.yaml": ""}, "lab", GRID,
                          ["m.yaml", "base config", "base.yaml", "the file is empty"]),
    "matrix_base_not_utf8": ({"m.yaml": _matrix(), "base.yaml": LATIN1 + TINY_BASE.encode()}, "lab", GRID,
                             ["m.yaml", "base config", "base.yaml", "not UTF-8"]),
    "matrix_base_inf": ({"m.yaml": _matrix(), "base.yaml": TINY_BASE + "optim: {lr: .inf}\n"}, "lab", GRID,
                        ["m.yaml", "base config", "optim.lr", "finite"]),
    "matrix_base_and_matrix_problems_together": ({"m.yaml": _matrix(head="bogus: 1\n"), "base.yaml": ""}, "lab",
                                                 GRID, ["unknown top-level key 'bogus'", "the file is empty"]),
    "matrix_status_not_utf8": ({"m.yaml": LATIN1}, "lab", ["grid", "status", "m.yaml", "--root", "runs"],
                               ["m.yaml", "not UTF-8"]),
    # ---- search specs
    "search_enqueue_above_high": ({"s.yaml": _spec(WEIGHT + "enqueue: [{rl.weight: 5.0}]\n")}, "lab", SEARCH,
                                  ["s.yaml", "enqueue[0]", "key 'rl.weight'", "outside the parameter's range"]),
    "search_enqueue_inf": ({"s.yaml": _spec(WEIGHT + "enqueue: [{rl.weight: .inf}]\n")}, "lab", SEARCH,
                           ["s.yaml", "enqueue[0]", "key 'rl.weight'", "finite"]),
    "search_enqueue_float_for_int": ({"s.yaml": _spec("parameters:\n  rl.warmup: {type: int, low: 0, high: 10}\n"
                                                      "enqueue: [{rl.warmup: 2.5}]\n")}, "lab", SEARCH,
                                     ["s.yaml", "enqueue[0]", "key 'rl.warmup'", "expected an integer"]),
    "search_enqueue_off_step": ({"s.yaml": _spec("parameters:\n  rl.warmup: {type: int, low: 0, high: 10, step: 2}\n"
                                                 "enqueue: [{rl.warmup: 3}]\n")}, "lab", SEARCH,
                                ["s.yaml", "enqueue[0]", "key 'rl.warmup'", "grid"]),
    "search_enqueue_not_a_choice": ({"s.yaml": _spec("parameters:\n  rl.clip: [none, param]\n"
                                                     "enqueue: [{rl.clip: output}]\n")}, "lab", SEARCH,
                                    ["s.yaml", "enqueue[0]", "key 'rl.clip'", "not one of the choices"]),
    "search_bound_10_400": ({"s.yaml": _spec(f"parameters:\n  rl.weight: {{low: 0.001, high: {HUGE}}}\n")}, "lab",
                            SEARCH, ["s.yaml", "'rl.weight'", "key 'high'", "too large for a float"]),
    "search_bound_nan": ({"s.yaml": _spec("parameters:\n  rl.weight: {low: .nan, high: 1.0}\n")}, "lab", SEARCH,
                         ["s.yaml", "'rl.weight'", "key 'low'", "finite"]),
    "search_int_bound_2_70": ({"s.yaml": _spec(f"parameters:\n  rl.warmup: {{type: int, low: 0, high: {BIG}}}\n")},
                              "lab", SEARCH, ["s.yaml", "'rl.warmup'", "key 'high'", "integer"]),
    "search_trials_2_70": ({"s.yaml": _spec(WEIGHT + f"trials: {BIG}\n")}, "lab", SEARCH, ["s.yaml", "trials"]),
    "search_sampler_seed_huge": ({"s.yaml": _spec(WEIGHT + f"sampler: {{seed: {HUGE}}}\n")}, "lab", SEARCH,
                                 ["s.yaml", "sampler", "key 'seed'"]),
    "search_divergence_inf": ({"s.yaml": _spec(WEIGHT + "divergence: {max_grad_norm: .inf}\n")}, "lab", SEARCH,
                              ["s.yaml", "divergence", "key 'max_grad_norm'"]),
    "search_constraint_inf": ({"s.yaml": SPEC_HEAD.replace(
        "minimize}", "minimize, constraints: [{metric: val/loss, max: .inf}]}") + WEIGHT}, "lab", SEARCH,
        ["s.yaml", "constraints[0]", "finite"]),
    "search_storage_unknown_scheme": ({"s.yaml": _spec(WEIGHT + "storage: foo://db/x\n")}, "lab", SEARCH,
                                      ["s.yaml", "key 'storage'", "unknown URL scheme 'foo'"]),
    "search_storage_sqlite_memory": ({"s.yaml": _spec(WEIGHT + "storage: 'sqlite://'\n")}, "lab", SEARCH,
                                     ["s.yaml", "key 'storage'", "sqlite:///PATH"]),
    "search_storage_parent_is_a_file": ({"s.yaml": _spec(WEIGHT + "storage: notes.txt/s.journal\n"),
                                         "notes.txt": "x\n"}, "lab", SEARCH,
                                        ["s.yaml", "key 'storage'", "notes.txt is not a directory"]),
    "search_storage_is_a_directory": ({"s.yaml": _spec(WEIGHT + "storage: d\n"), "d/x": "x\n"}, "lab", SEARCH,
                                      ["s.yaml", "key 'storage'", "is a directory"]),
    "search_storage_flag_unknown_scheme": ({"s.yaml": _spec()}, "lab", SEARCH + ["--storage", "http://host/x"],
                                           ["--storage", "unknown URL scheme 'http'"]),
    "search_not_utf8": ({"s.yaml": LATIN1 + _spec().encode()}, "lab", SEARCH, ["s.yaml", "not UTF-8"]),
    "search_empty": ({"s.yaml": "# nothing yet\n"}, "lab", SEARCH, ["s.yaml", "the file is empty"]),
    "search_duplicate_key": ({"s.yaml": _spec() + "objective: {metric: val/loss}\n"}, "lab", SEARCH,
                             ["s.yaml", "duplicate key 'objective'"]),
    "search_base_duplicate_key": ({"s.yaml": _spec(), "base.yaml": TINY_BASE + "eval: {nfe: [2]}\n"}, "lab", SEARCH,
                                  ["s.yaml", "base.yaml", "duplicate key 'eval'"]),
    "search_base_not_utf8": ({"s.yaml": _spec(), "base.yaml": LATIN1 + TINY_BASE.encode()}, "lab", SEARCH,
                             ["s.yaml", "base.yaml", "not UTF-8"]),
    # ---- the commands' own arguments
    "report_empty_dir": ({"grid/.keep": ""}, "lab", ["report", "grid"], ["grid", "no run directories"]),
    "report_missing_dir": ({}, "lab", ["report", "nowhere"], ["GRID_DIR", "nowhere", "does not exist"]),
    "report_bad_numbers": ({"grid/.keep": ""}, "lab", ["report", "grid", "--max-points", "1"],
                           ["--max-points"]),
    "report_storage_unknown_scheme": ({"grid/.keep": ""}, "lab", ["report", "grid", "--study-storage", "foo://x"],
                                      ["--study-storage", "unknown URL scheme 'foo'"]),
    "report_storage_sqlite_missing": ({"grid/.keep": ""}, "lab",
                                      ["report", "grid", "--study-storage", "sqlite:///study.db"],
                                      ["--study-storage", "study.db does not exist"]),
    "report_study_name_alone": ({"grid/.keep": ""}, "lab", ["report", "grid", "--study-name", "s"],
                                ["--study-name needs --study-storage"]),
    "report_out_is_a_file": ({"grid/.keep": "", "out": "x"}, "lab", ["report", "grid", "--out", "out"],
                             ["--out", "not a directory"]),
    "eval_missing_run_dir": ({}, "train", ["eval", "--run-dir", "nope"], ["--run-dir", "nope", "does not exist"]),
    "eval_empty_run_dir": ({"run/.keep": ""}, "train", ["eval", "--run-dir", "run"],
                           ["--run-dir", "no config.yaml", "no final weights"]),
    "eval_best_without_validation": ({"run/config.yaml": "run: {steps: 2}\n",
                                      "run/checkpoints/latest/meta.json": '{"step": 2}'}, "train",
                                     ["eval", "--run-dir", "run", "--which", "best"],
                                     ["--run-dir", "no best weights", "no validation has run yet"]),
    "eval_run_config_inf": ({"run/config.yaml": "rl: {weight: .inf}\n",
                             "run/checkpoints/latest/meta.json": '{"step": 2}'}, "train", ["eval", "--run-dir", "run"],
                            ["run/config.yaml", "rl.weight", "finite"]),
    "sample_missing_run_dir": ({}, "train", ["sample", "--run-dir", "nope"], ["--run-dir", "nope"]),
    "sample_empty_run_dir": ({"run/.keep": ""}, "train", ["sample", "--run-dir", "run"],
                             ["--run-dir", "no config.yaml"]),
    "sample_bad_nfe_and_out": ({"run/config.yaml": "run: {steps: 2}\n", "run/checkpoints/latest/meta.json": "{}",
                                "out": "x"}, "train",
                               ["sample", "--run-dir", "run", "--nfe", "0", "--out", "out/sub"],
                               ["--nfe", "--out", "not a directory"]),
    "fit_run_dir_is_a_file": ({"run": "x"}, "train", ["fit", "--run-dir", "run"], ["--run-dir", "not a directory"]),
    "grid_run_bad_arguments": ({"m.yaml": _matrix(), "root": "x"}, "lab",
                               ["grid", "run", "m.yaml", "--root", "root", "--workers", "0", "--slurm-param", "nokey"],
                               ["--workers", "--root", "--slurm-param"]),
    "grid_status_bad_workers": ({"m.yaml": _matrix()}, "lab", ["grid", "status", "m.yaml", "--workers", "0"],
                                ["--workers"]),
    "grid_collect_bad_rise_k": ({"m.yaml": _matrix()}, "lab", ["grid", "collect", "m.yaml", "--rise-k", "0"],
                                ["--rise-k"]),
    "search_bad_flags": ({"s.yaml": _spec()}, "lab", SEARCH + ["--trials", "0", "--poll-s", "nan"],
                         ["--trials", "--poll-s"]),
}


# --------------------------------------------------------------------------- helpers


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory that also holds the auxiliaries cache, so any write shows up in it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TWINFLOW_LAB_CACHE", str(work / "cache"))
    return work


def _write(work: Path, files: dict[str, str | bytes], *, base: bool) -> None:
    if base:
        (work / "base.yaml").write_text(TINY_BASE)
    for name, content in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _check(rc: int, out: str, err: str, needles: list[str], *, before: set[str], work: Path) -> None:
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert _tree(work) == before, f"new files: {sorted(_tree(work) - before)}"


# --------------------------------------------------------------------------- the suite


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_it_and_writes_nothing(case, workdir, capsys):
    files, cli, argv, needles = CASES[case]
    _write(workdir, files, base="base.yaml" not in files)
    before = _tree(workdir)
    rc = (train_main if cli == "train" else lab_main)(list(argv))
    captured = capsys.readouterr()
    _check(rc, captured.out, captured.err, needles, before=before, work=workdir)


def test_every_class_is_represented():
    ids = " ".join(CASES)
    for kind in ("config_", "override_", "matrix_", "search_", "report_", "eval_", "sample_", "grid_"):
        assert kind in ids
    for cls in ("inf", "nan", "2_70", "10_400", "overflow", "not_utf8", "duplicate", "empty", "enqueue",
                "storage", "base_"):
        assert cls in ids, cls
    assert len(CASES) >= 60


def test_storage_driver_that_is_not_installed(workdir, capsys):
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed here")
    _write(workdir, {"s.yaml": _spec(WEIGHT + "storage: postgresql://user@host/db\n")}, base=True)
    before = _tree(workdir)
    rc = lab_main(SEARCH)
    captured = capsys.readouterr()
    _check(rc, captured.out, captured.err, ["s.yaml", "key 'storage'", "driver", "psycopg"], before=before,
           work=workdir)


# --------------------------------------------------------------------------- real command lines


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")


SUBPROCESS = ["override_inf", "config_not_utf8", "matrix_expr_overflow", "search_enqueue_above_high",
              "search_storage_unknown_scheme", "report_empty_dir", "eval_missing_run_dir"]


@pytest.mark.parametrize("case", SUBPROCESS)
def test_console_command_exits_2_without_traceback(case, workdir):
    files, cli, argv, needles = CASES[case]
    _write(workdir, files, base="base.yaml" not in files)
    before = _tree(workdir)
    module = "twinflow_train.cli" if cli == "train" else "twinflow_lab"
    env = dict(_env(), TWINFLOW_LAB_CACHE=str(workdir / "cache"))
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=120)
    _check(proc.returncode, proc.stdout, proc.stderr, needles, before=before, work=workdir)


# an unexpected exception while the input is read is reported as an input problem; one after it is a crash


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault")


def test_input_phase_error_exits_2_and_internal_error_propagates(workdir, monkeypatch, capsys):
    import twinflow_train.config
    import twinflow_train.run.trainer

    monkeypatch.setattr(twinflow_train.run.trainer, "fit", _boom)
    with pytest.raises(RuntimeError, match="injected fault"):  # the interpreter prints it and exits 1
        train_main(["fit", "--run-dir", "run", "run.steps=2"])
    monkeypatch.setattr(twinflow_train.config, "from_dict", _boom)
    rc = train_main(["fit", "--run-dir", "run", "run.steps=2"])
    captured = capsys.readouterr()
    assert rc == 2 and "twinflow-train fit: RuntimeError: injected fault" in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (workdir / "run").exists()


_FAULT = """\
import sys
import harness.{module} as m
m.{name} = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected fault"))
from twinflow_lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, name, code, traceback", [
    ("matrix", "load_matrix", 2, False),  # inside the input phase: exit 2, the message, no traceback
    ("grid", "run_grid", 1, True),         # the command itself: a real internal error keeps its traceback
])
def test_console_input_error_exits_2_and_internal_error_exits_1(workdir, module, name, code, traceback):
    _write(workdir, {"m.yaml": _matrix()}, base=True)
    script = _FAULT.format(module=module, name=name)
    proc = subprocess.run([sys.executable, "-c", script, *GRID], cwd=workdir, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "RuntimeError: injected fault" in proc.stderr
    assert ("Traceback" in proc.stderr) is traceback, proc.stderr
    assert not (workdir / "runs").exists()


def test_the_checks_accept_what_is_valid(workdir):
    """The bounds are where they say: valid neighbours of the refused inputs still load, and nothing is created."""
    from harness.search_spec import ParamSpec, enqueue_problem, storage_problem
    from twinflow_train.config import ConfigError, load_config

    _write(workdir, {"c.yaml": "run: {threads: 1024, seed: 2147483647}\noptim: {lr: 1e-4, max_grad_norm: 1.0e+308}\n"
                               "method: &m {rect_weight: 0.5}\n"}, base=False)
    cfg = load_config("c.yaml")
    assert cfg.run.seed == 2**31 - 1 and cfg.optim.lr == pytest.approx(1e-4) and cfg.method.rect_weight == 0.5
    with pytest.raises(ConfigError, match="run.seed: integer 2147483648 is out of range"):
        load_config("c.yaml", ["run.seed=2147483648"])
    assert storage_problem("sqlite:///study.db") is None and storage_problem("runs/s/s.journal") is None
    assert not (workdir / "study.db").exists() and not (workdir / "runs").exists()
    grid = ParamSpec(path="rl.warmup", kind="int", low=0, high=10, step=2)
    assert enqueue_problem(grid, 4) is None and enqueue_problem(grid, 10) is None
    assert enqueue_problem(ParamSpec(path="rl.weight", kind="float", low=1e-3, high=1.0, log=True), 1) is None
    assert enqueue_problem(ParamSpec(path="rl.clip", kind="categorical", choices=("none", "param")), "param") is None
    assert enqueue_problem(ParamSpec(path="x", kind="categorical", choices=(1, 2)), True) is not None

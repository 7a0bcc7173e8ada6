"""Exact forks: a child run started from its parent's ``fork-<k>`` checkpoint is the child trained from scratch.

For each kind of first difference the ladders use (a hard RL switch, a sigmoid ramp cut by
``rl.start``, ``rl.clip: param`` on a sigmoid arm before its start), a short digits run is trained
three ways: the parent (writing ``checkpoints/fork-<k>``), the child from scratch, and the child
forked; the forked child must equal the scratch child bit for bit: weights, EMA target, evaluation
EMA, optimizer state, counters, policy, best weights, sample files and every metrics record after
the fork (``time/*`` keys aside).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twinflow_train import rundir
from twinflow_train.config import ConfigError, load_config
from twinflow_train.rundir import (FORK_FROM, fork_checkpoint, fork_origin, read_fork_file, read_metrics,
                                   read_run_metrics, verify_checkpoint)
from twinflow_train.run.fork import ForkRequest, prefix_reason, shared_prefix
from twinflow_train.run.trainer import EXIT_DONE, fit

REPO = Path(__file__).resolve().parents[3]
K = 5
"""The fork step of the trainer tests: RL acts from step 6; a validation at 4 (best weights) comes before it,
a checkpoint falls on it, and the log window of the record at 6 crosses it (log_every 3: steps 4, 5 | 6),
with its largest norm before the fork: a window not carried over would change that record."""
RL = ["rl.enabled=true", "rl.reward=digits", "rl.weight=5.0"]
SPIKE = ["schedule.spike.enabled=true", "schedule.spike.window=5", "schedule.spike.k=0.5", "schedule.spike.cooldown=1"]
"""A spike rule touchy enough to fire in a few steps."""
ARMS = {
    "base": [],
    "hard": RL + ["rl.schedule=hard", f"rl.warmup={K + 1}"],
    "sigmoid": RL + ["rl.schedule=sigmoid", "rl.center=10", "rl.width=2", f"rl.start={K + 1}"],
    "clip": RL + ["rl.schedule=sigmoid", "rl.center=10", "rl.width=2", f"rl.start={K + 1}", "rl.clip=param",
                  "rl.clip_norm=0.01"],
    "spike": SPIKE,
    "spike_hard": SPIKE + RL + ["rl.schedule=hard", f"rl.warmup={K + 1}"],
}
FORKS = [("base", "hard"), ("base", "sigmoid"), ("sigmoid", "clip"), ("spike", "spike_hard")]
"""(parent, child): the hard switch and the cut sigmoid from their no-RL ancestor; param clipping from its
unclipped sigmoid parent (a clip norm that binds once the RL term acts); a hard switch under decay-on-spike
(a host read per step, no gating; the spike window and the decayed scale travel in the policy state)."""


def _over(tiny_overrides: list[str], arm: str) -> list[str]:
    return tiny_overrides + ["run.steps=14", "run.log_every=3", "run.val_every=4", "run.ckpt_every=5",
                             "eval.ema_decay=0.9", *ARMS[arm]]


def _cfg(tiny_overrides, arm):
    return load_config(None, _over(tiny_overrides, arm))


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=False)


def _assert_equal_tree(a, b, where="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        # a loaded optimizer's param_groups hold lists where a fresh one holds tuples (AdamW's betas)
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("time/")}


def assert_same_run(scratch: Path, forked: Path, *, step: int) -> None:
    """The forked child is the scratch child: state, best weights, samples, records after ``step`` (-1: all)."""
    a, b = _state(scratch), _state(forked)
    for name in ("wall_s", "train_s"):  # clocks: the forked run's include its parent's time
        a["state"]["counters"].pop(name), b["state"]["counters"].pop(name)
    _assert_equal_tree(a, b, "latest")
    assert a["extra"].keys() == {"target", "eval_ema"}
    _assert_equal_tree(torch.load(rundir.best_weights(scratch), weights_only=True),
                       torch.load(rundir.best_weights(forked), weights_only=True), "best")
    for tag in ("final-nfe1", "best-nfe2"):
        assert np.array_equal(np.load(scratch / "samples" / f"{tag}.npz")["images"],
                              np.load(forked / "samples" / f"{tag}.npz")["images"]), tag
    own = [r for r in read_metrics(forked / "metrics.jsonl").records if r["kind"] != "event"]
    ref = [r for r in read_metrics(scratch / "metrics.jsonl").records if r["step"] > step]
    assert own and [_untimed(r) for r in own] == [_untimed(r) for r in ref]


# --------------------------------------------------------------------------- shared_prefix


def test_shared_prefix_of_the_blog_ladder():
    from harness.matrix import load_matrix

    grid = load_matrix(REPO / "ablations" / "blog-digits.yaml")
    cfg = {r.arm: r.config for r in grid.runs if r.seed == 0}
    steps = cfg["vanilla"].run.steps
    warmup = cfg["rl_hard"].rl.warmup
    start = cfg["rl_sigmoid"].rl.start
    assert warmup == steps // 3 and start == steps // 3 - 4 * (steps // 40)  # 600 and 420 at 1,800 steps
    # the hard switch: weight exactly 0 through warmup - 1
    for arm in ("rl_hard", "rl_weight_low", "rl_weight_high", "rl_rms"):
        assert shared_prefix(cfg["renoise"], cfg[arm]) == warmup - 1, arm
    assert shared_prefix(cfg["rl_hard"], cfg["rl_weight_high"]) == warmup - 1
    # the cut sigmoid: weight exactly 0 through start - 1, from renoise and from rl_hard alike
    for parent in ("renoise", "rl_hard"):
        for arm in ("rl_sigmoid", "rl_clip", "rl_sigmoid_high", "rl_clip_high"):
            assert shared_prefix(cfg[parent], cfg[arm]) == start - 1, (parent, arm)
    assert shared_prefix(cfg["rl_sigmoid"], cfg["rl_clip"]) == start - 1
    # a difference that acts from step 1: the renoise schedule, decay-on-spike
    assert shared_prefix(cfg["vanilla"], cfg["renoise"]) == 0
    assert shared_prefix(cfg["vanilla"], cfg["rl_hard"]) == 0
    assert shared_prefix(cfg["rl_clip"], cfg["spike_decay"]) == 0
    # the same arm shares everything with itself; another seed nothing
    assert shared_prefix(cfg["rl_clip"], cfg["rl_clip"]) == steps
    other_seed = next(r.config for r in grid.runs if r.arm == "rl_hard" and r.seed == 1)
    assert shared_prefix(cfg["renoise"], other_seed) == 0


def test_shared_prefix_is_zero_for_what_acts_from_step_one():
    base = load_config(None, RL + ["rl.schedule=hard", "rl.warmup=100", "run.steps=300"])
    assert shared_prefix(base, base) == 300
    for over, want in [
        (["schedule.policy=cosine"], 0), (["optim.lr=2e-4"], 0), (["schedule.warmup_steps=10"], 0),
        (["renoise.schedule=blog_linear"], 0), (["renoise.main.kind=beta"], 0), (["schedule.spike.enabled=true"], 0),
        (["run.log_every=5"], 0), (["data.batch_size=64"], 0), (["eval.ema_decay=0.99"], 0), (["eval.nfe=[2]"], 0),
        (["parallel.mixed_precision=bf16"], 0), (["run.threads=2"], 0), (["method.enhanced_ratio=0.6"], 0),
        # ignored: checkpoint cadence and format, telemetry
        (["run.ckpt_every=50", "checkpoint.format=dcp", "checkpoint.keep_latest_k=3", "telemetry.name=x",
          "run.preempt_grace_s=5", "run.preempt_check_every=3"], 300),
        (["run.diverge_grad_norm=50"], 0), (["run.nonfinite=stop"], 0),
        # RL: the earlier onset of the two
        (["rl.warmup=40"], 39), (["rl.weight=1.0"], 99), (["rl.clip=param"], 99), (["rl.enabled=false"], 99),
        (["rl.schedule=linear"], 99),  # the parent's switch at 100 comes first
        (["rl.schedule=sigmoid", "rl.center=100", "rl.width=5"], 0),  # an uncut sigmoid acts from step 1
        (["rl.schedule=sigmoid", "rl.center=100", "rl.width=5", "rl.start=80"], 79),
        # the first validation bounds a val_every difference; the shorter run its length
        (["run.val_every=50"], 49), (["run.steps=200"], 199), (["run.steps=90"], 89),
    ]:
        child = load_config(None, RL + ["rl.schedule=hard", "rl.warmup=100", "run.steps=300", *over])
        assert shared_prefix(base, child) == want, (over, prefix_reason(base, child))
    cosine = load_config(None, ["schedule.policy=cosine", "run.steps=300"])
    assert shared_prefix(cosine, load_config(None, ["schedule.policy=cosine", "run.steps=400"])) == 0


def test_rl_start_cuts_the_weight_to_exactly_zero():
    from twinflow_train.rl.schedule import rl_onset, rl_weight

    cfg = load_config(None, RL + ["rl.schedule=sigmoid", "rl.center=600", "rl.width=45", "rl.start=420"]).rl
    assert rl_weight(419, cfg) == 0.0 and rl_weight(420, cfg) == pytest.approx(5.0 / (1 + np.exp(4.0)))
    uncut = load_config(None, RL + ["rl.schedule=sigmoid", "rl.center=600", "rl.width=45"]).rl
    assert rl_weight(1, uncut) > 0 and rl_weight(700, cfg) == rl_weight(700, uncut)
    assert rl_onset(cfg, steps=1800) == 420 and rl_onset(uncut, steps=1800) == 1
    with pytest.raises(ConfigError, match="rl.start must be >= 1"):
        load_config(None, ["rl.start=0"])


# --------------------------------------------------------------------------- reading a forked run


def _fake_run(run_dir: Path, steps: range, *, fork: dict | None = None, config_hash: str = "h") -> None:
    from twinflow_train.rundir import MetricsWriter, atomic_write_json, write_status

    run_dir.mkdir(parents=True)
    w = MetricsWriter(run_dir / "metrics.jsonl")
    if fork is not None:
        w.write({"step": fork["step"], "kind": "event", "event": "fork", "checkpoint": None, "reason": ""})
        atomic_write_json(run_dir / "fork.json", fork)
    for k in steps:
        w.write({"step": k, "kind": "train", "loss/total": float(k), "run": run_dir.name})
    w.close()
    write_status(run_dir, "done", step=steps[-1], config_hash=config_hash)


def test_read_run_metrics_takes_the_shared_prefix_from_each_parent_recursively(tmp_path):
    g, p, c = tmp_path / "g", tmp_path / "a" / "p", tmp_path / "c"
    _fake_run(g, range(0, 11))
    _fake_run(p, range(5, 11), fork={"parent": "../../g", "step": 4, "parent_config_hash": "h"})
    _fake_run(c, range(8, 11), fork={"parent": "../a/p", "step": 7, "parent_config_hash": "h"})
    view = read_run_metrics(c).records
    assert [(r["step"], r.get("run"), r.get(FORK_FROM)) for r in view] == (
        [(k, "g", str(g)) for k in range(0, 5)] + [(4, None, str(p))] + [(k, "p", str(p)) for k in range(5, 8)]
        + [(7, None, None)] + [(k, "c", None) for k in range(8, 11)])
    assert fork_origin(c)["parent_dir"] == p and fork_origin(g) is None
    # the parent re-run under another config: the prefix may have drifted
    from twinflow_train.rundir import RunDirError, write_status
    write_status(p, "done", step=10, config_hash="other")
    with pytest.raises(RunDirError, match="now holds config other, not the h"):
        read_run_metrics(c)
    read = read_run_metrics(c, strict=False)
    assert len(read.records) == len(view) and "now holds config other" in read.problem
    # a parent gone: its steps are missing, said so
    import shutil
    shutil.rmtree(g)
    read = read_run_metrics(p, strict=False)
    assert [r["step"] for r in read.records] == [4, *range(5, 11)] and "has no metrics.jsonl" in read.problem
    # a fallback is no fork
    (c / "fork.json").write_text('{"fallback": "missing", "parent": "../a/p", "step": 7}')
    assert fork_origin(c) is None and read_run_metrics(c).records == read_metrics(c / "metrics.jsonl").records


# --------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def runs(tiny_overrides, tmp_path_factory) -> dict[str, Path]:
    """Every arm from scratch; the parents also write ``fork-<K>``."""
    root = tmp_path_factory.mktemp("forks")
    parents = {p for p, _ in FORKS}
    out = {}
    for arm in ARMS:
        out[arm] = root / arm
        assert fit(_cfg(tiny_overrides, arm), out[arm], progress=False,
                   fork_at=[K] if arm in parents else ()) == EXIT_DONE
    return out


@pytest.mark.slow
def test_fork_checkpoint_is_complete_and_outside_the_rotation(runs):
    cks = runs["base"] / "checkpoints"
    assert verify_checkpoint(cks / f"fork-{K}") is None
    meta = rundir.read_json(cks / f"fork-{K}" / "meta.json")
    assert meta["step"] == K and meta["kind"] == "fork" and meta["world"] == 1
    assert set(meta["files"]) == {"state.pt", "best/weights.pt"}  # the validation at 4 made best weights
    # keep_latest_k (1) kept step-10 beside latest (14); the fork checkpoint neither counts nor is pruned
    assert sorted(p.name for p in cks.iterdir()) == ["best", f"fork-{K}", "last_good", "latest", rundir.kept_name(10)]
    assert rundir.resume_step(runs["base"]) == 14
    # the log window crosses the fork (log steps 3 and 6): steps 4-5's events and norm travel with the state
    window = torch.load(cks / f"fork-{K}" / "state.pt", weights_only=False)["state"]["log_window"]
    assert window["max_norm"] > 0 and set(window["events"]) >= {"event/nonfinite", "event/skipped"}
    # a run that never forks has none
    assert not rundir.fork_checkpoints(runs["hard"]) and rundir.fork_checkpoints(runs["base"]) == {K: cks / f"fork-{K}"}


@pytest.mark.slow
@pytest.mark.parametrize("parent,child", FORKS)
def test_forked_child_equals_child_from_scratch(runs, tiny_overrides, tmp_path, parent, child):
    cfg = _cfg(tiny_overrides, child)
    assert shared_prefix(_cfg(tiny_overrides, parent), cfg) == K
    forked = tmp_path / child
    assert fit(cfg, forked, progress=False, fork=ForkRequest(parent=runs[parent], step=K)) == EXIT_DONE
    assert_same_run(runs[child], forked, step=K)
    if parent == "spike":  # the parent's window of norms, full at the fork, decides the child's spikes after it
        at_fork = torch.load(fork_checkpoint(runs[parent], K) / "state.pt", weights_only=False)["state"]
        assert len(at_fork["policy"]["window"]) == 5
        assert _state(forked)["state"]["counters"]["spikes"] > 0 and _state(forked)["state"]["policy"]["scale"] < 1
    origin = fork_origin(forked)
    assert origin["step"] == K and origin["parent_dir"] == Path(os.path.normpath(runs[parent]))
    assert origin["parent"] == os.path.relpath(runs[parent], forked)
    assert origin["checkpoint_sha256"] == rundir.file_digest(fork_checkpoint(runs[parent], K) / "meta.json")
    assert origin["parent_config_hash"] == rundir.read_status(runs[parent])["config_hash"]
    (event,) = [r for r in read_metrics(forked / "metrics.jsonl").records if r["kind"] == "event"]
    assert event["event"] == "fork" and event["step"] == K
    # the run's view from step 0: the parent's records through K (marked), then its own; no copies
    view = read_run_metrics(forked).records
    prefix = [r for r in view if FORK_FROM in r]
    assert prefix == [{**r, FORK_FROM: str(origin["parent_dir"])}
                      for r in read_metrics(runs[parent] / "metrics.jsonl").records if r["step"] <= K]
    assert view[len(prefix):] == read_metrics(forked / "metrics.jsonl").records
    assert {r["kind"] for r in prefix} == {"teacher", "train", "val"}
    # the scratch child's own first K steps are the parent's numbers (its RL telemetry at weight 0 aside)
    ref = {(r["step"], r["kind"]): r for r in read_metrics(runs[child] / "metrics.jsonl").records if r["step"] <= K}
    assert ref.keys() == {(r["step"], r["kind"]) for r in prefix}
    for r in prefix:
        mine = ref[(r["step"], r["kind"])]
        shared = set(mine) & set(r) - {FORK_FROM}
        assert {k for k in shared if not k.startswith("time/") and mine[k] != r[k]} == set(), r["step"]


@pytest.mark.slow
def test_a_forked_child_resumes_from_its_own_checkpoints(runs, tiny_overrides, tmp_path, monkeypatch):
    cfg = _cfg(tiny_overrides, "hard")
    forked = tmp_path / "hard"
    fork = ForkRequest(parent=runs["base"], step=K)
    monkeypatch.setenv("TWINFLOW_FAULT_AT_STEP", "12")  # after its own checkpoint at 10
    assert fit(cfg, forked, progress=False, fork=fork) != EXIT_DONE
    monkeypatch.delenv("TWINFLOW_FAULT_AT_STEP")
    assert fit(cfg, forked, progress=False, fork=fork) == EXIT_DONE
    assert_same_run(runs["hard"], forked, step=K)
    assert fork_origin(forked)["step"] == K
    assert [r["event"] for r in read_metrics(forked / "metrics.jsonl").records if r["kind"] == "event"] == ["fork"]


@pytest.mark.slow
def test_a_corrupt_fork_checkpoint_falls_back_to_training_from_scratch(runs, tiny_overrides, tmp_path, capfd):
    parent = tmp_path / "parent"
    source = fork_checkpoint(runs["base"], K)
    target = fork_checkpoint(parent, K)
    target.parent.mkdir(parents=True)
    for f in ("config.yaml", "status.json", "metrics.jsonl"):
        (parent / f).write_bytes((runs["base"] / f).read_bytes())
    import shutil
    shutil.copytree(source, target)
    state = target / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    state.write_bytes(bytes(data))
    child = tmp_path / "hard"
    assert fit(_cfg(tiny_overrides, "hard"), child, progress=False, fork=ForkRequest(parent=parent, step=K)) == EXIT_DONE
    assert "fork_fallback at step 0" in capfd.readouterr().out
    fork = read_fork_file(child)
    assert "state.pt does not match its sha256" in fork["fallback"] and fork["step"] == K
    assert fork_origin(child) is None
    (event,) = [r for r in read_metrics(child / "metrics.jsonl").records if r["kind"] == "event"]
    assert event["event"] == "fork_fallback" and event["step"] == 0 and "sha256" in event["reason"]
    # trained from scratch: the scratch run exactly, its own records from step 0 (the view adds nothing)
    assert_same_run(runs["hard"], child, step=-1)
    assert read_run_metrics(child).records == read_metrics(child / "metrics.jsonl").records
    # a parent without the checkpoint at all: the same fallback
    missing = tmp_path / "hard-missing"
    assert fit(_cfg(tiny_overrides, "hard"), missing, progress=False,
               fork=ForkRequest(parent=runs["base"], step=K - 1)) == EXIT_DONE
    assert "missing" in read_fork_file(missing)["fallback"]


@pytest.mark.slow
def test_a_fork_the_configs_do_not_allow_is_refused_before_anything_is_written(runs, tiny_overrides, tmp_path):
    child = tmp_path / "lr"
    cfg = load_config(None, _over(tiny_overrides, "base") + ["optim.lr=3e-4"])
    with pytest.raises(ConfigError, match=r"shares only its first 0 steps .*optim.lr differs"):
        fit(cfg, child, progress=False, fork=ForkRequest(parent=runs["base"], step=K))
    renoise = load_config(None, _over(tiny_overrides, "base") + ["renoise.schedule=blog_linear"])
    with pytest.raises(ConfigError, match="renoise.schedule differs"):
        fit(renoise, child, progress=False, fork=ForkRequest(parent=runs["base"], step=K))
    late = _cfg(tiny_overrides, "hard")
    with pytest.raises(ConfigError, match=f"shares only its first {K} steps"):
        fit(late, child, progress=False, fork=ForkRequest(parent=runs["base"], step=K + 2))
    assert not child.exists()


@pytest.mark.slow
def test_cli_flags(runs, tiny_overrides, tmp_path):
    from ..conftest import run_cli

    child = tmp_path / "cli"
    r = run_cli(["fit", "--no-progress", "--run-dir", str(child), "--fork-from", str(runs["base"]),
                 *_over(tiny_overrides, "hard")])
    assert r.returncode == 2 and "--fork-from and --fork-step go together" in r.stderr
    r = run_cli(["fit", "--no-progress", "--run-dir", str(child), "--fork-at", "99", *_over(tiny_overrides, "hard")])
    assert r.returncode == 2 and "--fork-at: steps must be in [1, run.steps = 14]" in r.stderr
    assert not child.exists()


# --------------------------------------------------------------------------- torchrun + DCP


@pytest.mark.slow
@pytest.mark.distributed
def test_fork_under_torchrun_with_dcp_checkpoints(tiny_overrides, tmp_path):
    # FSDP2 over 2 gloo ranks with 2 accumulation micro-batches: a per-term split (rl.clip: param) reduces
    # each micro-batch's gradient on its own, so it must not run while the RL weight is 0
    over = _over(tiny_overrides, "base") + ["checkpoint.format=dcp", "eval.teacher=false", "run.steps=10",
                                            "data.grad_accum=2"]
    hard = RL + ["rl.schedule=hard", "rl.warmup=6", "rl.clip=param", "rl.clip_norm=0.01"]

    def torchrun(run_dir, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "twinflow_train.cli", "fit", "--no-progress", "--run-dir", str(run_dir), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    parent, scratch, forked = tmp_path / "parent", tmp_path / "scratch", tmp_path / "forked"
    torchrun(parent, "--fork-at", "5", *over)
    meta = rundir.read_json(fork_checkpoint(parent, 5) / "meta.json")
    assert meta["world"] == 2 and meta["format"] == "dcp" and any(k.startswith("shards/") for k in meta["files"])
    torchrun(scratch, *over, *hard)
    torchrun(forked, "--fork-from", str(parent), "--fork-step", "5", *over, *hard)
    assert fork_origin(forked)["step"] == 5
    # DCP shards hold the state: compare what the trainer loads back, via the full-state converter
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for run in (scratch, forked):
        out = tmp_path / f"{run.name}.pt"
        dcp_to_torch_save(str(run / "checkpoints" / "latest" / "shards"), str(out))
        states.append(torch.load(out, weights_only=False))
    _assert_equal_tree(states[0], states[1], "shards")
    a, b = (torch.load(r / "checkpoints" / "latest" / "state.pt", weights_only=False)["state"] for r in (scratch, forked))
    for s in (a, b):
        s["counters"].pop("wall_s"), s["counters"].pop("train_s")
    _assert_equal_tree(a, b, "state")
    own = [_untimed(r) for r in read_metrics(forked / "metrics.jsonl").records if r.get("event") != "fork"]
    ref = [_untimed(r) for r in read_metrics(scratch / "metrics.jsonl").records if r["step"] > 5]
    assert own and own == ref

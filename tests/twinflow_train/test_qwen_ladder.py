"""The Qwen-Image ladder itself (ablations/blog-qwen.yaml: its arms, schedules and every run) end to end.

A tiny random-weight Qwen-Image pipeline (diffusers' real transformer, VAE and pipeline classes, a tiny
Qwen2.5-VL text encoder) is saved in ``from_pretrained`` layout; images go through ``twinflow-train encode``
into one shard set that every run reads; the harness runs each arm with the torchrun launcher, 2 gloo
processes per run. The base weights come from the model directory (``teacher.checkpoint`` = the model
dir): no teacher step, sharded meta-device materialisation in the trainer.

The RL arms score with HPSv2 (open_clip). Where open_clip is installed they run with a tiny random HPS
scorer; the main test environment has no open_clip, and there the test checks that the dry run refuses
exactly those arms, naming the missing extra, and runs the others.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twinflow_train.rundir import read_run_metrics

from .test_qwen_fixtures import write_images, write_tiny_pipeline

MATRIX = Path(__file__).resolve().parents[2] / "ablations" / "blog-qwen.yaml"
STEPS = 4
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
RL_ARMS = ("rl_hard", "rl_sigmoid", "rl_clip", "spike_decay")

# What a tiny CPU run needs, and nothing else: paths (model dir, shards, VAE, run root), tiny sizes
# (batch 8 = 2 ranks x 4 row groups; 10 samples at 1 NFE; a 2-step teacher sampler), a few steps
# (warm-up and ramp shrunk so the RL weight switches on inside them), CPU with one thread per process.
# Method, renoise, RL, clipping, spike, LR policy, bf16, activation checkpointing and DCP stay the ladder's.
def _tiny_overrides(root: Path) -> dict:
    return {
        "model.qwen.pretrained": str(root / "pipe"), "teacher.checkpoint": str(root / "pipe"),
        "codec.path": str(root / "pipe"), "data.shards": str(root / "shards"),
        "data.batch_size": 8, "eval.n_samples": 10, "eval.nfe": [1], "teacher.sample_steps": 2,
        "run.device": "cpu", "run.threads": 1, "run.log_every": 1, "run.val_every": 0, "run.ckpt_every": 0,
    }


def _hps_overrides(root: Path) -> dict:
    # the scorer's shape as a model-config file: every run's processes register it themselves
    return {"rl.hpsv2_arch": str(root / "HPS-tiny-ladder.json"), "rl.hpsv2_checkpoint": str(root / "hps_tiny.pt")}


def _claim_arms(claim: dict) -> set[str]:
    """The arms a claims entry compares (one test, or a claim of several parts under ``tests``)."""
    tests = claim.get("tests", [claim])
    return {t[k] for t in tests for k in ("baseline", "treatment") if k in t}


def derived_matrix(root: Path, *, arms: tuple[str, ...] | None = None, rl_scorer: bool = False) -> Path:
    """blog-qwen.yaml with only the tiny-run overrides added (and optionally fewer arms); written under root."""
    data = yaml.safe_load(MATRIX.read_text())
    data["base"] = str((MATRIX.parent / data["base"]).resolve())
    # the RL term switches on at step 3 (hard) and the cut sigmoid at step 2, inside the run: rl_hard forks from
    # renoise after step 2, the sigmoid arms after step 1 (harness/forks.py)
    data["vars"].update({"steps": STEPS, "rl_warmup": 3, "ramp_width": 0.25})
    data["seeds"] = [0]  # one seed per arm: the ladder's runs, not its sequential plan (harness/sequential.py)
    data["overrides"].update(_tiny_overrides(root))
    if rl_scorer:
        for arm in RL_ARMS:
            if "rl.hpsv2_checkpoint" in data["arms"][arm]:
                data["arms"][arm].update(_hps_overrides(root))
    if arms is not None:
        data["arms"] = {k: v for k, v in data["arms"].items() if k in arms}
        # a claim that names a left-out arm would (rightly) fail the matrix check: keep only the testable ones
        data["claims"] = [c for c in data.get("claims", []) if _claim_arms(c) <= set(arms) | {"teacher"}]
        if not data["claims"]:
            del data["claims"]
    path = root / f"blog-qwen-tiny-{len(data['arms'])}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _write_tiny_hps(root: Path) -> None:
    import open_clip
    import torch

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / "HPS-tiny-ladder.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "HPS-tiny-ladder.json")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("HPS-tiny-ladder", pretrained=None).state_dict()},
               root / "hps_tiny.pt")


@pytest.fixture(scope="module")
def ladder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen-ladder")
    write_tiny_pipeline(root / "pipe")
    write_images(root / "images", [(36, 24)] * 10 + [(20, 20)] * 4)
    enc = _cli("twinflow_train.cli", ["encode", "--images", str(root / "images"), "--pipeline", str(root / "pipe"),
                                      "--out", str(root / "shards"), "--buckets", "16x24,16x16",
                                      "--embed-dtype", "float32", "--no-progress"])
    assert enc.returncode == 0, enc.stderr[-3000:]
    if HAS_OPEN_CLIP:
        _write_tiny_hps(root)
    return root


def _cli(module: str, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_the_unmodified_ladder_names_the_missing_model_dir(tmp_path):
    out = _cli("harness.cli", ["grid", "run", "--dry-run", str(MATRIX), "--root", str(tmp_path / "runs")])
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "/seed-0" in ln]
    assert len(lines) == 6 and all("PROBLEM" in ln and "models/Qwen-Image-2512" in ln for ln in lines), out.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_dry_run_validates_every_run_of_the_ladder(ladder_root, tmp_path):
    matrix = derived_matrix(ladder_root, rl_scorer=HAS_OPEN_CLIP)
    out = _cli("harness.cli", ["grid", "run", "--dry-run", str(matrix), "--root", str(tmp_path / "runs")])
    rows = {ln.split()[0]: ln for ln in out.stdout.splitlines() if "/seed-0" in ln}
    assert sorted(rows) == sorted(f"{a}/seed-0" for a in ("vanilla", "renoise", *RL_ARMS)), out.stdout
    for key, line in rows.items():
        needs_extra = key.split("/")[0] in RL_ARMS and not HAS_OPEN_CLIP
        if needs_extra:  # the reward model's package is missing: refused before anything starts
            assert "PROBLEM" in line and "hpsv2" in line, line
        else:
            assert line.split()[1:] == ["new", "ok"], line
    assert out.returncode == (2 if not HAS_OPEN_CLIP else 0), out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_ladder_runs_end_to_end_on_two_processes(ladder_root, tmp_path):
    arms = None if HAS_OPEN_CLIP else ("vanilla", "renoise")  # see the module docstring
    matrix = derived_matrix(ladder_root, arms=arms, rl_scorer=HAS_OPEN_CLIP)
    root = tmp_path / "runs"
    out = _cli("harness.cli", ["grid", "run", str(matrix), "--root", str(root), "--launcher", "torchrun",
                               "--nproc-per-node", "2"])
    grid_dir = root / "blog-qwen"
    logs = {p.parent.parent.name: p.read_text()[-3000:] for p in grid_dir.rglob("attempt-1.log")}
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + json.dumps(logs)[-6000:]
    assert "no teacher preparation step" in out.stdout
    expected = yaml.safe_load(matrix.read_text())["arms"]
    for arm in expected:
        run = grid_dir / arm / "seed-0"
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        assert "--nproc_per_node=2" in (run / "logs" / "attempt-1.log").read_text().splitlines()[0]
        # a forked run's first steps are its source's records (rundir.read_run_metrics reads both files)
        records = read_run_metrics(run).records
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        assert all(r["lr"] == 1e-4 for r in train)  # the ladder's constant LR
        val = [r for r in records if r["kind"] == "val"]
        assert len(val) == 1 and val[0]["val/loss"] > 0
        assert json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())["step"] == STEPS
        if arm != "vanilla":  # the renoise schedule is on from this arm on
            assert "renoise/bias" in train[0]
        if arm in RL_ARMS:  # the reward term switched on within the steps
            assert any(r.get("rl/weight", 0) > 0 for r in train)
        if arm in ("rl_hard", "rl_sigmoid", "rl_clip"):  # forked from renoise's DCP checkpoint under torchrun
            fork = json.loads((run / "fork.json").read_text())
            assert "fallback" not in fork and fork["step"] == (2 if arm == "rl_hard" else 1), fork


def _qwen_cfg(model_dir: Path, teacher: str):
    from twinflow_train.config import load_config
    return load_config(None, ["model.family=qwen_image", "codec.kind=qwen_vae", f"model.qwen.pretrained={model_dir}",
                              f"teacher.checkpoint={teacher}"])


def test_preflight_takes_base_weights_from_the_model_directory(tmp_path):
    from twinflow_train.config import ConfigError
    from twinflow_train.assets.teacher import base_weights_in_model, get_teacher
    from twinflow_train.run.trainer import preflight_teacher

    from .test_qwen_fixtures import tiny_transformer

    model = tmp_path / "model"
    tiny_transformer().save_pretrained(str(model / "transformer"))
    for teacher in (str(model), str(model) + "/", "auto"):
        cfg = _qwen_cfg(model, teacher)
        assert base_weights_in_model(cfg) and preflight_teacher(cfg) is None
        assert get_teacher(cfg) == model / "transformer"  # nothing trained: the directory, checked
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="teacher.checkpoint: .* is a directory"):
        preflight_teacher(_qwen_cfg(model, str(other)))
    with pytest.raises(ConfigError, match="model.qwen.pretrained: .* is not a directory"):
        preflight_teacher(_qwen_cfg(tmp_path / "missing", "auto"))
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        preflight_teacher(_qwen_cfg(model, str(model)))

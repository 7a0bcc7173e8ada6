"""Issue 7 acceptance through the real trainer: tiny Qwen-Image from encoded shards, FSDP2 on 2 gloo processes.

- synthetic images of two aspect ratios are encoded by ``twinflow-train encode`` with a tiny
  random VAE / Qwen2.5-VL text encoder, and the run trains from those shards;
- 2 processes (grad_accum 1) log the same TwinFlow losses as 1 process with grad_accum 2;
- the 2-process run is killed by an injected fault after its step-2 DCP checkpoint, resumes
  from it, has every step exactly once in metrics.jsonl, and ends with the 1-process weights.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch

from twinflow_train.config import load_config
from twinflow_train.data.encode import encode_main

from .test_qwen_fixtures import write_images, write_tiny_pipeline

STEPS = 4


def _overrides(root: Path) -> list[str]:
    return ["model.family=qwen_image", f"model.qwen.pretrained={root / 'pipe'}", "codec.kind=qwen_vae",
            "data.dataset=latent_shards", f"data.shards={root / 'shards'}", "data.batch_size=8",
            f"run.steps={STEPS}", "run.log_every=1", "run.val_every=0", "run.ckpt_every=2", "run.device=cpu",
            "run.threads=1", "eval.n_samples=10", "eval.nfe=[1]", "eval.teacher=false", "teacher.sample_steps=2",
            f"teacher.checkpoint={root / 'teacher.pt'}", "checkpoint.format=dcp", "method.target=ema",
            "model.sign_embedding=true", f"aux.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from twinflow_train.models.qwen_image import build_qwen_image

    root = tmp_path_factory.mktemp("qwen-fit")
    write_tiny_pipeline(root / "pipe")
    # 10 landscape 3:2 images (the reference bucket, holds the 1 validation row) and 4 square ones
    write_images(root / "images", [(36, 24)] * 10 + [(20, 20)] * 4)
    assert encode_main(["--images", str(root / "images"), "--pipeline", str(root / "pipe"), "--out",
                        str(root / "shards"), "--buckets", "16x24,16x16", "--embed-dtype", "float32",
                        "--no-progress"]) == 0
    cfg = load_config(None, _overrides(root))
    # the base model: the pretrained transformer with its initialised target-time embedding
    torch.save(build_qwen_image(cfg, latent_shape=(4, 8, 12)).state_dict(), root / "teacher.pt")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from twinflow_train.cli import main
    os._exit(main(args))


def _launch(world: int, args: list[str], env: dict[str, str] | None = None) -> list[int]:
    """What torchrun does (env:// rendezvous, one process per rank). Spawned, not forked: a fork of a
    process whose torch thread pools are running (another test in this worker started them) can deadlock."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():  # a hung rank fails the test instead of hanging the suite
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / "final.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / "latest" / "shards"), str(out))
    sd = torch.load(out, weights_only=False)
    return {**{f"model.{k}": v for k, v in sd["model"].items()},
            **{f"ema.{k}": v for k, v in sd["extra"]["target"].items()}}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_from_shards_like_one_and_resume_exactly(prepared, tmp_path):
    from twinflow_train.run.trainer import fit

    over = _overrides(prepared)
    one = tmp_path / "one"
    assert fit(load_config(None, over + ["data.grad_accum=2"]), one, progress=False) == 0

    two = tmp_path / "two"
    args = ["fit", "--run-dir", str(two), "--no-progress", *over, "data.grad_accum=1"]
    assert _launch(2, args, {"TWINFLOW_FAULT_AT_STEP": "3"}) == [1, 1]  # crashes after the step-2 checkpoint
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "failed" and "injected fault at step 3" in status["reason"]
    assert json.loads((two / "checkpoints" / "latest" / "meta.json").read_text())["step"] == 2
    assert _launch(2, args) == [0, 0]  # resumes from the DCP checkpoint
    assert json.loads((two / "status.json").read_text())["state"] == "done"

    train_one = [r for r in _metrics(one) if r.get("kind") == "train"]
    train_two = [r for r in _metrics(two) if r.get("kind") == "train"]
    assert [r["step"] for r in train_two] == list(range(1, STEPS + 1))  # no gap, no duplicate after resume
    for a, b in zip(train_one, train_two):
        for key in ("loss/total", "loss/main", "loss/rect", "grad_norm/total"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert train_one[-1]["loss/total"] != train_one[0]["loss/total"]

    w1, w2 = _final_weights(one), _final_weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
    teacher = torch.load(prepared / "teacher.pt", weights_only=True)
    moved = sum(not torch.allclose(w1[f"model.{k}"], v, atol=1e-6) for k, v in teacher.items() if f"model.{k}" in w1)
    assert moved > len(teacher) // 2  # the comparison is not vacuous: training moved the weights
    val = [r for r in _metrics(two) if r.get("kind") == "val"]
    assert len(val) == 1 and val[0]["step"] == STEPS and val[0]["val/loss"] > 0

    # the run's EMA weights exported as a diffusers pipeline that loads and samples
    from diffusers import QwenImagePipeline

    from twinflow_train.cli import export_main

    assert export_main(["--run-dir", str(two), "--out", str(tmp_path / "export"), "--which", "ema",
                        "--pipeline", str(prepared / "pipe"), "--tt-mode", "few"]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(tmp_path / "export"), trust_remote_code=True)
    sd = pipe.transformer.state_dict()
    for k, v in sd.items():
        assert torch.allclose(v, w2[f"ema.transformer.{k}"], atol=0), k
    images = pipe(prompt=["pattern 3 aaaa"], height=16, width=24, num_inference_steps=2, true_cfg_scale=1.0,
                  output_type="pt").images
    assert images.shape == (1, 3, 16, 24) and torch.isfinite(images).all()

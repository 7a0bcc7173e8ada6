"""The GPU check set, one command on a CUDA machine: ``python -m pytest -m gpu``.

- the digits fit on CUDA (the embedded default, a few steps);
- the tiny Qwen-Image fit on CUDA from encoded shards, base weights from the model directory;
- bf16 FSDP2 on one device: close to fp32, times kept fp32;
- the step benchmark (test_qwen_bench.py::test_gpu_step_reports_mfu_and_memory).
Everything here is skipped without CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_digits_fit_on_cuda(tiny_overrides, tmp_path):
    from twinflow_train.config import load_config
    from twinflow_train.run.trainer import fit

    cfg = load_config(None, tiny_overrides + ["run.device=cuda", "run.steps=6", "run.val_every=6", "run.ckpt_every=6"])
    assert fit(cfg, tmp_path / "run", progress=False) == 0
    train = _train_records(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["loss/total"] > 0 for r in train)


def test_tiny_qwen_fit_on_cuda(tmp_path):
    from twinflow_train.config import load_config
    from twinflow_train.data.encode import encode_main
    from twinflow_train.run.trainer import fit

    from .test_qwen_fixtures import write_images, write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "pipe")
    write_images(tmp_path / "images", [(36, 24)] * 10)
    assert encode_main(["--images", str(tmp_path / "images"), "--pipeline", str(tmp_path / "pipe"), "--out",
                        str(tmp_path / "shards"), "--buckets", "16x24", "--no-progress"]) == 0
    pipe = str(tmp_path / "pipe")
    cfg = load_config(None, ["model.family=qwen_image", f"model.qwen.pretrained={pipe}", f"teacher.checkpoint={pipe}",
                             "codec.kind=qwen_vae", "data.dataset=latent_shards", f"data.shards={tmp_path / 'shards'}",
                             "data.batch_size=4", "run.steps=3", "run.log_every=1", "run.device=cuda",
                             "parallel.mixed_precision=bf16", "parallel.activation_checkpointing=true",
                             "eval.n_samples=10", "eval.nfe=[1]", "teacher.sample_steps=2", "checkpoint.format=dcp"])
    assert fit(cfg, tmp_path / "run", progress=False) == 0
    assert [r["step"] for r in _train_records(tmp_path / "run")] == [1, 2, 3]


def test_bf16_fsdp2_on_one_device_is_close_to_fp32():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from twinflow_train.config import ParallelConfig
    from twinflow_train.models.qwen_image import (TINY_CONFIG, QwenImageFlowModel,
                                                  TwinFlowQwenImageTransformer2DModel, parallelize_qwen_image)

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        outs = []
        for mp in ("fp32", "bf16"):
            torch.manual_seed(0)
            with torch.device("cuda"):
                tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG)
                for p in tf.parameters():
                    p.data.add_(0.05 * torch.randn_like(p))
            model = parallelize_qwen_image(QwenImageFlowModel(tf, null_prompt_embeds=None), mesh,
                                           ParallelConfig(mixed_precision=mp))
            g = torch.Generator(device="cuda").manual_seed(1)
            x = torch.randn(2, 4, 4, 6, device="cuda", generator=g)
            t = torch.rand(2, device="cuda", generator=g)
            cond = {"prompt_embeds": torch.randn(2, 5, TINY_CONFIG["joint_attention_dim"], device="cuda", generator=g)}
            out = model(x, t, t * 0.95, cond)
            out.square().mean().backward()
            outs.append(out.detach().float())
            assert all(p.grad is None or torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
        assert outs[1].dtype == torch.float32
        assert torch.allclose(outs[0], outs[1], atol=5e-2, rtol=5e-2)
    finally:
        if started:
            dist.destroy_process_group()

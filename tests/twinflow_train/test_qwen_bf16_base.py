"""The frozen base model stored in bf16 under bf16 compute: bit-identical outputs at 2 gloo ranks, half the bytes."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from .test_qwen_fixtures import TEXT_DIM, free_store, tiny_transformer

WORLD = 2


def _rank(rank: int, store: str, model_dir: str, out: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1"})
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from twinflow_train.config import load_config
    from twinflow_train.models.qwen_image import build_sharded_copies

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    cfg = load_config(None, ["model.family=qwen_image", "codec.kind=qwen_vae", f"model.qwen.pretrained={model_dir}",
                             f"teacher.checkpoint={model_dir}", "method.target=ema", "parallel.mixed_precision=bf16",
                             "model.tt_init=normal"])
    gen = torch.Generator().manual_seed(7)  # the same inputs on both ranks
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t, tt = torch.rand(2, generator=gen), torch.rand(2, generator=gen)
    cond = {"prompt_embeds": torch.randn(2, 5, TEXT_DIM, generator=gen)}
    report = {}
    for bf16 in (False, True):
        copies = build_sharded_copies(cfg, mesh=mesh, device="cpu", latent_shape=(4, 8, 8), with_ema=True,
                                      base_in_compute_dtype=bf16)
        with torch.no_grad():
            y = copies.teacher(x, t, tt, cond)
        local = [p.to_local() for p in copies.teacher.parameters()]
        report[str(bf16)] = {"out": y.double().flatten().tolist(), "dtypes": sorted({str(p.dtype) for p in local}),
                             "bytes": sum(p.numel() * p.element_size() for p in local),
                             "ema": sorted({str(p.dtype) for p in copies.ema.parameters()})}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_stored_base_gives_bit_identical_outputs(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(str(tmp_path / "model" / "transformer"))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, free_store(tmp_path), str(tmp_path / "model"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    for r in range(WORLD):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        fp32, bf16 = rep["False"], rep["True"]
        assert fp32["dtypes"] == ["torch.float32"] and bf16["dtypes"] == ["torch.bfloat16"]
        assert bf16["bytes"] * 2 == fp32["bytes"]
        assert bf16["out"] == fp32["out"] and any(v != 0 for v in bf16["out"])
        assert bf16["ema"] == fp32["ema"] == ["torch.float32"]  # the EMA target accumulates: stays fp32

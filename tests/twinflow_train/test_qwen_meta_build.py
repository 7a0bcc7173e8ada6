"""Student, EMA and frozen base built on the meta device and materialised sharded: host memory per rank.

A Qwen-Image transformer scaled up from the tiny config (~330 MB in fp32, tensors large enough that page-granular file reads cost little beyond the slices) is saved in ``from_pretrained``
layout. Four gloo ranks each build the three copies with ``build_sharded_copies`` (what the trainer does
for a model directory) and report the peak resident memory the build added (Linux ``VmHWM``, reset just
before). A rank holds 3 sharded copies (3/4 of the model) and, while it reads one copy, its slices of the
memory-mapped file (1/4 more): (3 + 1) / 4 of one model in all, where building on the host and
deep-copying takes at least three full copies per rank. glibc is told to return freed large blocks at once
(a fixed mmap threshold), so the peak is memory in use, not the allocator's cache of freed slices.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest
import torch

from .test_qwen_fixtures import free_store, tiny_transformer

WORLD = 4
SCALE = dict(num_layers=2, attention_head_dim=64, num_attention_heads=16)  # width 1024: ~330 MB in fp32


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


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
                             f"teacher.checkpoint={model_dir}", "method.target=ema"])
    null = torch.zeros(3, 32)
    # warm-up: the first meta build imports and initialises what every later one reuses
    from twinflow_train.models.qwen_image import build_qwen_image
    build_qwen_image(cfg, latent_shape=(4, 8, 8), null_prompt_embeds=null, device="meta")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = _kib("VmRSS")
    copies = build_sharded_copies(cfg, mesh=mesh, device="cpu", latent_shape=(4, 8, 8), with_ema=True)
    peak = _kib("VmHWM")
    # the copies hold the checkpoint's weights (one tensor checked against this rank's slice of the file)
    from safetensors import safe_open
    name = "transformer_blocks.1.img_mlp.net.0.proj.weight"
    local = {m: dict(getattr(copies, m).transformer.named_parameters())[name].to_local()
             for m in ("student", "teacher", "ema")}
    with safe_open(str(Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as h:
        full = h.get_tensor(name)
    rows = full.shape[0] // WORLD
    same = all(torch.equal(t, full[rank * rows:(rank + 1) * rows]) for t in local.values())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"added_kib": peak - before, "same": same}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_build_holds_shards_not_copies(tmp_path):
    model = tiny_transformer(**SCALE)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full_bytes > 200 * 2**20  # large enough to see above the allocator's noise
    model.save_pretrained(str(tmp_path / "model" / "transformer"))
    del model
    ctx = multiprocessing.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # read by glibc when each spawned rank starts
    procs = [ctx.Process(target=_rank, args=(r, free_store(tmp_path), str(tmp_path / "model"), str(tmp_path)))
             for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["same"] for r in reports)
    added = max(r["added_kib"] for r in reports) * 1024
    shards = 3 * full_bytes / WORLD
    assert added >= 0.9 * shards  # the measurement sees the copies it made
    bound = 1.15 * (3 + 1) * full_bytes / WORLD + 16 * 2**20
    assert added < bound < 3 * full_bytes, (f"peak added {added / 2**20:.0f} MiB per rank; full model "
                                            f"{full_bytes / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")

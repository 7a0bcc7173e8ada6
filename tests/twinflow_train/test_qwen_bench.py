"""The Qwen-Image step benchmark: skips cleanly without CUDA, and its code path runs (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_qwen_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_qwen_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_skips_cleanly_without_cuda(capsys):
    assert _bench().main([]) == 0
    assert capsys.readouterr().out.startswith("SKIP bench_qwen_step: no CUDA device")


@pytest.mark.slow
def test_smoke_run_reports_throughput(capsys):
    import torch.distributed as dist

    try:
        assert _bench().main(["--smoke", "--layers", "1", "--warmup", "1", "--steps", "1"]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["tokens_per_s"] > 0 and result["layers"] == 1 and result["image_tokens"] == 24


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_reports_mfu_and_memory(capsys):
    import torch.distributed as dist

    try:
        assert _bench().main(["--layers", "1", "--height", "512", "--width", "512", "--steps", "2"]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["peak_mem_gib"] > 0 and (result["mfu"] is None or 0 < result["mfu"] < 1)

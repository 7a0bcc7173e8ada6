"""The Qwen-Image step benchmark: skips cleanly without CUDA, and its code path runs (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark

def _bench():
    return load_benchmark("bench_qwen_step")


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
    assert result["rows_per_step"] == {"grad": 1, "no_grad": 0} and result["forwards_per_row"] == 3


@pytest.mark.slow
def test_twinflow_flops_come_from_the_methods_own_forward_counts(capsys):
    """The step's FLOPs use the rows the method forwarded, not a fixed multiple of the batch."""
    import torch.distributed as dist

    try:
        assert _bench().main(["--smoke", "--kind", "twinflow", "--batch", "8", "--layers", "1", "--warmup", "1",
                              "--steps", "2"]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    rows = result["rows_per_step"]
    assert rows["grad"] == 8 and 0 < rows["no_grad"]
    assert result["forwards_per_row"] == pytest.approx(3 + rows["no_grad"] / 8, abs=1e-4)
    # the 4.75 no-grad rows per row of docs/method.md §2.5 are an upper bound (every row in the enhanced range, N = 2)
    assert rows["no_grad"] / 8 <= 4.75


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

"""The decode-memory benchmark: skips cleanly without CUDA, and its --smoke mode runs the same code on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark

def _bench():
    return load_benchmark("bench_decode_memory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_skips_cleanly_without_cuda(capsys):
    assert _bench().main([]) == 0
    assert capsys.readouterr().out.startswith("SKIP bench_decode_memory: no CUDA device")


def test_smoke_measures_each_decode_beside_the_plan(capsys):
    assert _bench().main(["--smoke", "--variants", "plain fp32,checkpointed fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(ln) for ln in lines[:2]]
    assert [r["variant"] for r in rows] == ["plain fp32", "checkpointed fp32"]
    for r in rows:
        assert r["measure"] == "LiveBytes (CPU)" and r["image"] == "96x80"
        assert r["plan_bytes"] == r["plan_parts"]["peak"] > 0 and 0.9 < r["ratio"] < 1.1, r
    assert rows[1]["measured_bytes"] < 0.5 * rows[0]["measured_bytes"]
    attention = json.loads(lines[2])["mid_block_attention"]
    assert set(attention) == {"float32", "bfloat16"} and all(attention.values())


def test_unknown_variants_are_refused():
    with pytest.raises(SystemExit):
        _bench().main(["--smoke", "--variants", "tiled fp32"])

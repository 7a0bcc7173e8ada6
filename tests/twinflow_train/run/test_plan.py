"""The memory plan: meta tensors of the real Qwen-Image configuration, sharding arithmetic, activations."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinflow_train.config import ConfigError, load_config
from twinflow_train.run.plan import (BACKWARD, GIB, VIT_H_14, meta_transformer, plan_memory,
                                     saved_activation_bytes, sharded_bytes, vit_params)

ROOT = Path(__file__).resolve().parents[3]
QWEN = ["model.family=qwen_image", "codec.kind=qwen_vae", "parallel.mixed_precision=bf16", "data.batch_size=16",
        "parallel.activation_checkpointing=true", "method.target=student"]


def _cfg(*extra: str):
    return load_config(None, QWEN + list(extra))


def _plan(*extra: str, world: int = 4, gpu: float = 131.3, image=(1328, 1328), **kw):
    return plan_memory(_cfg(*extra), world=world, gpu_mem_gib=gpu, image=image, arch="qwen-image", **kw)


@pytest.mark.slow
def test_the_real_configuration_is_qwen_image_at_20b_parameters():
    m = meta_transformer(_cfg(), arch="qwen-image")
    tf = m.transformer
    assert len(tf.transformer_blocks) == 60 and tf.inner_dim == 3072 and tf.config.joint_attention_dim == 3584
    assert all(p.is_meta for p in m.parameters())  # nothing allocated
    n = sum(p.numel() for p in m.parameters())
    # Qwen-Image is published as a 20B MMDiT; TwinFlow adds E2 (one time-embedding MLP, ~10.6 M)
    e2 = sum(p.numel() for p in tf.target_time_embed.parameters())
    assert 20.0e9 < n - e2 < 20.6e9 and e2 == 256 * 3072 + 3072 + 3072 * 3072 + 3072
    plan = _plan()
    assert plan.params == n
    assert plan.params - plan.trainable == sum(p.numel() for p in m.parameters() if not p.requires_grad) > 0


@pytest.mark.slow
def test_sharding_divides_by_world_with_dim0_padding():
    ts = [torch.empty(10, 3, device="meta"), torch.empty(7, device="meta"), torch.empty((), device="meta")]
    assert sharded_bytes(ts, world=1, bytes_per=4) == 4 * (30 + 7 + 1)
    # rank 0 holds ceil(rows / world) rows of every tensor
    assert sharded_bytes(ts, world=4, bytes_per=4) == 4 * (3 * 3 + 2 + 1)
    p4, p8 = _plan(world=4), _plan(world=8, gpu=74.5)
    master4, master8 = (next(i.bytes for i in p.items if i.name.startswith("parameters")) for p in (p4, p8))
    assert master4 == pytest.approx(4 * p4.params / 4, rel=1e-3)
    assert master8 == pytest.approx(master4 / 2, rel=1e-3)
    adam4 = next(i.bytes for i in p4.items if i.name.startswith("AdamW"))
    assert adam4 == pytest.approx(8 * p4.trainable / 4, rel=1e-3)
    assert p8.micro_batch == 2 and p4.micro_batch == 4  # data.batch_size 16 over the ranks


@pytest.mark.slow
def test_checkpointing_reduces_activations_and_they_scale_with_rows():
    plan = _plan()
    assert plan.activations["ckpt"] < plan.activations["no_ckpt"] / 10
    act = next(i.bytes for i in plan.items if i.name.startswith("activations"))
    assert act == plan.activations["ckpt"]
    off = _plan("parallel.activation_checkpointing=false")
    assert next(i.bytes for i in off.items if i.name.startswith("activations")) == plan.activations["no_ckpt"]
    half = _plan(world=8)  # 2 rows per rank instead of 4
    assert half.activations["no_ckpt"] == pytest.approx(plan.activations["no_ckpt"] / 2, rel=0.01)
    smaller = _plan(image=(928, 928))
    assert smaller.activations["no_ckpt"] < plan.activations["no_ckpt"] * (928 / 1328) ** 2 * 1.05


def test_meta_counting_equals_counting_real_tensors():
    """The same tiny block forward on CPU tensors and on meta tensors saves the same bytes."""
    from twinflow_train.models.qwen_image import TINY_CONFIG, QwenEmbedRope, TwinFlowQwenImageTransformer2DModel

    counts = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG)
        block = tf.transformer_blocks[0]
        d = tf.inner_dim
        rope = QwenEmbedRope(theta=10000, axes_dim=list(tf.config.axes_dims_rope), scale_rope=True)
        freqs = tuple(f.to(device) for f in rope([[(1, 4, 6)]] * 2, max_txt_seq_len=5, device="cpu"))

        def run():
            block(hidden_states=torch.randn(2, 24, d, device=device), encoder_hidden_states=torch.randn(2, 5, d,
                  device=device), encoder_hidden_states_mask=None, temb=torch.randn(2, d, device=device),
                  image_rotary_emb=freqs)

        counts.append(saved_activation_bytes(block, run))
    assert counts[0] == counts[1] > 0


@pytest.mark.slow
def test_fits_follows_the_budget_and_rl_arms_hold_reward_and_vae():
    plan = _plan()
    assert plan.fits == (plan.total <= plan.budget)
    assert not _plan(gpu=40.0).fits and _plan(gpu=400.0).fits
    names = [i.name for i in plan.items]
    assert not any("reward" in n or "VAE" in n for n in names)
    rl = _plan("rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_checkpoint=/nowhere.pt")
    extra = {i.name: i.bytes for i in rl.items if i.name not in names}
    assert extra["reward model (HPSv2 ViT-H-14, fp32)"] == 4 * vit_params(**VIT_H_14)
    assert 0.9e9 < vit_params(**VIT_H_14) < 1.05e9  # open_clip's ViT-H-14: ~986 M
    decode = extra["RL: decode + backward (checkpointed, fp32)"]
    assert 8 * GIB < decode < 12 * GIB  # the checkpointed full-resolution decoder backward, fp32
    assert rl.sum_all == plan.sum_all + sum(extra.values())
    # phases: the decode lives in the forward only, the stash on split steps only (grad_accum 1)
    stash = extra["RL gradient stash (fp32, sharded)"]
    grads = next(i.bytes for i in plan.items if i.name.startswith("gradients"))
    ph, base = rl.phases, plan.phases
    assert stash == grads and ph["split backward"] - ph["backward"] == stash
    assert ph["split forward"] == ph["forward"]
    assert ph["forward"] - base["forward"] == sum(v for k, v in extra.items() if "stash" not in k)
    assert rl.total == max(ph.values()) and rl.binding == "split backward" and plan.binding == "backward"
    assert base["backward"] - base["forward"] == sum(i.bytes for i in plan.items if i.phases == BACKWARD)
    plain = plan_memory(rl_cfg := _cfg("rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_checkpoint=/nowhere.pt"),
                        world=4, gpu_mem_gib=131.3, image=(1328, 1328), arch="qwen-image", decoder="plain")
    plain_decode = next(i.bytes for i in plain.items if i.name.startswith("RL: decode"))
    assert 47 * GIB < plain_decode < 49 * GIB  # 40.5 frozen saves + 7.6 feat_cache clones
    bf16 = plan_memory(_cfg("rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_checkpoint=/nowhere.pt",
                            "rl.decoder_dtype=bf16"), world=4, gpu_mem_gib=131.3, image=(1328, 1328),
                       arch="qwen-image")
    assert next(i.bytes for i in bf16.items if i.name.startswith("RL: decode")) < 0.7 * decode  # fp32 norms
    assert rl_cfg.rl.decoder_dtype == "fp32"
    reencode = _plan("rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_checkpoint=/nowhere.pt",
                     "rl.estimator=reencode")
    assert all("RL: decode" not in i.name for i in reencode.items)  # no backward through the decoder
    ema = _plan("method.target=ema")
    assert ema.total - plan.total == next(i.bytes for i in plan.items if i.name.startswith("parameters"))
    accum = _plan("data.grad_accum=2", "rl.enabled=true", "rl.reward=hpsv2", "rl.hpsv2_checkpoint=/nowhere.pt")
    # with grad_accum > 1 the earlier micro-batches' gradients (and on split steps the stash) live in forwards
    assert accum.phases["split forward"] - accum.phases["forward"] == stash
    assert "forward" in next(i for i in accum.items if i.name.startswith("gradients")).phases


@pytest.mark.slow
def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match="data.batch_size"):
        _plan(world=3)
    with pytest.raises(ConfigError, match="model.family"):
        plan_memory(load_config(None, []), world=1, gpu_mem_gib=80, image=(1024, 1024))
    with pytest.raises(ConfigError, match="--image"):
        plan_memory(_cfg(), world=4, gpu_mem_gib=80, arch="qwen-image")
    with pytest.raises(ValueError, match="multiples of 16"):
        _plan(image=(1000, 1000))


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


@pytest.mark.slow
def test_plan_commands(tmp_path):
    out = _cli("twinflow_train.cli", "plan", "--world", "4", "--gpu-mem-gib", "131.3", "--arch", "qwen-image",
               "--image", "1328x1328", *QWEN)
    assert out.returncode == 0, out.stderr
    assert "FITS" in out.stdout and "20.44 B" in out.stdout
    bad = _cli("twinflow_train.cli", "plan", "--world", "3", "--gpu-mem-gib", "80", "--image", "1328x1328", *QWEN)
    assert bad.returncode == 2 and "data.batch_size" in bad.stderr
    grid = _cli("harness.cli", "grid", "plan", "ablations/blog-qwen.yaml", "--root", str(tmp_path), "--world", "4",
                "--gpu-mem-gib", "131.3", "--arch", "qwen-image", "--image", "1328x1328")
    lines = grid.stdout.splitlines()
    head = max(i for i, ln in enumerate(lines) if ln.startswith("arm "))  # the summary table, then the cost lines
    table = lines[head + 1:head + 7]
    rows = {ln.split()[0]: ln.split()[-1] for ln in table}
    assert sorted(rows) == sorted(["vanilla", "renoise", "rl_hard", "rl_sigmoid", "rl_clip", "spike_decay"])
    assert grid.returncode == (0 if all(v == "yes" for v in rows.values()) else 3), grid.stdout[-2000:]
    assert not math.isnan(float(table[-1].split()[1]))
    # what the grid computes, and what its forks save (harness/cost.py)
    assert any(ln.startswith("  forks save ~") and "GPU-hours" in ln for ln in lines[head + 7:]), grid.stdout[-2000:]


@pytest.mark.slow
def test_a_micro_batch_too_small_for_the_row_groups_is_a_warning():
    assert _plan(world=4).warnings == []
    small = _plan(world=8)  # 16 rows over 8 ranks: 2 rows per rank for 4 row groups
    assert len(small.warnings) == 1 and "any, adv" in small.warnings[0] and "32" in small.warnings[0]
    assert "WARNING" in small.table()

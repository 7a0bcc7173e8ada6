"""The step optimisations of the scale path give the same numbers as the plain code (CPU, tiny Qwen-Image).

- fused AdamW (what the benchmark and a CUDA run use) == the default foreach AdamW;
- diffusers' ``native`` attention backend (torch SDPA: flash attention on a GPU) == the explicit math
  attention, with and without a padded prompt mask;
- ``compile_blocks`` (torch.compile per block) == eager, forward and gradients; traced through dynamo and
  AOT autograd with the ``aot_eager`` backend, so no C++ toolchain is involved;
- bf16 mixed precision under FSDP2 is covered by test_qwen_sharding (close to fp32, times kept fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

from twinflow_train.models.qwen_image import QwenImageFlowModel, TwinFlowQwenImageTransformer2DModel, compile_blocks

from .test_qwen_fixtures import LATENT_CHANNELS, TEXT_DIM
from twinflow_train.models.qwen_image import TINY_CONFIG


def _model(seed: int = 0) -> QwenImageFlowModel:
    torch.manual_seed(seed)
    tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG)
    with torch.no_grad():  # the zero-initialised output layers would hide differences
        for p in tf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return QwenImageFlowModel(tf, null_prompt_embeds=torch.zeros(2, TEXT_DIM))


def _inputs(b: int = 3, *, masked: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, LATENT_CHANNELS, 4, 6, generator=g)
    t = torch.rand(b, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    if masked:
        mask[0, 3:] = False
    return x, t, 0.7 * t, {"prompt_embeds": torch.randn(b, 5, TEXT_DIM, generator=g), "prompt_mask": mask}


def test_fused_adamw_equals_the_default():
    a, b = _model(), _model()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99),
                              weight_decay=0.01, fused=fused) for m, fused in ((a, False), (b, True))]
    for step in range(3):
        x, t, tt, cond = _inputs(masked=False)
        for m, opt in zip((a, b), opts):
            m(x, t, tt, cond).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    assert not torch.equal(a.transformer.img_in.weight, _model().transformer.img_in.weight)  # it did train


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_equals_math_attention(masked):
    from diffusers.models.attention_dispatch import attention_backend

    m = _model()
    x, t, tt, cond = _inputs(masked=masked)
    with torch.no_grad():
        with attention_backend("native"):
            fast = m(x, t, tt, cond)
        with attention_backend("_native_math"):
            ref = m(x, t, tt, cond)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    assert fast.abs().mean() > 1e-3


@pytest.mark.slow
def test_compiled_blocks_equal_eager_forward_and_gradients():
    torch._dynamo.reset()
    eager = _model()
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager", fullgraph=False)
    x, t, tt, cond = _inputs(masked=False)
    outs = []
    for m in (eager, compiled):
        out = m(x, t, tt, cond)
        out.square().mean().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled.transformer.transformer_blocks)

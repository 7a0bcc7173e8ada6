"""The Qwen-Image adapter: equivalence with diffusers at tt = t, packing, velocity convention, conditions."""

from __future__ import annotations

import pytest
import torch

from twinflow_train.config import load_config
from twinflow_train.models.base import cond_cat
from twinflow_train.models.qwen_image import (
    TINY_CONFIG,
    QwenImageFlowModel,
    TwinFlowQwenImageTransformer2DModel,
    build_qwen_image,
    declared_block_types,
    load_transformer_weights,
    pack_latents,
    unpack_latents,
)

from .test_qwen_fixtures import LATENT_CHANNELS, TEXT_DIM, tiny_transformer


def _cond(b=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, length, TEXT_DIM, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, length - 2:] = False  # a padded row: the mask must matter
    embeds[0, length - 2:] = 0
    return {"prompt_embeds": embeds, "prompt_mask": mask}


def _adapter_from(stock, *, tt_init="copy", sign=False, null=None, seed=0):
    tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG, sign_embedding=sign)
    tf.load_state_dict(stock.state_dict(), strict=False)
    tf.init_target_time_embedding(tt_init, generator=torch.Generator().manual_seed(seed))
    return QwenImageFlowModel(tf.eval(), null_prompt_embeds=null)


def _stock_velocity(stock, x, t, cond):
    b, _, h, w = x.shape
    out = stock(hidden_states=pack_latents(x), encoder_hidden_states=cond["prompt_embeds"],
                encoder_hidden_states_mask=cond["prompt_mask"], timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False)[0]
    return unpack_latents(out, height=h, width=w)


@pytest.mark.parametrize("tt_init", ["copy", "normal"])
@pytest.mark.parametrize("sign", [False, True])
def test_outputs_equal_the_unwrapped_diffusers_model_at_tt_equal_t(tt_init, sign):
    stock = tiny_transformer(seed=3)
    model = _adapter_from(stock, tt_init=tt_init, sign=sign)
    x = torch.randn(3, LATENT_CHANNELS, 8, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.5, 0.97])
    cond = _cond()
    with torch.no_grad():
        ours = model(x, t, t, cond)
        ref = _stock_velocity(stock, x, t, cond)
    assert ours.shape == x.shape
    assert torch.equal(ours, ref)  # the gate is exactly zero: bit-identical, not merely close


def test_target_time_changes_the_output_and_gets_gradient():
    model = _adapter_from(tiny_transformer(seed=3))
    x = torch.randn(2, LATENT_CHANNELS, 4, 4)
    t = torch.tensor([0.9, 0.6])
    cond = _cond(b=2)
    same = model(x, t, t, cond)
    gap = model(x, t, torch.zeros(2), cond)
    assert (gap - same).abs().max() > 1e-4
    gap.square().mean().backward()
    grads = [p.grad for p in model.transformer.target_time_embed.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_exactly_the_parameters_that_cannot_affect_the_output_are_frozen():
    model = _adapter_from(tiny_transformer(seed=3))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(model.unused_parameters) and frozen
    for p in model.parameters():
        p.requires_grad_(True)
    x, t = torch.randn(2, LATENT_CHANNELS, 4, 4), torch.tensor([0.9, 0.6])
    model(x, t, t * 0.5, _cond(b=2)).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == frozen


def test_signed_time_selects_a_different_branch_and_the_sign_embedding_starts_at_zero():
    stock = tiny_transformer(seed=4)
    model = _adapter_from(stock, sign=True)
    x = torch.randn(2, LATENT_CHANNELS, 4, 4)
    s = torch.tensor([0.3, 0.7])
    cond = _cond(b=2)
    with torch.no_grad():
        pos, neg = model(x, s, s, cond), model(x, -s, -s, cond)
        assert (pos - neg).abs().max() > 1e-4  # sin(1000 t) is odd: -t reaches the pretrained embedding differently
        # zero-initialised sign embedding: the twin branch equals the plain model at -t at init
        assert torch.equal(neg, _stock_velocity(stock, x, -s, cond))
        model.transformer.sign_embed.fill_(0.5)
        assert torch.equal(model(x, s, s, cond), pos)  # t > 0 never sees it
        assert (model(x, -s, -s, cond) - neg).abs().max() > 1e-4


def test_packing_round_trips_and_matches_the_pipeline_layout():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, LATENT_CHANNELS, 6, 10)
    packed = pack_latents(x)
    ref = QwenImagePipeline._pack_latents(x.unsqueeze(2), 2, LATENT_CHANNELS, 6, 10)
    assert torch.equal(packed, ref)
    assert torch.equal(unpack_latents(packed, height=6, width=10), x)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, LATENT_CHANNELS, 5, 4))


def test_velocity_convention_matches_the_pipeline_scheduler():
    """QwenImagePipeline steps x += (sigma' - sigma) * out: one step to 0 equals our x_hat = x_t - t*F,
    and out = z - x lands exactly on x, so the transformer predicts our v and no conversion is needed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    t = 0.7
    x_t = t * z + (1 - t) * x
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[t], device="cpu")
    f = torch.randn(2, 16, 8, generator=g)
    stepped = sched.step(f, sched.timesteps[0], x_t, return_dict=False)[0]
    assert torch.allclose(stepped, x_t - t * f, atol=1e-6)
    sched.set_timesteps(sigmas=[t], device="cpu")
    assert torch.allclose(sched.step(z - x, sched.timesteps[0], x_t, return_dict=False)[0], x, atol=1e-5)


def test_null_condition_pads_the_empty_prompt_to_the_batch_length():
    null = torch.randn(3, TEXT_DIM)
    model = _adapter_from(tiny_transformer(), null=null)
    cond = {**_cond(b=2, length=5), "labels": torch.tensor([4, 7])}
    nc = model.null_cond(cond)
    assert nc["prompt_embeds"].shape == (2, 5, TEXT_DIM)
    assert torch.equal(nc["prompt_embeds"][1, :3], null) and torch.all(nc["prompt_embeds"][:, 3:] == 0)
    assert nc["prompt_mask"].tolist() == [[True] * 3 + [False] * 2] * 2
    assert torch.equal(nc["labels"], cond["labels"])  # other keys pass through
    both = cond_cat([cond, nc])  # the CFG pair runs as one forward
    assert both["prompt_embeds"].shape == (4, 5, TEXT_DIM)
    with torch.no_grad():
        out = model(torch.randn(4, LATENT_CHANNELS, 4, 4), torch.full((4,), 0.5), torch.full((4,), 0.5), both)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="fewer than the empty prompt"):
        model.null_cond(_cond(b=1, length=2))
    with pytest.raises(ValueError, match="empty-prompt embedding"):
        _adapter_from(tiny_transformer()).null_cond(cond)


def test_masked_padding_does_not_change_the_output():
    model = _adapter_from(tiny_transformer(seed=5))
    x = torch.randn(1, LATENT_CHANNELS, 4, 4)
    t = torch.tensor([0.4])
    cond = _cond(b=1, length=4)
    cond["prompt_mask"][:] = True
    longer = {"prompt_embeds": torch.cat([cond["prompt_embeds"], torch.randn(1, 3, TEXT_DIM)], 1),
              "prompt_mask": torch.cat([cond["prompt_mask"], torch.zeros(1, 3, dtype=torch.bool)], 1)}
    with torch.no_grad():
        assert torch.allclose(model(x, t, t, cond), model(x, t, t, longer), atol=1e-5)


def test_blocks_come_from_the_declared_no_split_modules():
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    model = _adapter_from(tiny_transformer())
    assert declared_block_types(model.transformer) == (QwenImageTransformerBlock,)
    blocks = model.shard_blocks()
    assert blocks == list(model.transformer.transformer_blocks)


def test_bad_inputs_and_unsupported_configs_fail_loudly():
    model = _adapter_from(tiny_transformer())
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, LATENT_CHANNELS + 1, 4, 4), torch.ones(1), torch.ones(1), _cond(b=1))
    with pytest.raises(ValueError, match="zero_cond_t"):
        TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG, zero_cond_t=True)
    with pytest.raises(ValueError, match="tt_init"):
        model.init_target_time_embedding("zeros")


def _qwen_cfg(**over):
    base = {"model.family": "qwen_image", "model.qwen.tiny": True, "codec.kind": "qwen_vae"}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def test_build_from_a_stock_pretrained_directory_and_reduce_depth(tmp_path):
    stock = tiny_transformer(seed=7, num_layers=3)
    stock.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    null = torch.randn(2, TEXT_DIM)
    cfg = _qwen_cfg(**{"model.qwen.pretrained": str(tmp_path / "pipe"), "model.qwen.tiny": False})
    model = build_qwen_image(cfg, latent_shape=(LATENT_CHANNELS, 8, 8), null_prompt_embeds=null)
    x, t, cond = torch.randn(2, LATENT_CHANNELS, 8, 8), torch.tensor([0.2, 0.8]), _cond(b=2)
    with torch.no_grad():
        assert torch.equal(model(x, t, t, cond), _stock_velocity(stock, x, t, cond))
    # E2 starts as E1 ('copy', the default) whatever the checkpoint held
    e1 = model.transformer.time_text_embed.timestep_embedder.state_dict()
    e2 = model.transformer.target_time_embed.state_dict()
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    shallow = build_qwen_image(_qwen_cfg(**{"model.qwen.pretrained": str(tmp_path / "pipe"), "model.qwen.tiny": False,
                                            "model.qwen.num_layers": 1}),
                               latent_shape=(LATENT_CHANNELS, 8, 8), null_prompt_embeds=null)
    assert len(shallow.transformer.transformer_blocks) == 1
    assert torch.equal(shallow.transformer.transformer_blocks[0].img_mod[1].weight,
                       stock.transformer_blocks[0].img_mod[1].weight)
    with pytest.raises(ValueError, match="channels"):
        build_qwen_image(cfg, latent_shape=(LATENT_CHANNELS * 2, 8, 8))


def test_loading_rejects_incomplete_weights(tmp_path):
    from safetensors.torch import save_file

    stock = tiny_transformer()
    sd = {k: v for k, v in stock.state_dict().items() if not k.startswith("proj_out")}
    (tmp_path / "w").mkdir()
    save_file(sd, str(tmp_path / "w" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "w" / "config.json").write_text("{}")
    tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG)
    with pytest.raises(KeyError, match="proj_out"):
        load_transformer_weights(tf, tmp_path / "w")


def test_build_tiny_from_config_and_reject_two_architecture_sources(tmp_path):
    model = build_qwen_image(_qwen_cfg(), latent_shape=(LATENT_CHANNELS, 4, 4),
                             null_prompt_embeds=torch.zeros(1, TEXT_DIM))
    assert len(model.transformer.transformer_blocks) == TINY_CONFIG["num_layers"]
    with torch.no_grad():
        out = model(torch.randn(1, LATENT_CHANNELS, 4, 4), torch.ones(1), torch.zeros(1), _cond(b=1))
    assert out.shape == (1, LATENT_CHANNELS, 4, 4)
    with pytest.raises(ValueError, match="both set"):
        build_qwen_image(_qwen_cfg(**{"model.qwen.pretrained": str(tmp_path)}), latent_shape=(LATENT_CHANNELS, 4, 4))

"""Export to a diffusers directory; a stock QwenImagePipeline loads it and samples at 2 NFE."""

from __future__ import annotations

import json

import pytest
import torch

from twinflow_train.config import SamplerConfig
from twinflow_train.run.export import export_diffusers
from twinflow_train.models.qwen_image import (
    TINY_CONFIG,
    QwenImageFlowModel,
    TwinFlowQwenImageTransformer2DModel,
    pack_latents,
    unpack_latents,
)

from ..test_qwen_fixtures import LATENT_CHANNELS, TEXT_DIM, tiny_transformer, write_tiny_pipeline


def _student(seed=0):
    tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG, sign_embedding=True)
    tf.load_state_dict(tiny_transformer(seed=seed).state_dict(), strict=False)
    tf.init_target_time_embedding("normal", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a "trained" student: E2 and the sign embedding carry information
        tf.target_time_embed.linear_2.bias.normal_(generator=torch.Generator().manual_seed(4))
        tf.sign_embed.fill_(0.1)
    return QwenImageFlowModel(tf.eval(), null_prompt_embeds=torch.randn(2, TEXT_DIM))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    base = write_tiny_pipeline(root / "base")
    model = _student()
    sampler = SamplerConfig(tt_mode="few", gaps=[0.001, 0.6], stochastic_ratio=1.0)
    out = export_diffusers(model, root / "out", sampler=sampler, base_pipeline=base, source={"run_dir": "x"})
    return root, out, model


def test_transformer_round_trips_with_the_target_time_embedding(exported):
    _, out, model = exported
    loaded = TwinFlowQwenImageTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    assert loaded.config.default_target_time == "zero" and loaded.config.sign_embedding
    ref = model.transformer.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    info = json.loads((out / "twinflow.json").read_text())
    assert info["tt_mode"] == "few" and info["sampler"]["gaps"] == [0.001, 0.6]


def test_stock_class_loads_it_as_the_tt_equal_t_model(exported):
    from diffusers import QwenImageTransformer2DModel

    _, out, model = exported
    stock = QwenImageTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    x, t = torch.randn(1, LATENT_CHANNELS, 4, 4), torch.tensor([0.4])
    embeds = torch.randn(1, 3, TEXT_DIM)
    with torch.no_grad():
        ref = model(x, t, t, {"prompt_embeds": embeds})
        out_stock = stock(hidden_states=pack_latents(x), encoder_hidden_states=embeds, timestep=t,
                          img_shapes=[[(1, 2, 2)]], return_dict=False)[0]
    # weights loaded from disk land in differently aligned storage, so BLAS may round differently: close, not equal
    assert torch.allclose(unpack_latents(out_stock, height=4, width=4), ref, atol=1e-6)


def test_a_stock_pipeline_samples_the_student_at_two_steps(exported):
    from diffusers import QwenImagePipeline

    from twinflow_train.method.scheduler import TwinFlowUCGMScheduler

    _, out, model = exported
    pipe = QwenImagePipeline.from_pretrained(str(out))
    assert isinstance(pipe.transformer, TwinFlowQwenImageTransformer2DModel)
    assert isinstance(pipe.scheduler, TwinFlowUCGMScheduler)
    prompts = ["a striped cube", "two spheres"]
    noise = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the pipeline does not pass its generator to step(): fresh noise is global-RNG
    got = pipe(prompt=prompts, latents=pack_latents(noise), height=16, width=16, num_inference_steps=2,
               true_cfg_scale=1.0, output_type="latent").images
    # the same sampler by hand: F(x, sigma_i, tt = 0) through the training adapter, the update of docs/method.md §3
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    cond = {"prompt_embeds": embeds} if mask is None else {"prompt_embeds": embeds, "prompt_mask": mask.bool()}
    torch.manual_seed(123)
    x = noise
    sigmas = [0.999, 0.6, 0.0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            f = model(x, torch.full((2,), s), torch.zeros(2), cond)
            x_hat = x - s * f
            if s_next == 0:
                x = x_hat
            else:
                eps = unpack_latents(torch.randn(pack_latents(x).shape), height=8, width=8)
                x = (1 - s_next) * x_hat + s_next * eps
    assert torch.allclose(unpack_latents(got, height=8, width=8), x, atol=1e-4)


def test_export_refuses_what_it_cannot_serve(exported, tmp_path):
    _, out, model = exported
    with pytest.raises(ValueError, match="per-step target time"):
        export_diffusers(model, tmp_path / "any", sampler=SamplerConfig(tt_mode="any"))
    with pytest.raises(FileExistsError):
        export_diffusers(model, out, sampler=SamplerConfig(tt_mode="few"))

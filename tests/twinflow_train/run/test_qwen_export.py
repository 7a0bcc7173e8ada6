"""Export to a diffusers directory; stock diffusers loads it (in a process that imports nothing of the project)
and samples at 1, 2 and 4 NFE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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


def _by_hand(model, pipe, prompts, noise, sigmas):
    """The sampler by hand: F(x, sigma_i, tt = 0) through the training adapter, the update of docs/method.md §3,
    fresh noise drawn from the global RNG in the pipeline's packed layout."""
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    cond = {"prompt_embeds": embeds} if mask is None else {"prompt_embeds": embeds, "prompt_mask": mask.bool()}
    torch.manual_seed(123)
    x, n, (h, w) = noise, noise.shape[0], noise.shape[-2:]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            f = model(x, torch.full((n,), s), torch.zeros(n), cond)
            x_hat = x - s * f
            if s_next == 0:
                x = x_hat
            else:
                eps = unpack_latents(torch.randn(pack_latents(x).shape), height=h, width=w)
                x = (1 - s_next) * x_hat + s_next * eps
    return x


def test_a_stock_pipeline_samples_the_student_at_two_steps(exported):
    from diffusers import QwenImagePipeline

    _, out, model = exported
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs shipped code only when told to
        QwenImagePipeline.from_pretrained(str(out))
    pipe = QwenImagePipeline.from_pretrained(str(out), trust_remote_code=True)
    # the classes come from the files shipped in the directory, not from this project's modules
    assert type(pipe.transformer).__name__ == "TwinFlowQwenImageTransformer2DModel"
    assert type(pipe.scheduler).__name__ == "TwinFlowUCGMScheduler"
    assert not type(pipe.transformer).__module__.startswith("twinflow_train")
    prompts = ["a striped cube", "two spheres"]
    noise = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the pipeline does not pass its generator to step(): fresh noise is global-RNG
    got = pipe(prompt=prompts, latents=pack_latents(noise), height=16, width=16, num_inference_steps=2,
               true_cfg_scale=1.0, output_type="latent").images
    x = _by_hand(model, pipe, prompts, noise, [0.999, 0.6, 0.0])
    assert torch.allclose(unpack_latents(got, height=8, width=8), x, atol=1e-4)


FRESH_PROCESS = textwrap.dedent("""
    import sys

    import torch
    from diffusers import DiffusionPipeline

    out, result = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    noise = torch.load(sys.argv[3])
    got = {"pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__,
           "scheduler": type(pipe.scheduler).__name__}
    for steps in (1, 2, 4):
        torch.manual_seed(123)
        got[steps] = pipe(prompt=["a striped cube", "two spheres"], latents=noise, height=16, width=16,
                          num_inference_steps=steps, true_cfg_scale=1.0, output_type="latent").images
    images = pipe(prompt="a striped cube", height=16, width=16, num_inference_steps=2, true_cfg_scale=1.0).images
    got["image_size"] = images[0].size
    got["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                    ("twinflow_train", "harness", "reports", "twinflow_lab"))
    torch.save(got, result)
""")


@pytest.mark.slow
def test_stock_diffusers_loads_and_samples_it_in_a_process_that_imports_nothing_of_the_project(exported, tmp_path):
    from diffusers import QwenImagePipeline

    from twinflow_train.method.scheduler import ucgm_sigmas

    _, out, model = exported
    noise = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(pack_latents(noise), tmp_path / "noise.pt")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    # no PYTHONPATH, another working directory, no network, a fresh module cache: what a user's shell has
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(out), str(tmp_path / "got.pt"),
                           str(tmp_path / "noise.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`accelerate`" not in done.stderr  # the qwen extra brings accelerate: no low-memory-loading warning
    got = torch.load(tmp_path / "got.pt", weights_only=False)
    assert got["project_modules"] == []
    assert (got["pipeline"], got["transformer"], got["scheduler"]) == (
        "QwenImagePipeline", "TwinFlowQwenImageTransformer2DModel", "TwinFlowUCGMScheduler")
    assert got["image_size"] == (16, 16)
    pipe = QwenImagePipeline.from_pretrained(str(out), trust_remote_code=True)  # for the prompt encoder only
    for steps in (1, 2, 4):
        sigmas = ucgm_sigmas(steps, gaps=[0.001, 0.6]).tolist()
        x = _by_hand(model, pipe, ["a striped cube", "two spheres"], noise, sigmas)
        assert torch.allclose(unpack_latents(got[steps], height=8, width=8), x, atol=1e-4), steps


def test_the_shipped_modules_import_nothing_of_the_project(exported):
    _, out, _ = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["twinflow_transformer", "TwinFlowQwenImageTransformer2DModel"]
    assert index["scheduler"] == ["twinflow_scheduler", "TwinFlowUCGMScheduler"]
    for folder, module in (("transformer", "twinflow_transformer"), ("scheduler", "twinflow_scheduler")):
        text = (out / folder / f"{module}.py").read_text()
        imports = [ln.split()[1] for ln in text.splitlines() if ln.startswith(("import ", "from "))]
        assert imports and all(m.split(".")[0] in ("__future__", "math", "typing", "numpy", "torch", "diffusers")
                               for m in imports), imports


def test_export_refuses_what_it_cannot_serve(exported, tmp_path):
    _, out, model = exported
    with pytest.raises(ValueError, match="per-step target time"):
        export_diffusers(model, tmp_path / "any", sampler=SamplerConfig(tt_mode="any"))
    with pytest.raises(FileExistsError):
        export_diffusers(model, out, sampler=SamplerConfig(tt_mode="few"))

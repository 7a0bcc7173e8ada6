"""The diffusers-compatible UCGM scheduler (docs/method.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from twinflow_train.method.scheduler import TwinFlowUCGMScheduler, ucgm_sigmas


def test_grid_matches_the_public_defaults():
    assert ucgm_sigmas(2, gaps=[0.001, 0.6]).tolist() == pytest.approx([0.999, 0.6, 0.0])
    assert ucgm_sigmas(4, gaps=[0.001, 0.5]).tolist() == pytest.approx([0.999, 1 - 0.5 / 3 - 0.001 * 2 / 3,
                                                                        1 - 2 * 0.499 / 3 - 0.001, 0.5, 0.0])
    assert ucgm_sigmas(1, gaps=[0.001, 0.6]).tolist() == pytest.approx([0.999, 0.0])
    assert ucgm_sigmas(4, gaps=[0.0, 0.0]).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_kumaraswamy_warp_keeps_the_endpoints_and_order():
    plain = ucgm_sigmas(4, gaps=[0.0, 0.0])
    warped = ucgm_sigmas(4, gaps=[0.0, 0.0], kumaraswamy=[2.0, 0.7, 1.3])
    assert warped[0] == 1.0 and warped[-1] == 0.0
    assert torch.all(warped[:-1] > warped[1:]) and not torch.allclose(plain, warped)
    u = 0.25
    assert warped[1].item() == pytest.approx(1 - (1 - (1 - u ** 2.0) ** 0.7) ** 1.3)


def _run(sched, x, fs, generator=None):
    for i, t in enumerate(sched.timesteps):
        x = sched.step(fs[i], t, x, generator=generator, return_dict=False)[0]
    return x


def test_one_step_returns_x_hat_and_deterministic_steps_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    x, f1, f2 = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    sched = TwinFlowUCGMScheduler(gaps=(0.001, 0.6), stochastic_ratio=0.0)
    sched.set_timesteps(1)
    s = float(sched.sigmas[0])
    assert torch.allclose(_run(sched, x, [f1]), x - s * f1, atol=1e-6)
    sched.set_timesteps(2)
    s0, s1 = (float(v) for v in sched.sigmas[:2])
    x_hat, z_hat = x - s0 * f1, x + (1 - s0) * f1
    mid = (1 - s1) * x_hat + s1 * z_hat  # r = 0: re-noise with the model's own noise estimate
    assert torch.allclose(_run(sched, x, [f1, f2]), mid - s1 * f2, atol=1e-5)


def test_stochastic_ratio_mixes_fresh_noise_from_the_given_generator():
    g = torch.Generator().manual_seed(1)
    x, f1, f2 = (torch.randn(2, 5, generator=g) for _ in range(3))
    sched = TwinFlowUCGMScheduler(gaps=(0.001, 0.6), stochastic_ratio=0.36)
    sched.set_timesteps(2)
    s0, s1 = (float(v) for v in sched.sigmas[:2])
    eps = torch.randn(2, 5, generator=torch.Generator().manual_seed(7))
    x_hat, z_hat = x - s0 * f1, x + (1 - s0) * f1
    mid = (1 - s1) * x_hat + s1 * (math.sqrt(0.64) * z_hat + math.sqrt(0.36) * eps)
    out = _run(sched, x, [f1, f2], generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, mid - s1 * f2, atol=1e-5)


def test_pipeline_protocol_sigmas_only_set_the_step_count_and_target_times_follow_the_mode():
    sched = TwinFlowUCGMScheduler(gaps=(0.001, 0.6), tt_mode="any")
    sched.set_timesteps(sigmas=[1.0, 0.5], mu=0.8, device="cpu")  # what QwenImagePipeline passes
    assert sched.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0])
    assert sched.timesteps.tolist() == pytest.approx([999.0, 600.0])
    sched.set_begin_index(0)
    assert sched.target_timestep_for(sched.timesteps[0]) == pytest.approx(0.6)
    given = TwinFlowUCGMScheduler(sigma_source="given")
    given.set_timesteps(sigmas=[0.9, 0.3])
    assert given.sigmas.tolist() == pytest.approx([0.9, 0.3, 0.0])
    with pytest.raises(ValueError, match="decreasing"):
        given.set_timesteps(sigmas=[0.3, 0.9])


def test_config_round_trips_and_bad_values_are_errors(tmp_path):
    sched = TwinFlowUCGMScheduler(gaps=(0.001, 0.5), kumaraswamy=(1.0, 1.2, 1.0), stochastic_ratio=0.5, tt_mode="mul")
    sched.save_pretrained(str(tmp_path))
    again = TwinFlowUCGMScheduler.from_pretrained(str(tmp_path))
    assert again.config.tt_mode == "mul" and list(again.config.gaps) == [0.001, 0.5]
    for bad in ({"tt_mode": "some"}, {"gaps": (0.6, 0.6)}, {"stochastic_ratio": 1.5}, {"kumaraswamy": (1.0, 0.0, 1.0)},
                {"sigma_source": "x"}):
        with pytest.raises(ValueError):
            TwinFlowUCGMScheduler(**bad)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        TwinFlowUCGMScheduler().step(torch.zeros(1), 999, torch.zeros(1))


@pytest.mark.parametrize("tt_mode", ["few", "any"])
def test_scheduler_loop_equals_the_trainers_evaluation_sampler(tt_mode):
    """Driving the adapter with this scheduler reproduces twinflow_train.method.sampling.ucgm_sample (same noise)."""
    from twinflow_train.config import SamplerConfig
    from twinflow_train.models.qwen_image import TINY_CONFIG, QwenImageFlowModel, TwinFlowQwenImageTransformer2DModel
    from twinflow_train.method.sampling import ucgm_sample

    torch.manual_seed(0)
    tf = TwinFlowQwenImageTransformer2DModel(**TINY_CONFIG)
    tf.init_target_time_embedding("normal", generator=torch.Generator().manual_seed(1))
    model = QwenImageFlowModel(tf.eval(), null_prompt_embeds=None)
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    cond = {"prompt_embeds": torch.randn(2, 3, TINY_CONFIG["joint_attention_dim"])}
    cfg = SamplerConfig(tt_mode=tt_mode, gaps=[0.001, 0.5], stochastic_ratio=0.7)
    ref = ucgm_sample(model=model, z=z, cond=cond, nfe=3, cfg=cfg, generator=torch.Generator().manual_seed(9))
    sched = TwinFlowUCGMScheduler(gaps=tuple(cfg.gaps), stochastic_ratio=cfg.stochastic_ratio, tt_mode=tt_mode)
    sched.set_timesteps(3)
    gen = torch.Generator().manual_seed(9)
    x = z
    with torch.no_grad():
        for t in sched.timesteps:
            s = t / sched.config.num_train_timesteps
            tt = sched.target_timestep_for(t)
            f = model(x, s.expand(2), torch.full((2,), tt), cond)
            x = sched.step(f, t, x, generator=gen).prev_sample
    assert torch.allclose(x, ref, atol=1e-5)

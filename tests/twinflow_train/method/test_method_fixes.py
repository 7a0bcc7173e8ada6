"""Method corrections: scale-free RL term, frozen-target roll-out, distilled-guidance comparison scale,
the public sampler default, and the per-rank group-size check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from twinflow_train.config import Config, ConfigError, MethodConfig, RenoiseConfig, SamplerConfig, load_config
from twinflow_train.method.twinflow import TwinFlow, check_group_rows, check_rows_per_rank
from twinflow_train.models.mlp import MLPFlowModel
from twinflow_train.rl.guidance import RewardGuidance
from twinflow_train.method.timesamplers import build_time_samplers

from .test_method import Recorder, batch
from ..tiny import tiny_model


# --------------------------------------------------------------------------- scale-free RL term


class _Identity(nn.Module):
    def decode(self, z):
        return z

    def encode(self, p):
        return p


class _SineReward(nn.Module):
    """A smooth per-sample reward of any input shape (sum of sin over elements)."""

    def forward(self, images, prompts):
        return torch.sin(3.0 * images).flatten(1).sum(1)


def _rl_to_rect_ratio(shape: tuple[int, ...], normalize: str) -> float:
    """Mean per-row RMS ratio of the RL term's and the rectification term's gradients on the same
    one-step output, both from the real code paths (RewardGuidance, TwinFlow on a real model)."""
    torch.manual_seed(0)
    model = MLPFlowModel(shape=shape, num_classes=3, hidden=32, depth=1, time_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cfg = load_config(None, ["rl.enabled=true", "rl.reward=digits", "rl.warmup=0", "rl.weight=0.5",
                             f"rl.normalize={normalize}", "method.rect_weight=1.0"])
    method = TwinFlow(cfg.method, time_samplers=build_time_samplers(cfg.renoise))
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    cond = {"labels": torch.arange(16) % 3}
    out = method.loss(model=model, target=model, x=x, cond=cond, generator=torch.Generator().manual_seed(2), step=1)
    term = RewardGuidance(cfg.rl, codec=_Identity(), reward=_SineReward()).term(
        x_gen=out.x_gen, cond=out.cond_gen, rect_grad=out.rect_grad, step=1)
    (g_rl,) = torch.autograd.grad(term.loss, out.x_gen)  # the weighted term's gradient
    rms = lambda t: t.flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    return float((rms(g_rl) / rms(out.rect_grad)).mean())


@pytest.mark.parametrize("normalize", ["rms", "none"])
def test_rl_to_rectification_gradient_ratio_does_not_grow_with_the_latent(normalize):
    """D = 8 vs D = 256 (32x): the ratio must stay put (a sum over elements would make it 32x larger).

    The sine reward's gradient per element is O(1) at any size, as is the RMS-normalised one."""
    small = _rl_to_rect_ratio((2, 2, 2), normalize)
    large = _rl_to_rect_ratio((4, 8, 8), normalize)
    assert small > 0 and large > 0
    assert 0.5 < large / small < 2.0, (small, large)


def test_rl_normalize_default_is_none():
    assert load_config(None).rl.normalize == "none"


# --------------------------------------------------------------------------- frozen target


def test_frozen_target_rolls_out_with_the_student_and_uses_the_copy_only_for_cfg():
    x, c = batch(16)
    student, frozen = Recorder(tiny_model(0)), Recorder(tiny_model(1))
    m = TwinFlow(MethodConfig(target="frozen", enhanced_ratio=0.5),
                 time_samplers=build_time_samplers(RenoiseConfig()))
    m.loss(model=student, target=frozen, x=x, cond=c, generator=torch.Generator().manual_seed(0), step=0)
    # the frozen copy: exactly one call, the CFG pair at tt = t
    assert len(frozen.calls) == 1 and torch.equal(frozen.calls[0]["t"], frozen.calls[0]["tt"])
    assert not frozen.calls[0]["grad"]
    # the roll-out (tt != t, positive times) runs on the student, without grad: N sub-steps, beside the
    # adv rows' one-step fakes (t = 1, tt = 0), which the student makes under every target
    no_grad_jumps = [k for k in student.calls if not k["grad"] and bool((k["t"] > 0).all())
                     and not torch.equal(k["t"], k["tt"])]
    assert len(no_grad_jumps) == 1 + MethodConfig().estimate_order
    # with an EMA-style target, the same roll-out calls go to the target instead
    student2, target2 = Recorder(tiny_model(0)), Recorder(tiny_model(1))
    TwinFlow(MethodConfig(target="ema", enhanced_ratio=0.5), time_samplers=build_time_samplers(RenoiseConfig())).loss(
        model=student2, target=target2, x=x, cond=c, generator=torch.Generator().manual_seed(0), step=0)
    assert len(target2.calls) == 1 + MethodConfig().estimate_order


def test_frozen_target_tutorial_layout_rolls_out_with_the_student():
    x, c = batch(8)
    student, frozen = Recorder(tiny_model(0)), Recorder(tiny_model(1))
    TwinFlow(MethodConfig(target="frozen", layout="tutorial", enhanced_ratio=0.5),
             time_samplers=build_time_samplers(RenoiseConfig())).loss(
        model=student, target=frozen, x=x, cond=c, generator=torch.Generator().manual_seed(0), step=0)
    assert len(frozen.calls) == 1  # the CFG pair only; both roll-outs ran on the student


# --------------------------------------------------------------------------- comparison guidance


@pytest.mark.parametrize("target,ratio,scale", [("ema", 0.5, 2.0), ("student", 0.8, 5.0), ("ema", 0.0, 1.0),
                                                ("frozen", 0.5, 1.5), ("frozen", 0.8, 1.8)])
def test_teacher_comparison_scale_is_the_distilled_guidance(target, ratio, scale):
    cfg = load_config(None, [f"method.target={target}", f"method.enhanced_ratio={ratio}"])
    assert math.isclose(cfg.teacher_cfg_scale, scale)
    assert load_config(None, [f"method.target={target}", f"method.enhanced_ratio={ratio}",
                              "teacher.cfg_scale=3.0"]).teacher_cfg_scale == 3.0


def test_enhanced_ratio_of_one_with_an_ema_target_is_an_error():
    with pytest.raises(ConfigError, match="enhanced_ratio"):
        load_config(None, ["method.target=ema", "method.enhanced_ratio=1.0"])
    assert load_config(None, ["method.target=frozen", "method.enhanced_ratio=1.0"]).teacher_cfg_scale == 2.0


# --------------------------------------------------------------------------- sampler default


def test_sampler_default_is_the_public_few_step_setting():
    s = SamplerConfig()
    assert s.tt_mode == "few" and s.gaps == [0.001, 0.6] and s.stochastic_ratio == 1.0


# --------------------------------------------------------------------------- group rows per rank


def test_group_check_counts_ranks_and_micro_batches():
    assert check_rows_per_rank(batch_size=16, grad_accum=1, world=2, ratios=[1, 1, 1, 1]) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"adv get 0 of the 4 rows per rank per micro-batch.*2 ranks"):
        check_rows_per_rank(batch_size=16, grad_accum=2, world=2, ratios=[1, 1, 1, 0.1])
    with pytest.raises(ValueError, match="must divide"):
        check_rows_per_rank(batch_size=10, grad_accum=1, world=4, ratios=[1, 1, 1, 1])
    # a zero ratio may have zero rows; a small positive one may not
    assert check_group_rows(rows=3, ratios=[1, 1, 1, 0]) == [1, 1, 1, 0]


def test_the_method_refuses_a_micro_batch_that_drops_a_group():
    x, c = batch(4)
    m = TwinFlow(MethodConfig(group_ratios=[1, 1, 1, 0.1]), time_samplers=build_time_samplers(RenoiseConfig()))
    with pytest.raises(ValueError, match="adv get 0 of the 4 rows"):
        m.loss(model=tiny_model(), target=tiny_model(1), x=x, cond=c, generator=torch.Generator().manual_seed(0),
               step=0)


def test_preflight_checks_the_launchers_world_size(tmp_path, monkeypatch):
    from twinflow_train.run import trainer

    cfg = load_config(None, ["data.batch_size=8"])
    monkeypatch.setattr(trainer, "preflight_teacher", lambda cfg: None)
    trainer.preflight(cfg, tmp_path / "run")  # 8 rows, 1 rank: 2 per group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="0 of the 2 rows per rank per micro-batch"):
        trainer.preflight(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["partitioned", "tutorial"])
def test_rect_grad_is_computed_only_when_asked_and_changes_nothing_else(layout):
    x, c = batch(16)
    outs = {}
    for flag in (True, False):
        m = TwinFlow(MethodConfig(layout=layout), time_samplers=build_time_samplers(RenoiseConfig()), with_rect_grad=flag)
        outs[flag] = m.loss(model=tiny_model(0), target=tiny_model(0), x=x, cond=c,
                            generator=torch.Generator().manual_seed(0), step=0)
    assert outs[True].rect_grad is not None and outs[False].rect_grad is None
    assert torch.equal(outs[True].loss, outs[False].loss) and torch.equal(outs[True].x_gen, outs[False].x_gen)

"""The RL term's clip without a second gradient set: in place (one micro-batch) and with a host stash."""

from __future__ import annotations

import pytest
import torch

from twinflow_train.run.grads import TermGradients

from .test_grads import losses, make_batch, make_model


def _step(*, split: bool, clip_in_place: bool = False, stash: str = "device", clip: float | None = 0.01,
          weight: float = 0.7):
    m = make_model().double()
    batch = [b.double() if b.is_floating_point() else b for b in make_batch(8)]
    terms = TermGradients(m, rl_clip_norm=clip, stash=stash)
    terms.start(split=split, clip_in_place=clip_in_place)
    l_tw, l_rl = losses(m, *batch)
    terms.backward(twinflow=l_tw, rl=weight * l_rl)
    stats = terms.finish()
    return [p.grad.clone() for p in m.parameters()], stats


@pytest.mark.parametrize("clip", [0.01, 1e6])  # active, inactive
def test_in_place_clip_equals_the_split_combination_in_float64(clip):
    ref, ref_stats = _step(split=True, clip=clip)
    got, stats = _step(split=False, clip_in_place=True, clip=clip)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    for k in ("grad_norm/rl", "grad_norm/rl_clipped", "rl/clip_coef"):
        assert torch.equal(stats[k], ref_stats[k]), k
    assert sorted(stats) == ["grad_norm/rl", "grad_norm/rl_clipped", "rl/clip_coef"]  # no per-term telemetry
    assert (float(stats["rl/clip_coef"]) < 1) == (clip == 0.01)


def test_host_stash_equals_the_device_stash():
    ref, ref_stats = _step(split=True)
    got, stats = _step(split=True, stash="host")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert stats.keys() == ref_stats.keys() and all(torch.equal(stats[k], ref_stats[k]) for k in stats)


def test_in_place_clip_refuses_what_it_cannot_do():
    m = make_model()
    with pytest.raises(ValueError, match="clip_in_place"):
        TermGradients(m).start(split=False, clip_in_place=True)  # no rl_clip_norm
    with pytest.raises(ValueError, match="clip_in_place"):
        TermGradients(m, rl_clip_norm=1.0).start(split=True, clip_in_place=True)
    with pytest.raises(ValueError, match="stash"):
        TermGradients(m, stash="disk")
    terms = TermGradients(m, rl_clip_norm=1.0)
    terms.start(split=False, clip_in_place=True)
    batch = make_batch(8)
    l_tw, l_rl = losses(m, *batch)
    terms.backward(twinflow=l_tw, rl=0.5 * l_rl)
    l_tw, l_rl = losses(m, *batch)
    with pytest.raises(RuntimeError, match="one micro-batch"):
        terms.backward(twinflow=l_tw, rl=0.5 * l_rl)

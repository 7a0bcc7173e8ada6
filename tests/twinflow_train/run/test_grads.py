"""Gradient norms, clipping and the two-term backward, on plain tensors and under FSDP2 (gloo, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from twinflow_train.config import ParallelConfig
from twinflow_train.run.grads import TermGradients, clip_grads_, grad_norm
from twinflow_train.models.mlp import MLPFlowModel

SHAPE = (2, 2, 2)


def make_model(seed: int = 0) -> MLPFlowModel:
    torch.manual_seed(seed)
    m = MLPFlowModel(shape=SHAPE, num_classes=3, hidden=16, depth=2, time_dim=8)
    with torch.no_grad():  # leave the adaLN-zero init, so every parameter gets a non-trivial gradient
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def make_batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    t = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    target = torch.randn(n, *SHAPE, generator=g)
    direction = torch.randn(n, *SHAPE, generator=g)  # a fixed "reward gradient"
    e2e = torch.arange(n) % 2 == 0  # every other row, so each even-sized slice holds half of them
    return x, t, labels, target, direction, e2e


def losses(model, x, t, labels, target, direction, e2e):
    """A TwinFlow-like loss on every row and an RL-like surrogate on the 'e2e' rows only."""
    out = model(x, t, torch.zeros_like(t), {"labels": labels})
    l_tw = ((out - target) ** 2).flatten(1).mean(1).mean()
    x_gen = (x - out)[e2e]
    l_rl = -(direction[e2e] * x_gen).flatten(1).sum(1).mean()
    return l_tw, l_rl


def reference_grads(model, batch, rl_weight):
    l_tw, l_rl = losses(model, *batch)
    params = [p for p in model.parameters()]
    g_tw = torch.autograd.grad(l_tw, params, retain_graph=True)
    g_rl = torch.autograd.grad(rl_weight * l_rl, params)
    return list(g_tw), list(g_rl)


def _norm(gs):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in gs))


def _dot(a, b):
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


# --------------------------------------------------------------------------- plain tensors


def test_grad_norm_matches_torch():
    m = make_model()
    l_tw, l_rl = losses(m, *make_batch(8))
    (l_tw + l_rl).backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])
    assert torch.allclose(grad_norm(m.parameters()), ref, rtol=1e-6)


def test_clip_grads_bounds_and_leaves_nonfinite_alone():
    m = make_model()
    l_tw, _ = losses(m, *make_batch(8))
    l_tw.backward()
    before = [p.grad.clone() for p in m.parameters()]
    norm = clip_grads_(m.parameters(), max_norm=1e-3)
    assert norm > 1e-3
    assert math.isclose(float(grad_norm(m.parameters())), 1e-3, rel_tol=1e-4)
    scale = 1e-3 / float(norm)
    for p, b in zip(m.parameters(), before):
        assert torch.allclose(p.grad, b * scale, rtol=1e-4, atol=1e-12)
    # a non-finite gradient is not scaled (the trainer's non-finite policy acts on the returned norm)
    first = next(m.parameters())
    first.grad[0] = float("nan")
    kept = [p.grad.clone() for p in m.parameters()]
    norm = clip_grads_(m.parameters(), max_norm=1e-3)
    assert not torch.isfinite(norm)
    for p, k in zip(m.parameters(), kept):
        assert torch.equal(torch.nan_to_num(p.grad, nan=7.0), torch.nan_to_num(k, nan=7.0))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grads_(m.parameters(), max_norm=0.0)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_terms_sum_to_single_backward(accum):
    w = 0.7
    batch = make_batch(8)
    ref_model = make_model()
    g_tw, g_rl = reference_grads(ref_model, batch, w)
    m = make_model()
    terms = TermGradients(m)
    terms.start(split=True)
    for a in range(accum):
        rows = slice(a * 8 // accum, (a + 1) * 8 // accum)
        l_tw, l_rl = losses(m, *(b[rows] for b in batch))
        terms.backward(twinflow=l_tw, rl=w * l_rl, scale=1.0 / accum)
    stats = terms.finish()
    for p, a, b in zip(m.parameters(), g_tw, g_rl):
        assert torch.allclose(p.grad, a + b, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(stats["grad_norm/twinflow"]), float(_norm(g_tw)), rel_tol=1e-5)
    assert math.isclose(float(stats["grad_norm/rl"]), float(_norm(g_rl)), rel_tol=1e-5)
    cos = _dot(g_tw, g_rl) / (_norm(g_tw) * _norm(g_rl))
    assert math.isclose(float(stats["grad_cos/twinflow_rl"]), float(cos), rel_tol=1e-4, abs_tol=1e-6)
    total = [a + b for a, b in zip(g_tw, g_rl)]
    share = _dot(g_rl, total) / _norm(total) ** 2
    assert math.isclose(float(stats["rl/share"]), float(share), rel_tol=1e-4, abs_tol=1e-6)
    assert float(stats["rl/clip_coef"]) == 1.0

    # the unsplit path gives the same combined gradient with one backward
    m2 = make_model()
    terms2 = TermGradients(m2)
    terms2.start(split=False)
    l_tw, l_rl = losses(m2, *batch)
    terms2.backward(twinflow=l_tw, rl=w * l_rl)
    assert terms2.finish() == {}
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.allclose(p.grad, p2.grad, rtol=1e-5, atol=1e-6), (p.grad - p2.grad).abs().max()


def test_rl_clip_bounds_rl_term_and_leaves_twinflow_untouched():
    w = 2.0
    batch = make_batch(8)
    g_tw, g_rl = reference_grads(make_model(), batch, w)
    rl_norm = float(_norm(g_rl))
    threshold = 0.25 * rl_norm
    m = make_model()
    terms = TermGradients(m, rl_clip_norm=threshold)
    terms.start(split=True)
    l_tw, l_rl = losses(m, *batch)
    terms.backward(twinflow=l_tw, rl=w * l_rl)
    stats = terms.finish()
    coef = threshold / rl_norm
    assert math.isclose(float(stats["rl/clip_coef"]), coef, rel_tol=1e-5)
    assert math.isclose(float(stats["grad_norm/rl_clipped"]), threshold, rel_tol=1e-5)
    assert math.isclose(float(stats["grad_norm/rl"]), rl_norm, rel_tol=1e-5)
    # what was added to the TwinFlow gradient has exactly the threshold norm; the TwinFlow part is unchanged
    rl_part = [p.grad - a for p, a in zip(m.parameters(), g_tw)]
    assert math.isclose(float(_norm(rl_part)), threshold, rel_tol=1e-4)
    for part, b in zip(rl_part, g_rl):
        assert torch.allclose(part, coef * b, rtol=1e-4, atol=1e-7)
    # a threshold above the RL norm changes nothing
    m3 = make_model()
    terms3 = TermGradients(m3, rl_clip_norm=10 * rl_norm)
    terms3.start(split=True)
    l_tw, l_rl = losses(m3, *batch)
    terms3.backward(twinflow=l_tw, rl=w * l_rl)
    assert float(terms3.finish()["rl/clip_coef"]) == 1.0
    for p, a, b in zip(m3.parameters(), g_tw, g_rl):
        assert torch.allclose(p.grad, a + b, rtol=1e-5, atol=1e-6)


def test_zero_rl_weight_gives_zero_rl_stats():
    m = make_model()
    terms = TermGradients(m, rl_clip_norm=1.0)
    terms.start(split=True)
    l_tw, l_rl = losses(m, *make_batch(8))
    # the guidance's term at weight 0: a constant without graph, skipped (the RL gradient is zero)
    terms.backward(twinflow=l_tw, rl=torch.zeros(()))
    stats = terms.finish()
    assert float(stats["grad_norm/rl"]) == 0.0
    assert float(stats["grad_cos/twinflow_rl"]) == 0.0
    assert float(stats["rl/share"]) == 0.0
    assert float(stats["grad_norm/twinflow"]) > 0


def test_term_gradients_bad_input():
    m = make_model()
    with pytest.raises(ValueError, match="clip_norm"):
        TermGradients(m, rl_clip_norm=0.0)
    terms = TermGradients(m, rl_clip_norm=1.0)
    with pytest.raises(ValueError, match="split"):
        terms.start(split=False)
    with pytest.raises(RuntimeError, match="start"):
        TermGradients(m).backward(twinflow=torch.zeros((), requires_grad=True), rl=None)
    l_tw, _ = losses(m, *make_batch(4))
    l_tw.backward()
    with pytest.raises(RuntimeError, match="not empty"):
        TermGradients(m).start(split=True)


# --------------------------------------------------------------------------- FSDP2, 1 and 2 processes


def _fsdp_worker(rank: int, world: int, store_path: str, layouts: list[tuple[bool, bool]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for raf, ac in layouts:
            _check_layout(rank, world, mesh, raf, ac)
        dist.barrier()  # gloo tears down cleanly only once every rank is done
    finally:
        dist.destroy_process_group()


def _check_layout(rank, world, mesh, raf: bool, ac: bool) -> None:
    from twinflow_train.distributed.parallel import shard_blocks_then_root

    w, accum, n = 1.5, 2, 8
    batch = make_batch(n)
    g_tw, g_rl = reference_grads(make_model(), batch, w)
    rl_norm = float(_norm(g_rl))
    par = ParallelConfig(reshard_after_forward=raf, activation_checkpointing=ac)

    def run(split: bool, clip: float | None):
        base = make_model()
        model = shard_blocks_then_root(base, base.shard_blocks(), mesh, par)
        terms = TermGradients(model, rl_clip_norm=clip)
        terms.start(split=split)
        per_rank = n // world
        mine = [b[rank * per_rank:(rank + 1) * per_rank] for b in batch]
        for a in range(accum):
            rows = slice(a * per_rank // accum, (a + 1) * per_rank // accum)
            # the trainer's usual accumulation pattern; split mode must override it
            model.set_requires_gradient_sync(a == accum - 1)
            l_tw, l_rl = losses(model, *(b[rows] for b in mine))
            terms.backward(twinflow=l_tw, rl=w * l_rl, scale=1.0 / accum)
        stats = terms.finish()
        grads = [p.grad.full_tensor() for p in model.parameters()]
        return grads, stats, model

    # 1) split, no clip: the two term gradients add up to the single-backward gradient of the sum
    split_grads, stats, model = run(True, None)
    single_grads, none_stats, _ = run(False, None)
    assert none_stats == {}
    for a, b, r_tw, r_rl in zip(split_grads, single_grads, g_tw, g_rl):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
        assert torch.allclose(a, r_tw + r_rl, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(stats["grad_norm/twinflow"]), float(_norm(g_tw)), rel_tol=1e-5)
    assert math.isclose(float(stats["grad_norm/rl"]), rl_norm, rel_tol=1e-5)
    assert math.isclose(float(grad_norm(model.parameters())), float(_norm([a + b for a, b in zip(g_tw, g_rl)])),
                        rel_tol=1e-5)

    # 2) split with the RL clip at a third of the RL norm: RL part bounded, TwinFlow part untouched
    threshold = rl_norm / 3
    clipped, stats, _ = run(True, threshold)
    assert math.isclose(float(stats["grad_norm/rl_clipped"]), threshold, rel_tol=1e-5)
    rl_part = [c - r for c, r in zip(clipped, g_tw)]
    assert math.isclose(float(_norm(rl_part)), threshold, rel_tol=1e-4)
    for part, r in zip(rl_part, g_rl):
        assert torch.allclose(part, r / 3, rtol=1e-4, atol=1e-6)


def _spawn(world: int, tmp_path, layouts: list[tuple[bool, bool]]) -> None:
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "store"), layouts), nprocs=world, join=True)


@pytest.mark.distributed
def test_fsdp2_world1(tmp_path):
    _spawn(1, tmp_path, [(True, False)])


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_world2(tmp_path):
    # (reshard_after_forward, activation_checkpointing): the default placement, no resharding, and
    # recomputation in backward (the RL backward recomputes the blocks once more)
    _spawn(2, tmp_path, [(True, False), (False, False), (True, True)])

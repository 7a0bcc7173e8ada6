"""FSDP2 on the tiny Qwen-Image transformer with 2 gloo processes.

One spawned 2-process session checks, against a plain 1-process model:
- meta-device init + per-rank slice loading reproduces the pretrained weights;
- a few training steps (grad accumulation 2 at 1 process == 2 ranks x 1) give the same losses
  and the same final parameters (EMA included);
- a DCP checkpoint written at step 2 by 2 processes resumes to exactly the uninterrupted run;
- activation checkpointing gives the same gradients; bf16 mixed precision runs and stays close.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from twinflow_train.config import ParallelConfig, load_config
from twinflow_train.data.batches import step_generator
from twinflow_train.models.base import cond_cat
from twinflow_train.models.qwen_image import build_qwen_image

from ..test_qwen_fixtures import LATENT_CHANNELS, TEXT_DIM, free_store, tiny_transformer

SHAPE = (LATENT_CHANNELS, 4, 6)
GLOBAL_BATCH = 4
STEPS = 4
LR = 1e-3


def _cfg(pretrained: str):
    return load_config(None, ["model.family=qwen_image", "codec.kind=qwen_vae", f"model.qwen.pretrained={pretrained}",
                              "model.sign_embedding=true"])


def _batch(step: int):
    g = step_generator(99, step)
    x = torch.randn(GLOBAL_BATCH, *SHAPE, generator=g)
    z = torch.randn(GLOBAL_BATCH, *SHAPE, generator=g)
    t = torch.rand(GLOBAL_BATCH, generator=g) * 2 - 1  # signed: twin-branch rows too
    tt = t * torch.rand(GLOBAL_BATCH, generator=g)
    embeds = torch.randn(GLOBAL_BATCH, 5, TEXT_DIM, generator=g)
    mask = torch.ones(GLOBAL_BATCH, 5, dtype=torch.bool)
    mask[::2, 3:] = False
    return x, z, t, tt, {"prompt_embeds": embeds, "prompt_mask": mask}


def _micro_loss(model, step: int, index: int, count: int) -> torch.Tensor:
    x, z, t, tt, cond = _batch(step)
    size = GLOBAL_BATCH // count
    sl = slice(index * size, (index + 1) * size)
    x, z, t, tt = x[sl], z[sl], t[sl], tt[sl]
    cond = {k: v[sl] for k, v in cond.items()}
    a = t.abs().view(-1, 1, 1, 1)
    x_t = a * z + (1 - a) * x
    with torch.no_grad():  # a CFG-style pair through the null condition, as the targets use it
        pair = cond_cat([cond, model.null_cond(cond)])
        guide = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), pair)
        v_enh = (z - x) + 0.1 * (guide[:size] - guide[size:])
    return (model(x_t, t, tt, cond) - v_enh).square().mean()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _ema_update(ema, model, step):
    d = 0.5 if step > 1 else 0.0
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)


def _train(model, ema, opt, steps, *, index, count, accum, start=1):
    losses = []
    for step in range(start, start + steps):
        total = 0.0
        for a in range(accum):
            loss = _micro_loss(model, step, index * accum + a, count)
            (loss / accum).backward()
            total += loss.detach() / accum
        torch.nn.utils.clip_grad_norm_(_trainable(model), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ema_update(ema, model, step)
        losses.append(total)
    return losses


def _full(module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def _worker(rank: int, world: int, store: str, pretrained: str, out: str, null: torch.Tensor) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from twinflow_train.distributed import checkpoint as ckpt
    from twinflow_train.models.qwen_image import materialize_qwen_image, parallelize_qwen_image

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    cfg = _cfg(pretrained)
    par = ParallelConfig()

    def fresh(par=par, frozen=False):
        m = build_qwen_image(cfg, latent_shape=SHAPE, null_prompt_embeds=null, device="meta")
        m = parallelize_qwen_image(m.requires_grad_(False) if frozen else m, mesh, par, frozen=frozen)
        return materialize_qwen_image(m, device="cpu", pretrained=pretrained, tt_init="copy", seed=cfg.run.seed)

    result: dict = {}
    model, ema = fresh(), fresh(frozen=True)
    result["init"] = _full(model)
    opt = torch.optim.AdamW(_trainable(model), lr=LR)
    losses = _train(model, ema, opt, 2, index=rank, count=world, accum=1)
    ckdir = Path(out) / "ckpt"
    ckpt.save_checkpoint(ckdir, fmt="dcp", model=model, optimizer=opt, extra_modules={"target": ema},
                         state={"step": 2}, step=2)
    losses += _train(model, ema, opt, STEPS - 2, index=rank, count=world, accum=1, start=3)
    for loss in losses:
        dist.all_reduce(loss)
    result["losses"] = [float(v) / world for v in losses]
    result["final"], result["ema"] = _full(model), _full(ema)

    # resume: fresh modules and optimizer, state from the DCP checkpoint, the same last steps
    model2, ema2 = fresh(), fresh(frozen=True)
    opt2 = torch.optim.AdamW(_trainable(model2), lr=LR)
    state = ckpt.load_checkpoint(ckdir, model=model2, optimizer=opt2, extra_modules={"target": ema2})
    _train(model2, ema2, opt2, STEPS - 2, index=rank, count=world, accum=1, start=state["step"] + 1)
    result["resumed"], result["resumed_ema"] = _full(model2), _full(ema2)

    # activation checkpointing: same gradients
    grads = {}
    for ac in (False, True):
        m = fresh(ParallelConfig(activation_checkpointing=ac))
        _micro_loss(m, 1, rank, world).backward()
        grads[ac] = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.requires_grad}
    result["ac_max_diff"] = max((grads[True][n] - grads[False][n]).abs().max().item() for n in grads[False])

    # bf16 compute, fp32 reductions and master weights
    mb = fresh(ParallelConfig(mixed_precision="bf16"))
    x, z, t, tt, cond = _batch(1)
    with torch.no_grad():
        result["bf16_out"] = mb(x, t, tt, cond)
    result["bf16_param_dtype"] = str(next(mb.parameters()).dtype)
    if rank == 0:
        torch.save(result, Path(out) / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_match_one_process_and_resume_exactly_from_dcp(tmp_path):
    import torch.multiprocessing as mp

    stock = tiny_transformer(seed=11)
    stock.save_pretrained(str(tmp_path / "pretrained"))
    null = torch.randn(3, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    # spawn, not fork: under pytest-xdist this worker may already run torch thread pools from earlier
    # tests, and a forked child of a threaded process can deadlock (seen: both ranks stuck on a futex)
    mp.start_processes(_worker, args=(2, free_store(tmp_path), str(tmp_path / "pretrained"), str(tmp_path), null),
                       nprocs=2, join=True, start_method="spawn")
    res = torch.load(tmp_path / "result.pt", weights_only=False)

    # 1-process reference: plain model, same global batch as 2 accumulation micro-batches
    cfg = _cfg(str(tmp_path / "pretrained"))
    model = build_qwen_image(cfg, latent_shape=SHAPE, null_prompt_embeds=null)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in init.items():  # meta init + sliced loading == plain loading
        assert torch.equal(res["init"][k], v), k
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(_trainable(model), lr=LR)
    losses = [float(v) for v in _train(model, ema, opt, STEPS, index=0, count=2, accum=2)]
    assert losses == pytest.approx(res["losses"], rel=1e-5, abs=1e-7)
    for name, ref in model.state_dict().items():
        assert torch.allclose(res["final"][name], ref, atol=2e-6, rtol=1e-5), name
        assert torch.allclose(res["ema"][name], ema.state_dict()[name], atol=2e-6, rtol=1e-5), name
    moved = sum(not torch.equal(model.state_dict()[k], init[k]) for k in init)
    assert moved > len(init) // 2  # training really changed the weights

    # DCP resume is exact (same ranks, same ops)
    for name in res["final"]:
        assert torch.equal(res["resumed"][name], res["final"][name]), name
        assert torch.equal(res["resumed_ema"][name], res["ema"][name]), name

    assert res["ac_max_diff"] <= 1e-6
    assert res["bf16_param_dtype"] == "torch.float32"  # master weights stay fp32
    x, z, t, tt, cond = _batch(1)
    with torch.no_grad():
        fp32 = build_qwen_image(cfg, latent_shape=SHAPE, null_prompt_embeds=null)(x, t, tt, cond)
    err = (res["bf16_out"] - fp32).abs().max() / fp32.abs().max()
    assert err < 0.05 and res["bf16_out"].dtype == torch.float32

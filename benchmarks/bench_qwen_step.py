"""Training-step benchmark of a reduced-depth Qwen-Image transformer at full width, bf16, 1 GPU.

    python benchmarks/bench_qwen_step.py                      # 4 blocks, 1328x1328, batch 1
    python benchmarks/bench_qwen_step.py --layers 8 --batch 2 --checkpointing
    python benchmarks/bench_qwen_step.py --smoke              # tiny config on CPU: checks the code path only

The model is the real ``TwinFlowQwenImageTransformer2DModel`` (Qwen-Image's width:
24 heads x 128, text dim 3584) with random weights (nothing is downloaded), wrapped by
``QwenImageFlowModel`` and placed by ``parallelize_qwen_image`` on a 1-GPU mesh: fp32
master weights, bf16 compute, fp32 reductions, as the trainer runs it. Two step kinds:

* ``fm``: one forward + backward of a flow-matching loss on the batch + AdamW step
  (the grad-carrying part of every TwinFlow step);
* ``twinflow``: the project's full TwinFlow step (``twinflow_train.method.twinflow.TwinFlow``,
  partitioned layout, target = the student under no_grad) + AdamW.

Reported: image tokens/s, step time, MFU and peak allocated memory. Model FLOPs are the
matmul FLOPs of one forward per row (``flops_per_token``) times the rows the step really
forwards: 3 x the rows with grad (forward + backward) plus the no-grad rows, both as the
method itself counts them (``TwinFlowOutput.forward_rows``) on every timed step; the
recomputation under checkpointing is not counted (the usual MFU convention).

Optimisations: AdamW is fused on CUDA, attention is diffusers' ``native`` backend (torch
SDPA, which picks flash attention on the GPU; ``--attention`` names another), bf16 compute
under FSDP2 with fp32 master weights and reductions, ``--compile`` compiles each block
(``compile_blocks``). Each is tested on CPU for equal numerics
(tests/twinflow_train/test_qwen_optimisations.py). Without CUDA (and without ``--smoke``)
it prints a SKIP line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: dense bf16 peak TFLOP/s by device-name substring (vendor datasheets, SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def peak_for(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (full model: 60)")
    p.add_argument("--height", type=int, default=1328, help="image height in pixels (latent = /8)")
    p.add_argument("--width", type=int, default=1328)
    p.add_argument("--text-tokens", type=int, default=256, help="prompt embedding length")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--kind", choices=("fm", "twinflow"), default="fm")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--attention", default="native", help="diffusers attention backend (default: native = torch SDPA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU (code path check; numbers meaningless)")
    return p.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from twinflow_train.config import ParallelConfig
    from twinflow_train.models.qwen_image import (
        TINY_CONFIG,
        QwenImageFlowModel,
        TwinFlowQwenImageTransformer2DModel,
        parallelize_qwen_image,
    )

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    arch = dict(TINY_CONFIG) if args.smoke else {}
    arch["num_layers"] = args.layers
    with torch.device(device):
        tf = TwinFlowQwenImageTransformer2DModel(**arch)
    tf.init_target_time_embedding("copy")
    text_dim = tf.config.joint_attention_dim
    model = QwenImageFlowModel(tf, null_prompt_embeds=torch.zeros(4, text_dim))
    par = ParallelConfig(mixed_precision="bf16", activation_checkpointing=args.checkpointing)
    model = parallelize_qwen_image(model, mesh, par)
    if args.compile:
        from twinflow_train.models.qwen_image import compile_blocks
        compile_blocks(model)
    return model, arch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("SKIP bench_qwen_step: no CUDA device (run on a GPU, or --smoke for a CPU code-path check)")
        return 0
    device = torch.device("cuda" if not args.smoke else "cpu")
    from twinflow_train.models.qwen_image import flops_per_token, param_count

    if args.smoke:
        args.height, args.width, args.text_tokens = 32, 48, 8
    model, arch = build(args, device)
    vae_factor = 8 if not args.smoke else 4
    c = model.latent_channels
    h, w = args.height // vae_factor, args.width // vae_factor
    if h % 2 or w % 2:
        raise SystemExit(f"--height/--width must be multiples of {2 * vae_factor}")
    tokens = (h // 2) * (w // 2)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, c, h, w, generator=gen, device=device)
    embeds = torch.randn(args.batch, args.text_tokens, model.transformer.config.joint_attention_dim, generator=gen,
                         device=device)
    cond = {"prompt_embeds": embeds, "prompt_mask": torch.ones(args.batch, args.text_tokens, dtype=torch.bool,
                                                               device=device)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    method = None
    if args.kind == "twinflow":
        from twinflow_train.config import MethodConfig, RenoiseConfig
        from twinflow_train.method.twinflow import TwinFlow
        from twinflow_train.method.timesamplers import build_time_samplers

        if args.batch < 4:
            raise SystemExit("--kind twinflow needs --batch >= 4 (four row groups)")
        method = TwinFlow(MethodConfig(target="student"), time_samplers=build_time_samplers(RenoiseConfig()))

    rows = {"grad": 0, "no_grad": 0}

    def step(k: int) -> dict[str, int]:
        if method is None:
            t = torch.rand(args.batch, generator=gen, device=device)
            z = torch.randn(x.shape, generator=gen, device=device)
            x_t = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x
            loss = (model(x_t, t, t * 0.9, cond) - (z - x)).square().mean()
            forwarded = {"grad": args.batch, "no_grad": 0}
        else:
            out = method.loss(model=model, target=model, x=x, cond=cond, generator=gen, step=k)
            loss, forwarded = out.loss, out.forward_rows
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return forwarded

    from diffusers.models.attention_dispatch import attention_backend

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with attention_backend(args.attention):
        for k in range(args.warmup):
            step(k + 1)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for k in range(args.steps):
            for key, n in step(args.warmup + k + 1).items():
                rows[key] += n
        sync()
    step_s = (time.perf_counter() - t0) / args.steps

    fwd_per_row = flops_per_token({**model.transformer.config}, image_tokens=tokens,
                                  text_tokens=args.text_tokens) * tokens
    # forward + backward of the grad rows = 3 forwards; the no-grad rows as the method counted them
    forwards = 3 * rows["grad"] + rows["no_grad"]
    flops = forwards * fwd_per_row / args.steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    result = {
        "device": name, "kind": args.kind, "layers": args.layers, "params": param_count(model),
        "image": f"{args.height}x{args.width}", "image_tokens": tokens, "text_tokens": args.text_tokens,
        "batch": args.batch, "checkpointing": args.checkpointing, "compile": args.compile,
        "attention": args.attention, "step_s": round(step_s, 4),
        "rows_per_step": {k: v / args.steps for k, v in rows.items()},
        "forwards_per_row": round(forwards / (args.steps * args.batch), 4),
        "tokens_per_s": round(args.batch * tokens / step_s, 1),
        "tflops_per_s": round(flops / step_s / 1e12, 2),
        "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    print(f"| {name} | {args.kind} | {args.layers} | {result['image']} | {args.batch} | {args.checkpointing} | "
          f"{result['step_s']} | {result['tokens_per_s']} | {result['mfu']} | {result['peak_mem_gib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

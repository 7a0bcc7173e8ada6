"""Peak memory of the exact reward gradient's decode at 1328^2: plain ``vae.decode`` vs the checkpointed,
cache-free decode (``twinflow_train/models/qwen_decode.py``), each with its backward to the latents, beside
the memory plan's figure (``twinflow_train/run/plan.py``, ``decode_peak_bytes``).

On one GPU (H100 or H200; random weights, the diffusers Qwen-Image VAE defaults, nothing downloaded): for
every variant, ``torch.cuda.max_memory_allocated`` over the decode of one latent ``[rows, 16, 1, 166, 166]``
and ``autograd.grad`` of a fixed linear pixel functional to the latent, less what was allocated before
(the VAE and the latent). Also the SDPA kernel the mid block's attention runs (one head of dim 384 over
27,556 tokens: flash attention does not take head dims above 256, so this says whether the memory-efficient
kernel or the S x S math path runs; the plan counts a flash-style save).

``--smoke`` runs the same code on CPU at tiny shapes (a base_dim-16 VAE, a 24 x 20 latent), measuring live
bytes of real tensors (``plan.LiveBytes``) instead of the CUDA allocator; the tests run it.

    python benchmarks/bench_decode_memory.py                 # one GPU, under 10 minutes
    python benchmarks/bench_decode_memory.py --smoke         # CPU, seconds

Prints one JSON object per variant, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
VARIANTS = ("plain fp32", "checkpointed fp32", "checkpointed bf16", "plain bf16")
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math",
            "flash (cpu)": "_scaled_dot_product_flash_attention_for_cpu"}


def build_vae(*, smoke: bool, device: str):
    import torch
    from diffusers import AutoencoderKLQwenImage

    kw = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
              temperal_downsample=[False, True]) if smoke else {}
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLQwenImage(**kw)
    return vae.eval().requires_grad_(False)


def attention_backend(vae, x) -> list[str]:
    """The SDPA kernels (aten op names) the mid block's attention runs on ``x`` (its input), forward and backward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    attn = vae.decoder.mid_block.attentions[0]
    xin = x.detach().requires_grad_(True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        out = attn(xin)
        torch.autograd.grad(out.float().square().sum(), xin)
    names = {e.name for e in prof.events()}
    found = [k for k, op in SDPA_OPS.items() if f"aten::{op}" in names]
    return found or sorted(n for n in names if "attention" in n)


def measure(vae, z, w, *, variant: str, device: str) -> int:
    """Peak bytes above the starting allocation of decode + autograd.grad to z."""
    import torch

    from twinflow_train.models.qwen_decode import decode_single_frame
    from twinflow_train.run.plan import LiveBytes

    checkpointed = variant.startswith("checkpointed")

    def run():
        zz = z.detach().clone().requires_grad_(True)
        out = decode_single_frame(vae, zz) if checkpointed else vae.decode(zz).sample
        (g,) = torch.autograd.grad((out.float() * w).sum(), zz)
        if not torch.isfinite(g).all():
            raise FloatingPointError(f"{variant}: non-finite latent gradient")

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes() as live:
        run()
    return live.peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny VAE and latent (the tests' mode)")
    p.add_argument("--image", type=int, default=1328, help="square image side in pixels (default 1328)")
    p.add_argument("--rows", type=int, default=1, help="latents decoded at once (default 1: the e2e row of a rank)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    import torch

    from twinflow_train.run.plan import decode_peak_bytes

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; valid: {list(VARIANTS)}")
    if args.smoke:
        device, h, w_ = "cpu", 24, 20
    else:
        if not torch.cuda.is_available():
            print("SKIP bench_decode_memory: no CUDA device (use --smoke for the CPU code path)")
            return 0
        if args.image % 16:
            p.error(f"--image must be a multiple of 16 (got {args.image})")
        device, h, w_ = "cuda", args.image // 8, args.image // 8
    vae = build_vae(smoke=args.smoke, device=device)
    meta = build_vae(smoke=args.smoke, device="meta")
    zdim = vae.config.z_dim
    scale = 2 ** len(vae.config.temperal_downsample)
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for variant in variants:
        dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
        v = vae.to(dtype)
        z = torch.randn(args.rows, zdim, 1, h, w_, device=device, generator=gen).to(dtype)
        wt = torch.randn(args.rows, 3, 1, h * scale, w_ * scale, device=device, generator=gen)
        t0 = time.perf_counter()
        peak = measure(v, z, wt, variant=variant, device=device)
        seconds = time.perf_counter() - t0
        plan = decode_peak_bytes(meta.to(dtype), z.to("meta"),
                                 decoder="checkpointed" if variant.startswith("checkpointed") else "plain")
        row = {"variant": variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "image": f"{h * scale}x{w_ * scale}", "rows": args.rows, "measured_bytes": peak,
               "plan_bytes": plan["peak"], "plan_parts": plan, "ratio": peak / plan["peak"],
               "seconds": round(seconds, 2), "measure": "cuda.max_memory_allocated" if device == "cuda"
               else "LiveBytes (CPU)"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del z, wt
    x = torch.randn(1, vae.config.base_dim * vae.config.dim_mult[-1], 1, h, w_, device=device)
    backends = {str(dt).removeprefix("torch."): attention_backend(vae.to(dt), x.to(dt))
                for dt in (torch.float32, torch.bfloat16)}
    print(json.dumps({"mid_block_attention": backends}), flush=True)
    print(f"\n{'variant':<20} {'measured GiB':>13} {'plan GiB':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['variant']:<20} {r['measured_bytes'] / GIB:>13.3f} {r['plan_bytes'] / GIB:>9.3f} {r['ratio']:>6.2f}")
    print(f"mid-block attention kernels: {backends}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

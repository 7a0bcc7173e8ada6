"""Per-step cost of reward guidance against the TwinFlow-only step.

One optimizer step of the embedded setup (MLPFlowModel hidden 512, depth 4,
latent [4, 4, 4], batch 128, partitioned layout, EMA target) is timed in these
variants, interleaved round-robin so that load drift on a shared machine hits
them alike, and reported as the median over rounds:

- ``twinflow``: method loss, one backward, global clip, AdamW step
- ``rl_exact``: + the exact latent reward gradient (decode + reward fwd/bwd on the
  e2e rows) and the surrogate, one backward of the sum (``rl.clip`` none/output, a
  non-log step)
- ``rl_exact_split``: + the per-term split (two backward passes over the shared graph,
  per-term norms and cosine): a log step, or every step under ``rl.clip: param``
- ``rl_exact_param_clip``: split + the RL term's own clip (``rl.clip: param``)
- ``rl_reencode_split``: the re-encode estimator, split (for comparison)
- ``latent_grad_only``: the exact latent gradient alone

Codec and reward are the project's digits autoencoder (untrained) and reward
classifier (``auxiliary.DigitsReward``, trained 20 steps into a private cache):
the cost does not depend on how well they are trained. Timings are CPU
wall-clock; ``--fsdp`` runs the student under FSDP2 at world size 1, as the
trainer does.

    .venv/bin/python benchmarks/bench_rl_overhead.py [--rounds 30] [--threads 2] [--fsdp]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twinflow_train.models.codecs import DigitsAutoencoder  # noqa: E402
from twinflow_train.config import load_config  # noqa: E402
from twinflow_train.data.batches import step_generator  # noqa: E402
from twinflow_train.run.grads import TermGradients, clip_grads_  # noqa: E402
from twinflow_train.method.twinflow import TwinFlow  # noqa: E402
from twinflow_train.models.mlp import MLPFlowModel  # noqa: E402
from twinflow_train.rl.guidance import RewardGuidance, exact_latent_grad  # noqa: E402
from twinflow_train.method.timesamplers import build_time_samplers  # noqa: E402


class StandInReward(torch.nn.Module):
    """Used only while ``twinflow_train.assets.auxiliary`` is absent: log p(class) of a small conv net on 8x8 images."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.SiLU(), torch.nn.Linear(128, 10))

    def forward(self, images, prompts):
        return torch.log_softmax(self.net(images), -1).gather(1, prompts["labels"][:, None]).squeeze(1)


def build_reward(cfg, cache: str) -> tuple[torch.nn.Module, str]:
    """The project's digits reward (classifier briefly trained into a private cache: the cost of a
    reward gradient does not depend on how well it is trained), or the stand-in while it is absent."""
    try:
        from twinflow_train.assets.auxiliary import DigitsReward, get_reward_classifier
    except ImportError:
        reward, what = StandInReward(), "stand-in conv classifier (twinflow_train.assets.auxiliary not present)"
    else:
        cfg = load_config(None, ["aux.reward_steps=20", f"aux.cache_dir={cache}", "rl.enabled=true",
                                 "rl.reward=digits"])
        reward, what = DigitsReward(get_reward_classifier(cfg)), "auxiliary.DigitsReward (project classifier)"
    reward.eval()
    for p in reward.parameters():
        p.requires_grad_(False)
    return reward, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; with 1, the CPU-time column is the work done whatever the machine's load")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 at world size 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_config(None, [f"data.batch_size={args.batch}", "rl.enabled=true", "rl.reward=digits",
                             "rl.warmup=0", "rl.weight=0.05", "rl.clip_norm=0.1"])
    model = MLPFlowModel(shape=(4, 4, 4), num_classes=10, hidden=512, depth=4, time_dim=128)
    model.init_target_time_embedding("copy")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if args.fsdp:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from twinflow_train.distributed.parallel import shard_blocks_then_root
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        model = shard_blocks_then_root(model, model.shard_blocks(), mesh, cfg.parallel)
        ema = shard_blocks_then_root(ema, ema.shard_blocks(), mesh, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    method = TwinFlow(cfg.method, time_samplers=build_time_samplers(cfg.renoise))
    codec = DigitsAutoencoder(latent_channels=4, hidden=cfg.codec.hidden).eval().requires_grad_(False)
    import tempfile
    reward, reward_name = build_reward(cfg, tempfile.mkdtemp(prefix="bench-rl-"))
    exact = RewardGuidance(cfg.rl, codec=codec, reward=reward)
    reenc = RewardGuidance(load_config(None, ["rl.enabled=true", "rl.reward=digits", "rl.warmup=0",
                                              "rl.estimator=reencode"]).rl, codec=codec, reward=reward)
    x = torch.randn(args.batch, 4, 4, 4)
    cond = {"labels": torch.arange(args.batch) % 10}

    def step(variant: str, k: int) -> None:
        gen = step_generator(0, k)
        if variant == "latent_grad_only":
            xg = torch.randn(args.batch // 4, 4, 4, 4)
            exact_latent_grad(x=xg, cond={"labels": cond["labels"][: args.batch // 4]}, codec=codec, reward=reward)
            return
        out = method.loss(model=model, target=ema, x=x, cond=cond, generator=gen, step=k)
        if variant == "twinflow":
            out.loss.backward()
        else:
            guidance = reenc if variant == "rl_reencode_split" else exact
            term = guidance.term(x_gen=out.x_gen, cond=out.cond_gen, rect_grad=out.rect_grad, step=k)
            split = variant != "rl_exact"
            terms = TermGradients(model, rl_clip_norm=cfg.rl.clip_norm if variant == "rl_exact_param_clip" else None)
            terms.start(split=split)
            terms.backward(twinflow=out.loss, rl=term.loss)
            terms.finish()
        clip_grads_(model.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = ["twinflow", "rl_exact", "rl_exact_split", "rl_exact_param_clip", "rl_reencode_split",
                "latent_grad_only"]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    from tqdm.auto import tqdm
    for r in tqdm(range(args.warmup + args.rounds), desc="rounds"):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            step(v, r + 1)
            if r >= args.warmup:
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
    base_w, base_c = statistics.median(wall["twinflow"]), statistics.median(cpu["twinflow"])
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, fsdp={args.fsdp}, "
          f"rounds {args.rounds} (medians; wall IQR in brackets)")
    print(f"reward: {reward_name}; codec: DigitsAutoencoder(latent 4, hidden {cfg.codec.hidden}), untrained")
    print(f"{'variant':22s} {'wall ms':>9s} {'wall IQR':>17s} {'cpu ms':>9s} {'wall x':>7s} {'cpu x':>7s}")
    for v in variants:
        ts = sorted(wall[v])
        med_w, med_c = statistics.median(ts), statistics.median(cpu[v])
        q1, q3 = ts[len(ts) // 4] * 1e3, ts[(3 * len(ts)) // 4] * 1e3
        print(f"{v:22s} {med_w * 1e3:9.1f} {f'[{q1:.1f}, {q3:.1f}]':>17s} {med_c * 1e3:9.1f} "
              f"{med_w / base_w:6.2f}x {med_c / base_c:6.2f}x")


if __name__ == "__main__":
    main()

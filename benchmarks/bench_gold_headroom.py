"""Headroom of the digits gold score: the teacher's samples against the real training digits.

The gold score must leave room to improve without leaving the data: the
teacher's mean below the 60th percentile of the real training digits, and the
top decile of real digits at least one standard deviation above the teacher's
mean. This prints both distributions (percentiles), those two checks, the terms
of the score (attributes, the judge's probability of the prompted class, the
distance to the nearest real digit of that class), the gold of images a
collapsed generator makes (all ink, blank, noise) and of real digits under
another class's prompt, and how well the proxy reward tracks the gold score
on the teacher's samples and on held-out real digits. Last, the per-row RMS of
the proxy's latent gradient (exact, through the decoder), which sets the scale
of ``rl.weight`` (the RL/rectification ratio is ~ w * RMS(g) / (2 * rect_weight)).

    python benchmarks/bench_gold_headroom.py --config configs/digits.yaml [--n 1000] [key=value ...]

Needs the cached teacher (``twinflow-train teacher`` with the same config).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from twinflow_train.assets.auxiliary import (DigitsProxyReward, centring, entry_record, get_gold_score, get_proxy_net,
                                             other_class, stroke_weight, WEIGHTS, cache_entry, proxy_key)
from twinflow_train.config import load_config
from twinflow_train.data.batches import step_generator
from twinflow_train.data.digits import load_digits_split
from twinflow_train.evaluation.evaluate import Evaluator
from twinflow_train.run.inference import COUNT_NOISE, count_prompts
from twinflow_train.rl.guidance import exact_latent_grad
from twinflow_train.run.setup import build_setup
from twinflow_train.run.trainer import build_base, preflight_teacher

PCTS = (10, 25, 50, 60, 75, 90)


def _describe(x: np.ndarray) -> dict[str, float]:
    out = {"mean": float(x.mean()), "std": float(x.std(ddof=1))}
    out.update({f"p{p}": float(v) for p, v in zip(PCTS, np.percentile(x, PCTS))})
    return out


def _row(name: str, d: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{d[k]:.3f}" for k in ("mean", "std", *[f"p{p}" for p in PCTS])) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--n", type=int, default=1000, help="teacher samples (class-balanced, fixed noise)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    dev = torch.device("cpu")
    setup = build_setup(cfg, device=dev)
    teacher = build_base(cfg, setup, preflight_teacher(cfg)).eval()
    ev = Evaluator(cfg, setup, device=dev)
    labels = count_prompts(args.n, 10)
    z = torch.randn((args.n, *setup.data.latent_shape), generator=step_generator(cfg.eval.seed, COUNT_NOISE))
    scale = cfg.teacher_cfg_scale
    latents = ev.teacher_latents(teacher, steps=cfg.teacher.sample_steps, cfg_scale=scale, z=z,
                                 cond={"labels": labels}).float()
    images = ev.decode(latents)
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    proxy = DigitsProxyReward(get_proxy_net(cfg))
    gold = get_gold_score(cfg)

    def scores(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            parts = gold.parts(x, {"labels": y})
            return {"gold": parts["gold"].numpy(), "stroke": stroke_weight(x).numpy(),
                    "centring": centring(x).numpy(), "judge_prob": parts["judge_prob"].numpy(),
                    "real_distance": parts["real_distance"].numpy(), "legible": (parts["legibility"] > 0.5).numpy(),
                    "proxy": proxy(x, {"labels": y}).numpy()}

    real, fake, held = (scores(split.train_images, split.train_labels), scores(images, labels),
                        scores(split.val_images, split.val_labels))
    print(f"teacher: {cfg.teacher.sample_steps}-step Euler at CFG {scale:g}, {args.n} samples; "
          f"real: {len(real['gold'])} training digits\n")
    print("| set | mean | std | " + " | ".join(f"p{p}" for p in PCTS) + " |")
    print("|---|" + "---|" * (2 + len(PCTS)))
    for key in ("gold", "stroke", "centring", "judge_prob", "real_distance", "proxy"):
        print(_row(f"real {key}", _describe(real[key])))
        print(_row(f"held-out {key}", _describe(held[key])))
        print(_row(f"teacher {key}", _describe(fake[key])))
    # what a collapsed or off-prompt generator makes, each under all ten prompts
    gen = torch.Generator().manual_seed(0)
    k = 200
    y = torch.arange(k) % 10
    degenerate = {
        "all ink": (torch.ones(k, 1, 8, 8), y),
        "blank": (-torch.ones(k, 1, 8, 8), y),
        "uniform noise": (torch.rand(k, 1, 8, 8, generator=gen) * 2 - 1, y),
        "Gaussian noise": (torch.randn(k, 1, 8, 8, generator=gen), y),
        "30% random ink": (torch.where(torch.rand(k, 1, 8, 8, generator=gen) < 0.3, 1.0, -1.0), y),
        "held-out digit, other prompt": (split.val_images, other_class(split.val_labels, gen)),
        "teacher sample, other prompt": (images, other_class(labels, gen)),
    }
    print("\n| image | gold mean | gold max | proxy mean | below the real median by (real std) |")
    print("|---|---|---|---|---|")
    med, sd = float(np.median(real["gold"])), float(real["gold"].std(ddof=1))
    for name, (x, yy) in degenerate.items():
        d = scores(x, yy)
        print(f"| {name} | {d['gold'].mean():.3f} | {d['gold'].max():.3f} | {d['proxy'].mean():.3f} | "
              f"{(med - d['gold'].max()) / sd:.2f} |")
    g_real, g_t = real["gold"], fake["gold"]
    p90 = float(np.percentile(g_real, 90))
    checks = {
        "teacher_mean_percentile_of_real": float((g_real < g_t.mean()).mean() * 100),
        "real_p90_minus_teacher_mean_in_real_std": (p90 - float(g_t.mean())) / float(g_real.std(ddof=1)),
        "real_p90_minus_teacher_mean_in_teacher_std": (p90 - float(g_t.mean())) / float(g_t.std(ddof=1)),
        "proxy_gold_corr_teacher": float(np.corrcoef(fake["proxy"], fake["gold"])[0, 1]),
        "proxy_gold_corr_heldout_real": float(np.corrcoef(held["proxy"], held["gold"])[0, 1]),
        "proxy_gold_corr_heldout_legible": float(np.corrcoef(held["proxy"][held["legible"]],
                                                             held["gold"][held["legible"]])[0, 1]),
        "proxy_fit_record": entry_record(cache_entry(cfg, kind="proxy", key=proxy_key(cfg)) / WEIGHTS)["info"],
    }
    with torch.no_grad():
        real_lat = setup.codec.encode(split.train_images[:512])
    for name, lat, lab in (("real", real_lat, split.train_labels[:512]), ("teacher", latents[:512], labels[:512])):
        g, _ = exact_latent_grad(x=lat, cond={"labels": lab}, codec=setup.codec, reward=proxy)
        checks[f"proxy_latent_grad_rms_{name}"] = float(g.flatten(1).pow(2).mean(1).sqrt().mean())
    print("\n" + json.dumps(checks, indent=1))
    ok = checks["teacher_mean_percentile_of_real"] < 60 and checks["real_p90_minus_teacher_mean_in_real_std"] >= 1
    print(f"headroom criteria met: {ok}")


if __name__ == "__main__":
    main()

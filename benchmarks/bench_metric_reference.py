"""What a run's sample files look like to the evaluation network, against two reference sets.

For each ``.npz`` sample file given (``twinflow-train sample --n N``: student at each NFE, ``--teacher``), and
for the training digits themselves, prints: FD and KID against the held-out digits (the project's metrics)
and against the training digits (same features), improved precision and recall (k = 3 nearest neighbours,
evaluation features, training digits as the real set), the within-class pixel standard deviation, the share
of saturated pixels (|x| > 0.9) and of pixels outside [-1, 1], and the mean pixel distance to the nearest
training digit. docs/method.md (section 7.1) holds the figures of the vanilla arm::

    twinflow-train fit --config configs/digits.yaml --run-dir D run.steps=1800 eval.n_samples=2000 \
        run.val_every=300
    twinflow-train sample --config D/config.yaml --run-dir D --n 2000 --which final --out S
    twinflow-train sample --config D/config.yaml --run-dir D --n 2000 --teacher --out S
    python benchmarks/bench_metric_reference.py --config D/config.yaml S/*.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinflow_train.assets.auxiliary import get_eval_net  # noqa: E402
from twinflow_train.config import load_config  # noqa: E402
from twinflow_train.data.digits import NUM_CLASSES, load_digits_split  # noqa: E402
from twinflow_train.evaluation.metrics import SampleScorer, frechet_distance  # noqa: E402

K = 3
"""Neighbours of the improved precision/recall balls."""


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float, float]:
    """Improved precision (share of ``fake`` inside some real k-NN ball) and recall (share of ``real`` inside some
    fake k-NN ball), Kynkaanniemi et al. 2019."""
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(fake, real)
    return float((d <= r_real[None]).any(1).double().mean()), float((d.T <= r_fake[None]).any(1).double().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="the run's config.yaml (its evaluation network)")
    ap.add_argument("files", type=Path, nargs="+", help="sample files (.npz with images and labels)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    net = get_eval_net(cfg)
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    held_out = SampleScorer(eval_net=net, reward=None, reference_images=split.val_images)
    training = SampleScorer(eval_net=net, reward=None, reference_images=split.train_images)
    train_feats = torch.from_numpy(training.reference_features).float()
    train_pixels = split.train_images.flatten(1)
    sets = [("training digits", split.train_images, split.train_labels)]
    for p in args.files:
        with np.load(p) as z:
            sets.append((p.name, torch.from_numpy(z["images"]).float(), torch.from_numpy(z["labels"]).long()))
    print("| set | FD held-out | KID held-out (1e-3) | FD training | KID training (1e-3) | precision | recall "
          "| pixel FD held-out | within-class pixel std | share |x|>0.9 | share outside [-1, 1] "
          "| pixel distance to nearest training digit |")
    print("|" + "---|" * 13)
    for name, x, y in sets:
        a, b = held_out.score(x, y), training.score(x, y)
        real = name == "training digits"
        feats = torch.from_numpy(held_out._features(x)).float()
        prec, rec = (float("nan"), float("nan")) if real else precision_recall(train_feats, feats)
        pix_fd = frechet_distance(x.flatten(1).double().numpy(), split.val_images.flatten(1).double().numpy())
        std = np.mean([float(x[y == c].std(0).mean()) for c in range(NUM_CLASSES) if int((y == c).sum()) > 1])
        nn = torch.cdist(x.flatten(1), train_pixels).topk(2 if real else 1, largest=False).values[:, -1]
        print(f"| {name} | {a['fd']:.1f} | {1e3 * a['kid']:.2f} | {b['fd']:.1f} | {1e3 * b['kid']:.2f} "
              f"| {prec:.3f} | {rec:.3f} | {pix_fd:.2f} | {std:.3f} | {float((x.abs() > 0.9).double().mean()):.3f} "
              f"| {float((x.abs() > 1).double().mean()):.4f} | {float(nn.mean()):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

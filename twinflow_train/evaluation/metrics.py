"""Sample metrics: Frechet distance and kernel inception distance in the evaluation network's feature space,
reward, prompt accuracy, and on digits the gold preference score and its learned proxy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ..assets.auxiliary import DigitsReward

SCORE_BATCH = 1024


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; eigenvalues below zero are rounding and clipped to 0."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D].

    ``|mu_a - mu_b|^2 + tr(Ca) + tr(Cb) - 2 tr((Ca^1/2 Cb Ca^1/2)^1/2)``, in float64,
    with unbiased covariances. The cross term uses the symmetric form, whose
    eigenvalues are real and non-negative, so no complex matrix square root is
    needed (the general ``sqrtm(Ca @ Cb)`` picks up imaginary round-off).
    Returns NaN when either set holds a non-finite value, so a diverged
    generator is visible as such rather than as a number.
    """
    a = (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)
    b = (b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two [N, D] arrays with the same D (got {a.shape} and {b.shape})")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 rows per set (got {a.shape[0]} and {b.shape[0]})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric in exact arithmetic; remove round-off asymmetry before eigvalsh
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    # the exact value is >= 0; a tiny negative is cancellation between equal sets
    return max(fd, 0.0)


def _as_float64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x.y / D + 1)^3`` between the rows of ``a`` [N, D] and ``b`` [M, D]: [N, M]."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _off_diagonal_mean(k: np.ndarray) -> float:
    n = k.shape[0]
    return float((k.sum() - np.trace(k)) / (n * (n - 1)))


def kernel_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Kernel inception distance (Binkowski et al. 2018) between feature sets ``a`` [N, D] and ``b`` [M, D].

    The unbiased estimate of the squared maximum mean discrepancy under the cubic polynomial kernel
    (``polynomial_kernel``): ``mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``,
    over all pairs at once (no subsets) in float64. Its expectation is 0 when both sets are drawn from one
    distribution, whatever their sizes, so an estimate may be slightly negative. Returns NaN when either set holds
    a non-finite value.
    """
    a, b = _as_float64(a), _as_float64(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance needs two [N, D] arrays with the same D (got {a.shape} and {b.shape})")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"kernel_distance needs at least 2 rows per set (got {a.shape[0]} and {b.shape[0]})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return (_off_diagonal_mean(polynomial_kernel(a, a)) + _off_diagonal_mean(polynomial_kernel(b, b))
            - 2.0 * float(polynomial_kernel(a, b).mean()))


class SampleScorer:
    """Scores generated images against a fixed reference set of real digits (``eval.reference``).

    Reference features are computed once at construction. ``score`` is
    deterministic: the networks are run in eval mode without randomness.
    """

    def __init__(self, *, eval_net: nn.Module, reward: DigitsReward | None, reference_images: torch.Tensor,
                 extra: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None):
        if not hasattr(eval_net, "features") or not hasattr(eval_net, "logits"):
            raise TypeError(f"eval_net must provide features() and logits() (got {type(eval_net).__name__})")
        if reference_images.shape[0] < 2:
            raise ValueError(f"reference_images needs at least 2 images (got {reference_images.shape[0]})")
        self.eval_net = eval_net.eval()
        self.reward = reward.eval() if reward is not None else None
        self.extra = dict(extra or {})
        """Further per-sample scores ``name -> f(images, labels) -> [B]`` whose means ``score`` reports
        (digits: ``gold`` and ``proxy``)."""
        self.reference_features = self._features(reference_images)
        mu, sd = self.reference_features.mean(0), self.reference_features.std(0)
        if not (sd > 0).all():
            raise ValueError(f"the reference set's features are constant in {int((sd <= 0).sum())} dimensions: "
                             "no scale for the kernel distance")
        self.kid_shift, self.kid_scale = mu, sd
        """The affine map ``(f - shift) / scale`` (reference mean and std per dimension) applied to the features
        before the kernel distance: the cubic kernel's ``1 / D`` scaling assumes features of unit scale."""
        self._kid_reference = self.kid_features(self.reference_features)  # the same for every ``score``

    def _device(self) -> torch.device:
        return next(self.eval_net.parameters()).device

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> np.ndarray:
        dev = self._device()
        out = [self.eval_net.features(images[i:i + SCORE_BATCH].to(dev)).float().cpu()
               for i in range(0, images.shape[0], SCORE_BATCH)]
        return torch.cat(out).numpy().astype(np.float64)

    def kid_features(self, features: np.ndarray) -> np.ndarray:
        """Features as the kernel distance sees them: standardised by the reference set (``kid_shift``,
        ``kid_scale``)."""
        return (features - self.kid_shift) / self.kid_scale

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``fd`` and ``kid`` (``kernel_distance`` on ``kid_features``) to the reference set, ``accuracy`` (eval
        net argmax == prompt) and ``reward`` (mean log p(prompt)), plus the mean of every ``extra`` score under its
        name.

        ``reward`` is present when a reward model was given.
        """
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}] (got {list(labels.shape)})")
        dev = self._device()
        feats, correct, reward_sum = [], 0, 0.0
        sums = {k: 0.0 for k in self.extra}
        for i in range(0, images.shape[0], SCORE_BATCH):
            x, y = images[i:i + SCORE_BATCH].to(dev), labels[i:i + SCORE_BATCH].to(dev)
            f = self.eval_net.features(x)
            feats.append(f.float().cpu())
            correct += int((self.eval_net.logits(x).argmax(-1) == y).sum())
            if self.reward is not None:
                reward_sum += float(self.reward(x, {"labels": y}).double().sum())
            for k, fn in self.extra.items():
                sums[k] += float(fn(x, y).double().sum())
        n = images.shape[0]
        feats_np = torch.cat(feats).numpy()
        out = {"fd": frechet_distance(feats_np, self.reference_features),
               "kid": kernel_distance(self.kid_features(feats_np), self._kid_reference),
               "accuracy": correct / n}
        if self.reward is not None:
            out["reward"] = reward_sum / n
        out.update({k: v / n for k, v in sums.items()})
        return out

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from twinflow_train.assets.auxiliary import DigitsReward, classifier_accuracy, get_eval_net, get_reward_classifier
from twinflow_train.config import ConfigError, load_config
from twinflow_train.data.digits import eval_prompts, load_digits_split
from twinflow_train.data.imaging import save_grid_png, save_samples
from twinflow_train.evaluation.metrics import SampleScorer, frechet_distance, kernel_distance, polynomial_kernel
from twinflow_train.run.setup import reference_images


def gaussian_sample(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n points whose sample mean and (unbiased) sample covariance are exactly ``mean`` and ``cov``."""
    d = mean.shape[0]
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(0)
    white = np.linalg.cholesky(np.cov(x, rowvar=False))
    x = x @ np.linalg.inv(white).T  # sample covariance exactly I
    return x @ np.linalg.cholesky(cov).T + mean


def random_cov(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --------------------------------------------------------------------------- frechet distance


def test_fd_of_a_set_with_itself_is_zero():
    x = gaussian_sample(500, np.zeros(16), random_cov(16, 0), seed=1)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.from_numpy(x).float(), x) == pytest.approx(0.0, abs=1e-4)


def test_fd_grows_with_a_mean_shift_by_exactly_its_squared_norm():
    x = gaussian_sample(400, np.zeros(8), random_cov(8, 2), seed=3)
    direction = np.random.default_rng(4).standard_normal(8)
    direction /= np.linalg.norm(direction)
    values = [frechet_distance(x, x + s * direction) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values == pytest.approx([0.0, 0.25, 1.0, 4.0], abs=1e-8)


def test_fd_matches_the_closed_form_for_two_gaussians():
    d = 12
    m1, m2 = np.random.default_rng(5).standard_normal((2, d))
    c1, c2 = random_cov(d, 6), random_cov(d, 7)
    a, b = gaussian_sample(300, m1, c1, seed=8), gaussian_sample(700, m2, c2, seed=9)
    root = scipy.linalg.sqrtm(c1)
    cross = np.real(scipy.linalg.sqrtm(root @ c2 @ root))
    expected = float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * cross))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)  # symmetric


def test_fd_of_diagonal_gaussians():
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = gaussian_sample(200, np.zeros(3), np.diag(v1), seed=10)
    b = gaussian_sample(200, np.array([1.0, 0.0, 0.0]), np.diag(v2), seed=11)
    expected = 1.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # 1 + 4 + 1 + 0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_handles_rank_deficient_covariances():
    # fewer points than dimensions: singular covariances, still a finite, non-negative value
    a = np.random.default_rng(0).standard_normal((10, 32))
    b = np.random.default_rng(1).standard_normal((10, 32)) + 0.5
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0


def test_fd_bad_inputs():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(x, np.zeros((1, 4)))
    y = np.random.default_rng(0).standard_normal((10, 4))
    y[3, 1] = np.nan
    assert math.isnan(frechet_distance(x + 1, y))  # a diverged sample set is not a number


# --------------------------------------------------------------------------- kernel distance (KID)


def test_kid_matches_a_direct_sum_over_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3
    d = a.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    ab = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)
    assert kernel_distance(b, a) == pytest.approx(kernel_distance(a, b), rel=1e-12)  # symmetric
    assert polynomial_kernel(a, b)[2, 4] == pytest.approx(k(a[2], b[4]), rel=1e-12)
    assert kernel_distance(torch.from_numpy(a).float(), b) == pytest.approx(aa + bb - 2 * ab, rel=1e-5)


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    # small, unequal sets: the biased (V-statistic) estimate would sit clearly above 0 here
    rng = np.random.default_rng(1)
    cov = random_cov(4, 2)
    chol = np.linalg.cholesky(cov)
    draws = [kernel_distance(rng.standard_normal((20, 4)) @ chol.T, rng.standard_normal((50, 4)) @ chol.T)
             for _ in range(400)]
    mean, se = float(np.mean(draws)), float(np.std(draws) / np.sqrt(len(draws)))
    assert abs(mean) < 3 * se, (mean, se)
    assert min(draws) < 0 < max(draws)  # an unbiased estimate of 0 goes both ways
    # the same data, shifted: clearly positive
    shifted = [kernel_distance(rng.standard_normal((20, 4)) @ chol.T + 0.5, rng.standard_normal((50, 4)) @ chol.T)
               for _ in range(50)]
    assert np.mean(shifted) > 10 * se


def test_kid_grows_with_a_mean_shift_and_a_variance_loss():
    x = gaussian_sample(400, np.zeros(8), random_cov(8, 3), seed=4)
    y = gaussian_sample(400, np.zeros(8), random_cov(8, 3), seed=5)
    direction = np.ones(8) / np.sqrt(8)
    shifts = [kernel_distance(x, y + s * direction) for s in (0.0, 0.25, 0.5, 1.0)]
    assert all(a < b for a, b in zip(shifts, shifts[1:])), shifts
    shrunk = [kernel_distance(x, y * f) for f in (1.0, 0.8, 0.5, 0.2)]
    assert all(a < b for a, b in zip(shrunk, shrunk[1:])), shrunk


def test_kid_bad_inputs():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same D"):
        kernel_distance(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        kernel_distance(x, np.zeros((1, 4)))
    y = np.random.default_rng(0).standard_normal((10, 4))
    y[3, 1] = np.inf
    assert math.isnan(kernel_distance(x, y))


# --------------------------------------------------------------------------- sample scorer


@pytest.fixture(scope="module")
def scorer_parts(tmp_path_factory):
    cfg = load_config(None, ["aux.reward_steps=200", "aux.eval_steps=200",
                             f"aux.cache_dir={tmp_path_factory.mktemp('cache')}"])
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    reward = DigitsReward(get_reward_classifier(cfg))
    net = get_eval_net(cfg)
    return SampleScorer(eval_net=net, reward=reward, reference_images=split.val_images), net, reward, split


def test_scorer_reports_fd_reward_and_accuracy(scorer_parts):
    scorer, net, reward, split = scorer_parts
    x, y = split.train_images[:400], split.train_labels[:400]
    s = scorer.score(x, y)
    assert set(s) == {"fd", "kid", "reward", "accuracy"}
    assert s["accuracy"] == pytest.approx(classifier_accuracy(net.logits, x, y))
    with torch.no_grad():
        assert s["reward"] == pytest.approx(float(reward(x, {"labels": y}).mean()), rel=1e-5)
    assert scorer.score(x, y) == s  # deterministic
    # KID: the unbiased estimate on features standardised by the reference set
    feats = scorer._features(x)
    assert s["kid"] == pytest.approx(kernel_distance(scorer.kid_features(feats),
                                                     scorer.kid_features(scorer.reference_features)), rel=1e-9)
    ref_std = scorer.kid_features(scorer.reference_features)
    assert np.allclose(ref_std.mean(0), 0, atol=1e-9) and np.allclose(ref_std.std(0), 1)
    # the reference set itself is at distance ~0 (FD) and below 0 (KID: the cross term holds each image paired
    # with itself, the two within-set terms leave those pairs out);
    # wrong prompts lower reward and accuracy, not FD or KID
    own = scorer.score(split.val_images, split.val_labels)
    assert own["fd"] < 1e-6 and own["kid"] < 0
    wrong = scorer.score(x, (y + 1) % 10)
    assert wrong["fd"] == s["fd"] and wrong["kid"] == s["kid"]
    assert wrong["reward"] < s["reward"] and wrong["accuracy"] < 0.2


def test_scorer_fd_tracks_degradation(scorer_parts):
    scorer, _, _, split = scorer_parts
    x, y = split.train_images[:400], split.train_labels[:400]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    scores = [scorer.score(x + s * noise, y) for s in (0.0, 0.5, 1.0)]
    fds, kids = [m["fd"] for m in scores], [m["kid"] for m in scores]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    blank = scorer.score(-torch.ones(50, 1, 8, 8), eval_prompts(per_class=5))
    assert blank["fd"] > fds[1]


def test_scorer_without_reward_and_nan_samples(scorer_parts):
    _, net, _, split = scorer_parts
    scorer = SampleScorer(eval_net=net, reward=None, reference_images=split.val_images)
    x = split.train_images[:20].clone()
    s = scorer.score(x, split.train_labels[:20])
    assert set(s) == {"fd", "kid", "accuracy"}
    x[0, 0, 0, 0] = float("nan")
    bad = scorer.score(x, split.train_labels[:20])
    assert math.isnan(bad["fd"]) and math.isnan(bad["kid"])
    with pytest.raises(ValueError, match="labels"):
        scorer.score(x, split.train_labels[:19])


# --------------------------------------------------------------------------- sample files


def test_save_samples_writes_the_documented_arrays_and_grid(tmp_path):
    labels = eval_prompts(per_class=4)
    images = torch.linspace(-1.2, 1.2, 40 * 64).reshape(40, 1, 8, 8)  # a little over-range on purpose
    npz, png = save_samples(tmp_path / "samples" / "final-nfe2", images, labels)
    assert npz == tmp_path / "samples" / "final-nfe2.npz" and png == tmp_path / "samples" / "final-nfe2.png"
    with np.load(npz) as f:
        assert set(f.files) == {"images", "labels"}
        assert f["images"].dtype == np.float32 and f["images"].shape == (40, 1, 8, 8)
        assert np.array_equal(f["images"], images.numpy())  # stored as generated, not clipped
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == labels.tolist()
    with Image.open(png) as im:
        # one prompt class per row: 4 columns, 10 rows of 8x8 cells scaled 4x with 1-pixel separators
        assert im.format == "PNG" and im.size == (4 * 33 + 1, 10 * 33 + 1)
        grid = np.asarray(im.convert("RGB"))
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[-2, -2].tolist() == [255, 255, 255]  # clipped for display
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["final-nfe2.npz", "final-nfe2.png"]


def test_save_samples_replaces_files_and_keeps_dots_in_the_stem(tmp_path):
    stem = tmp_path / "teacher.cfg1.5"
    save_samples(stem, torch.zeros(4, 1, 8, 8), torch.arange(4))
    save_samples(stem, torch.ones(4, 1, 8, 8), torch.arange(4))
    with np.load(tmp_path / "teacher.cfg1.5.npz") as f:
        assert (f["images"] == 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.cfg1.5.npz", "teacher.cfg1.5.png"]


def test_grid_marks_non_finite_pixels_red_and_checks_input(tmp_path):
    x = np.zeros((3, 1, 8, 8), dtype=np.float32)
    x[1, 0, 2, 3] = np.nan
    path = save_grid_png(x, tmp_path / "g.png", nrow=3, scale=1)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid[1 + 2, 1 + 9 + 3].tolist() == [255, 0, 0]  # image 1 starts at column 1 + 9
    assert grid[1, 1].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_grid_png(np.zeros((3, 8, 8)), tmp_path / "bad.png", nrow=3)
    with pytest.raises(ValueError, match="labels"):
        save_samples(tmp_path / "bad", torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad.npz").exists()


def test_scorer_refuses_a_reference_with_constant_features():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def features(self, x):  # the second feature is the same for every image: no scale for KID
            return torch.stack([x.flatten(1).mean(1), torch.ones(x.shape[0])], 1)

        def logits(self, x):
            return torch.zeros(x.shape[0], 10)

    images = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    with pytest.raises(ValueError, match="constant in 1 dimensions"):
        SampleScorer(eval_net=Flat(), reward=None, reference_images=images)


@pytest.mark.parametrize("reference", ["train", "held_out"])
def test_eval_reference_picks_the_real_digits_fd_and_kid_compare_with(reference):
    cfg = load_config(None, [f"eval.reference={reference}"])
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    want = split.train_images if reference == "train" else split.val_images
    assert torch.equal(reference_images(cfg, split), want)
    assert load_config(None).eval.reference == "train"  # the default: the distribution the student learns
    with pytest.raises(ConfigError, match="reference"):
        load_config(None, ["eval.reference=val"])

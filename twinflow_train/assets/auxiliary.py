"""Auxiliary networks of the embedded default, trained once and cached by config hash.

Four networks besides the teacher: the latent codec (a tiny autoencoder), the
differentiable reward classifier, an independent evaluation network, and the
proxy reward network that predicts the fixed gold score (``GoldScore``, judged
with the evaluation network) from noisy labels. Each
lives in ``<cache root>/<kind>-<hash>/`` where the hash covers exactly the
settings its weights depend on plus a per-kind format version, so a changed
setting trains a new entry and an unchanged one is reused.

Cache entries are shared by concurrent runs. :func:`train_or_load_file` is the
one way to fill an entry (the teacher uses it too): the first process to ask
takes an ``fcntl.flock`` lock and builds, the others block on the lock and then
load. A payload becomes visible only by ``os.replace`` of a fsynced temp file,
and only counts as complete once a checksum record written after it exists. A
payload that does not match its record is never loaded: ``train_or_load_file``
sets it aside (``<name>.corrupt-<time>``, with its record, kept as evidence) and
builds the entry again, saying so on stderr.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config, config_hash, to_dict
from ..data.digits import NUM_CLASSES, DigitsSplit, load_digits_split
from ..distributed.safeload import load_data
from ..models.base import Cond
from ..models.codecs import (Codec, DigitsAutoencoder, IdentityCodec, fit_autoencoder, reconstruction_mse,
                             single_thread)
from ..progress import progress_range
from ..rundir import atomic_path, file_digest

CacheKind = Literal["codec", "reward", "evalnet", "teacher", "proxy", "teachermetrics"]

FORMAT_VERSIONS: dict[str, int] = {
    "codec": 1,
    "reward": 1,
    "evalnet": 2,  # 2: shift-only augmentation (1 also added pixel noise, which blunted FD to noisy samples)
    "teacher": 2,  # 2: fused AdamW, warm-up + cosine to 1% (teacher.warmup_steps), EMA cap teacher.ema_decay
    "proxy": 1,  # the gold score it is fitted to is in its key (gold_key, GOLD_VERSION)
    "teachermetrics": 1,  # the teacher's step-0 metrics (evaluation/teacher_cache.py); its key holds the code's hash
}
"""Per-kind format version, part of every entry's hash. Bump a kind's number when
its architecture, training recipe or file layout changes in code (anything its
config key does not capture), so old entries are not reused by new code."""

CACHE_ENV = "TWINFLOW_LAB_CACHE"
WEIGHTS = "weights.pt"

# Fixed recipe of the classifiers (covered by FORMAT_VERSIONS, not by the config)
CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 2e-3
REWARD_NOISE_MAX = 0.3
"""Largest std of the Gaussian pixel noise added while training the reward classifier (data range is 2)."""
EVAL_FEATURES = 32
"""Width of the evaluation network's feature layer (the FD space)."""


class CacheCorruptError(RuntimeError):
    """A cache entry whose payload does not match its checksum record."""


# --------------------------------------------------------------------------- locations


def cache_root(cfg: Config) -> Path:
    """``aux.cache_dir``, else ``$TWINFLOW_LAB_CACHE``, else ``~/.cache/twinflow-lab``."""
    if cfg.aux.cache_dir is not None:
        return Path(cfg.aux.cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "twinflow-lab"


def cache_entry(cfg: Config, *, kind: CacheKind, key: Mapping[str, Any]) -> Path:
    """Directory ``<root>/<kind>-<hash>`` of the entry for ``key`` (not created here).

    The hash covers ``key`` and the kind's format version; ``key`` must hold
    every setting the entry's content depends on, and nothing else (settings
    that do not change the weights would only cause needless retraining).
    """
    if kind not in FORMAT_VERSIONS:
        raise ValueError(f"unknown cache kind {kind!r}; valid kinds: {', '.join(FORMAT_VERSIONS)}")
    digest = config_hash({"kind": kind, "format": FORMAT_VERSIONS[kind], "key": dict(key)})
    return cache_root(cfg) / f"{kind}-{digest}"


# --------------------------------------------------------------------------- entries


def record_path(path: Path) -> Path:
    """The checksum record that marks ``path`` complete."""
    return path.with_name(path.name + ".done.json")


def is_complete(path: Path) -> bool:
    """True when ``path`` and its record exist and agree; False when the record is missing.

    A payload without a record is the leftover of a writer that died between the
    two renames: it is rebuilt (under the lock), never loaded.
    """
    rec = record_path(path)
    if not rec.is_file():
        return False
    try:
        meta = json.loads(rec.read_text())
        expected, size = meta["sha256"], int(meta["bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise CacheCorruptError(f"cache record {rec} is unreadable ({e})") from None
    if not path.is_file():
        raise CacheCorruptError(f"cache record {rec} exists but its payload {path} is missing")
    actual_size = path.stat().st_size
    if actual_size != size or file_digest(path) != expected:
        raise CacheCorruptError(f"cache payload {path} does not match its record {rec} "
                                f"({actual_size} bytes, expected {size} with sha256 {expected[:12]}...)")
    return True


def _set_aside(path: Path, *, why: str) -> None:
    """Move a corrupt payload and its record out of the way (kept, not deleted), under the entry's lock."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for p in (path, record_path(path)):
        if p.exists():
            os.replace(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
    print(f"{why}; set aside as {path.name}.corrupt-{stamp} and rebuilding the entry", file=sys.stderr, flush=True)


def entry_record(path: str | Path) -> dict[str, Any]:
    """The record of a complete entry: sha256, bytes, created, pid, host, key, info."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"cache entry {path} is not complete (no record {record_path(path)})")
    return json.loads(record_path(path).read_text())


def train_or_load_file(path: str | Path, make: Callable[[Path], Mapping[str, Any] | None], *,
                       key: Mapping[str, Any] | None = None) -> Path:
    """Return ``path`` once it holds a complete payload, building it with ``make`` if needed.

    ``make(tmp)`` writes the payload to the temp file ``tmp`` (e.g. with
    ``torch.save``) and may return a JSON-able dict of facts about the build
    (timings, accuracies) kept in the record with ``key``. Process-safe: among
    processes asking for the same ``path`` at once, exactly one runs ``make``;
    the others wait on the lock file ``<path>.lock`` and then use its result.
    Build exceptions propagate and leave no payload behind. A payload that does
    not match its record is set aside and rebuilt, never loaded.
    """
    path = Path(path)
    try:
        if is_complete(path):  # records are written last and never rewritten: safe without the lock
            return path
    except CacheCorruptError:
        pass  # set aside and rebuilt below, under the lock
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to build {path}", file=sys.stderr, flush=True)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            try:
                if is_complete(path):
                    return path
            except CacheCorruptError as e:
                _set_aside(path, why=str(e))
            started = time.time()
            with atomic_path(path) as tmp:
                info = make(tmp)
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise RuntimeError(f"the builder of {path} wrote nothing to {tmp}")
                digest, size = file_digest(tmp), tmp.stat().st_size
            record = {"sha256": digest, "bytes": size, "created": time.time(), "build_seconds": time.time() - started,
                      "pid": os.getpid(), "host": socket.gethostname(),
                      "key": dict(key) if key is not None else None, "info": dict(info) if info else None}
            with atomic_path(record_path(path)) as tmp:
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path


def train_or_load(path: str | Path, *, build: Callable[[], nn.Module],
                  train: Callable[[nn.Module], Mapping[str, Any] | None],
                  key: Mapping[str, Any] | None = None) -> nn.Module:
    """Module weights cached at ``path``: built and trained once, loaded everywhere else.

    ``build()`` makes a fresh module (its initial weights do not matter when
    loading); ``train(module)`` trains it in place and may return facts for the
    record. Every caller, the one that trained included, gets ``build()`` with
    the saved state loaded, so all processes hold bit-identical weights.
    """
    def make(tmp: Path) -> Mapping[str, Any] | None:
        module = build()
        info = train(module)
        torch.save(module.state_dict(), tmp)
        return info

    path = train_or_load_file(path, make, key=key)
    module = build()
    module.load_state_dict(load_data(path))  # data only: a cache entry that would run code is refused
    return module


def _seeded_build(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with its initial weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)  # inputs still get gradients; the weights are never trained further
    return module


def _split_key(cfg: Config) -> dict[str, Any]:
    return {"dataset": "digits", "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed}


def _split(cfg: Config) -> DigitsSplit:
    return load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)


# --------------------------------------------------------------------------- codec


def codec_key(cfg: Config) -> dict[str, Any]:
    c = to_dict(cfg.codec)
    c.pop("path")  # the pretrained location of other codecs; the autoencoder is trained here
    return {"codec": c, "data": _split_key(cfg)}


def get_codec(cfg: Config) -> Codec:
    """The latent codec of ``cfg.codec``: trained and cached for ``autoencoder``; frozen, in eval mode."""
    kind = cfg.codec.kind
    if kind == "identity":
        return _frozen(IdentityCodec())
    if kind == "qwen_vae":
        raise ValueError("codec.kind 'qwen_vae' is provided by the Qwen scale path module "
                         "twinflow_train.models.qwen_vae, not by the digits auxiliaries")
    if kind != "autoencoder":
        raise ValueError(f"unknown codec.kind {kind!r}; valid: 'autoencoder', 'identity', 'qwen_vae'")
    c = cfg.codec
    key = codec_key(cfg)
    split = _split(cfg)

    def build() -> nn.Module:
        return _seeded_build(c.seed, lambda: DigitsAutoencoder(latent_channels=c.latent_channels, hidden=c.hidden))

    def train(model: nn.Module) -> dict[str, Any]:
        assert isinstance(model, DigitsAutoencoder)
        t0, cpu0 = time.perf_counter(), time.process_time()
        fit_autoencoder(model, split.train_images, steps=c.steps, lr=c.lr, seed=c.seed)
        info = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}
        with single_thread():
            return info | {"val_mse": reconstruction_mse(model, split.val_images)}

    path = cache_entry(cfg, kind="codec", key=key) / WEIGHTS
    return _frozen(train_or_load(path, build=build, train=train, key=key))  # type: ignore[return-value]


# --------------------------------------------------------------------------- classifiers


class DigitsMLPClassifier(nn.Module):
    """The reward model: an MLP on the 64 pixels (a different family from the evaluation CNN)."""

    def __init__(self, *, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "DigitsMLPClassifier")
        return self.net(images.float())


class DigitsConvNet(nn.Module):
    """The evaluation network: a small CNN whose pre-activation penultimate layer is the FD feature space."""

    def __init__(self, *, width: int = 32, features: int = EVAL_FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width // 2, width, 2, stride=2), nn.SiLU(),      # 8x8 -> 4x4
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Flatten(),
        )
        # linear features: FD assumes Gaussian features, which activations clipped by a nonlinearity are not
        self.feature = nn.Linear(width * 16, features)
        self.head = nn.Linear(features, NUM_CLASSES)
        self.feature_dim = features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "DigitsConvNet")
        return self.feature(self.body(images.float()))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


def _check_images(images: torch.Tensor, who: str) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{who}: expected digits images [B, 1, 8, 8], got {list(images.shape)}")


def random_shift(images: torch.Tensor, generator: torch.Generator, *, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    b, _, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p), value=-1.0)[:, 0]
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols].unsqueeze(1)


def _fit_minibatches(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int,
                     lr: float, batch: int, desc: str, progress: bool | None,
                     batch_loss: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]) -> None:
    """The auxiliaries' training loop: random mini-batches from one seeded generator, AdamW, cosine decay to 2%
    of ``lr``, one thread. ``batch_loss(x, y, gen)`` augments the batch with ``gen`` and returns the loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)
    n = images.shape[0]
    model.train()
    with single_thread():
        for _ in progress_range(steps, desc=desc, progress=progress):
            idx = torch.randint(0, n, (min(batch, n),), generator=gen)
            loss = batch_loss(images[idx], labels[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def fit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int,
                   noise_max: float, shift: bool, desc: str, progress: bool | None = None) -> None:
    """Cross-entropy with optional pixel-noise and 1-pixel-shift augmentation, AdamW, cosine decay.

    The noise std is drawn per sample in [0, noise_max].
    """
    def batch_loss(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if shift:
            x = random_shift(x, gen)
        if noise_max > 0:
            sigma = noise_max * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
            x = x + sigma * torch.randn(x.shape, generator=gen)
        return F.cross_entropy(model(x), y)

    _fit_minibatches(model, images, labels, steps=steps, seed=seed, lr=CLASSIFIER_LR, batch=CLASSIFIER_BATCH,
                     desc=desc, progress=progress, batch_loss=batch_loss)


@torch.no_grad()
def classifier_accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        labels: torch.Tensor, *, batch: int = 1024) -> float:
    """Share of ``images`` whose argmax logit equals ``labels``."""
    correct = 0
    for i in range(0, images.shape[0], batch):
        correct += int((logits_fn(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
    return correct / images.shape[0]


def _classifier_info(logits_fn: Callable[[torch.Tensor], torch.Tensor], split: DigitsSplit,
                     t0: float, cpu0: float) -> dict[str, Any]:
    info = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}
    with single_thread():
        return info | {"val_accuracy": classifier_accuracy(logits_fn, split.val_images, split.val_labels)}


def reward_key(cfg: Config) -> dict[str, Any]:
    return {"steps": cfg.aux.reward_steps, "seed": cfg.aux.reward_seed, "data": _split_key(cfg)}


def eval_key(cfg: Config) -> dict[str, Any]:
    return {"steps": cfg.aux.eval_steps, "seed": cfg.aux.eval_seed, "data": _split_key(cfg)}


def get_reward_classifier(cfg: Config) -> DigitsMLPClassifier:
    """The reward's digit classifier (MLP, seed ``aux.reward_seed``, ``aux.reward_steps``); frozen."""
    seed, steps = cfg.aux.reward_seed, cfg.aux.reward_steps
    split = _split(cfg)

    def train(model: nn.Module) -> dict[str, Any]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        # noise: generated digits are imperfect, and a classifier that has only seen clean
        # strokes has flat or erratic input gradients on them, useless as a reward signal
        fit_classifier(model, split.train_images, split.train_labels, steps=steps, seed=seed,
                       noise_max=REWARD_NOISE_MAX, shift=False, desc="reward classifier")
        return _classifier_info(model, split, t0, cpu0)

    key = reward_key(cfg)
    path = cache_entry(cfg, kind="reward", key=key) / WEIGHTS
    model = train_or_load(path, build=lambda: _seeded_build(seed, DigitsMLPClassifier), train=train, key=key)
    return _frozen(model)  # type: ignore[return-value]


def get_eval_net(cfg: Config) -> DigitsConvNet:
    """The evaluation network (CNN, seed ``aux.eval_seed``, ``aux.eval_steps``); frozen.

    Another architecture family, seed and augmentation than the reward model,
    so that samples optimised against the reward do not automatically look
    better to this judge. Trained with 1-pixel shifts but no pixel noise:
    measured on the default split, the FD to the held-out set of 1,000 training
    digits with added noise of std 0.4 is 3.1x their clean FD with this recipe,
    1.75x when the net had also been trained on noise.
    """
    seed, steps = cfg.aux.eval_seed, cfg.aux.eval_steps
    split = _split(cfg)

    def train(model: nn.Module) -> dict[str, Any]:
        assert isinstance(model, DigitsConvNet)
        t0, cpu0 = time.perf_counter(), time.process_time()
        # shifts, no noise: features invariant to pixel noise would let noisy samples look real to FD
        fit_classifier(model, split.train_images, split.train_labels, steps=steps, seed=seed,
                       noise_max=0.0, shift=True, desc="evaluation net")
        return _classifier_info(model.logits, split, t0, cpu0)

    key = eval_key(cfg)
    path = cache_entry(cfg, kind="evalnet", key=key) / WEIGHTS
    model = train_or_load(path, build=lambda: _seeded_build(seed, DigitsConvNet), train=train, key=key)
    return _frozen(model)  # type: ignore[return-value]


class DigitsReward(nn.Module):
    """Reward ``R(images, prompts)``: log-probability of the prompted class under the reward classifier.

    Differentiable in ``images`` (the classifier's weights are frozen), one value
    per row. Prompts are ``{"labels": int64 [B]}`` with classes 0..9; the null
    prompt has no class and is rejected.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = _frozen(classifier)

    def forward(self, images: torch.Tensor, prompts: Cond) -> torch.Tensor:
        labels = _checked_labels(images, prompts, "DigitsReward")
        logp = F.log_softmax(self.classifier(images).float(), dim=-1)
        return logp.gather(1, labels.long().view(-1, 1)).squeeze(1)


# --------------------------------------------------------------------------- gold score and its learned proxy
#
# The digits stand-in for a human-preference reward. The *gold* score is a fixed,
# hand-written function of the image and its prompt (the "true preference", never
# trained on); the *proxy* is a small network fitted to noisy gold labels on the
# training split (the "learned preference model", like HPSv2 is to human raters). RL
# optimises the proxy; evaluation reports both, and the gap between the proxy's gain
# and the gold's gain is the over-optimisation (reward hacking) of a run.

GOLD_VERSION = 2
"""Version of the gold score's definition, part of the proxy's cache key (its training targets). 2: gated by the
legibility of the prompted class (judge probability x realism) and ink bounded to the real range; 1 was the plain
mean of the stroke-weight and centring z-scores, which an all-ink image maximised."""
GOLD_CENTRE = 3.5
"""Pixel coordinate of the 8x8 image centre."""
PROXY_LABEL_NOISE = 0.5
"""Std of the Gaussian label noise of the proxy's training targets, in units of the gold score's std on the
training split (noisy raters)."""
PROXY_NOISE_MAX = 0.3
"""Largest std of the pixel noise of the proxy's training images (as the reward classifier's)."""
PROXY_HIDDEN = 128
PROXY_LR = 2e-3
PROXY_BATCH = 64


def _ink(images: torch.Tensor) -> torch.Tensor:
    """Ink in [0, 1] per pixel ``[B, 8, 8]``: the [-1, 1] image clamped to the valid range and rescaled."""
    _check_images(images, "gold score")
    return (images[:, 0].float().clamp(-1.0, 1.0) + 1.0) * 0.5


def stroke_weight(images: torch.Tensor) -> torch.Tensor:
    """Mean ink per image ``[B]`` in [0, 1] (share of the 8x8 square covered, grey levels counted fractionally)."""
    return _ink(images).mean(dim=(1, 2))


def centring(images: torch.Tensor) -> torch.Tensor:
    """Minus the distance (pixels) of the ink's centre of mass from the image centre ``[B]``; 0 = centred."""
    p = _ink(images)
    ax = torch.arange(8, dtype=p.dtype, device=p.device) - GOLD_CENTRE
    mass = p.sum(dim=(1, 2)).clamp_min(1e-6)  # an empty image has no centre: it scores as centred at distance 0
    cy = (p.sum(dim=2) * ax).sum(dim=1) / mass
    cx = (p.sum(dim=1) * ax).sum(dim=1) / mass
    return -torch.sqrt(cx * cx + cy * cy + 1e-12)


GOLD_STROKE = (0.305, 0.034)
"""(mean, std) of ``stroke_weight`` over the default training split (1,618 digits), rounded: fixed constants."""
GOLD_STROKE_CAP = 0.386
"""99th percentile of ``stroke_weight`` over the default training split: more ink than this earns nothing."""
GOLD_OVERINK_SLOPE = 2.0
"""Beyond the cap, each stroke-weight standard deviation of extra ink costs this many (twice what it earned)."""
GOLD_CENTRING = (-0.421, 0.258)
"""(mean, std) of ``centring`` over the default training split, rounded: fixed constants."""
GOLD_REAL_DISTANCE = (1.67, 2.50)
"""Realism ramp (ink L2 distance to the nearest training digit of the prompted class, 1-pixel shifts allowed):
full realism up to the first value (the 99th percentile of that distance among training digits, each left out of
its own reference; held-out digits: at most 1.77), none from the second (blank, all-ink and noise images lie at
2.65 and beyond)."""
GOLD_FLOOR = -4.0
"""Gold of an image that is not a legible digit of the prompted class (legibility 0); below every real digit's
attribute score (training split: lowest -2.5, median 0.02, std 0.77)."""


def ink_z(images: torch.Tensor) -> torch.Tensor:
    """The stroke-weight z-score bounded to the real range ``[B]``: linear up to ``GOLD_STROKE_CAP``, then falling
    ``GOLD_OVERINK_SLOPE`` times as fast (an all-ink image: about -34)."""
    z = (stroke_weight(images) - GOLD_STROKE[0]) / GOLD_STROKE[1]
    cap = (GOLD_STROKE_CAP - GOLD_STROKE[0]) / GOLD_STROKE[1]
    return torch.where(z <= cap, z, cap - GOLD_OVERINK_SLOPE * (z - cap))


def attribute_score(images: torch.Tensor) -> torch.Tensor:
    """``(ink_z + z_centring) / 2`` ``[B]``: a bold (within the real range), centred image scores high; at most
    about 2.0. The prompt does not enter; the gold score gates it by legibility."""
    z_centre = (centring(images) - GOLD_CENTRING[0]) / GOLD_CENTRING[1]
    return 0.5 * (ink_z(images) + z_centre)


def gold_key(cfg: Config) -> dict[str, Any]:
    """What the gold score depends on besides code: its version, the judge's entry and the reference split."""
    return {"version": GOLD_VERSION, "judge": eval_key(cfg), "judge_format": FORMAT_VERSIONS["evalnet"],
            "reference": _split_key(cfg)}


class GoldScore(nn.Module):
    """The fixed gold preference score ``g(image, prompt)`` ``[B]``: a legible, bold, centred digit of the prompted
    class scores high; anything else scores near ``GOLD_FLOOR``.

    ``a = attribute_score(image)`` (bounded ink and centring, in real standard deviations), ``p`` the judge's
    (evaluation network's) probability of the prompted class, ``r`` the realism ramp on the ink distance to the
    nearest training digit of that class (``GOLD_REAL_DISTANCE``), legibility ``L = p * r`` and
    ``g = GOLD_FLOOR + L * (max(a, GOLD_FLOOR) - GOLD_FLOOR)``. Pixels are clamped to [-1, 1] first
    (``_ink``), so ink pushed past the valid range earns nothing. Never trained on; see docs/reward.md.
    The judge is frozen and the reference digits fixed by the split: ``gold_key`` names both.
    """

    def __init__(self, judge: nn.Module, reference_images: torch.Tensor, reference_labels: torch.Tensor):
        super().__init__()
        self.judge = _frozen(judge)
        ink = F.pad(_ink(reference_images), (1, 1, 1, 1), value=0.0)
        shifted = torch.stack([ink[:, 1 + dy:9 + dy, 1 + dx:9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)
        self.register_buffer("ref_ink", shifted.flatten(2).reshape(-1, 64).contiguous(), persistent=False)
        self.register_buffer("ref_labels", reference_labels.long().repeat_interleave(9), persistent=False)

    def real_distance(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Ink L2 distance ``[B]`` to the nearest reference digit of each row's class (or a 1-pixel shift of one)."""
        ink = _ink(images).flatten(1)
        out = torch.full((ink.shape[0],), float("inf"), device=ink.device)
        for c in labels.unique().tolist():
            rows = labels == c
            ref = self.ref_ink[self.ref_labels == c]
            if ref.shape[0] == 0:
                raise ValueError(f"gold score: the reference digits have no class {c}")
            out[rows] = torch.cdist(ink[rows], ref).min(dim=1).values
        return out

    @torch.no_grad()
    def parts(self, images: torch.Tensor, prompts: Cond) -> dict[str, torch.Tensor]:
        """Every term of the score per row: attributes, judge probability, distance, realism, legibility, gold."""
        labels = _checked_labels(images, prompts, "GoldScore")
        a = attribute_score(images)
        p = F.softmax(self.judge(images.float()).float(), dim=-1).gather(1, labels.long().view(-1, 1)).squeeze(1)
        d = self.real_distance(images, labels)
        lo, hi = GOLD_REAL_DISTANCE
        r = ((hi - d) / (hi - lo)).clamp(0.0, 1.0)
        legible = p * r
        gold = GOLD_FLOOR + legible * (a.clamp_min(GOLD_FLOOR) - GOLD_FLOOR)
        return {"attributes": a, "judge_prob": p, "real_distance": d, "realism": r, "legibility": legible,
                "gold": gold}

    def forward(self, images: torch.Tensor, prompts: Cond) -> torch.Tensor:
        return self.parts(images, prompts)["gold"]


def get_gold_score(cfg: Config, *, judge: nn.Module | None = None) -> GoldScore:
    """The gold score of ``cfg``: the cached evaluation network as judge (``judge`` if given: the same network,
    already loaded) and the training split as reference digits."""
    split = _split(cfg)
    return GoldScore(get_eval_net(cfg) if judge is None else judge, split.train_images, split.train_labels)


class DigitsProxyNet(nn.Module):
    """The proxy reward model: an MLP on the 64 pixels and the one-hot prompt class, one scalar out."""

    def __init__(self, *, hidden: int = PROXY_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64 + NUM_CLASSES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_images(images, "DigitsProxyNet")
        onehot = F.one_hot(labels.long(), NUM_CLASSES).to(torch.float32)
        return self.net(torch.cat([images.float().flatten(1), onehot], dim=1)).squeeze(1)


def proxy_key(cfg: Config) -> dict[str, Any]:
    return {"steps": cfg.aux.proxy_steps, "seed": cfg.aux.proxy_seed, "data": _split_key(cfg), "gold": gold_key(cfg)}


def other_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn class different from each row's label ``[B]``."""
    return (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=generator)) % NUM_CLASSES


def fit_proxy(model: DigitsProxyNet, images: torch.Tensor, labels: torch.Tensor, *, gold: GoldScore, steps: int,
              seed: int, label_std: float, progress: bool | None = None) -> None:
    """MSE regression on noisy gold labels: 1-pixel shifts and pixel noise (std up to PROXY_NOISE_MAX) on the
    inputs, the gold score of the augmented image under its own class plus Gaussian label noise of std
    ``label_std`` as target. Only true prompts: mixing in a quarter of rows prompted with another class taught it
    the prompt but cut its held-out correlation on legible digits from 0.96 to 0.81 (docs/reward.md)."""
    def batch_loss(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = random_shift(x, gen)
        sigma = PROXY_NOISE_MAX * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
        x = x + sigma * torch.randn(x.shape, generator=gen)
        target = gold(x, {"labels": y}) + label_std * torch.randn(x.shape[0], generator=gen)
        return F.mse_loss(model(x, y), target)

    _fit_minibatches(model, images, labels, steps=steps, seed=seed, lr=PROXY_LR, batch=PROXY_BATCH,
                     desc="proxy reward", progress=progress, batch_loss=batch_loss)


@torch.no_grad()
def proxy_fit_report(model: DigitsProxyNet, images: torch.Tensor, labels: torch.Tensor, *,
                     gold: GoldScore) -> dict[str, float]:
    """How well the proxy tracks the gold score on clean images: correlation and RMSE under the true prompts (all
    images, and the legible ones: legibility above 1/2), and the mean gold, mean proxy and RMSE under a prompt of
    another class (a fixed draw)."""
    with single_thread():
        p = model(images, labels).double()
        parts = gold.parts(images, {"labels": labels})
        g = parts["gold"].double()
        wrong = other_class(labels, torch.Generator().manual_seed(0))
        pw = model(images, wrong).double()
        gw = gold(images, {"labels": wrong}).double()
    corr = float(torch.corrcoef(torch.stack([p, g]))[0, 1])
    legible = parts["legibility"] > 0.5
    corr_legible = float(torch.corrcoef(torch.stack([p[legible], g[legible]]))[0, 1])
    return {"corr": corr, "rmse": float((p - g).pow(2).mean().sqrt()), "gold_std": float(g.std()),
            "legible_share": float(legible.double().mean()), "corr_legible": corr_legible,
            "wrong_prompt_gold_mean": float(gw.mean()), "wrong_prompt_proxy_mean": float(pw.mean()),
            "wrong_prompt_rmse": float((pw - gw).pow(2).mean().sqrt())}


def get_proxy_net(cfg: Config) -> DigitsProxyNet:
    """The proxy reward network (seed ``aux.proxy_seed``, ``aux.proxy_steps``), trained on the training split
    only, cached like the other auxiliaries (its key names the gold score it was fitted to); frozen."""
    seed, steps = cfg.aux.proxy_seed, cfg.aux.proxy_steps
    split = _split(cfg)

    def train(model: nn.Module) -> dict[str, Any]:
        assert isinstance(model, DigitsProxyNet)
        gold = get_gold_score(cfg)
        t0, cpu0 = time.perf_counter(), time.process_time()
        with single_thread():
            gold_std = float(gold(split.train_images, {"labels": split.train_labels}).std())
        fit_proxy(model, split.train_images, split.train_labels, gold=gold, steps=steps, seed=seed,
                  label_std=PROXY_LABEL_NOISE * gold_std)
        info = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}
        fit = proxy_fit_report(model, split.val_images, split.val_labels, gold=gold)
        return info | {f"val_{k}": v for k, v in fit.items()}

    key = proxy_key(cfg)
    path = cache_entry(cfg, kind="proxy", key=key) / WEIGHTS
    model = train_or_load(path, build=lambda: _seeded_build(seed, DigitsProxyNet), train=train, key=key)
    return _frozen(model)  # type: ignore[return-value]


class DigitsProxyReward(nn.Module):
    """Reward ``R(images, prompts)``: the proxy network's estimate of the gold score; differentiable in ``images``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = _frozen(net)

    def forward(self, images: torch.Tensor, prompts: Cond) -> torch.Tensor:
        labels = _checked_labels(images, prompts, "DigitsProxyReward")
        return self.net(images, labels).float()


def _checked_labels(images: torch.Tensor, prompts: Cond, who: str) -> torch.Tensor:
    if "labels" not in prompts:
        raise KeyError(f"{who} needs prompts['labels']; got keys {sorted(prompts)}")
    labels = prompts["labels"]
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{who}: prompts['labels'] has shape {list(labels.shape)}, "
                         f"expected [{images.shape[0]}] (one class per image)")
    if labels.numel():
        # one host sync, but an out-of-range class would otherwise index silently (CPU) or assert (CUDA)
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < 0 or hi >= NUM_CLASSES:
            raise ValueError(f"{who}: prompt classes must be in [0, {NUM_CLASSES}) "
                             f"(got min {lo}, max {hi}; the null prompt has no reward)")
    return labels

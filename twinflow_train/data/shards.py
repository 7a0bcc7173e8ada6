"""Pre-encoded latent shards (written by ``twinflow-train encode``) as trainer data.

Batches never mix buckets (every row of a batch has the same latent size). The
reference bucket (most latent tokens) gets ``data.batch_size`` rows per optimizer
step; a bucket with fewer tokens gets ``batch_size * floor(ref_tokens / tokens)``
rows, so tokens (and activation memory) per batch stay at or below the reference
while every per-bucket batch still splits evenly into ranks x accumulation steps.

Order: epochs over the training rows. Epoch ``e`` permutes each bucket's rows
(seeded by ``(seed, e, bucket)``), cuts them into full batches, and shuffles the list
of (bucket, batch) pairs (seeded by ``(seed, e)``); optimizer step ``k`` takes entry
``k - 1`` of that sequence. A step's rows depend only on (seed, step), so 2 ranks see
exactly the rows of 1 rank with 2 accumulation micro-batches, and resume is exact
without a sampler state. A bucket with fewer training rows than its batch draws its
batch with replacement (one batch per epoch).

Validation: the last ``round(val_fraction * n)`` rows of each bucket's permutation
(seeded by ``split_seed``) are held out, so every bucket is represented in proportion.

Prompt embeddings are stored unpadded; a batch is zero-padded (mask False) to its
longest prompt, and at least to the empty prompt's length so the null condition fits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models.base import Cond
from .batches import step_generator

_SPLIT, _EPOCH_PLAN, _EPOCH_ROWS = 0x5917, 0xE90C, 0x20E5


def _manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"data.shards: {root} has no manifest.json (not written by `twinflow-train encode`?)")
    m = json.loads(path.read_text())
    if m.get("format") != "twinflow-latent-shards" or m.get("version") != 1:
        raise ValueError(f"{path}: unknown shard format {m.get('format')!r} version {m.get('version')!r}")
    return m


def read_null_prompt(root: str | Path) -> torch.Tensor:
    """The empty prompt's [L0, D] embedding stored with the shards."""
    from safetensors.torch import load_file  # lazy: optional dependency safetensors (the qwen extra)

    m = _manifest(root)
    return load_file(str(Path(root) / m["null_prompt"]))["prompt_embeds"].float()


def reference_latent_shape(root: str | Path) -> tuple[int, int, int]:
    """The latent shape of the bucket with the most tokens (ties: more rows, then the name), read from the
    manifest alone: the shape a model for these shards is built with."""
    buckets = _manifest(root)["buckets"]
    if not buckets:
        raise ValueError(f"{root}: the manifest lists no buckets")
    ref = max(buckets, key=lambda b: (b["latent_shape"][1] * b["latent_shape"][2], b["rows"], b["name"]))
    return tuple(ref["latent_shape"])


@dataclass
class Bucket:
    name: str
    latent_shape: tuple[int, int, int]
    files: list[Path]
    file_rows: list[int]
    captions: list[str]
    train: torch.Tensor  # row ids (into this bucket) of the training split
    val: torch.Tensor
    batch: int  # global rows per optimizer step

    @property
    def tokens(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)


class LatentShardData:
    """The ``TrainData`` protocol over a shard directory."""

    def __init__(self, root: str | Path, *, batch_size: int, grad_accum: int, seed: int, val_fraction: float,
                 split_seed: int, device: torch.device | str = "cpu",
                 caption_tokens: tuple[str, Callable[[list[str]], torch.Tensor]] | None = None):
        """``caption_tokens``: (condition key, tokenizer) adding each row's tokenised caption to its condition
        (the HPSv2 reward scores the prompt's text: ``hps_tokens``)."""
        self.root = Path(root)
        self.caption_tokens = caption_tokens
        self.manifest = _manifest(self.root)
        self.seed = seed
        self.device = torch.device(device)
        self.grad_accum = grad_accum
        self.null_tokens = int(self.manifest["null_prompt_tokens"])
        self.text_dim = int(self.manifest["text_dim"])
        self._handles: dict[Path, object] = {}
        self._plan: tuple[int, list[tuple[int, int]], list[torch.Tensor]] | None = None
        buckets = []
        for i, b in enumerate(sorted(self.manifest["buckets"], key=lambda b: b["name"])):
            files = [self.root / f["path"] for f in b["files"]]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{self.root}/manifest.json lists {f}, which does not exist")
            captions: list[str] = []
            for f in files:
                captions += [r["caption"] for r in json.loads(f.with_suffix(".json").read_text())]
            n = int(b["rows"])
            if len(captions) != n:
                raise ValueError(f"{self.root}: bucket {b['name']} lists {n} rows but its files hold {len(captions)}")
            perm = torch.randperm(n, generator=step_generator(split_seed, _SPLIT, i))
            n_val = int(math.floor(val_fraction * n + 0.5)) if n > 1 else 0
            buckets.append(Bucket(name=b["name"], latent_shape=tuple(b["latent_shape"]), files=files,
                                  file_rows=[int(f["rows"]) for f in b["files"]], captions=captions,
                                  train=perm[: n - n_val].sort().values, val=perm[n - n_val:].sort().values, batch=0))
        if not buckets:
            raise ValueError(f"{self.root}: the manifest lists no buckets")
        if sum(len(b.val) for b in buckets) == 0:
            raise ValueError(f"{self.root}: too few rows for a validation split at data.val_fraction={val_fraction}")
        ref = max(buckets, key=lambda b: (b.tokens, len(b.train), b.name))
        for b in buckets:
            b.batch = batch_size * max(1, ref.tokens // b.tokens)
        self.buckets = [b for b in buckets if len(b.train)]
        self.val_buckets = [b for b in buckets if len(b.val)]
        self.reference = ref
        # a pure validation bucket has no training batches; the reference shape is still its shape
        self.latent_shape: tuple[int, int, int] = ref.latent_shape

    # ---- reading rows

    def _handle(self, path: Path):
        from safetensors import safe_open  # lazy: optional dependency safetensors (the qwen extra)

        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt")
        return h

    def _locate(self, bucket: Bucket, row: int) -> tuple[Path, int]:
        for f, n in zip(bucket.files, bucket.file_rows):
            if row < n:
                return f, row
            row -= n
        raise IndexError(f"row {row} beyond bucket {bucket.name}")

    def rows(self, bucket: Bucket, rows: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        """Latents and padded prompt condition of ``rows`` of ``bucket`` (on ``self.device``)."""
        latents, embeds = [], []
        for r in rows.tolist():
            f, i = self._locate(bucket, r)
            h = self._handle(f)
            latents.append(h.get_slice("latents")[i:i + 1])
            lo, hi = h.get_slice("prompt_offsets")[i:i + 2].tolist()
            embeds.append(h.get_slice("prompt_embeds")[lo:hi])
        length = max(self.null_tokens, max(e.shape[0] for e in embeds))
        padded = torch.zeros((len(embeds), length, self.text_dim), dtype=torch.float32)
        mask = torch.zeros((len(embeds), length), dtype=torch.bool)
        for j, e in enumerate(embeds):
            padded[j, : e.shape[0]] = e.float()
            mask[j, : e.shape[0]] = True
        x = torch.cat(latents).float()
        cond = {"prompt_embeds": padded.to(self.device), "prompt_mask": mask.to(self.device)}
        if self.caption_tokens is not None:
            key, tokenize = self.caption_tokens
            cond[key] = tokenize([bucket.captions[r] for r in rows.tolist()]).to(self.device)
        return x.to(self.device), cond

    # ---- training order

    def _epoch(self, epoch: int) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        if self._plan is None or self._plan[0] != epoch:
            perms, plan = [], []
            for bi, b in enumerate(self.buckets):
                gen = step_generator(self.seed, _EPOCH_ROWS, epoch, bi)
                n = len(b.train)
                if n >= b.batch:
                    perms.append(b.train[torch.randperm(n, generator=gen)])
                    plan += [(bi, j) for j in range(n // b.batch)]
                else:  # too few rows for one batch: one batch per epoch, drawn with replacement
                    perms.append(b.train[torch.randint(0, n, (b.batch,), generator=gen)])
                    plan.append((bi, 0))
            order = torch.randperm(len(plan), generator=step_generator(self.seed, _EPOCH_PLAN, epoch)).tolist()
            self._plan = (epoch, [plan[i] for i in order], perms)
        return self._plan[1], self._plan[2]

    def batches_per_epoch(self) -> int:
        return sum(max(1, len(b.train) // b.batch) for b in self.buckets)

    def _step_batch(self, step: int) -> tuple[int, torch.Tensor]:
        """Optimizer ``step``'s entry of its epoch's plan: the bucket index and that batch's row ids."""
        per_epoch = self.batches_per_epoch()
        plan, perms = self._epoch((step - 1) // per_epoch)
        bi, j = plan[(step - 1) % per_epoch]
        batch = self.buckets[bi].batch
        return bi, perms[bi][j * batch:(j + 1) * batch]

    def step_bucket(self, step: int) -> Bucket:
        return self.buckets[self._step_batch(step)[0]]

    def micro_batch(self, *, step: int, index: int, count: int) -> tuple[torch.Tensor, Cond]:
        if step < 1:
            raise ValueError(f"steps are 1-based (got {step})")
        if not 0 <= index < count:
            raise ValueError(f"micro-batch index {index} out of range for {count}")
        bi, rows = self._step_batch(step)
        b = self.buckets[bi]
        if b.batch % count:
            raise ValueError(f"bucket {b.name}: batch of {b.batch} rows does not split into {count} micro-batches "
                             "(data.batch_size must be divisible by ranks x data.grad_accum)")
        size = b.batch // count
        return self.rows(b, rows[index * size:(index + 1) * size])

    # ---- validation

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Cond]]:
        """Held-out rows bucket by bucket (sorted names), never more per batch than a training micro-batch
        of that bucket at one rank (the memory the run is sized for)."""
        for b in self.val_buckets:
            cap = max(1, min(batch_size, b.batch // self.grad_accum))
            for i in range(0, len(b.val), cap):
                yield self.rows(b, b.val[i:i + cap])

    def val_prompts(self, n: int) -> tuple[list[str], Cond]:
        """``n`` held-out prompts (cycling), with their captions, padded to one length."""
        pool = [(b, int(r)) for b in self.val_buckets for r in b.val]
        picks = [pool[i % len(pool)] for i in range(n)]
        conds = [self.rows(b, torch.tensor([r]))[1] for b, r in picks]
        length = max(c["prompt_embeds"].shape[1] for c in conds)
        embeds = torch.zeros((n, length, self.text_dim), device=self.device)
        mask = torch.zeros((n, length), dtype=torch.bool, device=self.device)
        for j, c in enumerate(conds):
            m = c["prompt_embeds"].shape[1]
            embeds[j, :m], mask[j, :m] = c["prompt_embeds"][0], c["prompt_mask"][0]
        captions = [b.captions[r] for b, r in picks]
        cond = {"prompt_embeds": embeds, "prompt_mask": mask}
        if self.caption_tokens is not None:
            key, tokenize = self.caption_tokens
            cond[key] = tokenize(captions).to(self.device)
        return captions, cond


def shard_data(cfg, *, device: torch.device, caption_tokens: tuple[str, Callable] | None = None) -> "LatentShardData":
    """The trainer's ``data.dataset: latent_shards`` data for ``cfg`` (``caption_tokens``: see ``LatentShardData``)."""
    return LatentShardData(cfg.data.shards, batch_size=cfg.data.batch_size, grad_accum=cfg.data.grad_accum,
                           seed=cfg.run.seed, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed,
                           device=device, caption_tokens=caption_tokens)

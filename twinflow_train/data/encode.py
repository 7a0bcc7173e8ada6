"""``twinflow-train encode``: images + captions -> latent and prompt-embedding shards in aspect-ratio buckets.

Inputs: a folder of images with a caption file of the same stem (``cat.png`` +
``cat.txt``), or a Parquet file with an image column (bytes, ``{"bytes": ...}``
structs as written by Hugging Face datasets, or paths relative to the file) and a
caption column. Every image goes to the bucket nearest its aspect ratio (in log
space), is resized to cover the bucket and centre-cropped, and is encoded with the
pipeline's own VAE (posterior mean, normalised as QwenImagePipeline does) and
text encoder (``pipeline.encode_prompt``: the pipeline's prompt template, its
dropped system-prompt tokens and its last hidden layer).

Layout (see ``twinflow_train.data.shards``)::

    OUT/manifest.json                  buckets, shapes, dtypes, VAE fingerprint, row counts
    OUT/null_prompt.safetensors        the empty prompt's embedding (the null condition)
    OUT/<H>x<W>/shard-00000.safetensors  latents [n, C, h, w], prompt_embeds [sum L_i, D], prompt_offsets [n + 1]
    OUT/<H>x<W>/shard-00000.json       captions and sources of those rows, in order

The whole directory is written under a temporary name and renamed into place at the
end, so ``OUT`` either does not exist or is complete; an existing ``OUT`` is never
touched.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..rundir import atomic_dir

FORMAT = "twinflow-latent-shards"
VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Bucket sets as (height, width). ``qwen-1328``: the report's set around 1328x1328 pixels
#: (all multiples of 16 = VAE factor 8 x 2x2 patches).
BUCKET_SETS: dict[str, list[tuple[int, int]]] = {
    "qwen-1328": [(1328, 1328), (928, 1664), (1664, 928), (1104, 1472), (1472, 1104), (1056, 1584), (1584, 1056)],
}


class EncodeError(ValueError):
    """Bad input to the encoder; the message names the file or option."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    source: str
    caption: str
    image: object  # PIL.Image.Image


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """``"1328x1328,928x1664"`` (height x width) or a bucket-set name."""
    if spec in BUCKET_SETS:
        return list(BUCKET_SETS[spec])
    out = []
    for part in spec.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise EncodeError(f"--buckets: {part!r} is not HEIGHTxWIDTH (or one of {sorted(BUCKET_SETS)})") from None
        if h <= 0 or w <= 0:
            raise EncodeError(f"--buckets: {part!r} must be positive")
        out.append((h, w))
    if len(set(out)) != len(out):
        raise EncodeError(f"--buckets: duplicate bucket in {spec!r}")
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), b))


def fit_to_bucket(image, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop, -> [3, H, W] in [-1, 1]."""
    bh, bw = bucket
    image = image.convert("RGB")
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    image = image.crop((left, top, left + bw, top + bh))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(bh, bw, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def iter_folder(root: Path) -> tuple[int, Iterator[Item]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EncodeError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    for f in files:
        if not f.with_suffix(".txt").is_file():
            raise EncodeError(f"--images: {f} has no caption file {f.with_suffix('.txt').name}")

    def gen() -> Iterator[Item]:
        for f in files:
            caption = f.with_suffix(".txt").read_text(encoding="utf-8").strip()
            with Image.open(f) as im:
                im.load()
                yield Item(source=str(f.relative_to(root)), caption=caption, image=im.copy())

    return len(files), gen()


def iter_parquet(path: Path, *, image_column: str, caption_column: str) -> tuple[int, Iterator[Item]]:
    import pyarrow.parquet as pq  # lazy: pyarrow, only for a parquet input

    if not path.is_file():
        raise EncodeError(f"--parquet: {path} does not exist")
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for col, opt in ((image_column, "--image-column"), (caption_column, "--caption-column")):
        if col not in names:
            raise EncodeError(f"{opt}: {path} has no column {col!r} (columns: {', '.join(names)})")

    def open_image(value, row: int):
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str):
            p = Path(value) if Path(value).is_absolute() else path.parent / value
            if not p.is_file():
                raise EncodeError(f"{path}: row {row}: image path {value!r} does not exist")
            return Image.open(p)
        raise EncodeError(f"{path}: row {row}: column {image_column!r} holds {type(value).__name__}, "
                          "not image bytes or a path")

    def gen() -> Iterator[Item]:
        row = 0
        for batch in pf.iter_batches(columns=[image_column, caption_column], batch_size=64):
            data = batch.to_pydict()
            for value, caption in zip(data[image_column], data[caption_column]):
                if caption is None:
                    raise EncodeError(f"{path}: row {row}: caption is null")
                with open_image(value, row) as im:
                    im.load()
                    yield Item(source=f"{path.name}#{row}", caption=str(caption).strip(), image=im.copy())
                row += 1

    return pf.metadata.num_rows, gen()


# --------------------------------------------------------------------------- writing


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save  # lazy: optional dependency safetensors (the qwen extra)

    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))


@dataclass
class BucketWriter:
    root: Path
    height: int
    width: int
    shard_rows: int
    latent_dtype: torch.dtype
    embed_dtype: torch.dtype
    latents: list[torch.Tensor] = field(default_factory=list)
    embeds: list[torch.Tensor] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    rows: int = 0

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    def add(self, latent: torch.Tensor, embed: torch.Tensor, caption: str, source: str) -> None:
        self.latents.append(latent.to("cpu", self.latent_dtype))
        self.embeds.append(embed.to("cpu", self.embed_dtype))
        self.meta.append({"caption": caption, "source": source})
        self.rows += 1
        if len(self.latents) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.latents:
            return
        folder = self.root / self.name
        folder.mkdir(exist_ok=True)
        stem = f"shard-{len(self.files):05d}"
        lengths = torch.tensor([0] + [e.shape[0] for e in self.embeds], dtype=torch.int64)
        save_tensors(folder / f"{stem}.safetensors", {
            "latents": torch.stack(self.latents),
            "prompt_embeds": torch.cat(self.embeds),
            "prompt_offsets": torch.cumsum(lengths, 0),
        })
        (folder / f"{stem}.json").write_text(json.dumps(self.meta, ensure_ascii=False) + "\n", encoding="utf-8")
        self.files.append({"path": f"{self.name}/{stem}.safetensors", "rows": len(self.latents)})
        self.latents, self.embeds, self.meta = [], [], []


# --------------------------------------------------------------------------- encoding


def load_pipeline(path: Path, *, device: torch.device, dtype: torch.dtype):
    """The pipeline's VAE, tokenizer and text encoder (never its transformer)."""
    # lazy: optional dependency diffusers (the qwen extra)
    from diffusers import DiffusionPipeline

    from ..models.qwen_vae import dtype_kwarg

    if not (path / "model_index.json").is_file():
        raise EncodeError(f"--pipeline: {path} is not a diffusers pipeline directory (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(path), transformer=None, scheduler=None, **dtype_kwarg(dtype))
    for name in ("vae", "text_encoder", "tokenizer"):
        if getattr(pipe, name, None) is None:
            raise EncodeError(f"--pipeline: {path} has no {name}")
    if not hasattr(pipe, "encode_prompt"):
        raise EncodeError(f"--pipeline: {type(pipe).__name__} has no encode_prompt")
    pipe.vae.to(device).eval().requires_grad_(False)
    pipe.text_encoder.to(device).eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, device: torch.device, max_sequence_length: int) -> list[torch.Tensor]:
    """Per-prompt [L_i, D] embeddings, padding removed."""
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
    lengths = mask.sum(1).tolist() if mask is not None else [embeds.shape[1]] * len(prompts)
    return [embeds[i, : int(n)].float() for i, n in enumerate(lengths)]


def encode_dataset(*, pipeline: Path, items: Iterator[Item], total: int, out: Path, buckets: list[tuple[int, int]],
                   batch_size: int, shard_rows: int, device: torch.device, dtype: torch.dtype,
                   latent_dtype: torch.dtype, embed_dtype: torch.dtype, max_sequence_length: int,
                   source: str, progress: bool = True) -> dict:
    from ..models.qwen_vae import QwenVAECodec  # lazy: optional dependency diffusers (the qwen extra)

    if out.exists():
        raise EncodeError(f"--out: {out} already exists; choose a new directory (nothing is overwritten)")
    pipe = load_pipeline(pipeline, device=device, dtype=dtype)
    codec = QwenVAECodec(pipe.vae).to(device)
    for b in buckets:
        try:
            codec.latent_shape_for(*b)
        except ValueError as e:
            raise EncodeError(f"--buckets: {b[0]}x{b[1]}: {e}") from None
    with atomic_dir(out) as tmp:
        writers = {b: BucketWriter(tmp, b[0], b[1], shard_rows, latent_dtype, embed_dtype) for b in buckets}
        pending: dict[tuple[int, int], list[tuple[torch.Tensor, Item]]] = {b: [] for b in buckets}

        def run(bucket: tuple[int, int]) -> None:
            batch = pending[bucket]
            if not batch:
                return
            pixels = torch.stack([p for p, _ in batch]).to(device)
            with torch.no_grad():
                latents = codec.encode(pixels)
            texts = encode_prompts(pipe, [it.caption for _, it in batch], device=device,
                                   max_sequence_length=max_sequence_length)
            for lat, emb, (_, it) in zip(latents, texts, batch):
                writers[bucket].add(lat, emb, it.caption, it.source)
            pending[bucket] = []

        for item in tqdm(items, total=total, desc="encode", disable=not progress, mininterval=1.0):
            w, h = item.image.size
            bucket = nearest_bucket(w, h, buckets)
            pending[bucket].append((fit_to_bucket(item.image, bucket), item))
            if len(pending[bucket]) >= batch_size:
                run(bucket)
        for b in buckets:
            run(b)
            writers[b].flush()
        null = encode_prompts(pipe, [""], device=device, max_sequence_length=max_sequence_length)[0]
        save_tensors(tmp / "null_prompt.safetensors", {"prompt_embeds": null.to(embed_dtype)})
        used = [w for w in writers.values() if w.rows]
        if not used:
            raise EncodeError("no rows were encoded")
        manifest = {
            "format": FORMAT, "version": VERSION, "source": source, "pipeline": str(pipeline.resolve()),
            "vae": codec.config_fingerprint(), "latent_channels": codec.latent_channels,
            "text_dim": int(null.shape[1]), "null_prompt": "null_prompt.safetensors",
            "null_prompt_tokens": int(null.shape[0]), "latent_dtype": str(latent_dtype).removeprefix("torch."),
            "embed_dtype": str(embed_dtype).removeprefix("torch."), "rows": sum(w.rows for w in used),
            "buckets": [{"name": w.name, "height": w.height, "width": w.width,
                         "latent_shape": list(codec.latent_shape_for(w.height, w.width)), "rows": w.rows,
                         "files": w.files} for w in used],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinflow-train encode", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images with same-stem .txt captions")
    src.add_argument("--parquet", type=Path, help="Parquet file with image and caption columns")
    p.add_argument("--image-column", default="image", help="Parquet image column (bytes, {bytes: ...} or path)")
    p.add_argument("--caption-column", default="caption", help="Parquet caption column")
    p.add_argument("--pipeline", type=Path, required=True, help="local diffusers pipeline directory (Qwen-Image-2512)")
    p.add_argument("--out", type=Path, required=True, help="output shard directory (must not exist)")
    p.add_argument("--buckets", default="qwen-1328",
                   help=f"bucket set ({', '.join(BUCKET_SETS)}) or HxW list, e.g. 1024x1024,768x1344")
    p.add_argument("--batch-size", type=int, default=4, help="images per VAE / text-encoder batch")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per shard file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="VAE and text-encoder dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--latent-dtype", choices=tuple(_DTYPES), default="float32", help="stored latent dtype")
    p.add_argument("--embed-dtype", choices=tuple(_DTYPES), default="bfloat16", help="stored prompt-embedding dtype")
    p.add_argument("--max-sequence-length", type=int, default=1024, help="prompt tokens kept (pipeline limit 1024)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N inputs")
    p.add_argument("--no-progress", action="store_true")
    return p


def encode_main(argv: list[str]) -> int:
    """Entry point of ``twinflow-train encode``; returns the exit code (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or args.shard_rows < 1:
            raise EncodeError("--batch-size and --shard-rows must be >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EncodeError("--device cuda: no CUDA device is visible")
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        buckets = parse_buckets(args.buckets)
        if args.images is not None:
            if not args.images.is_dir():
                raise EncodeError(f"--images: {args.images} is not a directory")
            total, items = iter_folder(args.images)
            source = str(args.images.resolve())
        else:
            total, items = iter_parquet(args.parquet, image_column=args.image_column,
                                        caption_column=args.caption_column)
            source = str(args.parquet.resolve())
        if args.limit is not None:
            total = min(total, args.limit)
            items = (it for i, it in zip(range(args.limit), items))
        manifest = encode_dataset(pipeline=args.pipeline, items=items, total=total, out=args.out, buckets=buckets,
                                  batch_size=args.batch_size, shard_rows=args.shard_rows, device=device, dtype=dtype,
                                  latent_dtype=_DTYPES[args.latent_dtype], embed_dtype=_DTYPES[args.embed_dtype],
                                  max_sequence_length=args.max_sequence_length, source=source,
                                  progress=not args.no_progress)
    except (EncodeError, FileNotFoundError) as e:
        print(f"twinflow-train encode: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{b['name']}: {b['rows']}" for b in manifest["buckets"])
    print(f"{args.out}: {manifest['rows']} rows ({counts})")
    return 0

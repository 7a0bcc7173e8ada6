"""Pre-encoding (images of two aspect ratios -> bucketed shards) and the shard dataset."""

from __future__ import annotations

import json

import pytest
import torch

from twinflow_train.config import load_config
from twinflow_train.data.encode import encode_main, fit_to_bucket, nearest_bucket, parse_buckets
from twinflow_train.data.shards import LatentShardData, read_null_prompt
from twinflow_train.run.setup import build_setup

from ..test_qwen_fixtures import LATENT_CHANNELS, TEXT_DIM, tiny_vae, write_images, write_tiny_pipeline

# (width, height): 7 square and 7 landscape 3:2 images; buckets 8x8 (4 latent tokens) and 16x24 (24 tokens)
SIZES = [(20, 20), (12, 12), (33, 31), (8, 8), (40, 40), (16, 16), (9, 9),
         (36, 24), (24, 16), (30, 21), (48, 32), (26, 17), (60, 40), (24, 16)]
BUCKETS = "8x8,16x24"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    pipe = write_tiny_pipeline(root / "pipe", with_transformer=False)
    write_images(root / "images", SIZES)
    rc = encode_main(["--images", str(root / "images"), "--pipeline", str(pipe), "--out", str(root / "shards"),
                      "--buckets", BUCKETS, "--batch-size", "3", "--shard-rows", "4", "--embed-dtype", "float32",
                      "--no-progress"])
    assert rc == 0
    return root


def _pipeline(root):
    from diffusers import QwenImagePipeline
    return QwenImagePipeline.from_pretrained(str(root / "pipe"), transformer=None, scheduler=None)


def test_manifest_groups_rows_into_aspect_ratio_buckets(encoded):
    m = json.loads((encoded / "shards" / "manifest.json").read_text())
    buckets = {b["name"]: b for b in m["buckets"]}
    assert set(buckets) == {"8x8", "16x24"}
    assert buckets["8x8"]["rows"] == 7 and buckets["16x24"]["rows"] == 7
    assert buckets["16x24"]["latent_shape"] == [LATENT_CHANNELS, 8, 12]
    assert [f["rows"] for f in buckets["8x8"]["files"]] == [4, 3]  # --shard-rows 4
    assert m["text_dim"] == TEXT_DIM and m["latent_channels"] == LATENT_CHANNELS
    assert not list(encoded.glob(".shards.tmp-*"))  # published atomically, nothing left behind


def test_stored_rows_equal_the_pipelines_own_encoding(encoded):
    from PIL import Image
    from twinflow_train.models.qwen_vae import QwenVAECodec

    pipe = _pipeline(encoded)
    codec = QwenVAECodec(pipe.vae)
    data = LatentShardData(encoded / "shards", batch_size=2, grad_accum=1, seed=0, val_fraction=0.2, split_seed=0)
    bucket = next(b for b in data.buckets if b.name == "16x24")
    meta = json.loads((encoded / "shards" / "16x24" / "shard-00000.json").read_text())
    row = 1
    source = encoded / "images" / meta[row]["source"]
    with Image.open(source) as im:
        pixels = fit_to_bucket(im, (16, 24))
    x, cond = data.rows(bucket, torch.tensor([row]))
    with torch.no_grad():
        assert torch.allclose(x[0], codec.encode(pixels[None])[0], atol=1e-5)
        ref, mask = pipe.encode_prompt([meta[row]["caption"]], device=torch.device("cpu"))
    n = int(cond["prompt_mask"][0].sum())
    assert n == ref.shape[1] and torch.allclose(cond["prompt_embeds"][0, :n], ref[0], atol=1e-5)
    assert torch.all(cond["prompt_embeds"][0, n:] == 0)
    null, _ = pipe.encode_prompt([""], device=torch.device("cpu"))
    assert torch.allclose(read_null_prompt(encoded / "shards"), null[0], atol=1e-5)


def test_parquet_input_gives_the_same_rows(encoded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted((encoded / "images").glob("*.png"))[:4]
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": None} for p in images],
                      "text": [p.with_suffix(".txt").read_text() for p in images]})
    pq.write_table(table, tmp_path / "data.parquet")
    rc = encode_main(["--parquet", str(tmp_path / "data.parquet"), "--caption-column", "text",
                      "--pipeline", str(encoded / "pipe"), "--out", str(tmp_path / "pq"), "--buckets", BUCKETS,
                      "--embed-dtype", "float32", "--no-progress"])
    assert rc == 0
    pq_rows = LatentShardData(tmp_path / "pq", batch_size=1, grad_accum=1, seed=0, val_fraction=0.5, split_seed=0)
    folder = LatentShardData(encoded / "shards", batch_size=1, grad_accum=1, seed=0, val_fraction=0.5, split_seed=0)
    b_pq = next(b for b in pq_rows.buckets + pq_rows.val_buckets if b.name == "8x8")
    b_f = next(b for b in folder.buckets if b.name == "8x8")
    assert b_pq.captions == b_f.captions[:len(b_pq.captions)]
    n = len(b_pq.captions)
    assert torch.allclose(pq_rows.rows(b_pq, torch.arange(n))[0], folder.rows(b_f, torch.arange(n))[0], atol=1e-6)


def test_batches_are_bucket_pure_token_balanced_and_independent_of_the_split(encoded):
    data = LatentShardData(encoded / "shards", batch_size=2, grad_accum=2, seed=3, val_fraction=0.2, split_seed=0)
    sizes = {b.name: b.batch for b in data.buckets}
    assert sizes == {"16x24": 2, "8x8": 12}  # 24 / 4 tokens -> 6x the reference batch
    assert data.latent_shape == (LATENT_CHANNELS, 8, 12)  # reference bucket: most tokens
    seen_shapes = set()
    for step in range(1, 9):
        whole, c1 = data.micro_batch(step=step, index=0, count=1)
        halves = [data.micro_batch(step=step, index=i, count=2) for i in range(2)]
        assert torch.equal(whole, torch.cat([h[0] for h in halves]))
        lengths = torch.cat([h[1]["prompt_mask"].sum(1) for h in halves])
        assert torch.equal(c1["prompt_mask"].sum(1), lengths)  # the same prompts, padded per micro-batch
        assert c1["prompt_mask"].shape[1] >= data.null_tokens
        seen_shapes.add(tuple(whole.shape[1:]))
        again, _ = data.micro_batch(step=step, index=0, count=1)
        assert torch.equal(whole, again)
    assert seen_shapes == {(LATENT_CHANNELS, 4, 4), (LATENT_CHANNELS, 8, 12)}
    with pytest.raises(ValueError, match="micro-batches"):
        data.micro_batch(step=1, index=0, count=3)


def test_one_epoch_visits_each_training_row_once(encoded):
    data = LatentShardData(encoded / "shards", batch_size=2, grad_accum=1, seed=5, val_fraction=0.2, split_seed=0)
    ref = next(b for b in data.buckets if b.name == "16x24")
    assert len(ref.train) == 6 and len(ref.val) == 1  # round(0.2 * 7) held out in every bucket
    per_epoch = data.batches_per_epoch()
    seen = []
    for step in range(1, per_epoch + 1):
        if data.step_bucket(step) is ref:
            x, _ = data.micro_batch(step=step, index=0, count=1)
            seen += [x[i] for i in range(x.shape[0])]
    stored = data.rows(ref, ref.train)[0]
    assert len(seen) == 6
    assert all(any(torch.equal(s, r) for r in stored) for s in seen)
    assert len({tuple(s.flatten()[:4].tolist()) for s in seen}) == 6  # no repeats inside the epoch
    held_out = data.rows(ref, ref.val)[0]
    assert not any(torch.equal(s, h) for s in seen for h in held_out)


def test_validation_split_is_per_bucket_and_fixed(encoded):
    a = LatentShardData(encoded / "shards", batch_size=2, grad_accum=1, seed=0, val_fraction=0.3, split_seed=4)
    b = LatentShardData(encoded / "shards", batch_size=2, grad_accum=1, seed=9, val_fraction=0.3, split_seed=4)
    assert {x.name: x.val.tolist() for x in a.val_buckets} == {x.name: x.val.tolist() for x in b.val_buckets}
    assert all(len(x.val) == 2 for x in a.val_buckets)
    batches = list(a.val_batches(64))
    assert sum(x.shape[0] for x, _ in batches) == 4
    assert {tuple(x.shape[1:]) for x, _ in batches} == {(LATENT_CHANNELS, 4, 4), (LATENT_CHANNELS, 8, 12)}
    # never more rows per validation batch than the bucket's training micro-batch
    assert all(x.shape[0] <= 2 for x, _ in list(a.val_batches(64)) if x.shape[-1] == 12)


def test_shard_setup_checks_the_codec_against_the_shards(encoded, tmp_path):
    over = ["model.family=qwen_image", "model.qwen.tiny=true", "codec.kind=qwen_vae", "data.dataset=latent_shards",
            f"data.shards={encoded / 'shards'}", "data.batch_size=4"]
    setup = build_setup(load_config(None, over), device=torch.device("cpu"))
    assert setup.codec.latent_shape == (LATENT_CHANNELS, 8, 12)
    assert list(setup.sample_cond)[0] == "labels" and setup.num_classes is None
    cond = setup.eval_cond(5)
    assert cond["prompt_embeds"].shape[0] == 5 and cond["prompt_mask"].shape == cond["prompt_embeds"].shape[:2]
    other = tiny_vae(seed=2)
    other.register_to_config(latents_std=[2.0, 2.0, 2.0, 2.0])
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="differs from the one that encoded"):
        build_setup(load_config(None, over + [f"codec.path={tmp_path / 'other'}"]), device=torch.device("cpu"))


def test_bad_inputs_fail_before_anything_is_written(encoded, tmp_path, capsys):
    pipe = str(encoded / "pipe")
    base = ["--pipeline", pipe, "--buckets", BUCKETS, "--no-progress"]
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", [(8, 8)])
    (tmp_path / "imgs" / "img000.txt").unlink()
    assert encode_main(["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o1")] + base) == 2
    assert "no caption file" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert encode_main(["--images", str(encoded / "images"), "--out", str(encoded / "shards")] + base) == 2
    assert "already exists" in capsys.readouterr().err
    assert encode_main(["--images", str(encoded / "images"), "--out", str(tmp_path / "o2"), "--pipeline", pipe,
                        "--buckets", "10x10", "--no-progress"]) == 2
    assert "divisible by 4" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_buckets("12by12")


def test_bucket_choice_and_crop():
    from PIL import Image

    buckets = parse_buckets("qwen-1328")
    assert (1328, 1328) in buckets and all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (928, 1664)
    assert nearest_bucket(1000, 1010, buckets) == (1328, 1328)
    img = Image.frombytes("RGB", (30, 10), bytes(range(256)) * 3 + bytes(132))
    out = fit_to_bucket(img, (8, 16))
    assert out.shape == (3, 8, 16) and out.min() >= -1 and out.max() <= 1


def test_the_trainer_cli_routes_encode(encoded, tmp_path, capsys):
    from twinflow_train.cli import main

    assert main(["encode", "--images", str(tmp_path / "missing"), "--pipeline", str(encoded / "pipe"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_caption_tokens_follow_their_rows(encoded):
    """The reward's prompt tokens (``hps_tokens`` for HPSv2) are the tokenised captions of the very rows served."""
    def tokenize(captions):  # a stand-in tokenizer: one row per caption, its characters' codes
        return torch.tensor([[ord(c) for c in cap.ljust(24)[:24]] for cap in captions])

    plain = LatentShardData(encoded / "shards", batch_size=4, grad_accum=1, seed=0, val_fraction=0.2, split_seed=0)
    data = LatentShardData(encoded / "shards", batch_size=4, grad_accum=1, seed=0, val_fraction=0.2, split_seed=0,
                           caption_tokens=("hps_tokens", tokenize))
    for step in (1, 2, 3):
        bucket = data.step_bucket(step)
        x, cond = data.micro_batch(step=step, index=1, count=2)
        x0, cond0 = plain.micro_batch(step=step, index=1, count=2)
        assert torch.equal(x, x0) and torch.equal(cond["prompt_embeds"], cond0["prompt_embeds"])
        # the rows are identified by their latents; their captions are in the bucket's list
        rows = [next(r for r in range(len(bucket.captions)) if torch.equal(data.rows(bucket, torch.tensor([r]))[0][0],
                                                                            xi)) for xi in x]
        assert torch.equal(cond["hps_tokens"], tokenize([bucket.captions[r] for r in rows]))
    captions, cond = data.val_prompts(5)
    assert torch.equal(cond["hps_tokens"], tokenize(captions))

"""Tiny random-weight Qwen-Image components shared by the scale-path tests (and their own checks).

Nothing is downloaded: the transformer and VAE are diffusers' real classes at tiny
sizes, the text encoder is a tiny random Qwen2.5-VL (the class Qwen-Image uses), and
the tokenizer is a character-level one built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from twinflow_train.models.qwen_image import TINY_CONFIG

TEXT_DIM = TINY_CONFIG["joint_attention_dim"]
LATENT_CHANNELS = TINY_CONFIG["in_channels"] // 4


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    # spatial factor 2 (one down-sampling stage); latent mean/std far from 0/1 so normalisation matters
    return AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                  attn_scales=[], temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.7, 2.0, 1.1]).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(256)}
    vocab["<pad>"], vocab["<unk>"] = 256, 257
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = dict(bos_token_id=256, eos_token_id=256, pad_token_id=256)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=300, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM,
                           fullatt_block_indexes=[0]),
        vocab_size=300, **special)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_CONFIG, **overrides}).eval()


def write_tiny_pipeline(path: Path, *, with_transformer: bool = True) -> Path:
    """A complete QwenImagePipeline directory of tiny random components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                             text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                             transformer=tiny_transformer() if with_transformer else None)
    pipe.save_pretrained(str(path))
    return path


def write_images(folder: Path, sizes: list[tuple[int, int]], *, seed: int = 0) -> list[Path]:
    """Synthetic RGB images (width, height) with smooth structure, and a caption file each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        phase = torch.rand(3, generator=gen) * 6.28
        img = torch.stack([torch.sin(6 * xx + phase[c]) * torch.cos(4 * yy + phase[c]) for c in range(3)])
        data = ((img * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        p = folder / f"img{i:03d}.png"
        Image.fromarray(data).save(p)
        p.with_suffix(".txt").write_text(f"pattern {i} " + "abc"[i % 3] * (1 + i % 4))
        paths.append(p)
    return paths


def free_store(tmp_path: Path) -> str:
    """A file:// rendezvous for spawned gloo process groups (no ports)."""
    return f"file://{os.fspath(tmp_path / 'pg-store')}"


# ----------------------------------------------------------------------------- checks of the fixtures


def test_tiny_pipeline_encodes_prompts_with_the_pipelines_own_code(tmp_path):
    from diffusers import QwenImagePipeline

    write_tiny_pipeline(tmp_path / "pipe", with_transformer=False)
    pipe = QwenImagePipeline.from_pretrained(str(tmp_path / "pipe"), transformer=None, scheduler=None)
    prompts = ["a red cube", "a much longer prompt about a blue sphere"]
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    assert embeds.shape[0] == 2 and embeds.shape[2] == TEXT_DIM
    lengths = mask.sum(1)
    assert lengths[1] > lengths[0]  # unpadded lengths follow the prompts
    assert torch.all(embeds[0, lengths[0]:] == 0)  # the pipeline zero-pads

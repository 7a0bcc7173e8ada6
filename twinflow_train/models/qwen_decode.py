"""A checkpointed, cache-free single-frame decode of the Qwen-Image VAE, for the exact reward gradient.

``AutoencoderKLQwenImage.decode`` runs its causal decoder with ``feat_cache``: a list the forward
mutates (it keeps a clone of the input of every causal conv until the decode returns). For a clip of
one frame the cache never feeds anything back: the first chunk pads every causal conv with zeros, the
``upsample3d`` resamplers skip their time conv ("Rep"), and the clones are only read by a second
frame. So calling the decoder's blocks without ``feat_cache`` computes the same ops on the same
values: the same pixels and the same gradient, bit for bit (``tests/twinflow_train/models/
test_qwen_decode.py`` checks it in float64 and float32), minus the clones (7.6 GiB fp32 at 1328^2).

Without the mutable cache each block is a pure function of its input, so it can run under
``torch.utils.checkpoint`` (non-reentrant): the forward keeps only the blocks' inputs and one block's
activations exist again while that block is back-propagated. The gradient is still bitwise the
plain decode's (the recompute runs the same kernels on the same inputs); it costs one more decoder
forward. diffusers offers no checkpointing for this VAE (``_supports_gradient_checkpointing = False``),
and checkpointing its blocks with the cache passed fails on the mutated list.

Segments (:func:`decoder_segments`, in order): ``post_quant_conv`` + ``conv_in``; the mid block's
residual blocks and attention one by one; every residual block and resampler of every up block; the
head (RMS norm, SiLU, ``conv_out``, and the clamp to [-1, 1] that ``decode`` applies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["decoder_segments", "decode_single_frame"]

Segment = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def decoder_segments(vae: nn.Module) -> list[Segment]:
    """The decoder of ``vae`` (an ``AutoencoderKLQwenImage``) as named pure functions of one tensor,
    for a single frame: their composition is ``vae.decode(z).sample`` (clamp included)."""
    dec = vae.decoder

    def stem(x: torch.Tensor) -> torch.Tensor:
        return dec.conv_in(vae.post_quant_conv(x))

    def head(x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(dec.conv_out(dec.nonlinearity(dec.norm_out(x))), min=-1.0, max=1.0)

    out: list[Segment] = [("stem", stem), ("mid.resnets.0", dec.mid_block.resnets[0])]
    for i, (attn, res) in enumerate(zip(dec.mid_block.attentions, dec.mid_block.resnets[1:])):
        if attn is not None:
            out.append((f"mid.attentions.{i}", attn))
        out.append((f"mid.resnets.{i + 1}", res))
    for b, block in enumerate(dec.up_blocks):
        out += [(f"up.{b}.resnets.{r}", res) for r, res in enumerate(block.resnets)]
        if block.upsamplers is not None:
            out.append((f"up.{b}.upsampler", block.upsamplers[0]))
    out.append(("head", head))
    return out


def decode_single_frame(vae: nn.Module, z: torch.Tensor, *, checkpointed: bool = True) -> torch.Tensor:
    """``vae.decode(z).sample`` for a one-frame clip ``z [B, z_dim, 1, h, w]``, without ``feat_cache``; with
    ``checkpointed`` (and grad enabled) every segment runs under ``torch.utils.checkpoint``."""
    if z.dim() != 5 or z.shape[2] != 1:
        raise ValueError(f"decode_single_frame takes one-frame clips [B, C, 1, h, w] (got {list(z.shape)})")
    if getattr(vae, "use_tiling", False):
        raise ValueError("decode_single_frame decodes the whole frame; the VAE has tiling enabled "
                         "(a tiled decode is another function)")
    if vae.training and any(getattr(m, "p", 0.0) for m in vae.decoder.modules() if isinstance(m, nn.Dropout)):
        raise ValueError("decode_single_frame: the VAE is in training mode with dropout (put it in eval mode)")
    use_ckpt = checkpointed and torch.is_grad_enabled()
    x = z
    for _, fn in decoder_segments(vae):
        x = checkpoint(fn, x, use_reentrant=False) if use_ckpt else fn(x)
    return x

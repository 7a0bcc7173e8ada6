"""The TwinFlow Qwen-Image transformer: diffusers' ``QwenImageTransformer2DModel`` plus a gated target-time embedding.

This module imports only torch and diffusers (no module of this project, no relative import), so that
``export`` can ship this very file inside an exported pipeline directory (``transformer/twinflow_transformer.py``)
and stock diffusers loads it with ``trust_remote_code=True`` in a process that imports nothing of the project.
``twinflow_train.models.qwen_image`` re-exports the class; the trainer uses it from there.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    compute_text_seq_len_from_mask,
)

TtInit = Literal["copy", "normal"]

#: Config keys this forward does not implement (Qwen-Image and Qwen-Image-2512 leave them off).
_UNSUPPORTED = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


class TwinFlowQwenImageTransformer2DModel(QwenImageTransformer2DModel):
    """QwenImageTransformer2DModel with a gated target-time embedding (and optional sign embedding).

    ``forward`` accepts everything the parent's does plus ``target_timestep``; when it is
    not given (a stock pipeline calling), ``default_target_time`` decides: ``same`` (tt = t,
    exactly the parent model) or ``zero`` (tt = 0, the "few" sampling mode of docs/method.md §3).
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        sign_embedding: bool = False,
        default_target_time: Literal["same", "zero"] = "same",
    ):
        for key in _UNSUPPORTED:
            if locals()[key]:
                raise ValueError(f"transformer config {key}=True is not supported by the TwinFlow adapter")
        if default_target_time not in ("same", "zero"):
            raise ValueError(f"default_target_time must be 'same' or 'zero' (got {default_target_time!r})")
        super().__init__(patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                         num_layers=num_layers, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
                         guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope, zero_cond_t=zero_cond_t,
                         use_additional_t_cond=use_additional_t_cond, use_layer3d_rope=use_layer3d_rope)
        # E2: same shape as the pretrained E1 MLP so that 'copy' init is an exact copy
        self.target_time_embed = TimestepEmbedding(in_channels=256, time_embed_dim=self.inner_dim)
        self.sign_embed = nn.Parameter(torch.zeros(self.inner_dim)) if sign_embedding else None
        self.activation_checkpointing = False

    # ---- time embedding (docs/method.md §1)

    def time_embedding(self, t: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """temb = E1(t) + E2(tt) * (t - tt) [+ sign where t < 0]; signed t goes into E1's sinusoid."""
        proj = self.time_text_embed.time_proj  # parameter-free sinusoid, fp32
        t, tt = t.float(), tt.float()
        emb = self.time_text_embed.timestep_embedder(proj(t).to(dtype))
        gate = (t - tt)[:, None]  # fp32: the gap can be far below bf16 resolution of t
        emb = emb + (self.target_time_embed(proj(tt).to(dtype)).float() * gate).to(emb.dtype)
        if self.sign_embed is not None:
            emb = emb + (t < 0).to(emb.dtype)[:, None] * self.sign_embed.to(emb.dtype)
        return emb

    @torch.no_grad()
    def init_target_time_embedding(self, mode: TtInit, generator: torch.Generator | None = None,
                                   std: float = 0.02) -> None:
        """E2 <- copy of E1, or small-normal weights and zero biases; the sign embedding <- 0."""
        src = self.time_text_embed.timestep_embedder
        dst = self.target_time_embed
        if mode == "copy":
            for name, p in dst.named_parameters():
                p.copy_(src.get_parameter(name))
        elif mode == "normal":
            for name, p in dst.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:
                    full = torch.randn(p.shape, generator=generator) * std
                    _copy_full_into(p, full)
        else:
            raise ValueError(f"unknown model.tt_init {mode!r}; valid: 'copy', 'normal'")
        if self.sign_embed is not None:
            self.sign_embed.zero_()

    # ---- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor = None,
        img_shapes: list | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        return_dict: bool = True,
        target_timestep: torch.Tensor | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        if guidance is not None or controlnet_block_samples is not None or additional_t_cond is not None:
            raise ValueError("guidance, controlnet_block_samples and additional_t_cond are not supported")
        if attention_kwargs:  # LoRA scales and processor options are not implemented here; never ignore them
            raise ValueError(f"unsupported attention_kwargs {sorted(attention_kwargs)}")
        timestep = timestep.reshape(-1).expand(hidden_states.shape[0])
        if target_timestep is None:
            target_timestep = timestep if self.config.default_target_time == "same" else torch.zeros_like(timestep)
        target_timestep = target_timestep.reshape(-1).expand(hidden_states.shape[0])
        dtype = self.img_in.weight.dtype  # the compute dtype (bf16 under FSDP mixed precision)
        hidden = self.img_in(hidden_states.to(dtype))
        temb = self.time_embedding(timestep, target_timestep, dtype)
        text = self.txt_in(self.txt_norm(encoder_hidden_states.to(dtype)))
        text_len, _, mask = compute_text_seq_len_from_mask(text, encoder_hidden_states_mask)
        rope = self.pos_embed(img_shapes, max_txt_seq_len=text_len, device=hidden.device)
        for block in self.transformer_blocks:
            kwargs = dict(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                          temb=temb, image_rotary_emb=rope)
            if self.activation_checkpointing and torch.is_grad_enabled():
                # non-reentrant: recomputation re-enters the block's FSDP hooks (all-gather again in backward)
                text, hidden = torch.utils.checkpoint.checkpoint(block, use_reentrant=False, **kwargs)
            else:
                text, hidden = block(**kwargs)
        out = self.proj_out(self.norm_out(hidden, temb))
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size tensor into a (possibly FSDP-sharded) parameter."""
    if isinstance(param, DTensor):
        full = full.to(device=param.to_local().device, dtype=param.dtype)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
    else:
        param.copy_(full)

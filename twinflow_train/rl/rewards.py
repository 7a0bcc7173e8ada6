"""Differentiable reward models behind one interface (docs/method.md §5).

A reward model maps decoded images and their prompts to one reward per sample::

    reward(images, prompts) -> Tensor[B]

``images`` are ``[B, C, H, W]`` pixels on the [-1, 1] scale (what ``codec.decode``
returns) and ``prompts`` is the batch's condition (``Cond``: a dict of
batch-first tensors). The reward must be differentiable in ``images`` and
per-sample (row i depends on image i only: frozen, in eval mode), because the
latent reward gradient is taken as ``d sum_i R_i / d x``.

Rewards:

- ``digits`` (embedded): ``twinflow_train.assets.auxiliary.DigitsReward`` over the
  project's reward classifier, the log-probability of the prompted class
  (``prompts["labels"]``). Saturated by any good generator (the teacher scores
  ~-0.03): no headroom, kept for reproduction.
- ``proxy`` (embedded, the ladder's and the search's reward):
  ``twinflow_train.assets.auxiliary.DigitsProxyReward``, a small network fitted to noisy
  labels of the fixed gold score ``twinflow_train.assets.auxiliary.GoldScore``; the
  digits stand-in for a learned human-preference model. Evaluation reports the
  proxy and the gold score side by side.
- ``hpsv2``: the HPS v2 / v2.1 human-preference scorer: an open_clip model
  (``rl.hpsv2_arch``, ViT-H-14) with the HPS checkpoint from the local path
  ``rl.hpsv2_checkpoint``. Score = ``100 * cos(image_emb, text_emb)``, the
  diagonal of HPSv2's ``logits_per_image`` times 100, the scale HPSv2 reports.
  Needs the ``hpsv2`` extra (open-clip-torch + torchvision); nothing is
  downloaded.

How prompts carry text for HPSv2: ``Cond`` holds tensors only (it is sliced and
concatenated row-wise), so the prompt text travels pre-tokenised, as
``prompts["hps_tokens"]``, an int64 ``[B, context_length]`` tensor made by
``hpsv2_tokenize(texts, arch=...)`` (open_clip's tokenizer for the
architecture) when the data is prepared. A condition without that key is an
error that says how to make it.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from ..assets.auxiliary import DigitsProxyReward, DigitsReward, get_proxy_net, get_reward_classifier
from ..config import Config, ConfigError
from ..distributed.safeload import load_data
from ..models.base import Cond

__all__ = [
    "RewardModel", "MissingExtraError", "HPSv2Reward", "HPS_TOKENS_KEY",
    "build_reward", "check_reward_config", "load_hpsv2", "hpsv2_tokenize", "clip_preprocess",
]

HPS_TOKENS_KEY = "hps_tokens"
"""Key of the tokenised prompt text in ``Cond`` for the HPSv2 reward."""

_EXTRA_HINT = "install the optional extra: pip install 'twinflow-lab[hpsv2]' (open-clip-torch and torchvision)"


@runtime_checkable
class RewardModel(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Cond) -> torch.Tensor:
        """Per-sample reward ``[B]`` of pixels ``[B, C, H, W]`` in [-1, 1]; differentiable in ``images``."""
        ...


class MissingExtraError(ConfigError, ImportError):
    """The config asks for a feature whose optional dependencies are not installed."""


# --------------------------------------------------------------------------- start-up checks


def _import_open_clip() -> Any:
    """open_clip, or an error naming the ``hpsv2`` extra.

    torchvision built for another torch raises RuntimeError (missing operators)
    rather than ImportError on import, so both mean "the extra is not usable here".
    """
    try:
        # lazy: optional dependency open_clip (the hpsv2 extra), named when missing
        import torchvision  # noqa: F401  (open_clip imports it; a broken build fails here, named)
        import open_clip
    except (ImportError, RuntimeError) as e:
        raise MissingExtraError(
            f"rl.reward 'hpsv2' needs open_clip and a torchvision that imports with this torch "
            f"({torch.__version__}): {type(e).__name__}: {e}; {_EXTRA_HINT}") from e
    return open_clip


def check_reward_config(cfg: Config) -> None:
    """The reward's files and imports, checked before training starts (no model is built).

    What the config alone decides (a reward is set, it fits the data, the e2e rows exist,
    an HPSv2 checkpoint is named) holds by construction of ``Config``; this checks what
    needs the disk: the HPSv2 checkpoint file exists, the ``hpsv2`` extra imports, and the
    open_clip architecture is known. Raises ``ConfigError`` naming the field.
    """
    rl = cfg.rl
    if rl.reward != "hpsv2":
        return
    assert rl.hpsv2_checkpoint is not None  # Config requires it with reward 'hpsv2'
    # the file first (testable without the extra), then the packages, then the architecture
    path = Path(rl.hpsv2_checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"rl.hpsv2_checkpoint: no file at {str(path)!r}")
    _open_clip_arch(_import_open_clip(), rl.hpsv2_arch)


def _open_clip_arch(open_clip: Any, arch: str) -> str:
    """The open_clip model name ``arch`` stands for, registered first when it is a model-config file.

    ``rl.hpsv2_arch`` is either a name open_clip knows (``ViT-H-14``) or the path of an
    open_clip model-config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``): a scorer of
    another shape. A file is registered under its stem in this process, which is why every
    process that builds the scorer (and every preflight) goes through here.
    """
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(f"rl.hpsv2_arch: no open_clip model-config file at {str(path)!r}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"rl.hpsv2_arch: cannot read {str(path)!r} as JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise ConfigError(f"rl.hpsv2_arch: {str(path)!r} is not an open_clip model config "
                              f"(missing {', '.join(map(repr, missing))})")
        open_clip.add_model_config(path)
        arch = path.stem
    if open_clip.get_model_config(arch) is None:
        raise ConfigError(f"rl.hpsv2_arch: open_clip knows no architecture {arch!r} "
                          f"(known: {', '.join(open_clip.list_models()[:8])}, ...; or give a model-config .json path)")
    return arch


# --------------------------------------------------------------------------- factory


def build_reward(cfg: Config, *, device: torch.device | str = "cpu") -> RewardModel:
    """The reward model ``cfg.rl.reward`` names, frozen, in eval mode, on ``device``."""
    kind = cfg.rl.reward
    if kind == "digits":
        reward: nn.Module = DigitsReward(get_reward_classifier(cfg))
    elif kind == "proxy":
        reward = DigitsProxyReward(get_proxy_net(cfg))
    elif kind == "hpsv2":
        check_reward_config(cfg)
        assert cfg.rl.hpsv2_checkpoint is not None  # checked above
        reward = load_hpsv2(arch=cfg.rl.hpsv2_arch, checkpoint=cfg.rl.hpsv2_checkpoint)
    else:
        raise ConfigError("rl.reward is 'none': there is no reward model to build")
    reward = reward.to(device).eval()
    for p in reward.parameters():
        p.requires_grad_(False)
    return reward  # type: ignore[return-value]


# --------------------------------------------------------------------------- HPSv2


def clip_preprocess(images: torch.Tensor, *, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
                    resize_mode: Literal["shortest", "squash"] = "shortest",
                    interpolation: Literal["bicubic", "bilinear"] = "bicubic") -> torch.Tensor:
    """CLIP's evaluation preprocessing as differentiable tensor ops.

    [-1, 1] -> [0, 1], clamped (the scored image is a valid image: a real
    pipeline saves it clipped, so out-of-range pixels do not change the score and
    get no gradient); one channel -> three (grey); resize (shortest side to the
    target, antialiased, then centre crop; or squash to the target); normalise.
    The PIL resize of the reference pipeline and the 8-bit quantisation are not
    reproduced: they are not differentiable, and differ by interpolation detail.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"clip_preprocess: expected [B, 1 or 3, H, W] images, got {list(images.shape)}")
    x = ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    th, tw = size
    h, w = x.shape[-2:]
    if resize_mode == "shortest":
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=interpolation, align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
    elif resize_mode == "squash":
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode=interpolation, align_corners=False, antialias=True)
    else:
        raise ValueError(f"clip_preprocess: unknown resize_mode {resize_mode!r}; valid: 'shortest', 'squash'")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class HPSv2Reward(nn.Module):
    """HPSv2 score ``100 * cos(E_img(preprocess(images)), E_txt(prompts["hps_tokens"]))`` per sample.

    The text embedding needs no gradient (the scorer is frozen; only the
    pixels are differentiated) and is computed under ``no_grad``.
    """

    def __init__(self, clip_model: nn.Module, *, arch: str):
        super().__init__()
        # lazy: optional dependency open_clip (the hpsv2 extra; present if a model was built)
        from open_clip import get_model_preprocess_cfg

        self.model = clip_model
        self.arch = arch
        pp = get_model_preprocess_cfg(clip_model)
        self.size = _pair(pp.get("size", 224))
        self.mean = tuple(float(v) for v in pp["mean"])
        self.std = tuple(float(v) for v in pp["std"])
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.interpolation = pp.get("interpolation", "bicubic")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"rl.hpsv2_arch {arch!r}: preprocessing resize_mode {self.resize_mode!r} is not supported")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"rl.hpsv2_arch {arch!r}: interpolation {self.interpolation!r} is not supported")

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, images: torch.Tensor, prompts: Cond) -> torch.Tensor:
        tokens = prompts.get(HPS_TOKENS_KEY)
        if tokens is None:
            raise KeyError(f"HPSv2 reward: the condition has no {HPS_TOKENS_KEY!r} entry (keys: {sorted(prompts)}); "
                           f"tokenise the prompt texts with twinflow_train.rl.rewards.hpsv2_tokenize when preparing data")
        if tokens.shape[0] != images.shape[0]:
            raise ValueError(f"HPSv2 reward: {tokens.shape[0]} prompts for {images.shape[0]} images")
        pixels = clip_preprocess(images, size=self.size, mean=self.mean, std=self.std,
                                 resize_mode=self.resize_mode, interpolation=self.interpolation)
        img = self.model.encode_image(pixels.to(self._dtype()), normalize=True)
        with torch.no_grad():
            txt = self.model.encode_text(tokens.to(img.device), normalize=True)
        return 100.0 * (img.float() * txt.float()).sum(dim=-1)


def hpsv2_tokenize(texts: list[str], *, arch: str = "ViT-H-14") -> torch.Tensor:
    """int64 ``[len(texts), context_length]`` tokens of the prompts for ``prompts["hps_tokens"]``."""
    open_clip = _import_open_clip()
    return open_clip.get_tokenizer(arch)(list(texts)).long()


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"rl.hpsv2_checkpoint: {str(path)!r} holds no tensor state dict "
                          f"(expected a mapping of tensors, or one under 'state_dict')")
    # checkpoints saved from a DistributedDataParallel wrapper prefix every key with 'module.'
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_hpsv2(*, arch: str, checkpoint: str | Path) -> HPSv2Reward:
    """Build open_clip ``arch`` (no pretrained weights, nothing downloaded) and load the HPS checkpoint.

    The load is strict: a missing, unexpected or mis-shaped key is a ``ConfigError``
    naming ``rl.hpsv2_checkpoint`` (a scorer with partly random weights would
    silently give meaningless rewards).
    """
    open_clip = _import_open_clip()
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"rl.hpsv2_checkpoint: no file at {str(path)!r}")
    arch = _open_clip_arch(open_clip, arch)
    model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    try:
        obj = load_data(path)  # NotDataError (an UnpicklingError) for a file that would run code
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as e:
        raise ConfigError(f"rl.hpsv2_checkpoint: cannot read {str(path)!r}: {type(e).__name__}: {e}") from e
    sd = _state_dict_of(obj, path)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"rl.hpsv2_checkpoint: {str(path)!r} does not fit open_clip {arch!r} "
                          f"(rl.hpsv2_arch): {e}") from e
    if missing or unexpected:
        raise ConfigError(
            f"rl.hpsv2_checkpoint: {str(path)!r} does not fit open_clip {arch!r} (rl.hpsv2_arch): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return HPSv2Reward(model, arch=arch)

"""Typed trainer configuration: one dataclass per section, strict YAML loading.

The sections are written in the project's typed-input language (``twinflow_train.inputs``: ``section``,
``checked``, ``require``, ``from_dict``, ``Where``, overrides; how a section is checked and how its errors
read is described there), which the harness's input files use too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Mapping

# the typed-input language the sections are written in (twinflow_train/inputs.py); its names stay importable
# from here, where the trainer's code has always found them
from .inputs import (  # noqa: F401
    ConfigError,
    SectionProblems,
    Where,
    at_least,
    checked,
    config_hash,
    deep_merge,
    from_dict,
    literal_values,
    parse_overrides,
    raise_problems,
    require,
    section,
    set_dotted,
    to_dict,
    to_yaml,
)
from .yamlio import InputError, read_mapping


# --------------------------------------------------------------------------- sections


@section
class RunConfig:
    seed: int = 0
    """Seed of every generator in the run (data order, noise, times)."""
    steps: int = 1500
    """Optimizer steps to train."""
    log_every: int = 10
    """Write a metrics record every this many steps."""
    val_every: int = 250
    """Deterministic validation every this many steps (0: only at the end)."""
    ckpt_every: int = 250
    """Checkpoint every this many steps (0: only at the end)."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """On a non-finite loss agreed across ranks: skip the update and count it, or stop the run as diverged."""
    max_nonfinite: int = 20
    """Under ``skip``: this many non-finite steps in a row mark the run diverged."""
    diverge_grad_norm: float | None = 1000.0
    """Divergence rule (``run/divergence.py``): a pre-clip global grad norm above this for ``diverge_steps``
    consecutive steps ends the run as diverged, finite values or not (healthy digits runs peak near 2; None: off)."""
    diverge_steps: int = 10
    """Consecutive steps above ``diverge_grad_norm`` that end the run."""
    max_train_s: float = 0.0
    """Stop after this many seconds of training steps (validation excluded) as if ``steps`` were reached; 0: off."""
    threads: int = 0
    """torch intra-op threads (0: leave torch's default)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; ``auto`` takes CUDA when present."""
    preempt_grace_s: float = 120.0
    """On SIGTERM, SIGUSR1 or SIGUSR2: seconds to finish the step in flight and write its checkpoint before
    exiting at once anyway (``run.preempt``); keep it below the time a scheduler waits before SIGKILL."""
    preempt_check_every: int = 1
    """With several ranks, agree on a stop (one all-reduce of a flag) every this many steps."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        require(self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every})")
        require(self.val_every >= 0, f"val_every must be >= 0 (got {self.val_every})")
        require(self.ckpt_every >= 0, f"ckpt_every must be >= 0 (got {self.ckpt_every})")
        require(self.max_nonfinite >= 1, f"max_nonfinite must be >= 1 (got {self.max_nonfinite})")
        require(self.diverge_grad_norm is None or self.diverge_grad_norm > 0,
                 f"diverge_grad_norm must be > 0 or null (got {self.diverge_grad_norm})")
        require(self.diverge_steps >= 1, f"diverge_steps must be >= 1 (got {self.diverge_steps})")
        # more threads than any node has cores is a typo that torch would try to honour
        require(0 <= self.threads <= 1024, f"threads must be in [0, 1024] (got {self.threads})")
        require(self.max_train_s >= 0, f"max_train_s must be >= 0 (got {self.max_train_s})")
        require(self.preempt_grace_s > 0, f"preempt_grace_s must be > 0 (got {self.preempt_grace_s})")
        require(self.preempt_check_every >= 1, f"preempt_check_every must be >= 1 (got {self.preempt_check_every})")


@section
class DataConfig:
    dataset: Literal["digits", "latent_shards"] = "digits"
    """``digits``: scikit-learn's digits (embedded); ``latent_shards``: pre-encoded shards."""
    shards: str | None = None
    """Directory of pre-encoded latent shards (``latent_shards`` only)."""
    val_fraction: float = 0.1
    """Held-out fraction, split deterministically."""
    split_seed: int = 0
    """Seed of the train/validation split."""
    batch_size: int = 128
    """Global rows per optimizer step (all ranks and accumulation micro-batches)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step on each rank."""

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        require(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1 (got {self.grad_accum})")
        require(self.batch_size % self.grad_accum == 0,
                 f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        require(self.dataset != "latent_shards" or self.shards is not None,
                 "shards must be set when dataset is 'latent_shards'")


@section
class CodecConfig:
    kind: Literal["autoencoder", "identity", "qwen_vae"] = "autoencoder"
    """Latent codec: the project's tiny digits autoencoder, identity (pixel space), or the Qwen-Image VAE."""
    latent_channels: int = 4
    """Autoencoder latent channels (latent is [C, 4, 4] for 8x8 digits)."""
    hidden: int = 64
    """Autoencoder conv width."""
    steps: int = 3000
    """Autoencoder training steps."""
    lr: float = 2e-3
    """Autoencoder learning rate."""
    seed: int = 11
    """Autoencoder init/training seed."""
    path: str | None = None
    """Pretrained codec location (``qwen_vae``)."""

    def __post_init__(self) -> None:
        require(self.latent_channels >= 1, f"latent_channels must be >= 1 (got {self.latent_channels})")
        require(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        require(self.lr > 0, f"lr must be > 0 (got {self.lr})")


@section
class AuxConfig:
    cache_dir: str | None = None
    """Where trained auxiliaries live; default ``$TWINFLOW_LAB_CACHE`` or ``~/.cache/twinflow-lab``."""
    reward_steps: int = 2000
    """Training steps of the digits reward classifier."""
    reward_seed: int = 21
    """Seed of the digits reward classifier."""
    eval_steps: int = 2000
    """Training steps of the evaluation feature network."""
    eval_seed: int = 31
    """Seed of the evaluation feature network (distinct from the reward model's)."""
    proxy_steps: int = 3000
    """Training steps of the digits proxy reward network (``rl.reward: proxy``)."""
    proxy_seed: int = 41
    """Seed of the proxy reward network and of its label noise."""

    def __post_init__(self) -> None:
        require(self.reward_steps >= 1, f"reward_steps must be >= 1 (got {self.reward_steps})")
        require(self.eval_steps >= 1, f"eval_steps must be >= 1 (got {self.eval_steps})")
        require(self.proxy_steps >= 1, f"proxy_steps must be >= 1 (got {self.proxy_steps})")
        require(self.reward_seed != self.eval_seed,
                 "eval_seed must differ from reward_seed (the metric must not share the reward's init)")


@section
class QwenModelConfig:
    pretrained: str | None = None
    """Local diffusers directory (or its ``transformer`` subfolder) of Qwen-Image-2512; None: random init from ``tiny``."""
    tiny: bool = False
    """Build a tiny random-weight config of the same class (tests)."""
    num_layers: int | None = None
    """Override the number of transformer blocks (reduced-depth benchmarks)."""

    def __post_init__(self) -> None:
        require(self.num_layers is None or self.num_layers >= 1, f"num_layers must be >= 1 (got {self.num_layers})")


@section
class ModelConfig:
    family: Literal["mlp", "qwen_image"] = "mlp"
    """Network family: the embedded residual MLP, or diffusers' QwenImageTransformer2DModel."""
    hidden: int = 512
    """MLP width."""
    depth: int = 4
    """MLP residual blocks."""
    time_dim: int = 128
    """Sinusoidal time-embedding size."""
    tt_init: Literal["copy", "normal"] = "copy"
    """Init of the gated target-time embedding E2: a copy of E1, or small-normal output layer."""
    sign_embedding: bool = False
    """Add a learned, zero-initialised embedding when t < 0."""
    qwen: QwenModelConfig = field(default_factory=QwenModelConfig)
    """Qwen-Image adapter settings (family ``qwen_image``)."""

    def __post_init__(self) -> None:
        require(self.hidden >= 8, f"hidden must be >= 8 (got {self.hidden})")
        require(self.depth >= 1, f"depth must be >= 1 (got {self.depth})")
        require(self.time_dim >= 4 and self.time_dim % 2 == 0, f"time_dim must be even and >= 4 (got {self.time_dim})")


@section
class TeacherConfig:
    checkpoint: str = "auto"
    """Base model weights: ``auto`` = the cache entry for this config (made by ``twinflow-train teacher``), or a path."""
    steps: int = 6000
    """Teacher flow-matching training steps."""
    lr: float = 1e-3
    """Teacher learning rate."""
    batch_size: int = 256
    """Teacher batch size."""
    cond_dropout: float = 0.1
    """Probability of the null prompt during teacher training (enables CFG)."""
    seed: int = 0
    """Teacher training seed."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up before the cosine decay (a high peak rate needs one)."""
    ema_decay: float = 0.999
    """Cap of the teacher's weight EMA (warm-up ``(1 + k) / (10 + k)``); the EMA weights are the teacher."""
    sample_steps: int = 28
    """Euler steps when sampling the teacher for comparison."""
    cfg_scale: float | None = None
    """Teacher sampling guidance; None = the guidance the student is distilled toward: 1 / (1 - r) for an
    ``ema`` or ``student`` target, 1 + r for a ``frozen`` one (r = method.enhanced_ratio; docs/method.md §2.2)."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        require(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        require(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        require(0.0 <= self.cond_dropout < 1.0, f"cond_dropout must be in [0, 1) (got {self.cond_dropout})")
        require(self.sample_steps >= 1, f"sample_steps must be >= 1 (got {self.sample_steps})")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps) (got {self.warmup_steps})")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        require(self.cfg_scale is None or self.cfg_scale >= 0, f"cfg_scale must be >= 0 (got {self.cfg_scale})")


@section
class MethodConfig:
    layout: Literal["partitioned", "tutorial"] = "partitioned"
    """``partitioned``: four row groups per batch (docs/method.md §2.1); ``tutorial``: every term on every row."""
    group_ratios: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    """Relative sizes of the e2e, mul, any and adv groups."""
    mul_gap: float = 0.05
    """Largest relative gap t - tt of the mul group."""
    estimate_order: int = 2
    """RCGM estimate order N (Euler sub-steps of the target rollout)."""
    delta_t: float = 0.01
    """RCGM small step D."""
    target_clamp: float = 1.0
    """Clamp of the RCGM residual and of the rectify velocity difference."""
    enhanced_ratio: float = 0.5
    """CFG enhancement r_enh of the target."""
    enhanced_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """Open interval (lo, hi) of t where the CFG-enhanced target applies."""
    rect_weight: float = 1.0
    """lambda_rect of the rectification loss."""
    loss: Literal["l2", "barron"] = "barron"
    """Per-sample loss rho."""
    barron_c: float = 1e-3
    """Barron scale c (alpha = 1)."""
    target: Literal["ema", "student", "frozen"] = "ema"
    """Target network T: EMA of the student, the student under no_grad, or a frozen copy of the base model."""
    ema_decay: float = 0.99
    """Target EMA decay (approached by the warm-up recursion)."""

    def __post_init__(self) -> None:
        require(len(self.group_ratios) == 4, f"group_ratios must have 4 entries (e2e, mul, any, adv), got {len(self.group_ratios)}")
        require(all(r >= 0 for r in self.group_ratios) and sum(self.group_ratios) > 0,
                 f"group_ratios must be >= 0 with a positive sum (got {self.group_ratios})")
        require(0.0 < self.mul_gap < 1.0, f"mul_gap must be in (0, 1) (got {self.mul_gap})")
        require(self.estimate_order >= 1, f"estimate_order must be >= 1 (got {self.estimate_order})")
        require(0.0 < self.delta_t < 1.0, f"delta_t must be in (0, 1) (got {self.delta_t})")
        require(self.target_clamp > 0, f"target_clamp must be > 0 (got {self.target_clamp})")
        require(self.enhanced_ratio >= 0, f"enhanced_ratio must be >= 0 (got {self.enhanced_ratio})")
        require(len(self.enhanced_range) == 2 and 0.0 <= self.enhanced_range[0] <= self.enhanced_range[1] <= 1.0,
                 f"enhanced_range must be [lo, hi] with 0 <= lo <= hi <= 1 (got {self.enhanced_range})")
        require(self.rect_weight >= 0, f"rect_weight must be >= 0 (got {self.rect_weight})")
        require(self.barron_c > 0, f"barron_c must be > 0 (got {self.barron_c})")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})")


@section
class SamplerConfig:
    """Few-step UCGM sampler of the student (docs/method.md §3)."""

    tt_mode: Literal["few", "mul", "any"] = "few"
    """Target time given to the network each step: 0 (``few``, the public 2/4-step inference), sigma_i, or sigma_{i+1}."""
    gaps: list[float] = field(default_factory=lambda: [0.001, 0.6])
    """[g0, g1] of the grid linspace(g0, 1 - g1, S)."""
    kumaraswamy: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """(a, b, c) of the time warp 1 - (1 - u^a)^b)^c; all ones = no warp."""
    stochastic_ratio: float = 1.0
    """r: share of fresh noise in the re-noised estimate."""

    def __post_init__(self) -> None:
        require(len(self.gaps) == 2 and all(0.0 <= g < 1.0 for g in self.gaps) and sum(self.gaps) < 1.0,
                 f"gaps must be [g0, g1] in [0, 1) with g0 + g1 < 1 (got {self.gaps})")
        require(len(self.kumaraswamy) == 3 and all(v > 0 for v in self.kumaraswamy),
                 f"kumaraswamy must be three positive numbers (got {self.kumaraswamy})")
        require(0.0 <= self.stochastic_ratio <= 1.0, f"stochastic_ratio must be in [0, 1] (got {self.stochastic_ratio})")


@section
class TimeDistConfig:
    kind: Literal["uniform", "beta", "logit_normal"] = "uniform"
    """Static distribution of a training time."""
    a: float = 1.0
    """Beta alpha."""
    b: float = 1.0
    """Beta beta."""
    mean: float = 0.0
    """Logit-normal location."""
    std: float = 1.0
    """Logit-normal scale."""

    def __post_init__(self) -> None:
        require(self.a > 0 and self.b > 0, f"a and b must be > 0 (got a={self.a}, b={self.b})")
        require(self.std > 0, f"std must be > 0 (got {self.std})")


@section
class RenoiseConfig:
    """Time samplers and Dynamic Renoise Sampling (docs/method.md §4)."""

    main: TimeDistConfig = field(default_factory=TimeDistConfig)
    """Distribution of the main t of the non-adv rows."""
    adv: TimeDistConfig = field(default_factory=TimeDistConfig)
    """Distribution of s of the adv (fake-branch) rows."""
    rect: TimeDistConfig = field(default_factory=TimeDistConfig)
    """Distribution of the rectification renoise time s."""
    schedule: Literal["off", "blog_linear", "dmdr_cosine"] = "off"
    """Dynamic schedule: Beta(bias, 1) with bias linear start->end, or DMDR's Beta(1+3c, 1+0.5c) cosine."""
    start: float = 4.0
    """blog_linear: bias at step 0."""
    end: float = 1.0
    """blog_linear: bias from ``steps`` on."""
    steps: int = 3000
    """Length of the dynamic schedule (K)."""
    applies_to: list[Literal["main", "adv", "rect"]] = field(default_factory=lambda: ["rect"])
    """Which times the dynamic schedule replaces."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        require(self.start > 0 and self.end > 0, f"start and end must be > 0 (got start={self.start}, end={self.end})")
        require(len(set(self.applies_to)) == len(self.applies_to), f"applies_to has duplicates ({self.applies_to})")


@section
class RlConfig:
    """Latent-space reward guidance (docs/method.md §5)."""

    enabled: bool = False
    """Add w_rl(k) * L_rl to the TwinFlow loss."""
    reward: Literal["none", "digits", "proxy", "hpsv2"] = "none"
    """Reward model: ``digits`` (log p(prompted class) of the project's classifier), ``proxy`` (the learned
    proxy of the digits gold score, see twinflow_train/assets/auxiliary.py), or HPSv2 (extra ``hpsv2``)."""
    hpsv2_checkpoint: str | None = None
    """Local path of the HPS v2/v2.1 checkpoint (reward ``hpsv2``)."""
    hpsv2_arch: str = "ViT-H-14"
    """open_clip architecture of the HPSv2 scorer: a name open_clip knows, or the path of an open_clip
    model-config ``.json`` (a scorer of another shape, registered under the file's stem)."""
    estimator: Literal["exact", "reencode"] = "exact"
    """Latent gradient: autograd through the decoder, or the report's re-encode projection."""
    reencode_step: float = 1.0
    """Pixel step of the re-encode estimator (separate from the loss weight)."""
    decoder_dtype: Literal["fp32", "bf16"] = "fp32"
    """Decoder precision of the exact estimator's backward (Qwen-Image codec): ``fp32`` is the exact
    gradient (a checkpointed, cache-free decode, bitwise the plain decode's); ``bf16`` decodes with a bf16
    copy of the decoder, an approximation that halves most of its activation memory."""
    normalize: Literal["none", "rms"] = "none"
    """Per-sample normalisation of the latent reward gradient: ``none`` (fades as the reward saturates) or
    ``rms`` (unit RMS per row: full push at any saturation, never fades; the training report's setting)."""
    weight: float = 10.0
    """Peak RL weight w of the per-element surrogate. 10 is where the two-objective search on digits
    (proxy reward, 1,800 steps) put the most reward within 1.5x vanilla's FD@2 (BENCHMARKS.md); another
    reward has another gradient scale, so search it there (``ablations/search-rl-weight.yaml``)."""
    schedule: Literal["hard", "linear", "sigmoid"] = "hard"
    """w_rl(k): hard switch at ``warmup``, linear ramp over [warmup, warmup + ramp], or sigmoid at ``center`` with ``width``."""
    warmup: int = 2000
    """Hard-switch / linear-ramp start step."""
    ramp: int = 1000
    """Linear ramp length."""
    center: float = 2500.0
    """Sigmoid centre k0."""
    width: float = 250.0
    """Sigmoid width tau."""
    start: int | None = None
    """First step the RL term acts: the weight is exactly 0 for steps < ``start`` and the schedule's own value
    from ``start`` on (a sigmoid ramp cut at an explicit start, so it is exactly zero before it; any schedule).
    None: the schedule alone decides (a sigmoid then acts, however faintly, from step 1)."""
    clip: Literal["none", "param", "output"] = "none"
    """RL-term clipping: none, parameter space (own max norm), or output space (relative to the rectify signal)."""
    clip_norm: float = 1.0
    """Parameter-space max norm of the RL gradient."""
    grad_stash: Literal["device", "host"] = "device"
    """Where a split step (log steps; ``clip: param`` with ``data.grad_accum`` > 1) keeps the RL term's
    gradient during the TwinFlow backward: a second sharded fp32 gradient set on the ``device``, or in
    ``host`` memory (same values; one device-host round trip of a gradient set per split step)."""
    clip_tau: float = 1.0
    """Output-space bound per row: RMS of the RL term's gradient on the generator output <= tau * RMS of the
    rectification term's gradient on it."""

    def __post_init__(self) -> None:
        require(not self.enabled or self.reward != "none", "reward must be set when enabled is true")
        require(not self.enabled or self.reward != "hpsv2" or self.hpsv2_checkpoint is not None,
                 "hpsv2_checkpoint must be set to the local HPS v2/v2.1 checkpoint file when reward is 'hpsv2'")
        require(self.weight >= 0, f"weight must be >= 0 (got {self.weight})")
        require(self.reencode_step > 0, f"reencode_step must be > 0 (got {self.reencode_step})")
        require(self.decoder_dtype == "fp32" or self.estimator == "exact",
                 f"decoder_dtype {self.decoder_dtype!r} applies to estimator 'exact' only (got {self.estimator!r})")
        require(self.warmup >= 0, f"warmup must be >= 0 (got {self.warmup})")
        require(self.ramp >= 1, f"ramp must be >= 1 (got {self.ramp})")
        require(self.width > 0, f"width must be > 0 (got {self.width})")
        require(self.start is None or self.start >= 1, f"start must be >= 1 or null (got {self.start})")
        require(self.clip_norm > 0, f"clip_norm must be > 0 (got {self.clip_norm})")
        require(self.clip_tau > 0, f"clip_tau must be > 0 (got {self.clip_tau})")


@section
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Global clip of the total gradient (pre-clip norm is logged)."""

    def __post_init__(self) -> None:
        require(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1) (got {self.betas})")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        require(self.max_grad_norm > 0, f"max_grad_norm must be > 0 (got {self.max_grad_norm})")


@section
class SpikeConfig:
    enabled: bool = False
    """Decay the learning rate when the pre-clip grad norm spikes."""
    window: int = 50
    """Rolling window of pre-clip norms."""
    k: float = 6.0
    """Spike when norm > median + k * MAD of the window."""
    floor: float = 0.0
    """...and norm > this absolute floor."""
    gamma: float = 0.5
    """lr <- max(gamma * lr, min_lr) on a spike."""
    cooldown: int = 20
    """Steps after a decay during which no further decay happens."""
    skip_update: bool = False
    """Also skip the optimizer update of the spiking step."""

    def __post_init__(self) -> None:
        require(self.window >= 5, f"window must be >= 5 (got {self.window})")
        require(self.k > 0, f"k must be > 0 (got {self.k})")
        require(self.floor >= 0, f"floor must be >= 0 (got {self.floor})")
        require(0 < self.gamma < 1, f"gamma must be in (0, 1) (got {self.gamma})")
        require(self.cooldown >= 0, f"cooldown must be >= 0 (got {self.cooldown})")


@section
class ScheduleConfig:
    """Learning-rate policy (docs/method.md §6)."""

    policy: Literal["constant", "cosine", "plateau"] = "constant"
    """Base policy; ``plateau`` steps on the deterministic validation loss."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate."""
    min_lr: float = 1e-7
    """Floor of every decay."""
    plateau_factor: float = 0.1
    """ReduceLROnPlateau factor."""
    plateau_patience: int = 3
    """ReduceLROnPlateau patience, in validations."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """Decay-on-spike, on top of the base policy."""

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        require(self.min_lr >= 0, f"min_lr must be >= 0 (got {self.min_lr})")
        require(0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1) (got {self.plateau_factor})")
        require(self.plateau_patience >= 0, f"plateau_patience must be >= 0 (got {self.plateau_patience})")


@section
class ParallelConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; ``auto``: nccl on CUDA, gloo on CPU."""
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype of the step's forwards; weights, optimizer state and reductions stay fp32. Under FSDP2
    the parameter dtype of its policy; with plain modules (``fsdp: never``, one process) a bf16 autocast of
    the step's forwards, each model's output returned in fp32."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (the last block always keeps them)."""
    fsdp: Literal["auto", "always", "never"] = "auto"
    """FSDP2 wrapping: ``auto`` wraps when the world size is > 1, under bf16 mixed precision (its FSDP2
    policy) and for ``qwen_image`` (its placement relies on FSDP2); plain modules otherwise, whose
    per-call hooks cost more than the arithmetic of a small model. ``always`` also wraps a 1-process run;
    ``never`` keeps plain modules in one process, bf16 included (an autocast instead of FSDP2's policy)."""


@section
class EvalConfig:
    n_samples: int = 1000
    """Generated samples per NFE for the sample metrics (fixed noise and prompts)."""
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Student step counts evaluated."""
    seed: int = 1234
    """Seed of the fixed validation noise, times and prompts."""
    teacher: bool = True
    """Also record the teacher's metrics at its full step count (once per run)."""
    reference: Literal["train", "held_out"] = "train"
    """Real digits the FD and KID compare with: the training split (1,618 digits, the distribution the teacher and
    student learn) or the held-out split (179; its FD floor of ~40 hides a 1-NFE gap, docs/method.md 7.1)."""
    ema_decay: float = 0.0
    """Evaluation EMA of the student: when > 0, a second, slower EMA (same warm-up as ``method.ema_decay``)
    is what validation, the best/final sample files and ``twinflow-train sample/eval`` judge; 0: the raw student."""

    def __post_init__(self) -> None:
        require(self.n_samples >= 10, f"n_samples must be >= 10 (got {self.n_samples})")
        require(len(self.nfe) >= 1 and all(n >= 1 for n in self.nfe), f"nfe must be a non-empty list of ints >= 1 (got {self.nfe})")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})")


@section
class TelemetryConfig:
    wandb: Literal["off", "offline", "online", "disabled"] = "off"
    """Mirror records to Weights & Biases; ``WANDB_MODE`` overrides offline/online."""
    project: str = "twinflow-lab"
    """W&B project."""
    group: str | None = None
    """W&B group (the harness sets the grid name)."""
    name: str | None = None
    """W&B run name (the harness sets arm-seed)."""


@section
class CheckpointConfig:
    format: Literal["full", "dcp"] = "full"
    """``full``: one file gathered on rank 0; ``dcp``: sharded torch.distributed.checkpoint directory."""
    keep_last_good: bool = True
    """Keep a copy of the last checkpoint taken before any non-finite step."""
    keep_latest_k: int = 1
    """Earlier checkpoints kept besides ``latest`` (``checkpoints/step-<k>/``), the last fallbacks of a
    resume whose newer checkpoints do not verify; 0 keeps none."""

    def __post_init__(self) -> None:
        require(self.keep_latest_k >= 0, f"keep_latest_k must be >= 0 (got {self.keep_latest_k})")


@section
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    renoise: RenoiseConfig = field(default_factory=RenoiseConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        groups = sum(1 for r in self.method.group_ratios if r > 0)
        micro = self.data.batch_size // self.data.grad_accum
        require(self.method.layout == "tutorial" or micro >= groups,
                 f"data.batch_size per micro-batch ({micro} = batch_size / grad_accum) is smaller than the "
                 f"number of non-empty method.group_ratios groups ({groups})")
        require(self.teacher.cfg_scale is not None or self.method.target == "frozen" or self.method.enhanced_ratio < 1,
                 f"method.enhanced_ratio {self.method.enhanced_ratio} >= 1 with target {self.method.target!r} has no "
                 f"finite distilled guidance (1 / (1 - r)); use r < 1 or set teacher.cfg_scale")
        require(self.model.family != "qwen_image" or self.codec.kind == "qwen_vae" or self.data.dataset == "latent_shards",
                 "model.family 'qwen_image' needs codec.kind 'qwen_vae' or data.dataset 'latent_shards'")
        rl = self.rl
        # the reward guides the one-step generator output, which only the e2e rows produce
        require(not rl.enabled or self.method.layout == "tutorial" or self.method.group_ratios[0] > 0,
                 f"rl.enabled guides the one-step generator output of the e2e rows; method.group_ratios[0] (e2e) "
                 f"must be > 0 (got {self.method.group_ratios})")
        require(not rl.enabled or rl.reward not in ("digits", "proxy") or self.data.dataset == "digits",
                 f"rl.reward {rl.reward!r} scores 8x8 digit images; it needs data.dataset 'digits' "
                 f"(got {self.data.dataset!r})")
        require(self.schedule.warmup_steps < self.run.steps,
                 f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be < run.steps ({self.run.steps}): "
                 f"the learning rate would never reach optim.lr")
        require(self.schedule.min_lr <= self.optim.lr,
                 f"schedule.min_lr ({self.schedule.min_lr}) must be <= optim.lr ({self.optim.lr})")

    @property
    def teacher_cfg_scale(self) -> float:
        """Guidance the teacher is sampled at: ``teacher.cfg_scale``, else the student's distilled guidance."""
        if self.teacher.cfg_scale is not None:
            return self.teacher.cfg_scale
        return distilled_guidance(target=self.method.target, ratio=self.method.enhanced_ratio)


def distilled_guidance(*, target: str, ratio: float) -> float:
    """The CFG scale the CFG-enhanced objective converges to (docs/method.md §2.2).

    With an EMA or student target, T already carries the guidance it is trained toward, so the fixed
    point of ``v_enh = v + r * (T_c - T_u)`` is ``T_c - T_u = (v_c - v_u) / (1 - r)``: guidance
    ``1 / (1 - r)`` (2 at r = 0.5, 5 at r = 0.8). A frozen base model does not move: ``1 + r``.
    """
    if target == "frozen":
        return 1.0 + ratio
    if target in ("ema", "student"):
        if ratio >= 1.0:
            raise ValueError(f"method.enhanced_ratio {ratio} >= 1 with target {target!r}: no finite fixed point")
        return 1.0 / (1.0 - ratio)
    raise ValueError(f"method.target: unknown value {target!r}; valid: 'ema', 'student', 'frozen'")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The sections of a trainer config file, read like every other input file (``yamlio.read_mapping``)."""
    try:
        return read_mapping(path, kind="config", top_keys=[f.name for f in dataclasses.fields(Config)])
    except InputError as e:
        raise ConfigError(e.problems) from None


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply dotted overrides, validate everything."""
    raw = read_yaml(path) if path is not None else {}
    if overrides:
        over = parse_overrides(list(overrides)) if not isinstance(overrides, Mapping) else overrides
        raw = deep_merge(raw, over)
    try:
        return from_dict(Config, raw)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError([f"{where}{p}" for p in e.problems]) from None

"""The training loop: ``fit()`` orchestrates, ``train_step()`` does one optimizer step.

Every rank draws the same global batch for a step and takes its micro-batches
(``data.micro_batch``); all noise and times come from generators seeded by
(seed, step, micro-batch), so runs are reproducible, resumable bit-for-bit, and
a 2-process run follows a 1-process run with the same global batch.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, config_hash, read_yaml, to_dict, to_yaml, from_dict, ConfigError
from ..assets.auxiliary import CacheCorruptError, entry_record
from ..assets.teacher import teacher_path
from ..data.batches import Setup, step_generator
from ..data.imaging import save_samples
from ..distributed import checkpoint as ckpt
from ..distributed import precast as bf16
from ..distributed.safeload import load_data
from ..distributed.parallel import (Dist, agree_bad_flag, barrier, forward_precision, init_distributed, mean_over_ranks,
                                    reshard_all, shutdown)
from ..evaluation.evaluate import Evaluator
from ..evaluation.teacher_cache import cached_teacher_metrics
from ..method.ema import EmaPairs, ema_apply_, ema_decay, ema_pairs
from ..method.twinflow import TwinFlow, check_rows_per_rank
from ..models.base import FlowModel
from ..models.registry import build_model, model_family, parallelize, place_frozen, uses_fsdp
from ..rl.guidance import RewardGuidance
from ..rl.rewards import build_reward, check_reward_config
from .grads import TermGradients, clip_grads_
from .divergence import GradNormRule
from .lr_policy import LrPolicy
from .setup import build_setup
from ..rundir import (EXIT_BAD_CONFIG, EXIT_DIVERGED, EXIT_DONE, EXIT_FAILED, EXIT_PREEMPTED,  # noqa: F401
                     EXIT_PREEMPTED_NOW, FORK_FILE, META_FILE, TEACHER_SAMPLES, MetricsWriter, atomic_path,
                     atomic_write_json, atomic_write_text, best_weights, config_file, file_digest, fork_checkpoint,
                     last_good_checkpoint, latest_checkpoint, metrics_file, read_json, resume_step, sample_stem,
                     samples_dir, truncate_metrics, write_status)
from .preempt import Preempted, PreemptWatch, signals_at_steps
from ..method.timesamplers import build_time_samplers, dynamic_value
from .telemetry import WandbMirror
from .fork import FORK_BEST, ForkRequest, check_fork_at, check_fork_request, fork_problem

class Diverged(Exception):
    """The run cannot go on: non-finite values under the configured policy, or the grad-norm divergence rule.

    ``step`` and ``stats`` are the step that ended the run and its statistics; ``record`` holds the further
    fields of its metrics record (events, counts): the record is logged as evidence before the run stops."""

    def __init__(self, message: str, *, step: int, stats: dict[str, Any], record: dict[str, Any]):
        super().__init__(message)
        self.step = step
        self.stats = stats
        self.record = record


# --------------------------------------------------------------------------- preflight


def preflight_teacher(cfg: Config) -> Path | None:
    """The base weights' file, checked; None where the model builder loads them itself (the family's
    ``base_weights_in_model``, e.g. a Qwen-Image model directory)."""
    family = model_family(cfg)
    family.check_weights(cfg)
    if family.base_weights_in_model(cfg):
        if cfg.eval.ema_decay > 0:
            raise ConfigError(f"eval.ema_decay: the evaluation EMA is not built for {cfg.model.family} base weights "
                              "read sharded from the model directory; set it to 0")
        return None
    tpath = teacher_path(cfg)
    if tpath.is_dir():
        raise ConfigError(f"teacher.checkpoint: {tpath} is a directory ({family.teacher_dir_hint})")
    if not tpath.is_file():
        hint = ("run `twinflow-train teacher` with the same config first" if cfg.teacher.checkpoint == "auto"
                else "the path does not exist")
        raise ConfigError(f"teacher.checkpoint: no teacher weights at {tpath} ({hint})")
    if cfg.teacher.checkpoint == "auto":
        try:
            entry_record(tpath)  # the checksum: a corrupt cached teacher is never loaded
        except (CacheCorruptError, FileNotFoundError) as e:
            raise ConfigError(f"teacher.checkpoint: the cached teacher {tpath.parent} is not usable ({e}); "
                              "`twinflow-train teacher` with the same config rebuilds it") from None
    return tpath


def preflight(cfg: Config, run_dir: Path) -> Path | None:
    """Everything that can be checked before a single file is written. Returns ``preflight_teacher``'s path."""
    tpath = preflight_teacher(cfg)
    if cfg.method.layout == "partitioned":
        # the launcher's world size (torchrun sets WORLD_SIZE); one process otherwise
        world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
        try:
            check_rows_per_rank(batch_size=cfg.data.batch_size, grad_accum=cfg.data.grad_accum, world=world,
                                ratios=cfg.method.group_ratios)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.rl.enabled:
        check_reward_config(cfg)
    existing = config_file(run_dir)
    if existing.is_file():
        try:
            old = from_dict(Config, read_yaml(existing))
        except ConfigError as e:
            raise ConfigError(f"{existing}: existing run config does not load ({e}); refusing to overwrite") from None
        if config_hash(old) != config_hash(cfg):
            raise ConfigError(f"{run_dir} already holds a run with a different config "
                              f"({config_hash(old)} != {config_hash(cfg)}); use a new run directory")
    return tpath


# --------------------------------------------------------------------------- state


@dataclass
class Counters:
    nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    spikes: int = 0
    skipped: int = 0
    best_val: float = math.inf
    best_step: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0
    """Seconds spent in training steps only (no validation, sampling or checkpoints)."""
    nonfinite_since_ckpt: int = 0
    above_bound_in_a_row: int = 0
    """The divergence rule's count (``GradNormRule``): consecutive finite steps, up to the last one accounted for,
    whose pre-clip norm was above ``run.diverge_grad_norm``."""
    above_bound_since: int = 0
    """The first step of that count."""


@dataclass
class Pending:
    """A step whose update was decided on the device; its host bookkeeping waits for the next read."""

    step: int
    stats: dict[str, torch.Tensor]
    bad: torch.Tensor
    """0-dim float on the device: 1.0 where the step was non-finite on some rank (update skipped)."""


@dataclass
class LogWindow:
    """What the metrics record of the next log step summarises over the steps since the last one."""

    max_norm: float = 0.0
    events: dict[str, int] = field(default_factory=dict)

    def add(self, events: dict[str, int], norm: float) -> None:
        if math.isfinite(norm):
            self.max_norm = max(self.max_norm, norm)
        for k, v in events.items():
            self.events[k] = self.events.get(k, 0) + int(v)


@dataclass
class Run:
    cfg: Config
    dist: Dist
    setup: Setup
    model: nn.Module
    target: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    method: TwinFlow
    time_samplers: dict[str, Any]
    policy: LrPolicy
    evaluator: Evaluator
    guidance: Any = None
    step: int = 0
    """The last optimizer step completed (what status.json reports on failure)."""
    counters: Counters = field(default_factory=Counters)
    eval_ema: nn.Module | None = None
    """The evaluation EMA of the student (``eval.ema_decay`` > 0): validated, sampled and checkpointed."""
    fsdp: bool = True
    """Modules are FSDP2-wrapped (``parallel.use_fsdp``)."""
    gated: bool = False
    """Updates are decided on the device (``_gated_update``): no host read on steps that do not log."""
    pending: list[Pending] = field(default_factory=list)
    log_window: LogWindow = field(default_factory=LogWindow)
    preempt: PreemptWatch | None = None
    """Signal handling of this fit (``run.preempt``); None: signals keep their default action."""
    _pairs: dict[str, EmaPairs] = field(default_factory=dict)
    precast: list[Any] = field(default_factory=list)
    """``Bf16Linears`` of the no-grad networks the step calls under a bf16 autocast (plain modules,
    ``mixed_precision: bf16``): refreshed before each step's forwards."""
    teacher_weights: Path | None = None
    """The teacher's weights file (``preflight_teacher``): keys the cached teacher metrics."""
    fault_grad_scale: tuple[int, float] | None = None
    """Tests only (``TWINFLOW_FAULT_GRAD_SCALE=STEP:SCALE``): gradients are multiplied by SCALE before the
    clip from step STEP on, so the pre-clip norm explodes while the clipped updates stay finite."""

    def extra_modules(self) -> dict[str, nn.Module]:
        extra = {"target": self.target} if self.target is not self.model and self.cfg.method.target == "ema" else {}
        if self.eval_ema is not None:
            extra["eval_ema"] = self.eval_ema
        return extra

    @property
    def eval_model(self) -> nn.Module:
        """The network validation and sample files judge: the evaluation EMA where configured."""
        return self.eval_ema if self.eval_ema is not None else self.model

    def ema_pairs(self, name: str, ema: nn.Module) -> EmaPairs:
        """``ema``'s update pairs with the student; cached for plain modules, whose tensors never change
        (FSDP2 swaps sharded and gathered parameters, so its pairs are rebuilt every time)."""
        if self.fsdp:
            return ema_pairs(ema, self.model)
        if name not in self._pairs:
            self._pairs[name] = ema_pairs(ema, self.model)
        return self._pairs[name]


def _shard(cfg: Config, d: Dist, module: FlowModel, *, frozen: bool = False) -> nn.Module:
    return (place_frozen if frozen else parallelize)(module.to(d.device), d.mesh, cfg)


def build_base(cfg: Config, setup: Setup, teacher_weights: Path | None) -> FlowModel:
    """The base model the student starts from (and the teacher it is compared with)."""
    base = build_model(cfg, latent_shape=setup.data.latent_shape, num_classes=setup.num_classes)
    if teacher_weights is not None:
        base.load_state_dict(load_data(teacher_weights))
    return base


def _frozen_copy(module: nn.Module) -> nn.Module:
    copied = copy.deepcopy(module)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW: the fused kernel for plain tensors (one kernel over every parameter, and it can skip a
    step on a device flag, see ``_gated_update``); the multi-tensor path for FSDP2's DTensors."""
    o = cfg.optim
    plain = not any(hasattr(p, "to_local") for p in params)
    impl = {"fused": True} if plain else {"foreach": True}
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, **impl)


def _host_copies(cfg: Config, d: Dist, setup: Setup,
                 teacher_weights: Path | None) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module | None]:
    """Student, frozen base, EMA target and evaluation EMA from one base model on the host (models that fit
    a host)."""
    base = build_base(cfg, setup, teacher_weights)
    # the base model never trained E2 (its gate is zero at tt = t): initialise it as the student's, so a
    # frozen-teacher target sees the teacher's own field at tt != t instead of a random perturbation
    base.init_target_time_embedding(cfg.model.tt_init, generator=step_generator(cfg.run.seed, 0xE2))
    student = copy.deepcopy(base)
    for p in base.parameters():
        p.requires_grad_(False)
    teacher = _shard(cfg, d, base, frozen=True).eval()
    ema = None
    if cfg.method.target == "ema":
        ema = _shard(cfg, d, _frozen_copy(student), frozen=True).eval()
    eval_ema = _shard(cfg, d, _frozen_copy(student), frozen=True).eval() if cfg.eval.ema_decay > 0 else None
    return _shard(cfg, d, student), teacher, ema, eval_ema


def build_copies(cfg: Config, d: Dist, setup: Setup,
                 teacher_weights: Path | None) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module | None]:
    """(student, frozen base, EMA target or None, evaluation EMA or None); base weights that the model holds
    itself are read sharded where the family can (``ModelFamily.sharded_copies``), never whole."""
    family = model_family(cfg)
    if family.base_weights_in_model(cfg) and family.sharded_copies is not None:
        c = family.sharded_copies(cfg, mesh=d.mesh, device=d.device, latent_shape=setup.data.latent_shape,
                                  with_ema=cfg.method.target == "ema")
        if c is not None:
            return c.student, c.teacher, c.ema, None
    return _host_copies(cfg, d, setup, teacher_weights)


def build_run(cfg: Config, d: Dist, teacher_weights: Path | None) -> Run:
    setup = build_setup(cfg, device=d.device)
    model, teacher, ema, eval_ema = build_copies(cfg, d, setup, teacher_weights)
    target = {"ema": lambda: ema, "student": lambda: model, "frozen": lambda: teacher}[cfg.method.target]()
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]  # adapters may freeze dead parameters
    optimizer = build_optimizer(cfg, trainable)
    guidance = None
    if cfg.rl.enabled:
        guidance = RewardGuidance(cfg.rl, codec=setup.codec, reward=build_reward(cfg, device=d.device))
    samplers = build_time_samplers(cfg.renoise)
    fsdp = uses_fsdp(cfg, world=d.world)
    precast = []
    if not fsdp and cfg.parallel.mixed_precision == "bf16" and cfg.method.target in ("ema", "frozen"):
        if bf16.fp32_linears(target):  # a base model already held in bf16 has nothing to cast
            precast.append(bf16.Bf16Linears(target))  # the EMA target or the frozen base model: cast once per step
    return Run(cfg=cfg, dist=d, setup=setup, model=model, target=target, teacher=teacher, optimizer=optimizer,
               method=TwinFlow(cfg.method, time_samplers=samplers,
                               with_rect_grad=cfg.rl.enabled and cfg.rl.clip == "output"), time_samplers=samplers,
               policy=LrPolicy(cfg.schedule, base_lr=o.lr, total_steps=cfg.run.steps),
               evaluator=Evaluator(cfg, setup, device=d.device), guidance=guidance, eval_ema=eval_ema,
               fsdp=fsdp, precast=precast,
               gated=optimizer.defaults.get("fused") is True and not cfg.schedule.spike.enabled)


# --------------------------------------------------------------------------- one step


def train_step(run: Run, step: int) -> dict[str, torch.Tensor | float]:
    """Forward/backward over this rank's micro-batches and the pre-clip norm; no optimizer update."""
    cfg, d = run.cfg, run.dist
    accum = cfg.data.grad_accum
    count = accum * d.world
    run.model.train()
    terms = None
    rl_on = run.guidance is not None
    if rl_on and run.guidance.weight(step) != 0.0:
        # per-term gradients on every logged step (telemetry); param-space clipping splits the terms when
        # micro-batches accumulate and otherwise clips the RL gradient in place (no second gradient set).
        # At weight 0 the step is the no-RL step bit for bit (run/fork.py relies on it): one backward of
        # the TwinFlow loss, no split (a split sums micro-batches and shards in another order), no clip.
        log_step = step % cfg.run.log_every == 0 or step == cfg.run.steps
        clip = run.guidance.param_clip_norm is not None
        terms = TermGradients(run.model, rl_clip_norm=run.guidance.param_clip_norm, stash=cfg.rl.grad_stash)
        split = log_step or (clip and accum > 1)
        terms.start(split=split, clip_in_place=clip and not split)
    for copies in run.precast:
        copies.refresh()  # after the last update (and any resume): this step's bf16 weights of the no-grad networks
    sums: dict[str, torch.Tensor] = {}
    for a in range(accum):
        index = a * d.world + d.rank
        x, cond = run.setup.data.micro_batch(step=step, index=index, count=count)
        gen = step_generator(cfg.run.seed, step, index, device=d.device)
        with forward_precision(cfg.parallel, device=d.device, fsdp=run.fsdp):
            out = run.method.loss(model=run.model, target=run.target, x=x, cond=cond, generator=gen, step=step)
            rl = None if not rl_on else run.guidance.term(x_gen=out.x_gen, cond=out.cond_gen,
                                                          rect_grad=out.rect_grad, step=step)
        micro = {"loss/main": out.loss_main.detach(), "loss/rect": out.loss_rect.detach()}
        if hasattr(run.model, "set_requires_gradient_sync"):
            run.model.set_requires_gradient_sync(a == accum - 1)  # reduce-scatter once per optimizer step
        if terms is not None:
            terms.backward(twinflow=out.loss, rl=rl.loss, scale=1.0 / accum)
            micro.update({k: v.detach() for k, v in rl.stats.items()})
            # the surrogate's value means little alone, but a non-finite reward must trip the non-finite policy
            micro["loss/total"] = out.loss.detach() + rl.loss.detach()
        else:
            (out.loss / accum).backward()
            if rl is not None:  # weight 0: the reward's telemetry only
                micro.update({k: v.detach() for k, v in rl.stats.items()})
            micro["loss/total"] = out.loss.detach()
        for k, v in micro.items():
            sums[k] = sums.get(k, 0.0) + v.float() / accum  # stays on the device: read on log steps only
    if terms is not None:
        sums.update({k: v.float() for k, v in terms.finish().items()})  # already global over ranks
    if run.fault_grad_scale is not None and step >= run.fault_grad_scale[0]:
        torch._foreach_mul_([p.grad for p in run.model.parameters() if p.grad is not None], run.fault_grad_scale[1])
    norm = clip_grads_(run.model.parameters(), max_norm=cfg.optim.max_grad_norm)  # pre-clip global norm
    sums["grad_norm/total"] = norm.detach().float()
    return sums


_GLOBAL_PREFIXES = ("grad_norm/", "grad_cos/", "rl/share", "rl/clip_coef")


def _is_global(key: str) -> bool:
    """Telemetry already reduced over ranks (gradient statistics); the rest is averaged on log steps."""
    return key.startswith(_GLOBAL_PREFIXES)


def _bad_flag(run: Run, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 where the step's loss or pre-clip norm is non-finite on any rank (0-dim, on the device)."""
    ok = torch.isfinite(stats["loss/total"]).all() & torch.isfinite(stats["grad_norm/total"])
    return agree_bad_flag((~ok).float(), run.dist.device)


def _apply_update(run: Run, step: int, stats: dict[str, torch.Tensor]) -> None:
    """Decide on the step's update: non-finite policy, spike policy, optimizer and EMAs.

    Gated runs (fused optimizer, no spike policy) decide on the device: the optimizer skips the
    step on the non-finite flag and the EMAs are gated by it, so nothing is read back; the counters,
    events and a ``Diverged`` stop follow at the next log, validation or checkpoint step
    (``_settle``), replaying every pending step in order with the same rules. Otherwise the flag
    and the norm are read here, one host synchronisation per step: the spike policy needs every
    norm in its host-side window before it can decide whether this very update is skipped and what
    the next step's learning rate is, and the multi-tensor optimizer has no device-side skip.
    """
    bad = _bad_flag(run, stats)
    if run.gated:
        _gated_update(run, step, bad)
        run.pending.append(Pending(step=step, stats=stats, bad=bad))
        return
    flag, norm = torch.stack([bad, stats["grad_norm/total"]]).tolist()  # the one host read of this step
    events = _account(run, step, stats, bad=flag > 0, norm=norm)
    if events["event/skipped"]:
        run.optimizer.zero_grad(set_to_none=True)
        return
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _update_emas(run, step, gate=None)


def _gated_update(run: Run, step: int, bad: torch.Tensor) -> None:
    # the fused AdamW kernel skips parameters, moments and step count where found_inf is non-zero
    run.optimizer.found_inf = bad  # type: ignore[attr-defined]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _update_emas(run, step, gate=1.0 - bad)


def _update_emas(run: Run, step: int, *, gate: torch.Tensor | None) -> None:
    cfg = run.cfg
    if run.fsdp and (cfg.method.target == "ema" or run.eval_ema is not None):
        reshard_all(run.model)  # the student's last block may still hold gathered weights from a no-grad forward
    if cfg.method.target == "ema":
        ema_apply_(run.ema_pairs("target", run.target), ema_decay(step - 1, cfg.method.ema_decay), gate=gate)
    if run.eval_ema is not None:
        ema_apply_(run.ema_pairs("eval_ema", run.eval_ema), ema_decay(step - 1, cfg.eval.ema_decay), gate=gate)


def _account(run: Run, step: int, stats: dict[str, Any], *, bad: bool, norm: float) -> dict[str, int]:
    """Host bookkeeping of one step's update decision: counters, ``Diverged``, spike policy; the events."""
    cfg, c = run.cfg, run.counters
    events = {"event/nonfinite": 0, "event/spike": 0, "event/decay": 0, "event/skipped": 0}
    diverged = None
    if bad:
        c.nonfinite += 1
        c.nonfinite_in_a_row += 1
        c.nonfinite_since_ckpt += 1
        events["event/nonfinite"] = 1
        events["event/skipped"] = 1
        reason = None
        if cfg.run.nonfinite == "stop":
            reason = f"non-finite loss or gradient at step {step}"
        elif c.nonfinite_in_a_row >= cfg.run.max_nonfinite:
            reason = f"{c.nonfinite_in_a_row} non-finite steps in a row (last at step {step})"
        if reason is not None:
            run.step = step - 1  # the last completed step, as if the run had stopped right there
            raise Diverged(reason, step=step, stats=stats, record={**events, "count/nonfinite": c.nonfinite})
    else:
        c.nonfinite_in_a_row = 0
        # the divergence rule sees every finite step's norm in order (the gated path replays them here too)
        rule = GradNormRule(bound=cfg.run.diverge_grad_norm, steps=cfg.run.diverge_steps,
                            in_a_row=c.above_bound_in_a_row, since=c.above_bound_since)
        diverged = rule.observe(step, norm)
        c.above_bound_in_a_row, c.above_bound_since = rule.in_a_row, rule.since
        events.update(run.policy.observe_grad_norm(step, norm))
        c.spikes += events["event/spike"]
        if events["event/skipped"]:
            c.skipped += 1
    run.log_window.add(events, norm)
    if diverged is not None:
        run.step = step  # the step the rule fired at (finite): status.json names it
        window = run.log_window
        raise Diverged(diverged, step=step, stats=stats,
                       record={"grad_norm/max": window.max_norm, **window.events, "event/diverged": 1,
                               "count/nonfinite": c.nonfinite, "count/spikes": c.spikes, "lr": run.policy.lr(step)})
    return events


def _settle(run: Run) -> None:
    """Host bookkeeping of the gated steps since the last read: one read for all of them."""
    if not run.pending:
        return
    pending, run.pending = run.pending, []
    values = torch.stack([torch.stack([p.bad, p.stats["grad_norm/total"]]) for p in pending]).tolist()
    for p, (flag, norm) in zip(pending, values):
        _account(run, p.step, p.stats, bad=flag > 0, norm=norm)


# --------------------------------------------------------------------------- validation & files


def validate(run: Run, step: int) -> dict[str, float]:
    model = run.eval_model
    model.eval()
    rec: dict[str, float] = {"val/loss": run.evaluator.val_loss(model)}
    rec.update(run.evaluator.student_metrics(model))
    rec.update(run.policy.observe_val(rec["val/loss"]))
    return rec


def write_samples(run: Run, run_dir: Path, tag: str) -> None:
    labels = next(iter(run.setup.sample_cond.values())).cpu()
    for nfe in run.cfg.eval.nfe:
        images = run.evaluator.sample_files_student(run.eval_model, nfe)
        if run.dist.is_main:
            save_samples(sample_stem(samples_dir(run_dir), tag, nfe), images.cpu(), labels)


# --------------------------------------------------------------------------- fit


def fit(cfg: Config, run_dir: str | Path, *, progress: bool = True, restart_on_corrupt: bool = False,
        fork_at: Sequence[int] = (), fork: ForkRequest | None = None) -> int:
    """Train one run into ``run_dir``; returns the exit code (0 done, 1 failed, 3 diverged, 4/5 preempted:
    stopped on a signal, ``run.preempt``).

    ``restart_on_corrupt``: when checkpoints exist but none verifies, start again from step 0
    (an event in metrics.jsonl) instead of failing.
    ``fork_at``: also write the full state after each of these steps to ``checkpoints/fork-<k>/``.
    ``fork``: with no checkpoint of its own, start from the parent's ``fork-<k>`` (``_start_from_fork``).
    """
    run_dir = Path(run_dir)
    fork_at = check_fork_at(cfg, fork_at)
    tpath = preflight(cfg, run_dir)  # raises before anything is written
    if fork is not None:
        check_fork_request(cfg, run_dir, fork)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    d = init_distributed(cfg.run, cfg.parallel)
    chash = config_hash(cfg)
    run: Run | None = None
    writer: MetricsWriter | None = None

    def record_exit_now(reason: str) -> None:  # a second signal or the grace ran out: the last checkpoint stands
        if d.is_main and run_dir.is_dir():
            step = resume_step(run_dir)
            write_status(run_dir, "preempted", step=step, config_hash=chash,
                         reason=f"{reason}; exited at once, resumes from the checkpoint of step {step}")

    watch = PreemptWatch(grace_s=cfg.run.preempt_grace_s, check_every=cfg.run.preempt_check_every,
                         on_exit_now=record_exit_now).install()
    try:
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(config_file(run_dir), to_yaml(cfg))
            write_status(run_dir, "running", step=0, config_hash=chash)
        barrier()
        run = build_run(cfg, d, tpath)
        run.preempt = watch
        run.teacher_weights = tpath
        run.step, events = _resume(run, run_dir, restart_on_corrupt=restart_on_corrupt, fork=fork)
        if d.is_main:
            mirror = None
            if cfg.telemetry.wandb != "off":
                mirror = WandbMirror(mode=cfg.telemetry.wandb, project=cfg.telemetry.project, group=cfg.telemetry.group,
                                     name=cfg.telemetry.name, run_dir=run_dir, config=to_dict(cfg))
            writer = MetricsWriter(metrics_file(run_dir), mirror=mirror)
            for event in events:
                print(f"twinflow-train: {event['event']} at step {event['step']}"
                      f"{' from ' + event['checkpoint'] if event['checkpoint'] else ''}: {event['reason']}", flush=True)
                writer.write(event)
        _loop(run, run_dir, writer, start=run.step, progress=progress, fork_at=fork_at)
        if d.is_main:
            write_status(run_dir, "done", step=run.step, config_hash=chash)
        return EXIT_DONE
    except Preempted as e:
        if d.is_main:
            write_status(run_dir, "preempted", step=e.step, reason=str(e), config_hash=chash)
        print(f"twinflow-train: {e}", flush=True)
        return EXIT_PREEMPTED
    except Diverged as e:
        if d.is_main:
            write_status(run_dir, "diverged", step=run.step if run else 0, reason=str(e), config_hash=chash)
        print(f"twinflow-train: run diverged: {e}", flush=True)
        return EXIT_DIVERGED
    except Exception as e:  # recorded for the harness, then re-raised for the traceback
        if d.is_main and run_dir.is_dir():
            try:
                write_status(run_dir, "failed", step=run.step if run else 0, reason=f"{type(e).__name__}: {e}",
                             config_hash=chash)
            except OSError as status_error:  # a full disk may refuse this too; the log and exit code still say it
                print(f"twinflow-train: could not record the failure in status.json: {status_error}", flush=True)
        if isinstance(e, ckpt.CheckpointError):
            print(f"twinflow-train: {e}", flush=True)
        else:
            traceback.print_exc()
        return EXIT_FAILED
    finally:
        watch.uninstall()
        if writer is not None:
            writer.close()
        shutdown()


def _resume(run: Run, run_dir: Path, *, restart_on_corrupt: bool,
            fork: ForkRequest | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Load the newest checkpoint that verifies, else start from ``fork`` or from step 0; returns the step
    and the event records to log."""
    point, events = ckpt.choose_resume_point(run_dir, restart_on_corrupt=restart_on_corrupt)
    if point.path is None:
        if run.dist.is_main:
            truncate_metrics(metrics_file(run_dir), last_step=-1)  # a run with no checkpoint starts clean
            (run_dir / FORK_FILE).unlink(missing_ok=True)  # a run from step 0 is no fork (until _start_from_fork)
        if fork is not None:
            return _start_from_fork(run, run_dir, fork, events)
        return 0, events
    step = _load_state(run, point.path)
    if run.dist.is_main:
        truncate_metrics(metrics_file(run_dir), last_step=step)
    return step, events


def _load_state(run: Run, path: Path) -> int:
    """Restore a checkpoint (``latest``-like or ``fork-<k>``) into ``run`` on every rank; returns its step."""
    state = ckpt.load_checkpoint(path, model=run.model, optimizer=run.optimizer, extra_modules=run.extra_modules())
    run.counters = Counters(**state["counters"])
    run.policy.load_state_dict(state["policy"])
    if run.guidance is not None and "guidance" in state:
        run.guidance.load_state_dict(state["guidance"])
    if "log_window" in state:  # the events and largest norm since the last log step (older checkpoints lack it)
        run.log_window = LogWindow(**state["log_window"])
    return int(state["step"])


def _start_from_fork(run: Run, run_dir: Path, fork: ForkRequest,
                     events: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Start from ``PARENT/checkpoints/fork-<k>`` (verified on rank 0, every rank follows): its state, its best
    weights, ``fork.json`` and a ``fork`` event; a missing or corrupt one trains from step 0 instead, with a
    ``fork_fallback`` event and ``fork.json`` {"fallback": why}. Never fails for the parent's sake."""
    d = run.dist
    box: list[Any] = [fork_problem(run.cfg, run_dir, fork, world=d.world) if d.is_main else None]
    if d.world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    problem: str | None = box[0]
    rel = os.path.relpath(fork.parent, run_dir)
    source = fork_checkpoint(fork.parent, fork.step)
    if problem is not None:
        if d.is_main:
            atomic_write_json(run_dir / FORK_FILE, {"fallback": problem, "parent": rel, "step": fork.step})
        events.append({"step": 0, "kind": "event", "event": "fork_fallback",
                       "checkpoint": os.path.relpath(source, run_dir), "reason": f"trains from step 0: {problem}"})
        return 0, events
    step = _load_state(run, source)
    if d.is_main:
        best = best_weights(run_dir)
        if (source / FORK_BEST).is_file():
            with atomic_path(best) as tmp:
                shutil.copyfile(source / FORK_BEST, tmp)
        else:
            best.unlink(missing_ok=True)
        parent_meta = read_json(source / META_FILE) or {}
        atomic_write_json(run_dir / FORK_FILE, {
            "parent": rel, "step": step, "checkpoint_sha256": file_digest(source / META_FILE),
            "parent_config_hash": parent_meta.get("config_hash")})
    barrier()
    events.append({"step": step, "kind": "event", "event": "fork", "checkpoint": os.path.relpath(source, run_dir),
                   "reason": f"steps 1-{step} are the parent's ({rel}); training goes on at step {step + 1}"})
    return step, events


def _state(run: Run, step: int) -> dict[str, Any]:
    c = run.counters
    state = {"step": step, "counters": vars(c).copy(), "policy": run.policy.state_dict(),
             "config_hash": config_hash(run.cfg),
             "log_window": {"max_norm": run.log_window.max_norm, "events": dict(run.log_window.events)}}
    if run.guidance is not None:
        state["guidance"] = run.guidance.state_dict()
    return state


def _save(run: Run, run_dir: Path, step: int) -> None:
    c = run.counters
    state = _state(run, step)
    latest = latest_checkpoint(run_dir)
    ckpt.save_checkpoint(latest, fmt=run.cfg.checkpoint.format, model=run.model, optimizer=run.optimizer,
                         extra_modules=run.extra_modules(), state=state, step=step,
                         keep_latest_k=run.cfg.checkpoint.keep_latest_k)
    if run.cfg.checkpoint.keep_last_good and c.nonfinite_since_ckpt == 0:
        ckpt.copy_checkpoint(latest, last_good_checkpoint(run_dir))
    c.nonfinite_since_ckpt = 0
    barrier()


def _save_fork(run: Run, run_dir: Path, step: int) -> None:
    """``checkpoints/fork-<step>/``: ``latest``'s content (checksummed the same way) plus the best weights as of
    this step, outside the ``latest`` rotation; changes nothing of the run's own state (collective)."""
    best = best_weights(run_dir)
    ckpt.save_checkpoint(fork_checkpoint(run_dir, step), fmt=run.cfg.checkpoint.format, model=run.model,
                         optimizer=run.optimizer, extra_modules=run.extra_modules(), state=_state(run, step),
                         step=step, keep_latest_k=None,
                         extra_files={FORK_BEST: best} if run.dist.is_main and best.is_file() else None,
                         meta={"kind": "fork", "world": run.dist.world, "config_hash": config_hash(run.cfg)})


def step_record(run: Run, step: int, stats: dict[str, torch.Tensor], *, window: LogWindow,
                step_s: float) -> dict[str, Any]:
    """The metrics record of log step ``step`` (kind ``train``): the step's statistics, the largest norm and the
    events of ``window`` (the steps since the last log step), the counters, the learning rate and the times
    (``step_s``: seconds per step since the last log step). Collective: every rank calls it."""
    c = run.counters
    rec: dict[str, Any] = {"step": step, "kind": "train"}
    # grad norms are already global; per-rank loss terms are averaged so every world size logs the same
    rec.update(mean_over_ranks({k: float(v) for k, v in stats.items() if not _is_global(k)}))
    rec.update({k: float(v) for k, v in stats.items() if _is_global(k)})
    rec.update({"grad_norm/max": window.max_norm, "lr": run.policy.lr(step),
                "count/nonfinite": c.nonfinite, "count/spikes": c.spikes,
                "time/step_s": step_s, "time/wall_s": c.wall_s, "time/train_s": c.train_s})
    rec.update(window.events)
    bias = dynamic_value(run.time_samplers, step)  # one dynamic schedule drives every time it applies to
    if bias is not None:
        rec["renoise/bias"] = bias
    return rec


def _loop(run: Run, run_dir: Path, writer: MetricsWriter | None, *, start: int, progress: bool,
          fork_at: Sequence[int] = ()) -> int:
    cfg, d, c = run.cfg, run.dist, run.counters
    total = cfg.run.steps
    fault = int(os.environ.get("TWINFLOW_FAULT_AT_STEP", "0") or 0)
    signals = signals_at_steps(os.environ.get("TWINFLOW_SIGNAL_AT_STEP", ""), rank=d.rank)
    run.fault_grad_scale = _fault_grad_scale(os.environ.get("TWINFLOW_FAULT_GRAD_SCALE", ""))
    t_start = time.perf_counter()
    wall0 = c.wall_s
    if start == 0 and cfg.eval.teacher:
        rec = {"step": 0, "kind": "teacher", **_teacher_metrics(run)}
        if writer:
            writer.write(rec)
    bar = tqdm(total=total, initial=start, desc="fit", disable=not (progress and d.is_main), mininterval=1.0)
    t_log, steps_since_log = time.perf_counter(), 0
    if start == 0:
        run.log_window = LogWindow()  # else the resumed checkpoint's window (steps since its last log step)
    forks = set(fork_at)
    step = start
    for step in range(start + 1, total + 1):
        run.step = step - 1
        if step == fault:
            raise RuntimeError(f"injected fault at step {step} (TWINFLOW_FAULT_AT_STEP)")
        for sig in signals.get(step, ()):
            os.kill(os.getpid(), sig)  # as a scheduler would, while the step runs
        t_step = time.perf_counter()
        lr = run.policy.lr(step)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        stats = train_step(run, step)
        try:
            _apply_update(run, step, stats)
            c.train_s += time.perf_counter() - t_step
            last = step == total or (cfg.run.max_train_s > 0 and _agree_budget_spent(run))
            # a signal: this step's checkpoint, then stop (no extra log or validation, so the resumed run
            # follows an uninterrupted one exactly)
            stop = not last and run.preempt is not None and run.preempt.agreed(step, world=d.world, device=d.device)
            is_log = step % cfg.run.log_every == 0 or last
            is_val = (cfg.run.val_every and step % cfg.run.val_every == 0) or last
            is_ckpt = (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or last or stop
            if is_log or is_val or is_ckpt or step in forks:
                _settle(run)  # every gated step is accounted for before anything is logged or saved
        except Diverged as e:
            if writer:  # the step that ended the run is evidence: log it before stopping
                writer.write({"step": e.step, "kind": "train", **{k: float(v) for k, v in e.stats.items()},
                              **e.record, "time/wall_s": c.wall_s, "time/train_s": c.train_s})
            raise
        steps_since_log += 1
        c.wall_s = wall0 + (time.perf_counter() - t_start)
        bar.update(1)
        if is_log:
            now = time.perf_counter()
            window, run.log_window = run.log_window, LogWindow()
            rec = step_record(run, step, stats, window=window, step_s=(now - t_log) / steps_since_log)
            if writer:
                writer.write(rec)
            bar.set_postfix(loss=f"{rec['loss/total']:.4f}", gn=f"{rec['grad_norm/total']:.3g}")
            t_log, steps_since_log = now, 0
        if is_val:
            rec = {"step": step, "kind": "val", **validate(run, step), "time/wall_s": c.wall_s,
                   "time/train_s": c.train_s}
            if rec["val/loss"] < c.best_val:
                c.best_val, c.best_step = rec["val/loss"], step
                ckpt.save_weights(best_weights(run_dir), run.eval_model)
            rec["val/best_loss"] = c.best_val
            if writer:
                writer.write(rec)
        if is_ckpt:
            if writer:
                writer.sync()
            _save(run, run_dir, step)
        if step in forks:
            _save_fork(run, run_dir, step)
        run.step = step
        if stop:
            bar.close()
            raise Preempted(f"stopped on {run.preempt.signal_name or 'a signal on another rank'} at the checkpoint "
                            f"of step {step}; resumes from there", step=step)
        if last:
            break
    bar.close()
    _finish(run, run_dir)
    return step


def _teacher_metrics(run: Run) -> dict[str, float]:
    """The teacher's step-0 metrics, from the asset cache where an earlier run with the same key computed them."""
    def compute() -> dict[str, float]:
        return run.evaluator.teacher_metrics(run.teacher)

    if run.setup.scorer is None:
        return compute()  # no sample metrics for this data (nothing to compute or cache)
    d = run.dist
    return cached_teacher_metrics(run.cfg, compute, teacher_weights=run.teacher_weights, world=d.world, rank=d.rank,
                                  fsdp=run.fsdp, device=d.device)


def _fault_grad_scale(text: str) -> tuple[int, float] | None:
    """``TWINFLOW_FAULT_GRAD_SCALE``'s ``STEP:SCALE`` (tests of the divergence rule); empty: off."""
    if not text:
        return None
    try:
        step, scale = text.split(":")
        return int(step), float(scale)
    except ValueError:
        raise ValueError(f"TWINFLOW_FAULT_GRAD_SCALE must be STEP:SCALE, e.g. 5:1e6 (got {text!r})") from None


def _agree_budget_spent(run: Run) -> bool:
    """Rank 0's clock decides, so every rank stops at the same step."""
    spent = torch.tensor([float(run.counters.train_s >= run.cfg.run.max_train_s)])
    if run.dist.world > 1:
        torch.distributed.broadcast(spent, src=0)
    return bool(spent.item())


def _finish(run: Run, run_dir: Path) -> None:
    """Sample files: final weights, best weights, and the teacher, on the same noise and prompts."""
    run.eval_model.eval()
    write_samples(run, run_dir, "final")
    best = best_weights(run_dir)
    if best.is_file():
        ckpt.load_weights(best, run.eval_model)
        write_samples(run, run_dir, "best")
    images = run.evaluator.sample_files_teacher(run.teacher)
    if run.dist.is_main:
        labels = next(iter(run.setup.sample_cond.values())).cpu()
        save_samples(sample_stem(samples_dir(run_dir), TEACHER_SAMPLES), images.cpu(), labels)

"""Deterministic validation (docs/method.md §7).

The validation loss is flow matching against the true velocity on fixed
held-out rows with fixed noise and times, so two evaluations of the same
weights give the same number and a rise means the model got worse, not that
the draw changed. Sample metrics use fixed noise and prompts at every NFE.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..data.batches import Setup, step_generator
from ..method.sampling import euler_sample, ucgm_sample
from ..models.base import Cond, FlowModel, cond_rows
from ..rundir import TEACHER_EULER_STEPS

VAL_BATCH = 512
_NOISE, _TIMES, _SAMPLE_NOISE, _SAMPLER, _FILE_NOISE = 1, 2, 3, 4, 5  # purposes of eval generators
_PREFERENCE = ("gold", "proxy")  # digits: the fixed gold score and the learned proxy RL optimises


class Evaluator:
    def __init__(self, cfg: Config, setup: Setup, *, device: torch.device):
        self.cfg = cfg
        self.setup = setup
        self.device = device
        seed = cfg.eval.seed
        shape = setup.data.latent_shape
        n = cfg.eval.n_samples
        self.sample_noise = torch.randn((n, *shape), generator=step_generator(seed, _SAMPLE_NOISE)).to(device)
        self.sample_prompts = setup.eval_cond(n)
        k = next(iter(setup.sample_cond.values())).shape[0]
        self.file_noise = torch.randn((k, *shape), generator=step_generator(seed, _FILE_NOISE)).to(device)

    @torch.no_grad()
    def val_loss(self, model: FlowModel) -> float:
        total, count = 0.0, 0
        # batches are re-read each time (shards stay on disk); noise and times are fixed per batch index,
        # drawn at the batch's own shape (aspect-ratio buckets differ)
        for i, (x, cond) in enumerate(self.setup.data.val_batches(VAL_BATCH)):
            b = x.shape[0]
            z = torch.randn(x.shape, generator=step_generator(self.cfg.eval.seed, _NOISE, i)).to(x.device, x.dtype)
            t = torch.rand(b, generator=step_generator(self.cfg.eval.seed, _TIMES, i)).to(x.device)
            x_t = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x
            err = (model(x_t, t, t, cond).float() - (z - x)).pow(2).flatten(1).mean(1)
            total += err.sum().item()
            count += b
        return total / count

    @torch.no_grad()
    def student_latents(self, model: FlowModel, *, nfe: int, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        gen = step_generator(self.cfg.eval.seed, _SAMPLER, nfe)
        out = []
        for i in range(0, z.shape[0], VAL_BATCH):
            sl = slice(i, i + VAL_BATCH)
            out.append(ucgm_sample(model=model, z=z[sl], cond=cond_rows(cond, sl), nfe=nfe,
                                   cfg=self.cfg.sampler, generator=gen))
        return torch.cat(out)

    @torch.no_grad()
    def teacher_latents(self, teacher: FlowModel, *, steps: int, cfg_scale: float, z: torch.Tensor,
                        cond: Cond) -> torch.Tensor:
        out = [euler_sample(model=teacher, z=z[i:i + VAL_BATCH], cond=cond_rows(cond, slice(i, i + VAL_BATCH)),
                            steps=steps, cfg_scale=cfg_scale) for i in range(0, z.shape[0], VAL_BATCH)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.setup.codec.decode(latents[i:i + VAL_BATCH]) for i in range(0, latents.shape[0], VAL_BATCH)])

    def _score(self, latents: torch.Tensor) -> dict[str, float]:
        labels = next(iter(self.sample_prompts.values()))
        return self.setup.scorer.score(self.decode(latents.float()), labels)

    def student_metrics(self, model: FlowModel) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.setup.scorer is None:
            return out
        for nfe in self.cfg.eval.nfe:
            s = self._score(self.student_latents(model, nfe=nfe, z=self.sample_noise, cond=self.sample_prompts))
            out.update({f"val/fd_nfe{nfe}": s["fd"], f"val/kid_nfe{nfe}": s["kid"],
                        f"val/reward_nfe{nfe}": s["reward"], f"val/accuracy_nfe{nfe}": s["accuracy"]})
            out.update({f"val/{k}_nfe{nfe}": s[k] for k in _PREFERENCE if k in s})
        return out

    def teacher_metrics(self, teacher: FlowModel) -> dict[str, float]:
        """The base model at its full step count and distilled guidance, plus its own 1-, 2- and 4-step Euler FD
        and KID."""
        if self.setup.scorer is None:
            return {}
        cfg = self.cfg
        s = self._score(self.teacher_latents(teacher, steps=cfg.teacher.sample_steps, cfg_scale=cfg.teacher_cfg_scale,
                                             z=self.sample_noise, cond=self.sample_prompts))
        out = {"teacher/fd": s["fd"], "teacher/kid": s["kid"], "teacher/reward": s["reward"],
               "teacher/accuracy": s["accuracy"],
               "teacher/steps": cfg.teacher.sample_steps, "teacher/cfg_scale": cfg.teacher_cfg_scale}
        out.update({f"teacher/{k}": s[k] for k in _PREFERENCE if k in s})
        for steps in TEACHER_EULER_STEPS:
            e = self._score(self.teacher_latents(teacher, steps=steps, cfg_scale=cfg.teacher_cfg_scale,
                                                 z=self.sample_noise, cond=self.sample_prompts))
            out[f"teacher/fd_euler{steps}"] = e["fd"]
            out[f"teacher/kid_euler{steps}"] = e["kid"]
        return out

    def sample_files_student(self, model: FlowModel, nfe: int) -> torch.Tensor:
        lat = self.student_latents(model, nfe=nfe, z=self.file_noise, cond=self.setup.sample_cond)
        return self.decode(lat.float())

    def sample_files_teacher(self, teacher: FlowModel) -> torch.Tensor:
        lat = self.teacher_latents(teacher, steps=self.cfg.teacher.sample_steps, cfg_scale=self.cfg.teacher_cfg_scale,
                                   z=self.file_noise, cond=self.setup.sample_cond)
        return self.decode(lat.float())

"""Synthetic telemetry for tests, the benchmark and the README's labelled example.

The numbers are made up (seeded), with the shape of real runs: decaying losses,
log-normal grad norms with injected spikes, schedules, periodic validation with
sample metrics, a teacher line, and optional diverged runs. Nothing here is a
result of training; reports built from it say "synthetic" in their title.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from harness.claims import Claim, ClaimTest
from twinflow_train.rundir import atomic_write_text, encode_record, write_status


def _run_frames(*, grid: str, arm: str, index: int, seed: int, steps: int, log_every: int, val_every: int,
                nfe: Sequence[int], diverge_at: int | None, run_dir: str, rng: np.random.Generator
                ) -> tuple[pd.DataFrame, dict]:
    rl = index >= 1
    last = steps if diverge_at is None else diverge_at
    s = np.arange(log_every, last + 1, log_every, dtype=np.int64)
    if s.size == 0 or s[-1] != last:
        s = np.append(s, last)
    n = s.size
    frac = s / steps
    # later arms of the ladder get calmer gradients and a slightly better loss, so the report has something to show
    calm = 0.75 ** index
    base = np.exp(rng.normal(0.0, 0.25, n)) * (0.5 + 0.5 * np.exp(-3 * frac))
    spike = rng.random(n) < 0.002 * calm
    gn = base * np.where(spike, rng.uniform(10, 60, n) * calm + 1, 1.0)
    if rl:  # the report's grad-norm jump at the RL switch
        gn = gn * (1 + 2.0 * calm * np.exp(-np.abs(frac - 0.5) * 40))
    loss_main = 0.15 + 0.6 * np.exp(-4 * frac) * (1 - 0.03 * index) + rng.normal(0, 0.01, n)
    loss_rect = 0.05 + 0.2 * np.exp(-3 * frac) + rng.normal(0, 0.005, n)
    cols: dict[str, np.ndarray] = {
        "step": s,
        "loss/main": loss_main, "loss/rect": loss_rect,
        "grad_norm/total": gn, "grad_norm/max": gn * (1 + np.abs(rng.normal(0, 0.05, n))),
        "lr": np.where(s < 0.05 * steps, 1e-4 * s / (0.05 * steps), 1e-4),
        "renoise/bias": np.maximum(1.0, 4.0 - 3.0 * frac / 0.6) if index >= 1 else np.full(n, np.nan),
        "event/spike": spike.astype(float), "count/spikes": np.cumsum(spike).astype(float),
        "event/nonfinite": np.zeros(n), "count/nonfinite": np.zeros(n),
        "time/step_s": 0.1 + rng.normal(0, 0.005, n),
    }
    total = loss_main + loss_rect
    if rl:
        w = 0.05 / (1 + np.exp(-(frac - 0.5) * 40)) if index >= 3 else np.where(frac >= 0.5, 0.05, 0.0)
        g_rl = gn * 0.5 * (w / 0.05) + 1e-3
        cols.update({"rl/weight": w, "loss/rl": -w * (1 + 0.3 * frac), "rl/reward": -2 + frac + rng.normal(0, 0.05, n),
                     "grad_norm/twinflow": gn * 0.8, "grad_norm/rl": g_rl,
                     "grad_cos/twinflow_rl": rng.normal(0.1, 0.05, n), "rl/share": g_rl / (g_rl + gn * 0.8)})
        total = total + cols["loss/rl"]
    cols["loss/total"] = total
    cols["time/wall_s"] = np.cumsum(np.full(n, log_every * 0.1))
    if diverge_at is not None:  # the last record is the non-finite one the trainer stops on
        for k in ("loss/main", "loss/rect", "loss/total", "grad_norm/total"):
            cols[k] = cols[k].astype(float)
            cols[k][-1] = np.nan
        cols["event/nonfinite"][-1] = 1.0
        cols["count/nonfinite"][-1] = 1.0
    train = pd.DataFrame(cols).assign(kind="train")

    vs = np.arange(val_every, last + 1, val_every, dtype=np.int64) if val_every else np.zeros(0, np.int64)
    if diverge_at is None and (vs.size == 0 or vs[-1] != steps):
        vs = np.append(vs, steps)
    elif diverge_at is not None:  # a run stops on the non-finite step, before validating it
        vs = vs[vs < diverge_at]
    vf = vs / steps
    val = {"step": vs, "val/loss": 0.2 + 0.5 * np.exp(-4 * vf) + 0.05 * vf ** 2 - 0.005 * index
           + rng.normal(0, 0.003, vs.size)}
    for k in nfe:
        val[f"val/fd_nfe{k}"] = 2.0 + 30 * np.exp(-3 * vf) / k ** 0.5 + 0.3 * rng.normal(0, 1, vs.size) - 0.2 * index
        val[f"val/reward_nfe{k}"] = -2.0 + 0.8 * vf + 0.15 * rl + rng.normal(0, 0.02, vs.size)
        val[f"val/accuracy_nfe{k}"] = np.clip(0.6 + 0.35 * vf + rng.normal(0, 0.01, vs.size), 0, 1)
    val["val/best_loss"] = np.minimum.accumulate(val["val/loss"]) if vs.size else val["val/loss"]
    val["time/wall_s"] = vs * 0.1
    val_df = pd.DataFrame(val).assign(kind="val")
    teacher = pd.DataFrame({"step": [0], "kind": ["teacher"], "teacher/fd": [2.5], "teacher/reward": [-1.0],
                            "teacher/accuracy": [0.97], "teacher/steps": [28.0],
                            **{f"teacher/fd_euler{k}": [2.5 + 20.0 / k] for k in nfe}})
    df = pd.concat([teacher, train, val_df], ignore_index=True).sort_values(["step"], kind="stable")
    df = df.assign(grid=grid, arm=arm, seed=seed, run_dir=run_dir)
    wall = float(cols["time/wall_s"][-1])
    status = {"arm": arm, "seed": seed, "state": "done" if diverge_at is None else "diverged",
              "reason": None if diverge_at is None else f"non-finite loss at step {diverge_at}",
              "step": int(last), "wall_s": wall, "run_dir": run_dir}
    return df, status


def synthetic_grid_frames(*, arms: Sequence[str], seeds: Sequence[int], steps: int, log_every: int = 1,
                          val_every: int = 0, nfe: Sequence[int] = (1, 2, 4),
                          diverge: Mapping[tuple[str, int], int] | None = None, seed: int = 0,
                          grid: str = "synthetic", root: str = "/synthetic") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, statuses) tables in the ``collect_grid`` / ``run_statuses`` shape."""
    diverge = dict(diverge or {})
    unknown = [k for k in diverge if k[0] not in arms or k[1] not in seeds]
    if unknown:
        raise ValueError(f"diverge names run(s) {unknown} outside arms x seeds")
    val_every = val_every or max(steps // 10, 1)
    frames, statuses = [], []
    for i, arm in enumerate(arms):
        for sd in seeds:
            rng = np.random.default_rng([seed, i, sd])
            df, st = _run_frames(grid=grid, arm=arm, index=i, seed=sd, steps=steps, log_every=log_every,
                                 val_every=val_every, nfe=nfe, diverge_at=diverge.get((arm, sd)),
                                 run_dir=f"{root}/{grid}/{arm}/seed-{sd}", rng=rng)
            frames.append(df)
            statuses.append(st)
    metrics = pd.concat(frames, ignore_index=True)
    lead = ["grid", "arm", "seed", "run_dir", "kind", "step"]
    metrics = metrics[lead + [c for c in metrics.columns if c not in lead]]
    return metrics, pd.DataFrame(statuses)


@functools.lru_cache(maxsize=1)
def _digit_prototypes() -> np.ndarray:
    """The first scikit-learn digit of each class, [10, 8, 8] in [-1, 1]."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn (~1 s to import), only for the digit prototypes

    digits = load_digits()
    return np.stack([digits.images[np.flatnonzero(digits.target == c)[0]] for c in range(10)]) / 8.0 - 1.0


def _sample_images(labels: np.ndarray, *, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Digit-like 8x8 images: a real scikit-learn digit of the prompted class, plus noise of scale ``noise``."""
    clean = _digit_prototypes()[labels]
    out = clean + rng.normal(0, noise, clean.shape)
    return np.clip(out, -1, 1).astype(np.float32)[:, None]


_NONFINITE_KEYS = ("loss/main", "loss/rect", "loss/total", "grad_norm/total")


def write_synthetic_grid(grid_dir: str | Path, *, arms: Sequence[str], seeds: Sequence[int], steps: int,
                         log_every: int = 1, val_every: int = 0, nfe: Sequence[int] = (1, 2, 4),
                         diverge: Mapping[tuple[str, int], int] | None = None, seed: int = 0,
                         per_class: int = 4) -> Path:
    """Run directories (metrics.jsonl, status.json, samples/*.npz) laid out as the trainer writes them.

    ``grid_dir/<arm>/seed-<k>/``; non-finite values are written as strings, as the trainer does.
    """
    grid_dir = Path(grid_dir)
    metrics, statuses = synthetic_grid_frames(arms=arms, seeds=seeds, steps=steps, log_every=log_every,
                                              val_every=val_every, nfe=nfe, diverge=diverge, seed=seed,
                                              grid=grid_dir.name, root=str(grid_dir.parent))
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    for (arm, sd), df in metrics.groupby(["arm", "seed"], sort=False):
        run_dir = grid_dir / str(arm) / f"seed-{sd}"
        recs = df.drop(columns=["grid", "arm", "seed", "run_dir"]).to_dict("records")
        lines = []
        for r in recs:
            # a record carries only the keys its kind logs (NaN cells are other kinds' keys), except the
            # terms of the step that went non-finite, which the trainer writes as the string "nan"
            keep_nan = _NONFINITE_KEYS if r["kind"] == "train" else ()
            clean = {}
            for k, v in r.items():
                if isinstance(v, float) and not math.isfinite(v):
                    if math.isnan(v) and k not in keep_nan:
                        continue
                    v = str(v)
                clean[k] = v
            clean["step"] = int(clean["step"])
            lines.append(encode_record(clean))
        atomic_write_text(run_dir / "metrics.jsonl", "".join(lines))
        st = statuses[(statuses.arm == arm) & (statuses.seed == sd)].iloc[0]
        write_status(run_dir, st.state, step=int(st.step), reason=st.reason, pid=0, config_hash="synthetic")
        i = list(arms).index(arm)
        samples = run_dir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        if st.state == "done":
            for k in nfe:
                for tag, extra in (("final", 0.0), ("best", 0.05)):
                    rng = np.random.default_rng([seed, i, sd, k, int(tag == "best")])
                    imgs = _sample_images(labels, noise=0.6 / k + 0.1 * (len(arms) - i) / len(arms) + extra, rng=rng)
                    np.savez(samples / f"{tag}-nfe{k}.npz", images=imgs, labels=labels)
        np.savez(samples / "teacher.npz", images=_sample_images(labels, noise=0.05, rng=np.random.default_rng(7)),
                 labels=labels)
    return grid_dir


def synthetic_claims() -> list[Claim]:
    """Three claims over the synthetic grid's arms (vanilla, renoise, rl_hard): a window reduced to its max on a log
    scale, a claim of two tests (a decrease, and an increase with a tolerance), and one against the teacher line."""
    return [
        Claim("the RL switch raises the peak grad norm", (
            ClaimTest(baseline="vanilla", treatment="renoise", metric="grad_norm/max", reduce="max", window=(90, None),
                      direction="increase", scale="log"),)),
        Claim("renoise lowers FD without costing reward", (
            ClaimTest(baseline="vanilla", treatment="renoise", metric="val/fd_nfe2", direction="decrease"),
            ClaimTest(baseline="vanilla", treatment="renoise", metric="val/reward_nfe2", direction="increase",
                      tolerance=0.05))),
        Claim("rl_hard beats the teacher's reward", (
            ClaimTest(baseline="teacher", treatment="rl_hard", metric="val/reward_nfe2",
                      baseline_metric="teacher/reward", direction="increase"),)),
    ]

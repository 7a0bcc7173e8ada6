"""The final student at 1, 2 and 4 NFE beside its teacher: the ladder's vanilla arm, per seed, per arm of overrides.

Each run is ``twinflow-train fit --config CONFIG run.steps=STEPS`` (one validation, at its end). Its final weights
(the evaluation EMA) and the teacher (28 steps, the comparison guidance) are then sampled by ``twinflow-train sample
--n 2000`` on ``--draws`` independent noise draws (``eval.seed`` = 1234 + k, class-balanced prompts; the student
and the teacher get the same noise in a draw), and every file is scored three ways:

- FD against ``eval.reference`` (the project's FD; default the 1,618 training digits, evaluation features), the
  student's FD over the teacher's in the same draw (the paired ratio), and KID (1e-3) in the same features;
- pixel FD: the Frechet distance to the 1,618 training digits in raw pixels (64 numbers, no network);
- held-out FD: the evaluation features against the 179 held-out digits.

One draw's FD moves by about 10% with the noise (the teacher's train-reference FD over 12 draws: 13.7, SD 1.3);
the table gives means over the draws and the paired ratio's mean and SD between draws.

    python benchmarks/bench_one_step.py [--seeds 0 1 2] [--steps 1800] [--draws 5] [--parallel 2]
        [--arm NAME KEY=VALUE ...] [--out DIR] [--json FILE]

``--arm`` (repeatable) names an arm and its overrides; without one the committed config runs as ``committed``.
Runs and sample files are kept under ``--out`` (a temporary directory by default); what is already there (a
finished run, a sample file) is not made again, so a table can be re-printed or extended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twinflow_train.assets.auxiliary import get_eval_net  # noqa: E402
from twinflow_train.config import load_config  # noqa: E402
from twinflow_train.data.digits import load_digits_split  # noqa: E402
from twinflow_train.evaluation.metrics import SampleScorer, frechet_distance  # noqa: E402
from twinflow_train.rundir import iter_metrics  # noqa: E402
from twinflow_train.run.setup import reference_images  # noqa: E402

N_SAMPLES = 2000
NFES = (1, 2, 4)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinflow_train.cli", *args]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def draw_seed(k: int) -> int:
    return 1234 + k


def sample_files(run_dir: Path, *, draws: int, teacher: bool) -> list[Path]:
    """The run's 2,000-sample files per draw (the teacher's with ``teacher``), sampled where missing."""
    out = []
    for k in range(draws):
        folder = run_dir / f"draw{k}"
        want = sorted(folder.glob("teacher-*.npz" if teacher else "final-*.npz"))
        if not want:
            _run(_cli("sample", "--config", str(run_dir / "config.yaml"), "--run-dir", str(run_dir), "--no-progress",
                      "--n", str(N_SAMPLES), "--which", "final", "--out", str(folder), *(["--teacher"] if teacher else []),
                      f"eval.seed={draw_seed(k)}"), run_dir.with_suffix(".log"))
            want = sorted(folder.glob("teacher-*.npz" if teacher else "final-*.npz"))
        out += want
    return out


def run_one(config: Path, run_dir: Path, overrides: list[str], *, steps: int, draws: int) -> None:
    """Train (unless done), then write the student's sample files of every draw."""
    if not any(r.get("kind") == "val" and r["step"] == steps for r in _records(run_dir)):
        _run(_cli("fit", "--config", str(config), "--run-dir", str(run_dir), "--no-progress", f"run.steps={steps}",
                  f"run.val_every={steps}", f"run.ckpt_every={steps}", f"eval.n_samples={N_SAMPLES}", "run.threads=1",
                  *overrides), run_dir.with_suffix(".log"))
    sample_files(run_dir, draws=draws, teacher=False)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return list(iter_metrics(path)) if path.is_file() else []


def score_file(path: Path, scorers: dict) -> dict[str, float]:
    with np.load(path) as z:
        x, y = torch.from_numpy(z["images"]).float(), torch.from_numpy(z["labels"]).long()
    m = scorers["reference"].score(x, y)
    return {"fd": m["fd"], "kid": 1e3 * m["kid"], "held_out": scorers["held_out"].score(x, y)["fd"],
            "pixel": frechet_distance(x.flatten(1).double().numpy(), scorers["pixels"])}


def _nfe(path: Path) -> int:
    return int(path.stem.rsplit("nfe", 1)[1])


def summarise(files: list[Path], teacher: list[dict], scorers: dict) -> dict:
    """Means over the draws per NFE, and the paired ratio of FD to the teacher's (mean, SD between draws)."""
    out: dict = {}
    for n in NFES:
        per = [score_file(p, scorers) for p in files if _nfe(p) == n]
        assert len(per) == len(teacher), f"{len(per)} draws at {n} NFE, {len(teacher)} of the teacher"
        ratio = np.array([s["fd"] / t["fd"] for s, t in zip(per, teacher)])
        out[n] = {k: float(np.mean([s[k] for s in per])) for k in per[0]}
        out[n].update(ratio=float(ratio.mean()), ratio_sd=float(ratio.std(ddof=1)) if len(ratio) > 1 else float("nan"),
                      kid_diff=float(np.mean([s["kid"] - t["kid"] for s, t in zip(per, teacher)])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1800, help="the ladder's length")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--draws", type=int, default=5, help="independent noise draws of 2,000 samples")
    p.add_argument("--arm", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), default=None)
    p.add_argument("--out", type=Path, default=None, help="where the runs are kept (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    arms = {a[0]: a[1:] for a in args.arm} if args.arm else {"committed": []}
    for name, over in arms.items():
        bad = [o for o in over if "=" not in o]
        if bad:
            p.error(f"--arm {name}: overrides must be KEY=VALUE (got {bad})")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-one-step-"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed, out / f"{name}-seed{seed}") for name in arms for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda j: run_one(args.config, j[2], arms[j[0]] + [f"run.seed={j[1]}"], steps=args.steps,
                                        draws=args.draws), jobs))
    cfg = load_config(jobs[0][2] / "config.yaml")
    teachers = {repr(load_config(d / "config.yaml").teacher) for _, _, d in jobs}
    if len(teachers) != 1:
        raise SystemExit("the arms' teachers differ; compare arms of one teacher")
    split = load_digits_split(val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    net = get_eval_net(cfg)
    scorers = {"reference": SampleScorer(eval_net=net, reward=None, reference_images=reference_images(cfg, split)),
               "held_out": SampleScorer(eval_net=net, reward=None, reference_images=split.val_images),
               "pixels": split.train_images.flatten(1).double().numpy()}
    teacher = [score_file(p, scorers) for p in sample_files(jobs[0][2], draws=args.draws, teacher=True)]
    rows = [{"arm": name, "seed": seed, "nfe": summarise(sample_files(d, draws=args.draws, teacher=False), teacher,
                                                          scorers)} for name, seed, d in jobs]
    t = {k: float(np.mean([d[k] for d in teacher])) for k in teacher[0]}
    print(f"runs in {out}; {args.draws} draws of {N_SAMPLES} samples per NFE; FD and KID against eval.reference "
          f"({cfg.eval.reference}); teacher ({cfg.teacher.sample_steps} steps): FD {t['fd']:.2f}, KID {t['kid']:.2f}, "
          f"pixel FD {t['pixel']:.3f}, held-out FD {t['held_out']:.1f}")
    print("| arm | seed | FD@1 (/ teacher, SD) | FD@2 (/ teacher, SD) | FD@4 (/ teacher, SD) | KID@1 / 2 / 4 - teacher "
          "| pixel FD@1 / 2 / 4 (/ teacher at 1) | held-out FD@1 / 2 / 4 |")
    print("|" + "---|" * 8)
    for r in rows:
        m = r["nfe"]
        fds = " | ".join(f"{m[n]['fd']:.2f} ({m[n]['ratio']:.3f}x, {m[n]['ratio_sd']:.3f})" for n in NFES)
        kids = " / ".join(f"{m[n]['kid_diff']:+.2f}" for n in NFES)
        pix = " / ".join(f"{m[n]['pixel']:.3f}" for n in NFES) + f" ({m[1]['pixel'] / t['pixel']:.2f}x)"
        held = " / ".join(f"{m[n]['held_out']:.1f}" for n in NFES)
        print(f"| {r['arm']} | {r['seed']} | {fds} | {kids} | {pix} | {held} |")
    if args.json:
        args.json.write_text(json.dumps({"teacher": teacher, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Teacher and auxiliaries from a cold cache: time, and the teacher's 28-step FD.

``cold`` mode (default): for this tree and for a base commit (unpacked with ``git
archive``), ``twinflow-train teacher --config CONFIG`` runs in a subprocess with its
own ``PYTHONPATH`` and an empty cache directory, timed end to end (wall seconds, and
the CPU seconds of the process tree from ``resource.getrusage``). Then both teachers
are scored with this tree's evaluator on the same evaluation network and codec (the
two caches' codec and evaluation-net files are checked to be byte-identical, since
their recipes are shared): 28-step Euler FD over ``--n-samples`` fixed-noise samples
against the held-out digits.

``variant`` mode: trains one teacher recipe (``--override teacher.*=...``) into a
scratch cache that reuses an existing cache's codec and classifiers, and prints its
training seconds and FD (for choosing a recipe).

    python benchmarks/bench_aux.py [--base 26d7949] [--config configs/digits.yaml] [--n-samples 2000]
    python benchmarks/bench_aux.py --variant --from-cache DIR --override teacher.steps=1500 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def teacher_fd(config: Path, overrides: list[str], cache: Path, weights: Path, n_samples: int) -> float:
    """28-step Euler FD (the config's teacher guidance) of ``weights``, scored with the evaluator of ``cache``."""
    import torch

    from twinflow_train.config import load_config
    from twinflow_train.evaluation.evaluate import Evaluator
    from twinflow_train.run.setup import build_setup
    from twinflow_train.run.trainer import build_base

    torch.set_num_threads(1)
    cfg = load_config(config, overrides + [f"aux.cache_dir={cache}", f"eval.n_samples={n_samples}"])
    setup = build_setup(cfg, device=torch.device("cpu"))
    teacher = build_base(cfg, setup, weights).eval()
    ev = Evaluator(cfg, setup, device=torch.device("cpu"))
    lat = ev.teacher_latents(teacher, steps=cfg.teacher.sample_steps, cfg_scale=cfg.teacher_cfg_scale,
                             z=ev.sample_noise, cond=ev.sample_prompts)
    return float(ev._score(lat)["fd"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(cache: Path, kind: str) -> Path:
    found = sorted(cache.glob(f"{kind}-*/weights.pt"))
    if len(found) != 1:
        raise SystemExit(f"bench_aux: expected one {kind} entry in {cache}, found {len(found)}")
    return found[0]


def cold(tree: Path, config: Path, cache: Path, overrides: list[str]) -> dict:
    """One cold-cache ``twinflow-train teacher`` in ``tree``; wall and CPU seconds."""
    env = dict(os.environ, PYTHONPATH=str(tree), TWINFLOW_LAB_CACHE=str(cache))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "twinflow_train.cli", "teacher", "--config", str(config),
                          "--no-progress", *overrides], env=env, cwd=str(tree), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"bench_aux: teacher build in {tree} failed:\n{out.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    builds = {}
    for rec in sorted(cache.glob("*/weights.pt.done.json")):
        builds[rec.parent.name.split("-")[0]] = round(json.loads(rec.read_text())["build_seconds"], 1)
    return {"wall_s": wall, "cpu_s": cpu, "build_s": builds, "teacher": str(_entry(cache, "teacher"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="26d7949")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--skip-base", type=Path, default=None,
                   help="reuse a base cache built earlier (its teacher is scored, not rebuilt); base time not measured")
    p.add_argument("--new-cache", type=Path, default=None,
                   help="build this tree's cache here and keep it (must not exist yet; default: a temp dir)")
    p.add_argument("--variant", action="store_true")
    p.add_argument("--from-cache", type=Path, default=None, help="variant mode: cache holding codec and classifiers")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    config = args.config.resolve()

    if args.variant:
        import torch

        from twinflow_train.config import load_config
        from twinflow_train.assets.teacher import get_teacher

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with tempfile.TemporaryDirectory(prefix="bench-aux-") as tmp:
            cache = Path(tmp)
            for kind in ("codec", "reward", "evalnet"):
                src = _entry(args.from_cache, kind).parent
                shutil.copytree(src, cache / src.name, ignore=shutil.ignore_patterns("*.lock"))
            cfg = load_config(config, args.override + [f"aux.cache_dir={cache}"])
            t0, c0 = time.perf_counter(), time.process_time()
            weights = get_teacher(cfg, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            fd = teacher_fd(config, args.override, cache, weights, args.n_samples)
        res = {"overrides": args.override, "train_wall_s": wall, "train_cpu_s": cpu, "fd28": fd}
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory(prefix="bench-aux-") as tmp:
        tmp = Path(tmp)
        res: dict = {"config": str(config), "n_samples": args.n_samples}
        if args.skip_base is None:
            base_tree = tmp / "base-tree"
            base_tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
            base_cache = tmp / "base-cache"
            res["base"] = cold(base_tree, config, base_cache, args.override)
            print("base:", json.dumps(res["base"]), flush=True)
        else:
            base_cache = args.skip_base
            res["base"] = {"teacher": str(_entry(base_cache, "teacher")), "note": "cache built earlier"}
        new_cache = args.new_cache or tmp / "new-cache"
        if new_cache.exists() and any(new_cache.iterdir()):
            raise SystemExit(f"bench_aux: --new-cache {new_cache} is not empty (a cold cache is measured)")
        res["new"] = cold(ROOT, config, new_cache, args.override)
        print("new:", json.dumps(res["new"]), flush=True)
        for kind in ("codec", "evalnet", "reward"):
            res[f"same_{kind}"] = _sha(_entry(base_cache, kind)) == _sha(_entry(new_cache, kind))
        # both teachers through one evaluator (the new cache's codec and evaluation net)
        res["base"]["fd28"] = teacher_fd(config, args.override, new_cache, Path(res["base"]["teacher"]), args.n_samples)
        res["new"]["fd28"] = teacher_fd(config, args.override, new_cache, Path(res["new"]["teacher"]), args.n_samples)
        res["fd_ratio"] = res["new"]["fd28"] / res["base"]["fd28"]
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

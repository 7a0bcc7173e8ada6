"""``twinflow-train teacher | fit | sample | eval | plan | encode | export``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import Config, ConfigError, RunConfig, TeacherConfig, load_config
from .rundir import CONFIG_FILE, META_FILE, RESTART_FLAG, best_weights, latest_checkpoint
from .yamlio import INT_MAX, InputError, dir_problem, reading_input


def _common(p: argparse.ArgumentParser, *, run_dir: bool) -> None:
    p.add_argument("--config", type=Path, default=None, help="trainer YAML (default: the dataclass defaults on digits, or "
                   "RUN_DIR/config.yaml for sample/eval; configs/digits.yaml is the tuned setup)")
    if run_dir:
        p.add_argument("--run-dir", type=Path, required=True, help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rl.weight=0.05")


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """The command's own arguments, checked before any file is read or written."""
    run_dir: Path | None = getattr(args, "run_dir", None)
    problems = []
    if args.command == "fit" and (problem := dir_problem(run_dir)) is not None:
        problems.append(f"--run-dir: {problem}")
    if args.command == "fit" and (args.fork_from is None) != (args.fork_step is None):
        problems.append("--fork-from and --fork-step go together (the parent run directory and the step to fork at)")
    if args.command == "fit" and args.fork_from is not None and run_dir is not None and \
            args.fork_from.resolve() == run_dir.resolve():
        problems.append(f"--fork-from: {args.fork_from} is the run directory itself")
    if args.command in ("sample", "eval"):
        if not run_dir.is_dir():
            problems.append(f"--run-dir: {run_dir} is not a run directory (it does not exist)"
                            if not run_dir.exists() else f"--run-dir: {run_dir} is not a directory")
        else:
            if args.config is None and not (run_dir / CONFIG_FILE).is_file():
                problems.append(f"--run-dir: {run_dir} holds no {CONFIG_FILE} (not a run of twinflow-train fit?); "
                                "pass --config to give its config")
            weights = (best_weights(run_dir) if args.which == "best"
                       else latest_checkpoint(run_dir) / META_FILE)
            if not weights.is_file():
                problems.append(f"--run-dir: {run_dir} holds no {args.which} weights ({weights} does not exist"
                                f"{'; no validation has run yet' if args.which == 'best' else ''})")
    nfe = getattr(args, "nfe", None) or []
    if any(not 1 <= n <= INT_MAX for n in nfe):
        problems.append(f"--nfe: step counts must be in [1, {INT_MAX}] (got {nfe})")
    out = getattr(args, "out", None)
    if out is not None and (problem := dir_problem(out)) is not None:
        problems.append(f"--out: {problem}")
    return problems


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _load(args: argparse.Namespace) -> Config:
    """Every check of the command's input (arguments, config file, overrides); raises ``InputError``."""
    with reading_input(f"twinflow-train {args.command}"):
        problems = _argument_problems(args)
        path = args.config
        if path is None and args.command in ("fit", "teacher", "plan") and _is_rank_zero():
            print(f"twinflow-train {args.command}: no --config: using the built-in defaults of "
                  f"twinflow_train/config.py (digits; run.steps {RunConfig().steps}, teacher.steps "
                  f"{TeacherConfig().steps}); configs/digits.yaml is the tuned digits setup the README uses",
                  file=sys.stderr, flush=True)
        if path is None and args.command in ("sample", "eval") and (args.run_dir / CONFIG_FILE).is_file():
            path = args.run_dir / CONFIG_FILE  # a missing one is among the problems already
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as e:
            problems += e.problems
        if problems:
            raise InputError(problems)
        return cfg


def cmd_teacher(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before the heavy imports: bad input fails at once
    # lazy: the teacher brings torch; bad input fails before it loads
    from .assets.teacher import base_weights_in_model, prepare
    path = prepare(cfg, progress=not args.no_progress, workers=args.workers)
    if base_weights_in_model(cfg):
        print(f"base weights come from the model ({path or 'random init'}); no teacher to train")
    else:
        print(path)
    return 0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = _load(args)
    # lazy: start-up loads no run module; each command loads its own
    from .run.summary import fit_summary, run_is_complete
    forking = bool(args.fork_at) or args.fork_from is not None  # the trainer checks and handles those itself
    if not forking and run_is_complete(cfg, args.run_dir):
        # nothing to train: no process group, no W&B run, status.json and the files stay as they are
        if _is_rank_zero():
            print(fit_summary(args.run_dir, steps=cfg.run.steps, already_complete=True), flush=True)
        return 0
    from .run.fork import ForkRequest  # lazy: start-up loads no run module; each command loads its own
    from .run.trainer import fit  # lazy: the trainer brings torch
    fork = ForkRequest(parent=args.fork_from, step=args.fork_step) if args.fork_from is not None else None
    rc = fit(cfg, args.run_dir, progress=not args.no_progress, restart_on_corrupt=args.restart_on_corrupt,
             fork_at=args.fork_at or (), fork=fork)
    if rc == 0 and _is_rank_zero():
        print(fit_summary(args.run_dir, steps=cfg.run.steps), flush=True)
    return rc


def cmd_sample(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .run.inference import sample_count, sample_run  # lazy: inference brings torch
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1 (got {args.n})")
    if args.n is None and args.teacher:
        raise ConfigError("--teacher writes --n samples; give --n N")
    if args.n is not None:
        out = sample_count(cfg, args.run_dir, n=args.n, which=args.which, nfe=args.nfe, out_dir=args.out,
                           teacher=args.teacher)
    else:
        out = sample_run(cfg, args.run_dir, which=args.which, nfe=args.nfe, out_dir=args.out)
    for p in out:
        print(p)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .run.inference import eval_run  # lazy: inference brings torch
    result = eval_run(cfg, args.run_dir, which=args.which)
    print(json.dumps(result, indent=1))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .run.plan import plan_from_args  # lazy: the memory plan brings torch
    try:
        plan = plan_from_args(cfg, args)
    except ValueError as e:  # ConfigError included: a value the plan cannot use
        print(f"twinflow-train: plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinflow-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("teacher", help="train and cache the base model and the auxiliary networks")
    _common(p, run_dir=False)
    p.add_argument("--workers", type=_positive_int, default=2, help="processes preparing independent networks at once")
    p.set_defaults(func=cmd_teacher)
    p = sub.add_parser("fit", help="TwinFlow distillation into a run directory (resumes automatically)")
    _common(p, run_dir=True)
    p.add_argument(RESTART_FLAG, action="store_true", help="when the run directory holds checkpoints "
                   "but none verifies, start again from step 0 (default: fail, naming them)")
    p.add_argument("--fork-at", type=_positive_int, action="append", metavar="K",
                   help="also write the full state after step K to RUN_DIR/checkpoints/fork-K/ for child runs "
                   "to start from (repeatable; not part of the config)")
    p.add_argument("--fork-from", type=Path, default=None, metavar="PARENT_RUN_DIR",
                   help="with no checkpoint of its own, start from PARENT_RUN_DIR/checkpoints/fork-K "
                   "(--fork-step K) when the two configs share steps 1-K; a missing or corrupt one: train from "
                   "step 0, recording why")
    p.add_argument("--fork-step", type=_positive_int, default=None, metavar="K", help="the step --fork-from forks at")
    p.set_defaults(func=cmd_fit)
    for name, func, text in (("sample", cmd_sample, "fixed-noise samples (.npz + .png) from a run's weights"),
                             ("eval", cmd_eval, "deterministic validation of a run's weights")):
        p = sub.add_parser(name, help=text)
        _common(p, run_dir=True)
        p.add_argument("--which", choices=("final", "best"), default="final", help="latest checkpoint or best weights")
        if name == "sample":
            p.add_argument("--nfe", type=int, nargs="+", default=None, help="step counts (default: eval.nfe)")
            p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/samples)")
            p.add_argument("--n", type=int, default=None,
                           help="write N samples per NFE (class-balanced prompts, noise fixed by eval.seed) "
                                "instead of the 40 fixed sample-file prompts")
            p.add_argument("--teacher", action="store_true",
                           help="with --n: sample the teacher at teacher.sample_steps and the comparison guidance")
        p.set_defaults(func=func)
    p = sub.add_parser("plan", help="per-rank GPU memory of a Qwen-Image run (meta tensors; no weights, no GPU)")
    _common(p, run_dir=False)
    from .run.plan import add_plan_arguments  # lazy: the memory plan brings torch
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("encode", help="pre-encode images + captions into latent shards (scale path)",
                       add_help=False)
    p.set_defaults(func=None)
    p = sub.add_parser("export", help="write a run's weights as a diffusers pipeline directory (scale path)",
                       add_help=False)
    p.set_defaults(func=None)
    return parser


def export_main(argv: list[str]) -> int:
    """``twinflow-train export --run-dir DIR --out DIR [--config FILE] [--which final|best|ema] [--pipeline BASE]
    [--tt-mode few|mul] [key=value ...]``; returns the exit code (0 done, 2 bad input).

    The family's own ``ModelFamily.export`` does the work (``export.export_qwen_image_run`` for Qwen-Image)."""
    from .models.registry import FAMILIES, model_family  # lazy: the models bring torch

    p = argparse.ArgumentParser(prog="twinflow-train export", description="run weights -> diffusers directory")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--which", choices=("final", "best", "ema"), default="ema")
    p.add_argument("--pipeline", type=Path, default=None, help="base pipeline dir: write a complete pipeline")
    p.add_argument("--tt-mode", choices=("few", "mul"), default=None, help="default: sampler.tt_mode")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        path = args.config if args.config is not None else args.run_dir / CONFIG_FILE
        cfg = load_config(path, args.overrides)
        family = model_family(cfg)
        if family.export is None:
            exporting = [name for name, f in FAMILIES.items() if f.export is not None]
            raise ConfigError(f"model.family: {cfg.model.family!r} has no export "
                              f"(families that export: {', '.join(map(repr, exporting))})")
        out = family.export(cfg, run_dir=args.run_dir, out=args.out, which=args.which, tt_mode=args.tt_mode,
                            base_pipeline=args.pipeline)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        for problem in getattr(e, "problems", None) or [str(e)]:
            print(f"twinflow-train export: {problem}", file=sys.stderr)
        return 2
    print(out)
    if out is not None and (Path(out) / "model_index.json").is_file():
        print(f"twinflow-train export: load it with diffusers: DiffusionPipeline.from_pretrained({str(out)!r}, "
              "trust_remote_code=True)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["encode"]:
        from .data.encode import encode_main  # lazy: encoding brings torch
        return encode_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"twinflow-train: config error: {problem}", file=sys.stderr)
        return 2
    except InputError as e:  # anything else raised is an internal error and keeps its traceback (exit 1)
        for problem in e.problems:
            print(f"twinflow-train: {problem}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"twinflow-train: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

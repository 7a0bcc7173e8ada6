"""``twinflow-train teacher | fit | sample | eval | encode | export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config


def _common(p: argparse.ArgumentParser, *, run_dir: bool) -> None:
    p.add_argument("--config", type=Path, default=None, help="trainer YAML (default: the dataclass defaults on digits, or "
                   "RUN_DIR/config.yaml for sample/eval; configs/digits.yaml is the tuned setup)")
    if run_dir:
        p.add_argument("--run-dir", type=Path, required=True, help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rl.weight=0.05")


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and getattr(args, "run_dir", None) is not None and args.command in ("sample", "eval"):
        candidate = args.run_dir / "config.yaml"
        path = candidate if candidate.is_file() else None
    return load_config(path, args.overrides)


def cmd_teacher(args: argparse.Namespace) -> int:
    from .teacher import get_teacher
    cfg = _load(args)
    path = get_teacher(cfg, progress=not args.no_progress)
    print(path)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .trainer import fit
    return fit(_load(args), args.run_dir, progress=not args.no_progress)


def cmd_sample(args: argparse.Namespace) -> int:
    from .inference import sample_run
    cfg = _load(args)
    out = sample_run(cfg, args.run_dir, which=args.which, nfe=args.nfe, out_dir=args.out)
    for p in out:
        print(p)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .inference import eval_run
    cfg = _load(args)
    result = eval_run(cfg, args.run_dir, which=args.which)
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinflow-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("teacher", help="train and cache the base model and the auxiliary networks")
    _common(p, run_dir=False)
    p.set_defaults(func=cmd_teacher)
    p = sub.add_parser("fit", help="TwinFlow distillation into a run directory (resumes automatically)")
    _common(p, run_dir=True)
    p.set_defaults(func=cmd_fit)
    for name, func, text in (("sample", cmd_sample, "fixed-noise samples (.npz + .png) from a run's weights"),
                             ("eval", cmd_eval, "deterministic validation of a run's weights")):
        p = sub.add_parser(name, help=text)
        _common(p, run_dir=True)
        p.add_argument("--which", choices=("final", "best"), default="final", help="latest checkpoint or best weights")
        if name == "sample":
            p.add_argument("--nfe", type=int, nargs="+", default=None, help="step counts (default: eval.nfe)")
            p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/samples)")
        p.set_defaults(func=func)
    p = sub.add_parser("encode", help="pre-encode images + captions into latent shards (scale path)",
                       add_help=False)
    p.set_defaults(func=None)
    p = sub.add_parser("export", help="write a run's weights as a diffusers pipeline directory (scale path)",
                       add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["encode"]:
        from .encode import encode_main
        return encode_main(argv[1:])
    if argv[:1] == ["export"]:
        from .export import export_main
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"twinflow-train: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"twinflow-train: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

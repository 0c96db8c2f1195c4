"""``python -m ease.experiments --suite depth``: the depth suite from the command line.

Every flag is checked before any file is written; a bad one ends the command with one
``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from ease.cli.experiments import _Parser, default_threads, set_threads
from ease.depth_suite import GPU_PRESET, RECIPES, DepthSuiteSettings, run_depth_suite
from ease.depth_suite.recipes import check_suite_settings

__all__ = ["main", "parse_args"]

_TUPLES = {"targets": float, "batch_sizes": int, "recipes": str}
_FLAGS = ("out", "vocab_size", "dim", "num_layers", "num_heads", "seq_len", "batch_size", "lr", "max_steps",
          "warmup_steps", "eval_every", "eval_batches", "min_exit_layer", "confidence", "prompts", "prompt_len",
          "new_tokens", "repeats", "draft_tokens", "classifier_batches", "seed")


def _build_parser(defaults: DepthSuiteSettings) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m ease.experiments --suite depth",
        description="Train five recipes (" + ", ".join(RECIPES) + ") on one 12-layer shape on the standard-library "
                    "corpus, then measure per-layer quality, the exit trade-off of every criterion and generation "
                    "speed. The defaults are the CPU run (53 minutes measured on 2 cores).",
    )
    parser.add_argument("--suite", choices=("depth",), default="depth", help=argparse.SUPPRESS)
    kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(defaults) if f.name in _FLAGS}
    for flag in _FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kinds[flag], default=None,
                            help=f"default: {getattr(defaults, flag)}")
    for flag in _TUPLES:
        parser.add_argument(f"--{flag.replace('_', '-')}", default=None,
                            help=f"comma-separated, default: {','.join(map(str, getattr(defaults, flag)))}")
    parser.add_argument("--gpu", action="store_true",
                        help="the preset for one H100/H200 (about 10 minutes, a prediction: not yet run on one): " +
                             ", ".join(f"{k}={v}" for k, v in GPU_PRESET.items()) + "; other flags still apply")
    parser.add_argument("--retrain", action="store_true", help="train even where --out holds models trained "
                        "with the same settings (default: load them and only measure)")
    parser.add_argument("--threads", type=int, default=None, help=f"CPU threads for torch (default here: {default_threads()})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-recipe lines")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[DepthSuiteSettings, int | None]:
    """Flags -> (:class:`DepthSuiteSettings`, threads); the values are checked by
    :func:`~ease.depth_suite.recipes.check_suite_settings`."""
    defaults = DepthSuiteSettings()
    parser = _build_parser(defaults)
    args = parser.parse_args(argv)
    settings = replace(defaults, **GPU_PRESET, extra={"preset": "gpu"}) if args.gpu else defaults
    given = {flag: getattr(args, flag) for flag in _FLAGS if getattr(args, flag) is not None}
    for flag, kind in _TUPLES.items():
        text = getattr(args, flag)
        if text is None:
            continue
        try:
            given[flag] = tuple(kind(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')} must be comma-separated {kind.__name__} values, got {text!r}")
    command = "python -m ease.experiments " + shlex.join(sys.argv[1:] if argv is None else argv)
    extra = {**settings.extra, "command": command}
    return replace(settings, **given, retrain=args.retrain, verbose=not args.quiet, extra=extra), args.threads


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ease.experiments --suite depth``; returns the exit status."""
    try:
        settings, threads = parse_args(argv)
        check_suite_settings(settings)
        set_threads(threads)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_depth_suite(settings)
    print()
    print(results["table"])
    print(f"wrote {Path(settings.out).resolve()}/ (results.json, results.md, "
          f"{', '.join(Path(p).name for p in results['figures'])}, models/) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m ease.experiments`` / ``ease-experiments``: the comparison run from the command line."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ease.experiments import RUN_NAMES, ExperimentSettings, run_experiments
from ease.training.distributed import setup_distributed

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> ExperimentSettings:
    """Command-line flags -> :class:`ExperimentSettings`."""
    defaults = ExperimentSettings()
    parser = argparse.ArgumentParser(
        prog="python -m ease.experiments",
        description="Train and compare the three EASE runs (standard, deep supervision, asymmetric) on one corpus.",
    )
    parser.add_argument("--text", default=None, help="a UTF-8 text file to use instead of the built-in corpus")
    parser.add_argument("--out", default=defaults.out, help="output folder (default: %(default)s)")
    for flag, kind in (
        ("vocab_size", int), ("dim", int), ("num_layers", int), ("seq_len", int), ("batch_size", int),
        ("lr", float), ("max_epochs", int), ("patience", int), ("threshold", float), ("seed", int),
    ):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=getattr(defaults, flag),
                            help="default: %(default)s")
    parser.add_argument("--thresholds", default=",".join(map(str, defaults.thresholds)),
                        help="comma-separated routing thresholds for the sweep")
    parser.add_argument("--runs", default=",".join(defaults.runs),
                        help="comma-separated runs to train, a subset of %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = parser.parse_args(argv)
    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
    except ValueError:
        parser.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
    runs = tuple(name.strip() for name in args.runs.split(",") if name.strip())
    unknown = [name for name in runs if name not in RUN_NAMES]
    if unknown or not runs:
        parser.error(f"--runs must name some of {','.join(RUN_NAMES)}, got {args.runs!r}")
    values = {k: v for k, v in vars(args).items() if k not in ("thresholds", "quiet", "runs")}
    return ExperimentSettings(**values, thresholds=thresholds, verbose=not args.quiet, runs=runs)


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m ease.experiments`` and the ``ease-experiments`` script."""
    settings = parse_args(argv)
    results = run_experiments(settings)
    if not setup_distributed("auto").is_main:
        return results
    print()
    print(results["table"])
    print(f"wrote {Path(settings.out).resolve()}/ (results.json, results.md, loss_curves.png, exit_tradeoff.png, models/)")
    best = min(run["evaluation"]["loss"] for run in results["runs"].values())
    if not best < results["unigram_baseline"]["loss"] - math.log(1.5):
        print("warning: no run beat the unigram baseline by a clear margin (1.5x in PPL)")
    return results


if __name__ == "__main__":
    main()

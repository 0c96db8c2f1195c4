"""``python -m ease.experiments`` / ``ease-experiments``: the comparison run from the command line.

Every flag is checked before any file is written; a bad one ends the command with one
``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from ease.data import DataBundle
from ease.experiments import ExperimentSettings, check_settings, load_experiment_data, run_experiments
from ease.training.distributed import setup_distributed

__all__ = ["default_threads", "main", "parse_args", "run", "set_threads"]


def default_threads() -> int:
    """CPU threads torch trains with unless ``--threads`` says: 1 on machines of up to 4 cores.

    On a small machine shared with other work, torch's default (one OpenMP thread per
    core) oversubscribes the cores: training ran 5-6x slower than with one thread. On
    larger machines, half the cores (at most 8), leaving room for other processes.
    """
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(cores // 2, 8)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error: ...`` line (exit status 2), as ease-generate does."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def _build_parser(defaults: ExperimentSettings) -> argparse.ArgumentParser:
    parser = _Parser(
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
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for torch (default here: {default_threads()}; 1 on machines of up to "
                             "4 cores, where more threads than free cores slow training several times)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--suite", choices=SUITES, default="comparison",
                        help="comparison (default): these three runs; depth: five recipes on a 12-layer model on "
                             "the standard-library corpus (see --suite depth --help)")
    return parser


SUITES = ("comparison", "depth")


def _suite(argv: list[str] | None) -> str:
    """The ``--suite`` named in ``argv`` (default ``comparison``); its own flags are parsed by that suite."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", default="comparison")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.suite


def parse_args(argv: list[str] | None = None) -> ExperimentSettings:
    """Command-line flags -> :class:`ExperimentSettings` (values are checked by :func:`check_settings`)."""
    settings, _ = _parse(argv)
    return settings


def _parse(argv: list[str] | None) -> tuple[ExperimentSettings, int | None]:
    defaults = ExperimentSettings()
    parser = _build_parser(defaults)
    args = parser.parse_args(argv)
    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
    except ValueError:
        parser.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
    runs = tuple(name.strip() for name in args.runs.split(",") if name.strip())
    values = {k: v for k, v in vars(args).items() if k not in ("thresholds", "quiet", "runs", "threads", "suite")}
    return ExperimentSettings(**values, thresholds=thresholds, verbose=not args.quiet, runs=runs), args.threads


def _prepare(argv: list[str] | None) -> tuple[ExperimentSettings, DataBundle]:
    """Parse and check the flags, set the threads and load the corpus: all before any file is written."""
    settings, threads = _parse(argv)
    check_settings(settings)
    set_threads(threads)
    return settings, load_experiment_data(settings)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads to ``--threads`` (None: :func:`default_threads`); returns the number.

    Raises:
        ValueError: ``threads`` below 1.
    """
    import torch

    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def _report(settings: ExperimentSettings, results: dict) -> None:
    if not setup_distributed("auto").is_main:
        return
    print()
    print(results["table"])
    print(f"wrote {Path(settings.out).resolve()}/ (results.json, results.md, loss_curves.png, exit_tradeoff.png, models/)")
    best = min(run["evaluation"]["loss"] for run in results["runs"].values())
    if not best < results["unigram_baseline"]["loss"] - math.log(1.5):
        print("warning: no run beat the unigram baseline by a clear margin (1.5x in PPL)")


def run(argv: list[str] | None = None) -> dict:
    """Parse, check, train and report; returns the results. A bad flag raises (see :func:`main`)."""
    settings, data = _prepare(argv)
    results = run_experiments(settings, data)
    _report(settings, results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ease.experiments`` and ``ease-experiments``; returns the exit status.

    ``--suite depth`` hands the flags to :func:`ease.cli.depth_suite.main`. A bad flag, a missing or unreadable corpus, or a corpus too small for the batches
    (all found before any output is written) prints one ``error: ...`` line and returns
    2; errors during training propagate with their traceback.
    """
    if _suite(argv) == "depth":
        from ease.cli.depth_suite import main as depth_main

        return depth_main(argv)
    try:
        settings, data = _prepare(argv)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _report(settings, run_experiments(settings, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

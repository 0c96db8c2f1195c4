"""``python -m ease.train --config run.toml`` (or ``ease-train``): one training run from a TOML file.

The file format and what the run writes: :mod:`ease.training_run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ease.training_run.execute import default_threads, run
from ease.training_run.spec import METRICS_FILE, MODEL_DIR, SUMMARY_FILE, ConfigError, run_file_schema, load_run_spec

__all__ = ["build_parser", "main"]


def _keys_epilog() -> str:
    """The tables and their keys, for ``--help``."""
    import textwrap

    lines = ["keys of a run file (every one optional; write \"none\" for None):"]
    for table, keys in run_file_schema().items():
        lines += textwrap.wrap(", ".join(keys), width=88, initial_indent=f"  [{table}] ", subsequent_indent="    ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m ease.train",
        description="Train one EASE model from a TOML run file (tables [model], [data], [l3t], [training], "
        "[output]; see the module documentation of ease.cli.train).",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the TOML run file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
        help="override one key, the value read as TOML (repeatable): --set training.max_steps=2000 "
        "--set l3t.routing_threshold=0.9 --set data.corpus=stdlib",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads(N). Default: 1 on a machine with at most 4 cores, else torch's default: "
        "on a small shared machine OpenMP's spin-waiting threads made training 5-6x slower",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars, per-evaluation lines or report")
    return parser


def _report(summary: dict[str, Any], out: Path) -> str:
    """The lines printed at the end of a run: final figures per layer, where the files went."""
    ev, stop = summary["evaluation"], summary["early_stopping"]
    lines = [
        f"best {'step ' + str(stop['best_step']) if stop['best_step'] is not None else 'epoch ' + str(stop['best_epoch'])}"
        f" | val loss {ev['loss']:.4f} | ppl {ev['ppl']:.2f} | accuracy {ev['accuracy']:.4f} | "
        f"train {summary['train_seconds']:.1f} s, wall {summary['wall_seconds']:.1f} s",
    ]
    for layer, figures in ev.get("layers", {}).items():
        lines.append(f"  layer {layer}: loss {figures['loss']:.4f}, accuracy {figures['accuracy']:.4f}")
    if ev.get("early_exit"):
        e = ev["early_exit"]
        lines.append(
            f"  early exit (threshold {e['threshold']:g}): accuracy {e['accuracy']:.4f}, mean exit layer "
            f"{e['mean_exit_layer']:.2f}, compute saved {e['compute_saved']:.1%}"
        )
    lines.append(f"wrote {out.resolve()}/ ({MODEL_DIR}/, {METRICS_FILE}, {SUMMARY_FILE}, plots)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ease.train`` and ``ease-train``; returns the exit status.

    0 after a run; 2, with one line ``error: ...`` on stderr and nothing written, for a
    run file, override or data that cannot be used.
    """
    import torch

    args = build_parser().parse_args(argv)
    threads = args.threads if args.threads is not None else default_threads()
    if threads is not None:
        if threads < 1:
            print(f"error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(threads)
    verbose = not args.quiet
    try:
        spec = load_run_spec(args.config, args.overrides, verbose=verbose)
        summary = run(spec, verbose=verbose)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ease.training.distributed import setup_distributed

    if verbose and setup_distributed(spec.config.distributed).is_main:
        print(_report(summary, spec.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

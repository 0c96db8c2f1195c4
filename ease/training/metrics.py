"""The metrics log of a training run: JSON lines, and TensorBoard scalars when it is installed.

Every ``log_every`` optimiser steps one line is appended to ``<log_dir>/metrics.jsonl``::

    {"kind": "train", "step": 120, "tokens": 491520, "lr": 0.0029, "loss": 3.91,
     "grad_norm": 0.84, "tokens_per_second": 5120.3, "layers": {"1": {"loss": 4.2, "accuracy": 0.21}, ...}}

(the loss and per-layer figures are token-weighted means over the steps since the last
line), and one line per evaluation, ``{"kind": "eval", "step": ..., "loss": ..., ...}``.
Each line is flushed as it is written, so a killed run keeps every line written before.
With the optional ``tensorboard`` package the same scalars go to ``<log_dir>/tensorboard``;
without it, nothing else happens. Only the main process (rank 0) writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "discard_after"]

METRICS_NAME = "metrics.jsonl"


def _finite(value: float) -> float | None:
    # JSON has no NaN or infinity: a non-finite figure is written as null.
    return value if math.isfinite(value) else None


def discard_after(log_dir: str | os.PathLike, step: int) -> int:
    """Drop the lines of ``log_dir/metrics.jsonl`` written after optimiser step ``step``.

    A run resumed from the checkpoint of ``step`` trains the later steps again and logs
    them again; without this the file would hold them twice. Rewritten atomically; a
    torn last line (a run killed mid-write) is dropped too.

    Returns:
        The number of lines dropped (0 when there is no file).
    """
    from ease._io import atomic_write_text

    path = Path(log_dir) / METRICS_NAME
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLog:
    """Accumulates step figures and appends a line every ``log_every`` steps.

    Args:
        log_dir: the folder of ``metrics.jsonl`` (created); None logs nothing.
        log_every: steps per training line (>= 1).
        enabled: False on ranks other than 0.
    """

    def __init__(self, log_dir: str | os.PathLike | None, log_every: int = 10, enabled: bool = True) -> None:
        self.enabled = enabled and log_dir is not None
        self.log_every = log_every
        self.path = Path(log_dir) / METRICS_NAME if log_dir is not None else None
        self._file = None
        self._tensorboard = None
        self._reset()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))

    def _reset(self) -> None:
        self._tokens = 0
        self._loss = 0.0
        self._layers: dict[int, list[float]] = {}
        self._steps = 0
        self._started = time.perf_counter()

    def step(
        self,
        step: int,
        tokens_seen: int,
        tokens: int,
        lr: float,
        loss_sum: float,
        layer_ce_sums: dict[int, float],
        layer_correct: dict[int, int],
        grad_norm: float,
    ) -> None:
        """Record optimiser step ``step`` (1-based count after it); write a line when due.

        Args:
            step: optimiser steps taken so far, this one included.
            tokens_seen: target tokens trained on so far, this step included.
            tokens: this step's target tokens.
            lr: the learning rate of the embeddings' group (the base rate times the schedule).
            loss_sum: the step's loss times its tokens.
            layer_ce_sums, layer_correct: per supervised layer, cross-entropy sum and
                correct top-1 predictions over this step's tokens.
            grad_norm: the global gradient norm before clipping.
        """
        if not self.enabled:
            return
        self._steps += 1
        self._tokens += tokens
        self._loss += loss_sum
        for layer, ce in layer_ce_sums.items():
            sums = self._layers.setdefault(layer, [0.0, 0.0, 0.0])
            sums[0] += ce
            sums[1] += layer_correct.get(layer, 0)
            sums[2] += tokens
        if step % self.log_every:
            return
        seconds = max(time.perf_counter() - self._started, 1e-9)
        record = {
            "kind": "train",
            "step": step,
            "tokens": tokens_seen,
            "lr": lr,
            "loss": _finite(self._loss / max(self._tokens, 1)),
            "grad_norm": _finite(grad_norm),
            "tokens_per_second": self._tokens / seconds,
            "layers": {
                str(layer): {"loss": _finite(ce / max(n, 1)), "accuracy": correct / max(n, 1)}
                for layer, (ce, correct, n) in sorted(self._layers.items())
            },
        }
        self._write(record)
        self._reset()

    def evaluation(self, step: int, tokens_seen: int, figures: dict[str, Any]) -> None:
        """Append one line for an evaluation (:meth:`ease.Trainer.evaluate`'s dict) after ``step``."""
        if not self.enabled:
            return
        record = {
            "kind": "eval",
            "step": step,
            "tokens": tokens_seen,
            "loss": _finite(figures["loss"]),
            "accuracy": figures["accuracy"],
            "objective": _finite(figures["objective"]),
        }
        if "layers" in figures:
            record["layers"] = {
                str(layer): {"loss": _finite(v["loss"]), "accuracy": v["accuracy"]}
                for layer, v in figures["layers"].items()
            }
        if "early_exit" in figures:
            record["early_exit"] = {
                key: figures["early_exit"][key] for key in ("threshold", "accuracy", "mean_exit_layer", "compute_saved")
            }
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            prefix = record["kind"]
            for key in ("loss", "lr", "grad_norm", "tokens_per_second", "accuracy", "objective"):
                if record.get(key) is not None:
                    self._tensorboard.add_scalar(f"{prefix}/{key}", record[key], record["step"])
            for layer, values in record.get("layers", {}).items():
                for key, value in values.items():
                    if value is not None:
                        self._tensorboard.add_scalar(f"{prefix}/layer{layer}/{key}", value, record["step"])

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

"""The figures of a run: per-layer training loss over steps, per-layer validation accuracy at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train lines, eval lines)`` of a ``metrics.jsonl``, in step order.

    A resumed run appends lines again for the steps after its last checkpoint; the line
    written last for a step is the one kept.
    """
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                kept[(record["kind"], record["step"])] = record
    lines = sorted(kept.values(), key=lambda r: r["step"])
    return [r for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "eval"]


def _figure():
    """A matplotlib figure and axes without pyplot (no global state, no GUI), or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5))
    return fig, fig.subplots()


def _save_figure(fig, ax, path: Path) -> Path:
    """Add the legend and write ``path`` as PNG, atomically."""
    from ease._io import atomic_path

    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def plot_loss_per_layer(metrics_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """``loss_per_layer.png``: each layer's training loss over steps, evaluations as markers.

    Training lines come from the ``"train"`` lines of ``metrics.jsonl`` (a layer is drawn
    where it was supervised); markers are each evaluation's per-layer validation loss
    (the final layer's alone for a model trained on its last layer).

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    made = _figure()
    if made is None:
        return None
    fig, ax = made
    train, evals = read_metrics(metrics_path)
    layers = sorted({int(l) for r in train for l in r["layers"]} | {int(l) for r in evals for l in r.get("layers", {})})
    colors = {}
    for layer in layers:
        points = [(r["step"], r["layers"][str(layer)]["loss"]) for r in train if str(layer) in r["layers"]]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            (line,) = ax.plot(*zip(*points), "-", lw=1, label=f"layer {layer} train")
            colors[layer] = line.get_color()
    last = max(layers) if layers else None
    for layer in layers:
        points = [(r["step"], r["layers"][str(layer)]["loss"]) for r in evals if str(layer) in r.get("layers", {})]
        if not points and layer == last:
            points = [(r["step"], r["loss"]) for r in evals]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), "o", ms=5, color=colors.get(layer), label=f"layer {layer} validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss per layer")
    return _save_figure(fig, ax, Path(path))


def plot_accuracy_per_layer(evaluation: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """``accuracy_per_layer.png``: each layer's validation accuracy at the end, as bars.

    ``evaluation`` is :meth:`~ease.Trainer.evaluate`'s dict; a model trained on its last
    layer has that layer's bar alone. With a routing threshold the early-exit accuracy is
    drawn as a horizontal line, labelled with the mean exit layer.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    made = _figure()
    if made is None:
        return None
    fig, ax = made
    per_layer = {int(l): v["accuracy"] for l, v in evaluation.get("layers", {}).items()}
    if not per_layer:
        num_layers = None
        per_layer = {"final": evaluation["accuracy"]}
    else:
        num_layers = max(per_layer)
    names = [str(l) for l in per_layer]
    bars = ax.bar(names, list(per_layer.values()), color="tab:blue", label="validation accuracy (top-1)")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    exit_stats = evaluation.get("early_exit")
    if exit_stats:
        ax.axhline(
            exit_stats["accuracy"], color="tab:red", ls="--",
            label=f"early exit τ={exit_stats['threshold']:g}: mean layer {exit_stats['mean_exit_layer']:.2f}"
            + (f" of {num_layers}" if num_layers else ""),
        )  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("next-token accuracy")
    ax.set_title("validation accuracy per layer")
    return _save_figure(fig, ax, Path(path))

"""Choosing ``routing_threshold`` on validation data: the cheapest threshold that keeps accuracy.

A token exits at the first layer ``l >= min_exit_layer`` whose exit-head top-1 softmax
probability (:func:`ease_kernels.exit_confidence`) reaches the threshold; the last layer
answers every token left (the rule of :meth:`ease.Trainer.evaluate` and of
:func:`ease.generation.generate`). Raising the threshold can only delay an exit, so the
mean exit layer grows with it, and the lowest threshold whose accuracy stays within
``max_accuracy_drop`` of full depth is the one that saves the most compute.

The sweep is measured teacher-forced: every layer's logits are computed once per batch on
the true context, and every threshold is scored from them. In generation the context is
the model's own output and the skipped layers' keys and values come from state
propagation, so the generated-text agreement is measured separately (``bench/``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

import ease_kernels
from ease.data import IGNORE_INDEX, split_batch
from ease.exits import DEFAULT_THRESHOLDS, ExitRule, first_exit_layer
from ease.validation import check_real, check_threshold

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ease.models import EarlyExitDecoder

__all__ = ["DEFAULT_THRESHOLDS", "CalibrationPoint", "CalibrationResult", "calibrate_threshold"]

@dataclass
class CalibrationPoint:
    """Early-exit figures at one threshold.

    Attributes:
        threshold: the routing threshold.
        accuracy: top-1 next-token accuracy of the early-exit answers.
        accuracy_drop: full-depth accuracy minus ``accuracy`` (negative: a gain).
        mean_exit_layer: mean layer at which tokens exit (1..num_layers).
        compute_saved: ``1 - mean_exit_layer / num_layers``, the fraction of blocks skipped.
        exit_fractions: ``{layer: fraction of tokens exiting there}`` for every layer.
    """

    threshold: float
    accuracy: float
    accuracy_drop: float
    mean_exit_layer: float
    compute_saved: float
    exit_fractions: dict[int, float]


@dataclass
class CalibrationResult:
    """What :func:`calibrate_threshold` found.

    Attributes:
        threshold: the lowest swept threshold whose accuracy drop is at most
            ``max_accuracy_drop``, or None when no threshold qualifies.
        full_depth_accuracy: accuracy of the last layer on every token.
        max_accuracy_drop: the allowed drop (absolute, as a fraction: 0.01 = one point).
        min_exit_layer: no token exited before this layer.
        num_layers: the model's depth.
        num_tokens: target tokens scored.
        layer_accuracy: ``{layer: accuracy}`` when every token answers at that layer.
        sweep: one :class:`CalibrationPoint` per threshold, in increasing threshold order.
    """

    threshold: float | None
    full_depth_accuracy: float
    max_accuracy_drop: float
    min_exit_layer: int
    num_layers: int
    num_tokens: int
    layer_accuracy: dict[int, float]
    sweep: list[CalibrationPoint]

    @property
    def chosen(self) -> CalibrationPoint | None:
        """The sweep point of :attr:`threshold` (None when no threshold qualifies)."""
        return next((point for point in self.sweep if point.threshold == self.threshold), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for JSON."""
        return asdict(self)

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
        """Accuracy against mean layers used: the threshold sweep, per-layer exits, full depth.

        Args:
            path: where to save the figure (format from the suffix, e.g. ``.png``); None
                only returns it.
            title: the figure title.

        Returns:
            The ``matplotlib.figure.Figure`` (built without pyplot, so no display is needed).

        Raises:
            ImportError: matplotlib is not installed (``pip install 'ease[plots]'``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:  # an optional dependency
            raise ImportError(
                "CalibrationResult.plot needs matplotlib: pip install matplotlib (or 'ease[plots]')"
            ) from error
        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = figure.add_subplot()
        layers = sorted(self.layer_accuracy)
        ax.plot(layers, [self.layer_accuracy[l] for l in layers], "s:", color="grey",
                label="every token at layer l")
        x = [point.mean_exit_layer for point in self.sweep]
        y = [point.accuracy for point in self.sweep]
        ax.plot(x, y, "o-", color="tab:blue", label="early exit, threshold sweep")
        labelled_at = -math.inf
        for point in self.sweep:  # label thresholds where the labels do not overlap
            if point.mean_exit_layer - labelled_at >= 0.06 * self.num_layers:
                ax.annotate(f"{point.threshold:g}", (point.mean_exit_layer, point.accuracy),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
                labelled_at = point.mean_exit_layer
        ax.axhline(self.full_depth_accuracy, color="black", lw=0.8, label="full depth")
        ax.axhline(self.full_depth_accuracy - self.max_accuracy_drop, color="black", lw=0.8, ls="--",
                   label=f"full depth - {self.max_accuracy_drop:g}")
        chosen = self.chosen
        if chosen is not None:
            ax.plot([chosen.mean_exit_layer], [chosen.accuracy], "*", ms=14, color="tab:red",
                    label=f"chosen: threshold {chosen.threshold:g}")
        ax.set_xlabel("mean layers used per token")
        ax.set_ylabel("next-token accuracy")
        ax.set_xlim(0.5, self.num_layers + 0.5)
        ax.set_title(title or f"Threshold calibration ({self.num_tokens} tokens, min_exit_layer={self.min_exit_layer})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def _check_thresholds(thresholds: Iterable[float] | None) -> list[float]:
    values = DEFAULT_THRESHOLDS if thresholds is None else list(thresholds)
    if not values:
        raise ValueError("thresholds must hold at least one threshold")
    return sorted({check_threshold("thresholds", value, allow_none=False) for value in values})


@torch.no_grad()
def calibrate_threshold(
    model: EarlyExitDecoder,
    val_batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    max_accuracy_drop: float = 0.01,
    thresholds: Iterable[float] | None = None,
    min_exit_layer: int = 1,
    exit_criterion: str = "max_prob",
) -> CalibrationResult:
    """The lowest routing threshold whose early-exit accuracy stays near full depth.

    Each batch runs the model once for the logits of every layer; every threshold is then
    scored from those logits (no rerun per threshold).

    Args:
        model: an :class:`~ease.models.EarlyExitDecoder` (run in eval mode; its mode is
            restored afterwards).
        val_batches: re-iterable batches: ``[B, T + 1]`` token tensors or
            ``(inputs, targets)`` pairs (targets equal to ``IGNORE_INDEX`` are skipped).
        max_accuracy_drop: the largest allowed ``full_depth_accuracy - accuracy``, absolute
            (0.01 = one percentage point).
        thresholds: thresholds to sweep, each in (0, 1]; default :data:`DEFAULT_THRESHOLDS`.
        min_exit_layer: no token exits before this layer.
        exit_criterion: the exit score the thresholds apply to
            (:data:`ease.exits.EXIT_CRITERIA`).

    Returns:
        :class:`CalibrationResult` with the chosen ``threshold`` (or None) and the ``sweep``.

    Raises:
        ValueError: a bad ``max_accuracy_drop``, threshold or ``min_exit_layer``; no batch or
            no target token.
    """
    max_accuracy_drop = check_real("max_accuracy_drop", max_accuracy_drop, 0.0)
    values = _check_thresholds(thresholds)
    num_layers = model.num_layers
    # The rule's threshold varies over the sweep; its layers are what is fixed here.
    rule = ExitRule.for_model(model, None, min_exit_layer, exit_criterion)
    min_exit_layer = rule.min_exit_layer

    device = model.device
    threshold_t = torch.tensor(values, device=device)[:, None, None]  # (S, 1, 1)
    layer_correct = torch.zeros(num_layers, dtype=torch.long, device=device)
    exit_correct = torch.zeros(len(values), dtype=torch.long, device=device)
    exit_counts = torch.zeros(len(values), num_layers, dtype=torch.long, device=device)
    tokens = batches = 0
    was_training = model.training
    model.eval()
    try:
        for batch in val_batches:
            batches += 1
            inputs, targets = split_batch(batch)
            inputs, targets = inputs.to(device), targets.to(device, torch.long)
            counted = targets != IGNORE_INDEX
            tokens += int(counted.sum())
            # One model pass per batch: every layer's logits (and, for the criteria that
            # read them, hidden states) score every threshold.
            if rule.needs_hidden:
                hidden = model.hidden_states(inputs, range(1, num_layers + 1))
                previous = model.embed(inputs)
                logits = {layer: model.exit_head(state) for layer, state in hidden.items()}
            else:
                hidden, previous = {}, None
                logits = model(inputs, exit_layers=range(1, num_layers + 1))
            confidence, correct = [], []
            for layer in range(1, num_layers + 1):
                state = hidden.get(layer)
                decision = rule.score(logits.pop(layer), layer, state, previous)
                confidence.append(decision.confidence[counted])
                correct.append(decision.prediction[counted] == targets[counted])
                previous = state
            confidence = torch.stack(confidence)  # (L, N)
            correct = torch.stack(correct)  # (L, N)
            layer_correct += correct.sum(1)
            # exits[s, i, n]: token n may leave at layer min_exit_layer + i under threshold s.
            exits = confidence[min_exit_layer - 1 : num_layers - 1] >= threshold_t  # (S, m, N)
            exit_index = first_exit_layer(exits, min_exit_layer, num_layers, dim=1) - 1  # (S, N), 0-based
            token_index = torch.arange(correct.shape[1], device=device)
            exit_correct += correct[exit_index, token_index].sum(1)  # (S,)
            exit_counts.scatter_add_(1, exit_index, torch.ones_like(exit_index))
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("val_batches yielded no batch (a generator is exhausted after one pass: pass a list)")
    if tokens == 0:
        raise ValueError(f"val_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")

    layer_accuracy = {layer: int(layer_correct[layer - 1]) / tokens for layer in range(1, num_layers + 1)}
    full = layer_accuracy[num_layers]
    layer_numbers = torch.arange(1, num_layers + 1, dtype=torch.float64)
    sweep = []
    for s, threshold in enumerate(values):
        counts = exit_counts[s].cpu()
        mean_exit_layer = float((counts.double() * layer_numbers).sum()) / tokens
        accuracy = int(exit_correct[s]) / tokens
        sweep.append(
            CalibrationPoint(
                threshold=threshold,
                accuracy=accuracy,
                accuracy_drop=full - accuracy,
                mean_exit_layer=mean_exit_layer,
                compute_saved=1.0 - mean_exit_layer / num_layers,
                exit_fractions={layer: int(counts[layer - 1]) / tokens for layer in range(1, num_layers + 1)},
            )
        )
    # A small tolerance so that a drop equal to the limit, up to float rounding, qualifies.
    qualifying = [p.threshold for p in sweep if p.accuracy_drop <= max_accuracy_drop + 1e-12]
    return CalibrationResult(
        threshold=min(qualifying) if qualifying else None,
        full_depth_accuracy=full,
        max_accuracy_drop=float(max_accuracy_drop),
        min_exit_layer=min_exit_layer,
        num_layers=num_layers,
        num_tokens=tokens,
        layer_accuracy=layer_accuracy,
        sweep=sweep,
    )

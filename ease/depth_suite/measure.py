"""What the depth suite measures on each trained model.

- :func:`layer_quality`: validation loss and accuracy of every layer's exit;
- :func:`criterion_sweeps`: for each exit criterion, the teacher-forced threshold sweep
  (accuracy, agreement with the last layer, mean exit layer) on calibration batches, and
  the threshold Learn-then-Test certifies for each target agreement
  (:func:`ease.calibrate_threshold` with ``risk="agreement"``), with its realised
  agreement on separate check batches;
- :func:`generation_speed`: greedy generation tokens/s at each batch size, full depth,
  early exit at the certified thresholds and self-speculation, timed interleaved in one
  process, each generated token's decision agreement with full depth beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ease.calibration import calibrate_threshold
from ease.data import split_batch
from ease.exit_classifier import train_exit_classifier
from ease.exits import EXIT_CRITERIA
from ease.generation.measure import decision_agreement, generate_all, time_interleaved
from ease.models import EarlyExitDecoder

__all__ = ["GRIDS", "criterion_sweeps", "generation_speed", "layer_quality"]

GRIDS = {
    "max_prob": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "margin": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "saturation": (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999),
    "classifier": (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999),
}
"""The thresholds swept per criterion: each criterion's score has its own scale."""


@torch.no_grad()
def layer_quality(model: EarlyExitDecoder, batches: Sequence[torch.Tensor]) -> dict[int, dict[str, float]]:
    """``{layer: {"loss", "accuracy"}}`` of every layer's exit on ``batches`` (token means).

    A standard model's intermediate exits were never trained: their figures show what
    an untrained exit gives, through the same shared head.
    """
    was_training = model.training
    model.eval()
    num_layers = model.num_layers
    loss = torch.zeros(num_layers, dtype=torch.float64)
    correct = torch.zeros(num_layers, dtype=torch.float64)
    tokens = 0
    try:
        for batch in batches:
            inputs, targets = (t.to(model.device) for t in split_batch(batch))
            logits = model(inputs, exit_layers=range(1, num_layers + 1))
            for layer in range(1, num_layers + 1):
                flat = logits[layer].flatten(0, 1).float()
                loss[layer - 1] += float(F.cross_entropy(flat, targets.flatten(), reduction="sum"))
                correct[layer - 1] += float((flat.argmax(-1) == targets.flatten()).sum())
            tokens += targets.numel()
    finally:
        model.train(was_training)
    return {l: {"loss": float(loss[l - 1]) / tokens, "accuracy": float(correct[l - 1]) / tokens}
            for l in range(1, num_layers + 1)}


def train_classifier(model: EarlyExitDecoder, batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Train the model's exit classifier (the ``"classifier"`` criterion) on ``batches``."""
    torch.manual_seed(0)
    result = train_exit_classifier(model, batches, epochs=1)
    return {"steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss}


def criterion_sweeps(
    model: EarlyExitDecoder,
    calibration_batches: Sequence[torch.Tensor],
    check_batches: Sequence[torch.Tensor],
    targets: Sequence[float],
    confidence: float,
    min_exit_layer: int,
) -> dict[str, dict[str, Any]]:
    """Per criterion: the sweep, and per target the certified threshold and its held-out agreement."""
    results = {}
    for criterion in EXIT_CRITERIA:
        grid = GRIDS[criterion]
        # One pass per criterion: the tested losses (disagreement with the last layer) do
        # not depend on the target, so every target's test reruns on the same sums.
        calibration = calibrate_threshold(
            model, calibration_batches, 1 - min(targets), thresholds=grid, min_exit_layer=min_exit_layer,
            exit_criterion=criterion, confidence=confidence, risk="agreement",
        )
        sweep = [
            {"threshold": p.threshold, "accuracy": p.accuracy, "agreement": p.agreement,
             "mean_exit_layer": p.mean_exit_layer}
            for p in calibration.sweep
        ]
        check = calibrate_threshold(
            model, check_batches, thresholds=grid, min_exit_layer=min_exit_layer, exit_criterion=criterion
        )
        held_out = {p.threshold: p for p in check.sweep}
        certified = {}
        for target in targets:
            threshold = calibration.certified_threshold(1 - target)
            point = held_out.get(threshold)
            certified[str(target)] = {
                "threshold": threshold,
                "calibration_agreement": next((p["agreement"] for p in sweep if p["threshold"] == threshold), None),
                "held_out_agreement": None if point is None else point.agreement,
                "held_out_accuracy": None if point is None else point.accuracy,
                "held_out_mean_exit_layer": None if point is None else point.mean_exit_layer,
            }
        results[criterion] = {"sweep": sweep, "certified": certified, "tested_tokens": calibration.tested_tokens,
                              "full_depth_accuracy": calibration.full_depth_accuracy}
    return results


def generation_settings(
    sweeps: dict[str, dict[str, Any]], targets: Sequence[float], min_exit_layer: int, draft_tokens: int
) -> list[dict[str, Any]]:
    """What is timed: full depth, early exit at every criterion's certified threshold for
    each target (a threshold certified for several targets is timed once, under the
    highest), and self-speculation (draft depth ``"auto"``)."""
    settings: list[dict[str, Any]] = [{"mode": "full", "criterion": None, "target": None, "options": {}}]
    for criterion in EXIT_CRITERIA:
        timed: dict[float, dict[str, Any]] = {}
        for target in sorted(targets):
            threshold = sweeps[criterion]["certified"][str(target)]["threshold"]
            if threshold is None:
                continue
            timed[threshold] = {"mode": "early exit", "criterion": criterion, "target": target, "options": {
                "routing_threshold": threshold, "min_exit_layer": min_exit_layer, "exit_criterion": criterion,
            }}
        settings += timed.values()
    settings.append({"mode": "self-speculative", "criterion": None, "target": None,
                     "options": {"draft_layers": "auto", "num_draft_tokens": draft_tokens}})
    return settings


def generation_speed(
    model: EarlyExitDecoder,
    prompts: Sequence[Sequence[int]],
    settings: Sequence[dict[str, Any]],
    batch_sizes: Sequence[int],
    new_tokens: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """One row per (batch size, setting): tokens/s, speed-up over full depth at that batch
    size (timed in the same rounds), mean exit layer, decision agreement, token agreement
    with full depth's output, draft acceptance."""
    cases = [(batch, setting) for batch in batch_sizes for setting in settings]
    outputs = [generate_all(model, prompts, batch, new_tokens, s["options"]) for batch, s in cases]  # also a warm-up
    times = time_interleaved(
        [lambda b=batch, o=s["options"]: generate_all(model, prompts, b, new_tokens, o) for batch, s in cases], repeats
    )
    rows, full = [], {}
    for (batch, setting), outs, seconds in zip(cases, outputs, times):
        new = torch.cat([o.new_tokens for o in outs])
        exits = torch.cat([o.token_exit_layers for o in outs])
        rate = new.numel() / statistics.median(seconds)
        if setting["mode"] == "full":
            full[batch] = (rate, new)
        drafted = sum(o.draft_tokens for o in outs)
        rows.append({
            "batch": batch, "mode": setting["mode"], "criterion": setting["criterion"], "target": setting["target"],
            "threshold": setting["options"].get("routing_threshold"),
            "tokens_per_s": rate, "speedup": rate / full[batch][0],
            "mean_exit_layer": float(exits.double().mean()),
            "decision_agreement": decision_agreement(model, prompts, new),
            "output_agreement": float((new == full[batch][1]).double().mean()),
            "draft_acceptance": sum(o.accepted_draft_tokens for o in outs) / drafted if drafted else None,
            "seconds": seconds,
        })
    return rows

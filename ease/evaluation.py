"""Validation figures of an EASE decoder: loss, perplexity, accuracy per layer, and early exit.

Every statistic is token-weighted over all batches (sums over non-ignored targets,
divided once at the end). Early exit is measured teacher-forced with the rule of
:class:`ease.exits.ExitRule`: every layer's logits are computed, so
``compute_saved = 1 - mean_exit_layer / num_layers`` is the fraction of blocks an exiting
inference would skip, not a timing. Under torchrun each rank evaluates its own rows and
the sums are all-reduced before dividing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ease.data import IGNORE_INDEX, Batch
from ease.exits import ExitRule
from ease.models import EarlyExitDecoder
from ease.modules.exit_head import token_sum_cross_entropy
from ease.training import distributed as dist_utils
from ease.training.batches import prepare_shards
from ease.training.distributed import DistributedContext, WrappedModel
from ease.training.loop import autocast

__all__ = ["evaluate", "perplexity"]


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite past float64's range instead of an ``OverflowError``."""
    return math.exp(loss) if loss < 709.0 else math.inf


@torch.no_grad()
def evaluate(
    model: EarlyExitDecoder,
    wrapped: WrappedModel,
    batches: Iterable[Batch],
    weights: Mapping[int, float],
    rule: ExitRule,
    context: DistributedContext,
    vocab_size: int,
) -> dict[str, Any]:
    """The figures of :meth:`ease.Trainer.evaluate` (which documents the returned dict).

    Args:
        model: the bare decoder; ``wrapped`` is how it runs.
        batches: re-iterable validation batches.
        weights: every layer's loss weight (for ``"objective"``).
        rule: the exit rule; early-exit figures only for a model that trains every layer
            and a rule with a threshold.
        context: this process's place in a torchrun launch.
        vocab_size: targets must lie below it.
    """
    num_layers = model.num_layers
    every_layer = model.trains_every_layer
    if not every_layer:  # untrained intermediate exits: their confidences mean nothing
        rule = ExitRule(num_layers, None, rule.min_exit_layer, rule.criterion)
    early_exit = rule.threshold is not None
    layers = sorted(
        set(range(1, num_layers + 1)) if every_layer else {num_layers} | {l for l, w in weights.items() if w > 0}
    )
    presharded = context.enabled and dist_utils.has_distributed_sampler(batches)
    device = model.device
    # Accumulated on the device so the loop never waits on the host.
    ce_sums = {layer: torch.zeros((), dtype=torch.float64, device=device) for layer in layers}
    correct = {layer: torch.zeros((), dtype=torch.long, device=device) for layer in layers}
    exit_counts = torch.zeros(num_layers + 1, dtype=torch.long, device=device)
    exit_correct = torch.zeros((), dtype=torch.long, device=device)
    exit_agree = torch.zeros((), dtype=torch.long, device=device)
    tokens = 0
    count = 0

    was_training = model.training
    model.eval()
    gathered = contextlib.ExitStack()
    try:
        # FSDP2: gather the root's parameters so hidden_states and exit_head can be called.
        gathered.enter_context(wrapped.gathered())
        for batch in batches:
            count += 1
            [(inputs, targets, batch_tokens, _)], _ = prepare_shards(
                batch, vocab_size, device, context, 1, presharded, global_count=False
            )
            tokens += batch_tokens
            counted = targets != IGNORE_INDEX
            with autocast(device):
                # Hidden states first, then one layer's logits at a time: only one
                # (B, T, V) tensor is alive, which matters for large vocabularies.
                hidden = model.hidden_states(inputs, layers)
            predictions, exits = {}, []
            # The state before layer 1 (saturation compares each layer with the one before).
            previous = model.embed(inputs) if early_exit and rule.needs_hidden else None
            for layer in layers:
                state = hidden.pop(layer)
                with autocast(device):
                    logits = model.exit_head(state)  # (B, T, V)
                ce_sums[layer] += token_sum_cross_entropy(logits, targets).double()
                # One fused pass gives the prediction and, where a token may exit, the decision.
                decision = rule.decide(logits, layer, state, previous)
                correct[layer] += ((decision.prediction == targets) & counted).sum()
                predictions[layer] = decision.prediction
                if rule.checks(layer):
                    exits.append(decision.exit)
                if previous is not None:
                    previous = state
            if early_exit:
                exit_layer = rule.first_exit(torch.stack(exits) if exits else counted.new_zeros((0, *counted.shape)))
                stacked = torch.stack([predictions[layer] for layer in range(1, num_layers + 1)])  # (L, B, T)
                exit_prediction = stacked.gather(0, (exit_layer - 1)[None]).squeeze(0)
                exit_counts += torch.bincount(exit_layer[counted], minlength=num_layers + 1)
                exit_correct += ((exit_prediction == targets) & counted).sum()
                exit_agree += ((exit_prediction == predictions[num_layers]) & counted).sum()
    finally:
        gathered.close()
        model.train(was_training)

    if context.enabled:
        tokens, exit_correct, exit_agree = _reduce(
            tokens, ce_sums, correct, exit_counts, torch.stack([exit_correct, exit_agree]), context
        )
    if count == 0:
        raise ValueError(
            "val_batches yielded no batch (a generator is exhausted after one pass: pass a list or a DataLoader)"
        )
    if tokens == 0:
        raise ValueError(f"val_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")

    losses = {layer: float(ce_sums[layer]) / tokens for layer in layers}
    accuracies = {layer: int(correct[layer]) / tokens for layer in layers}
    result: dict[str, Any] = {
        "loss": losses[num_layers],
        "ppl": perplexity(losses[num_layers]),
        "accuracy": accuracies[num_layers],
        "objective": sum(weight * losses[layer] for layer, weight in weights.items() if weight > 0),
        "tokens": tokens,
    }
    if every_layer:
        result["layers"] = {
            layer: {"loss": losses[layer], "ppl": perplexity(losses[layer]), "accuracy": accuracies[layer]}
            for layer in layers
        }
    if early_exit:
        counts = exit_counts.tolist()
        mean_exit_layer = sum(layer * counts[layer] for layer in range(1, num_layers + 1)) / tokens
        # Checks per token: every checked layer up to the exit (a token leaving at l was
        # checked at min_exit_layer..l; one answered by the last layer at every checked layer).
        checks = sum(
            counts[layer] * len([l for l in rule.checked_layers if l <= layer]) for layer in range(1, num_layers + 1)
        ) / tokens
        result["early_exit"] = {
            "threshold": float(rule.threshold),
            "min_exit_layer": rule.min_exit_layer,
            "criterion": rule.criterion,
            "accuracy": int(exit_correct) / tokens,
            "agreement": int(exit_agree) / tokens,
            "exit_fractions": {layer: counts[layer] / tokens for layer in range(1, num_layers + 1)},
            "mean_exit_layer": mean_exit_layer,
            "compute_saved": 1.0 - mean_exit_layer / num_layers,
            "check_cost": checks * check_cost_in_blocks(model, rule),
        }
    return result


def check_cost_in_blocks(model: EarlyExitDecoder, rule: ExitRule) -> float:
    """The cost of one exit check on one token, in units of one transformer block.

    Counted as multiply-adds per token, which for these layers equal their weight counts:
    a block's matrices; the exit head's projection (``vocab * dim``) for the criteria read
    from logits; the classifier's weights for ``"classifier"`` (its prediction, needed only
    at the exit, is left out); a cosine of two states for ``"saturation"`` (``dim``).
    """
    block = sum(p.numel() for p in model.layers[0].parameters() if p.dim() >= 2)
    if rule.criterion == "saturation":
        return model.config.dim / block
    if rule.criterion == "classifier":
        return rule.classifier.cost_per_token() / block
    return model.vocab_size * model.config.dim / block


def _reduce(
    tokens: int,
    ce_sums: dict[int, torch.Tensor],
    correct: dict[int, torch.Tensor],
    exit_counts: torch.Tensor,
    exit_correct: torch.Tensor,
    context: DistributedContext,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Sum the accumulators over ranks in one all-reduce.

    Packed in float64, where counts stay exact up to 2**53. ``ce_sums``, ``correct`` and
    ``exit_counts`` are updated in place; ``exit_correct`` holds the early-exit correct and
    agreeing counts; returns ``(tokens, exit_correct, exit_agree)``.
    """
    layers = list(ce_sums)
    count = len(layers)
    device = exit_counts.device
    packed = torch.cat(
        [
            torch.tensor([tokens], dtype=torch.float64, device=device),
            torch.stack([ce_sums[layer] for layer in layers]),
            torch.stack([correct[layer] for layer in layers]).double(),
            exit_counts.double(),
            exit_correct.double().reshape(-1),
        ]
    )
    packed = dist_utils.all_reduce_sum(packed, context)
    for index, layer in enumerate(layers):
        ce_sums[layer] = packed[1 + index]
        correct[layer] = packed[1 + count + index].round().long()
    exit_counts.copy_(packed[1 + 2 * count : 1 + 2 * count + exit_counts.numel()].round().long())
    return int(packed[0].item()), packed[-2].round().long(), packed[-1].round().long()

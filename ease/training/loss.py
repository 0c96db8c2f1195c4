"""The training objective of one batch: ``sum_l w_l * CE_l`` over the supervised layers.

The model computes the hidden states of the layers with a weight above 0 (the others
compute nothing past the deepest of them, and no logits at all); its
:class:`~ease.modules.ExitHead` turns them into the loss, plain or fused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ease.config import TrainingConfig
from ease.models import EarlyExitDecoder
from ease.data import IGNORE_INDEX


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Raise a ``ValueError`` for a target outside ``[0, vocab_size)`` that is not ``IGNORE_INDEX``."""
    # Checked before cross_entropy: an out-of-range target is a device-side assert on
    # CUDA, which kills the process's CUDA context instead of raising.
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"targets must be token ids in [0, {vocab_size}) or ignore_index={IGNORE_INDEX}, "
            f"got {int(targets[bad][0])} ({int(bad.sum())} such targets)"
        )


def layer_weights(model: EarlyExitDecoder, config: TrainingConfig, vocab_size: int) -> dict[int, float]:
    """Every layer's loss weight, after checking ``model`` against the trainer and config.

    Raises:
        ValueError: the model's vocabulary is not ``vocab_size``, or the config does not
            fit the model (:meth:`TrainingConfig.validate_for`).
    """
    if model.vocab_size != vocab_size:
        raise ValueError(
            f"model has vocab_size={model.vocab_size} but the trainer was built with vocab_size={vocab_size}"
        )
    return config.weights_for(model)


def supervised_layers(weights: Mapping[int, float]) -> list[int]:
    """The layers with a weight above 0, ascending: the only ones that compute logits."""
    return [layer for layer, weight in sorted(weights.items()) if weight > 0]


def uses_fused_loss(model: EarlyExitDecoder, config: TrainingConfig) -> bool:
    """Whether the loss walks the tokens in chunks (:func:`ease_kernels.exit_head_loss`).

    Deep supervision with ``config.fused_loss``; a model trained on its final layer only
    always takes the plain path.
    """
    return config.fused_loss and model.trains_every_layer


def weighted_loss(
    model: EarlyExitDecoder,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: Mapping[int, float],
    fused: bool,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``sum_l w_l * CE_l`` of one batch on the model's device.

    Args:
        model: the decoder (bare: the caller runs this inside its DDP/FSDP2 wrapper).
        inputs, targets: ``(B, T)`` int64 on the model's device.
        weights: every layer's weight; layers of weight 0 compute no logits.
        fused: :func:`uses_fused_loss`.
        keep: layer dropout's ``(B, num_layers)`` decisions, or None.

    Returns:
        ``(loss, per_layer, correct)``: a float32 scalar with a graph; ``{layer: CE_l}``
        detached and ``{layer: correct top-1 count}``, for the supervised layers.
    """
    active = supervised_layers(weights)
    hidden = model.hidden_states(inputs, active) if keep is None else model.hidden_states(inputs, active, keep)
    return model.exit_head.loss(hidden, targets, {layer: weights[layer] for layer in active}, fused)

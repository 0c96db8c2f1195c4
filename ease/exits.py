"""The early-exit rule, in one place: which layer answers each token.

A token exits at the first layer ``l`` with ``min_exit_layer <= l < num_layers`` whose
exit-head confidence (the top-1 softmax probability, :func:`ease_kernels.exit_confidence`)
reaches ``routing_threshold``; the last layer answers every token left. Evaluation
(:func:`ease.evaluation.evaluate`), calibration (:func:`ease.calibration.calibrate_threshold`)
and both generation paths (:mod:`ease.generation`) all decide through :class:`ExitRule`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import ease_kernels
from ease.validation import check_min_exit_layer, check_threshold

__all__ = ["DEFAULT_THRESHOLDS", "ExitRule", "first_exit_layer"]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (
    0.97, 0.98, 0.99, 0.995, 0.999, 1.0,
)
"""The threshold grid swept when none is given: 0.05 to 0.95 by 0.05, then finer towards 1."""


def first_exit_layer(exits: torch.Tensor, min_exit_layer: int, num_layers: int, dim: int = 0) -> torch.Tensor:
    """The layer (1-based) each token answers at, from its exit decisions.

    Args:
        exits: boolean, with the layers ``min_exit_layer .. num_layers - 1`` along ``dim``
            (in that order): True where the token's confidence at that layer reaches the
            threshold. That dimension may be empty (no layer may exit).
        min_exit_layer: the layer of index 0 along ``dim``.
        num_layers: the model's depth; the answer where no layer exits.
        dim: the layer dimension.

    Returns:
        int64, ``exits``' shape without ``dim``: the first layer whose decision is True,
        else ``num_layers``.
    """
    anywhere = exits.any(dim)  # defined on an empty layer dimension too (all False)
    if exits.shape[dim] == 0:
        return torch.full_like(anywhere, num_layers, dtype=torch.long)
    first = exits.to(torch.uint8).argmax(dim) + min_exit_layer  # argmax returns the first maximum
    return torch.where(anywhere, first, num_layers)


@dataclass(frozen=True)
class ExitRule:
    """The early-exit rule of one model: its depth, threshold and earliest exit layer.

    Build it with :meth:`for_model`, which checks the arguments once with the messages of
    :mod:`ease.validation`.

    Attributes:
        num_layers: the model's depth ``L``.
        threshold: the routing threshold in (0, 1], or None for full depth.
        min_exit_layer: no token exits before this layer (1-based).
    """

    num_layers: int
    threshold: float | None
    min_exit_layer: int = 1

    @classmethod
    def for_model(cls, model: torch.nn.Module, threshold: object, min_exit_layer: object = 1) -> ExitRule:
        """The rule for ``model`` (anything with ``num_layers``), arguments checked.

        Raises:
            ValueError: ``threshold`` outside (0, 1]; ``min_exit_layer`` outside
                ``1..num_layers`` (an :class:`~ease.validation.ArgumentTypeError` for a
                value of the wrong type).
        """
        num_layers = model.num_layers
        return cls(
            num_layers,
            check_threshold("routing_threshold", threshold),
            check_min_exit_layer(min_exit_layer, num_layers),
        )

    @property
    def exits_early(self) -> bool:
        """Whether any token can leave before the last layer."""
        return self.threshold is not None and self.min_exit_layer < self.num_layers

    def checks(self, layer: int) -> bool:
        """Whether tokens may exit at ``layer`` (1-based), so its confidence must be read."""
        return self.exits_early and self.min_exit_layer <= layer < self.num_layers

    @property
    def checked_layers(self) -> range:
        """The layers at which a token may exit, in order (empty at full depth)."""
        return range(self.min_exit_layer, self.num_layers) if self.exits_early else range(0)

    def decide(self, logits: torch.Tensor, layer: int) -> ease_kernels.ExitDecision:
        """Confidence, prediction and (where ``layer`` may exit) the exit decision of ``logits``.

        One fused pass of :func:`ease_kernels.exit_confidence`; at a layer that cannot exit,
        ``exit`` is None.
        """
        return ease_kernels.exit_confidence(logits, self.threshold if self.checks(layer) else None)

    def first_exit(self, exits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """:func:`first_exit_layer` of decisions stacked over :attr:`checked_layers` along ``dim``."""
        return first_exit_layer(exits, self.min_exit_layer, self.num_layers, dim)

"""The early-exit rule, in one place: which layer answers each token.

A token exits at the first layer ``l`` with ``min_exit_layer <= l < num_layers`` whose
exit score reaches ``routing_threshold``; the last layer answers every token left.
Evaluation (:func:`ease.evaluation.evaluate`), calibration
(:func:`ease.calibration.calibrate_threshold`) and both generation paths
(:mod:`ease.generation`) all decide through :class:`ExitRule`.

The score is one of :data:`EXIT_CRITERIA` (CALM, Schuster et al. 2022, compares them):

- ``"max_prob"`` (default, the SPEC's): the top-1 softmax probability of the layer's
  exit head;
- ``"margin"``: top-1 minus top-2 softmax probability (the same one-pass kernel,
  :func:`ease_kernels.exit_confidence`);
- ``"saturation"``: the cosine similarity of the layer's hidden state with the previous
  layer's (the embedding's for layer 1): a state that stopped changing is done; no
  logits are needed to decide;
- ``"classifier"``: a learned probability that this layer's prediction equals the final
  layer's (:class:`ease.exit_classifier.ExitClassifier`, trained after the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import ease_kernels
from ease.config import EXIT_CRITERIA
from ease.validation import check_min_exit_layer, check_threshold

__all__ = ["DEFAULT_THRESHOLDS", "EXIT_CRITERIA", "ExitRule", "check_criterion", "first_exit_layer"]

# Criteria read from the logits by the exit-confidence kernel, in the same pass as the prediction.
_KERNEL_CRITERIA = ("max_prob", "margin")


def check_criterion(value: object) -> str:
    """``exit_criterion``: one of :data:`EXIT_CRITERIA`."""
    if value not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {', '.join(EXIT_CRITERIA)}, got {value!r}")
    return value

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
    """The early-exit rule of one model: its depth, threshold, earliest exit layer and score.

    Build it with :meth:`for_model`, which checks the arguments once with the messages of
    :mod:`ease.validation`.

    Attributes:
        num_layers: the model's depth ``L``.
        threshold: the routing threshold in (0, 1], or None for full depth.
        min_exit_layer: no token exits before this layer (1-based).
        criterion: one of :data:`EXIT_CRITERIA`.
        classifier: the model's exit classifier (``criterion="classifier"`` only).
    """

    num_layers: int
    threshold: float | None
    min_exit_layer: int = 1
    criterion: str = "max_prob"
    classifier: torch.nn.Module | None = field(default=None, compare=False, repr=False)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, threshold: object, min_exit_layer: object = 1, criterion: object = "max_prob"
    ) -> ExitRule:
        """The rule for ``model`` (anything with ``num_layers``), arguments checked.

        Raises:
            ValueError: ``threshold`` outside (0, 1]; ``min_exit_layer`` outside
                ``1..num_layers`` (an :class:`~ease.validation.ArgumentTypeError` for a
                value of the wrong type); an unknown ``criterion``, or ``"classifier"``
                for a model without a trained exit classifier.
        """
        num_layers = model.num_layers
        criterion = check_criterion(criterion)
        classifier = getattr(model, "exit_classifier", None) if criterion == "classifier" else None
        if criterion == "classifier" and classifier is None:
            raise ValueError(
                "exit_criterion='classifier' needs the model's exit classifier: train one with "
                "ease.train_exit_classifier(model, batches) first"
            )
        return cls(
            num_layers,
            check_threshold("routing_threshold", threshold),
            check_min_exit_layer(min_exit_layer, num_layers),
            criterion,
            classifier,
        )

    @property
    def exits_early(self) -> bool:
        """Whether any token can leave before the last layer."""
        return self.threshold is not None and self.min_exit_layer < self.num_layers

    @property
    def needs_hidden(self) -> bool:
        """Whether the score reads hidden states (``saturation``, ``classifier``), not only logits."""
        return self.criterion not in _KERNEL_CRITERIA

    def checks(self, layer: int) -> bool:
        """Whether tokens may exit at ``layer`` (1-based), so its score must be read."""
        return self.exits_early and self.min_exit_layer <= layer < self.num_layers

    @property
    def checked_layers(self) -> range:
        """The layers at which a token may exit, in order (empty at full depth)."""
        return range(self.min_exit_layer, self.num_layers) if self.exits_early else range(0)

    def score(
        self,
        logits: torch.Tensor | None,
        layer: int,
        hidden: torch.Tensor | None = None,
        previous: torch.Tensor | None = None,
    ) -> ease_kernels.ExitDecision:
        """The criterion's score of every token at ``layer``, whatever the threshold.

        Args:
            logits: ``(..., V)`` the layer's exit-head logits (None for ``saturation`` or
                ``classifier``: the prediction is then None).
            layer: 1-based.
            hidden: ``(..., dim)`` the layer's hidden state (``saturation``, ``classifier``).
            previous: ``(..., dim)`` the previous layer's (the embedding's for layer 1;
                ``saturation``).

        Returns:
            :class:`ease_kernels.ExitDecision` with ``confidence`` the score (float32),
            ``prediction`` the argmax of ``logits``, and ``exit`` None.
        """
        if self.criterion in _KERNEL_CRITERIA:
            if self.criterion == "max_prob":
                return ease_kernels.exit_confidence(logits)
            return ease_kernels.exit_confidence(logits, criterion=self.criterion)
        prediction = None if logits is None else logits.argmax(-1)
        if self.criterion == "saturation":
            score = F.cosine_similarity(hidden.float(), previous.float(), dim=-1)
        else:
            score = self.classifier(hidden, layer)
        return ease_kernels.ExitDecision(score, prediction, None)

    def decide(
        self,
        logits: torch.Tensor | None,
        layer: int,
        hidden: torch.Tensor | None = None,
        previous: torch.Tensor | None = None,
    ) -> ease_kernels.ExitDecision:
        """Score, prediction and (where ``layer`` may exit) the exit decision.

        ``max_prob`` and ``margin`` take one fused pass of
        :func:`ease_kernels.exit_confidence`; at a layer that cannot exit, ``exit`` is None.
        Arguments as for :meth:`score`.
        """
        if self.criterion in _KERNEL_CRITERIA:  # one kernel pass reads score, prediction and decision
            threshold = self.threshold if self.checks(layer) else None
            if self.criterion == "max_prob":
                return ease_kernels.exit_confidence(logits, threshold)
            return ease_kernels.exit_confidence(logits, threshold, criterion=self.criterion)
        if not self.checks(layer):
            prediction = None if logits is None else logits.argmax(-1)
            return ease_kernels.ExitDecision(None, prediction, None)
        decision = self.score(logits, layer, hidden, previous)
        return decision._replace(exit=decision.confidence >= self.threshold)

    def first_exit(self, exits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """:func:`first_exit_layer` of decisions stacked over :attr:`checked_layers` along ``dim``."""
        return first_exit_layer(exits, self.min_exit_layer, self.num_layers, dim)

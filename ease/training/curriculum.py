"""Which exits a training step supervises (exit curricula), and loss weights that follow depth.

An exit curriculum (LayerSkip, Elhoushi et al. 2024) switches exits on and off over
training; a layer switched off in a step weighs 0 there, so it computes no logits (on the
fused and the plain loss path alike). The last layer is always supervised.

- ``"none"``: every layer with a weight, every step (the default).
- ``"rotational"``: every ``period`` steps each early exit is on once: at step ``s`` the
  layers ``l < L`` with ``(l - 1 + s) % period == 0``, plus the last.
- ``"gradual"``: exits are switched on from the last layer towards the first as training
  goes: after a fraction ``f`` of ``total_steps``, the layers ``l >= L - round(f * (L - 1))``.

:func:`depth_loss_weights` builds ``layer_weights`` from a shape over depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ease.config import CURRICULA
from ease.validation import check_int, check_real

__all__ = ["CURRICULA", "DEPTH_SCALES", "ExitCurriculum", "depth_loss_weights"]


DEPTH_SCALES = ("uniform", "linear", "sqrt", "inverse", "inverse_sqrt", "sum")
"""Shapes of :func:`depth_loss_weights`: a weight proportional to 1, l, sqrt(l), 1/l,
1/sqrt(l) or 1 + 2 + ... + l."""


def depth_loss_weights(num_layers: int, scale: str = "uniform", total: float = 1.0) -> dict[int, float]:
    """``layer_weights`` over ``1..num_layers`` proportional to a function of depth, summing to ``total``.

    ``"linear"`` and ``"sum"`` (LayerSkip's ``e_scale``) put more weight on deep layers,
    ``"inverse"`` and ``"inverse_sqrt"`` on early ones.

    Raises:
        ValueError: ``num_layers`` not an integer >= 1, an unknown ``scale``, or
            ``total`` not a finite number > 0.
    """
    num_layers = check_int("num_layers", num_layers, 1)
    total = check_real("total", total, 0.0, above=True)
    shapes = {
        "uniform": lambda l: 1.0,
        "linear": lambda l: float(l),
        "sqrt": math.sqrt,
        "inverse": lambda l: 1.0 / l,
        "inverse_sqrt": lambda l: 1.0 / math.sqrt(l),
        "sum": lambda l: l * (l + 1) / 2.0,
    }
    if scale not in shapes:
        raise ValueError(f"scale must be one of {', '.join(DEPTH_SCALES)}, got {scale!r}")
    raw = {layer: shapes[scale](layer) for layer in range(1, num_layers + 1)}
    norm = sum(raw.values())
    return {layer: total * value / norm for layer, value in raw.items()}


@dataclass(frozen=True)
class ExitCurriculum:
    """The exits supervised at each step.

    Attributes:
        kind: one of :data:`CURRICULA`.
        num_layers: the model's depth ``L``.
        period: ``"rotational"``: steps for every exit to be on once (>= 1).
        total_steps: ``"gradual"``: the steps of the whole run (its end has every exit on).
    """

    kind: str = "none"
    num_layers: int = 1
    period: int = 2
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CURRICULA:
            raise ValueError(f"exit_curriculum must be one of {', '.join(CURRICULA)}, got {self.kind!r}")
        check_int("curriculum_period", self.period, 1)
        if self.kind == "gradual" and self.total_steps is None:
            raise ValueError(
                "exit_curriculum='gradual' switches exits on over the whole run, so it needs the number "
                "of steps: set TrainingConfig.max_steps, or train with train_with_early_stopping over "
                "batches of known length"
            )

    def active(self, step: int) -> set[int]:
        """The layers (1-based) that may be supervised at optimiser step ``step`` (0-based)."""
        last = self.num_layers
        if self.kind == "none":
            return set(range(1, last + 1))
        if self.kind == "rotational":
            return {l for l in range(1, last) if (l - 1 + step) % self.period == 0} | {last}
        fraction = min(step / max(self.total_steps, 1), 1.0)
        first = last - round(fraction * (last - 1))
        return set(range(first, last + 1))

    def weights(self, weights: dict[int, float], step: int) -> dict[int, float]:
        """``weights`` with the layers off at ``step`` set to 0 (the last layer is always on)."""
        if self.kind == "none":
            return weights
        on = self.active(step)
        return {layer: (weight if layer in on else 0.0) for layer, weight in weights.items()}

"""Layer dropout (LayerSkip, Elhoushi et al. 2024): skip blocks in training, more often deeper.

Block ``l`` of ``L`` is skipped for a row of the batch with probability

    p_l = p_max * scale(l),   scale = 1 (uniform), (l - 1) / (L - 1) (linear),
                                      2 ** ((l - 1) / (L - 1)) - 1 (exponential),

so the first block is never skipped except under ``uniform``. A skipped block passes its
input through unchanged (the residual stream), so the layers after it, and the exits that
supervise them, learn to work without it: what lets early exits and self-speculation use
a shallow model. Never applied at evaluation or generation.

The decisions of a step are drawn for the whole global batch from a generator seeded by
``(seed, step)`` alone, before the batch is split over ranks and micro-batches: the same
run gives the same decisions on one process or many, and a resumed run draws the same
ones again. They reach the model as a tensor argument, so a compiled model gets fresh
decisions every step instead of constants frozen at trace time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ease.config import LAYER_DROPOUT_SHAPES
from ease.validation import check_int, check_real

__all__ = ["LAYER_DROPOUT_SHAPES", "LayerDropout"]



@dataclass(frozen=True)
class LayerDropout:
    """The skip probabilities of one model's blocks and the per-step decisions.

    Attributes:
        num_layers: the model's depth ``L``.
        max_probability: ``p_max`` in ``[0, 1)``; 0 turns layer dropout off.
        shape: one of :data:`LAYER_DROPOUT_SHAPES`.
        seed: with the step, seeds the decisions.
    """

    num_layers: int
    max_probability: float = 0.0
    shape: str = "exponential"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_layers", self.num_layers, 1)
        check_real("layer_dropout", self.max_probability, 0.0, 1.0, below=True)
        if self.shape not in LAYER_DROPOUT_SHAPES:
            raise ValueError(
                f"layer_dropout_shape must be one of {', '.join(LAYER_DROPOUT_SHAPES)}, got {self.shape!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether any block can be skipped."""
        return self.max_probability > 0 and any(p > 0 for p in self.probabilities())

    def probabilities(self) -> list[float]:
        """``p_l`` for layers ``1..L``, in order."""
        span = max(self.num_layers - 1, 1)
        scales = {
            "uniform": lambda i: 1.0,
            "linear": lambda i: i / span,
            "exponential": lambda i: 2.0 ** (i / span) - 1.0,
        }[self.shape]
        return [self.max_probability * min(scales(i), 1.0) for i in range(self.num_layers)]

    def keep(self, step: int, rows: int) -> torch.Tensor:
        """``(rows, L)`` bool on the CPU: True where row ``b`` runs block ``l`` at ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand((rows, self.num_layers), generator=generator)
        return draws >= torch.tensor(self.probabilities())

"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor.

The schedule is a factor of the optimiser step, ``factor(step)`` in ``[0, 1]``, that
multiplies every parameter group's peak learning rate (``base_lr * layer_lr_scales[l]``),
so the per-layer ratios hold at every step. It depends on the step alone: a resumed run
recomputes it from the step its checkpoint stores and continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ease.config import LR_SCHEDULES
from ease.validation import check_int, check_real

__all__ = ["LR_SCHEDULES", "LRSchedule"]



@dataclass(frozen=True)
class LRSchedule:
    """``factor(step)`` for optimiser steps ``0, 1, ...`` (the step about to be taken).

    Attributes:
        kind: one of :data:`LR_SCHEDULES`.
        warmup_steps: steps of linear warmup from ``1 / (warmup_steps + 1)`` of the peak up
            to the peak (step ``warmup_steps`` is the first at the peak); 0 for none.
        total_steps: the step at which the decay reaches the floor (``None``: no decay,
            allowed only for ``"constant"``).
        min_lr_ratio: the floor, a fraction of the peak, in ``[0, 1]``.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.kind!r}")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps, 1)
        elif self.kind != "constant":
            raise ValueError(
                f"lr_schedule={self.kind!r} decays to the floor at the end of training, so it needs the "
                "number of steps: set TrainingConfig.max_steps, or train with train_with_early_stopping "
                "over batches of known length (max_epochs * len(train_batches))"
            )

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        floor = self.min_lr_ratio
        if self.kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def is_identity(self) -> bool:
        """True when every step's factor is 1 (constant, no warmup): the optimiser's lr is left alone."""
        return self.kind == "constant" and self.warmup_steps == 0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` to its ``peak_lr`` times :meth:`factor`; return the factor.

        Groups built by :func:`ease.training.optim.create_optimizer` carry ``peak_lr``; a
        group without it (an optimiser built elsewhere) takes its current ``lr`` as peak.
        """
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
            group["lr"] = group["peak_lr"] * factor
        return factor

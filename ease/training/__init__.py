"""Training of EASE decoders, in parts: the objective, the optimiser, the epoch loop, early
stopping, checkpoints and torchrun, behind the thin :class:`~ease.training.trainer.Trainer`.

- :mod:`ease.training.loss`: ``sum_l w_l * CE_l`` of one batch, through the model's exit head.
- :mod:`ease.training.optim`: per-layer AdamW parameter groups (``layer_lr_scales``).
- :mod:`ease.training.batches`: a global batch as one rank runs it.
- :mod:`ease.training.loop`: one epoch of steps.
- :mod:`ease.training.early_stopping`: epochs until the validation objective stops improving.
- :mod:`ease.training.checkpoint`: atomic checkpoints and exact resume.
- :mod:`ease.training.distributed`: torchrun, DDP and FSDP2.
"""

from ease.training.early_stopping import EarlyStoppingResult
from ease.training.trainer import Trainer

__all__ = ["EarlyStoppingResult", "Trainer"]

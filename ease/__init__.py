"""EASE: Efficient Asymmetric Supervision for Early-Exit Transformers.

Two decoders (:class:`StandardTransformer`, :class:`DeepSupervisionTransformer`), a
:class:`Trainer` configured by :class:`TrainingConfig` with per-layer loss weights
(``layer_weights``), per-layer learning rates (``layer_lr_scales``) and an early-exit
threshold (``routing_threshold``), on the kernels of :mod:`ease_kernels`.
"""

from ease.models import (
    DeepSupervisionTransformer,
    EarlyExitDecoder,
    ModelConfig,
    StandardTransformer,
    load_model,
)

__all__ = [
    "DeepSupervisionTransformer",
    "EarlyExitDecoder",
    "ModelConfig",
    "StandardTransformer",
    "load_model",
]

"""EASE: Efficient Asymmetric Supervision for Early-Exit Transformers.

Two decoders (:class:`StandardTransformer`, :class:`DeepSupervisionTransformer`), a
:class:`Trainer` configured by :class:`TrainingConfig` with per-layer loss weights
(``layer_weights``), per-layer learning rates (``layer_lr_scales``) and an early-exit
threshold (``routing_threshold``), on the kernels of :mod:`ease_kernels`.
"""

from ease.config import TrainingConfig, create_deep_supervision_config, create_standard_config
from ease.models import (
    DeepSupervisionTransformer,
    EarlyExitDecoder,
    ExitSettings,
    ModelConfig,
    StandardTransformer,
    load_model,
)
from ease.hf_llama import from_hf_llama, to_hf_llama
from ease.data import IGNORE_INDEX
from ease.training import EarlyStoppingResult, Trainer
from ease.calibration import CalibrationResult, calibrate_threshold
from ease.generation import CacheSlots, GenerationOutput, KVCache
from ease.exits import EXIT_CRITERIA, ExitRule
from ease.exit_classifier import ExitClassifier, train_exit_classifier
from ease.training.curriculum import depth_loss_weights

__all__ = [
    "DeepSupervisionTransformer",
    "EarlyExitDecoder",
    "ExitSettings",
    "ModelConfig",
    "StandardTransformer",
    "load_model",
    "from_hf_llama",
    "to_hf_llama",
    "IGNORE_INDEX",
    "EarlyStoppingResult",
    "Trainer",
    "TrainingConfig",
    "create_deep_supervision_config",
    "create_standard_config",
    "CalibrationResult",
    "calibrate_threshold",
    "CacheSlots",
    "GenerationOutput",
    "KVCache",
    "EXIT_CRITERIA",
    "ExitRule",
    "ExitClassifier",
    "train_exit_classifier",
    "depth_loss_weights",
]

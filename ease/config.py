"""Training options of EASE: per-layer loss weights, learning rates and exit threshold.

:class:`TrainingConfig` holds the three options of the user's API (``layer_weights``,
``layer_lr_scales``, ``routing_threshold``) and the optimiser settings around them.
Everything that can be checked without a model is checked in ``__post_init__``; what
needs the model's depth (layer numbers, exits below the last layer of a
:class:`~ease.models.StandardTransformer`) is checked by
:meth:`TrainingConfig.validate_for`. Layers are numbered from 1 to ``num_layers``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ease.validation import (
    check_bool,
    check_int,
    check_min_exit_layer,
    check_real,
    check_threshold,
)
from ease.validation import is_int as _is_int
from ease.validation import is_real as _is_real

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder


# The choices of the training recipe's options; their modules (ease.training.schedule,
# layer_dropout, curriculum) take them from here, so that the config imports no torch.
LR_SCHEDULES = ("constant", "linear", "cosine")
"""``lr_schedule``: after warmup, no decay, straight to the floor, or half a cosine to it."""
LAYER_DROPOUT_SHAPES = ("uniform", "linear", "exponential")
"""``layer_dropout_shape``: how the skip probability grows with depth."""
CURRICULA = ("none", "rotational", "gradual")
"""``exit_curriculum``: which exits each step supervises."""
EXIT_CRITERIA = ("max_prob", "margin", "saturation", "classifier")
"""``exit_criterion``: the score an exit compares with its threshold (ease.exits)."""

# ease.training.distributed.DISTRIBUTED_MODES, repeated so that the config imports no torch.distributed.
_DISTRIBUTED_MODES = ("auto", "ddp", "fsdp", "none")


def _check_layer_dict(name: str, value: object, positive: bool) -> dict[int, float] | None:
    """A copy of a ``{layer: number}`` option with int keys >= 1 and finite float values.

    ``positive`` asks for values > 0 (learning-rate scales); otherwise values >= 0.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict {{layer: value}} or None, got {type(value).__name__}")
    checked: dict[int, float] = {}
    for layer, number in value.items():
        if not _is_int(layer) or layer < 1:
            raise ValueError(f"{name} keys must be layer numbers (integers >= 1; layers count from 1), got {layer!r}")
        if not _is_real(number) or not math.isfinite(number):
            raise ValueError(f"{name}[{layer}] must be a finite number, got {number!r}")
        if positive and not number > 0:
            raise ValueError(f"{name}[{layer}] must be > 0, got {number!r}")
        if not positive and number < 0:
            raise ValueError(f"{name}[{layer}] must be >= 0, got {number!r}")
        checked[int(layer)] = float(number)
    return checked


@dataclass
class TrainingConfig:
    """How a :class:`~ease.training.Trainer` trains and evaluates an early-exit decoder.

    Attributes:
        layer_weights: loss weight of each layer, ``{layer: weight}``. The training loss
            is ``sum_l weight_l * CE_l`` with the weights used as given (not
            renormalised); layers left out weigh 0 and compute no logits. ``None`` means
            ``{num_layers: 1.0}``, the final layer only (Lee et al. 2015).
        layer_lr_scales: learning-rate multiplier of each layer, ``{layer: scale}``;
            layers left out, the embeddings, the final norm and the head use 1.0
            (Howard & Ruder 2018).
        routing_threshold: early-exit threshold of evaluation: a token exits at the first
            layer whose top-1 softmax probability reaches it (BranchyNet). In (0, 1];
            ``None`` runs every token at full depth.
        min_exit_layer: no token exits before this layer (1-based).
        exit_criterion: the score compared with ``routing_threshold``: ``"max_prob"``
            (the top-1 softmax probability, default), ``"margin"`` (top-1 minus top-2),
            ``"saturation"`` (cosine of successive hidden states) or ``"classifier"``
            (a learned exit classifier); see :mod:`ease.exits`.
        weight_decay: AdamW decoupled weight decay on weight matrices (embeddings and
            head included); norm weights and biases are never decayed.
        grad_clip: maximum global gradient norm, or ``None`` for no clipping.
        betas: AdamW ``(beta1, beta2)``.
        seed: seed of Python, NumPy and torch, set when the trainer is built.
        verbose: default for progress bars and per-epoch lines.
        fused_loss: for models that support early exit (deep supervision), compute the
            training loss with :func:`ease_kernels.exit_head_loss`, which walks the tokens
            in chunks so that at most one chunk of logits exists instead of every
            supervised layer's; same loss and gradients. ``False``: the plain per-layer
            logits. Models trained on their final layer only always take the plain path.
        distributed: how a ``torchrun`` launch is used: ``"auto"`` (DDP under torchrun,
            one process otherwise), ``"ddp"``, ``"fsdp"`` (FSDP2 ``fully_shard``) or
            ``"none"`` (every process trains alone). Batches are global batches: under
            torchrun each rank takes its own rows, so results do not depend on the number
            of ranks. See :mod:`ease.training.distributed`.
        grad_accumulation_steps: split each batch into this many micro-batches, run
            forward and backward on each and step once; the loss is still normalised by
            the whole batch's token count, so only memory changes, not the result.
        checkpoint_dir: when set, :meth:`~ease.training.Trainer.train_with_early_stopping`
            writes ``checkpoint_dir/last.pt`` atomically after every epoch (model,
            optimiser, epoch and step, early-stopping state, every RNG state).
        resume: when True and ``checkpoint_dir/last.pt`` exists,
            ``train_with_early_stopping`` resumes from it instead of starting over.
        lr_schedule: ``"constant"`` (default), ``"linear"`` or ``"cosine"`` decay after
            warmup, to ``min_lr_ratio`` of the peak at the end of training
            (:mod:`ease.training.schedule`); it multiplies every parameter group, so the
            ``layer_lr_scales`` ratios hold at every step.
        warmup_steps: optimiser steps of linear warmup (0: none).
        min_lr_ratio: the floor of the decay, a fraction of the peak in [0, 1].
        max_steps: a step budget for ``train_with_early_stopping`` (None: epochs only).
            With a step or token budget, or ``eval_every``, training evaluates every
            ``eval_every`` steps, early stopping counts evaluations (``patience`` of
            them), and checkpoints are written after each evaluation.
        max_tokens: a budget of target tokens (None: no token budget).
        eval_every: optimiser steps between evaluations (None: once per epoch, or once
            at the end of a budget shorter than an epoch).
        layer_dropout: LayerSkip's layer dropout, the largest probability (at the last
            layer) that a block is skipped for a row in training; 0 turns it off
            (:mod:`ease.training.layer_dropout`).
        layer_dropout_shape: how the probability grows with depth: ``"uniform"``,
            ``"linear"`` or ``"exponential"`` (default, LayerSkip's).
        exit_curriculum: ``"none"`` (default), ``"rotational"`` or ``"gradual"``: which
            exits each step supervises (:mod:`ease.training.curriculum`).
        curriculum_period: ``"rotational"``: steps for every exit to be on once.
        log_dir: when set, ``log_dir/metrics.jsonl`` gets a JSON line every ``log_every``
            steps and one per evaluation (:mod:`ease.training.metrics`).
        log_every: optimiser steps per metrics line.
        compile: run the loss (model and exit head) under ``torch.compile``; a one-off
            compile time, then faster steps on large models.

    Raises:
        ValueError: naming the field, for any value outside the ranges above.
    """

    layer_weights: dict[int, float] | None = None
    layer_lr_scales: dict[int, float] | None = None
    routing_threshold: float | None = None
    min_exit_layer: int = 1
    exit_criterion: str = "max_prob"
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    verbose: bool = True
    fused_loss: bool = True
    distributed: str = "auto"
    grad_accumulation_steps: int = 1
    checkpoint_dir: str | None = None
    resume: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_steps: int | None = None
    max_tokens: int | None = None
    eval_every: int | None = None
    layer_dropout: float = 0.0
    layer_dropout_shape: str = "exponential"
    exit_curriculum: str = "none"
    curriculum_period: int = 2
    log_dir: str | None = None
    log_every: int = 10
    compile: bool = False

    def __post_init__(self) -> None:
        self.layer_weights = _check_layer_dict("layer_weights", self.layer_weights, positive=False)
        if self.layer_weights is not None and not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError(
                f"layer_weights must give at least one layer a weight > 0, got {self.layer_weights}"
            )
        self.layer_lr_scales = _check_layer_dict("layer_lr_scales", self.layer_lr_scales, positive=True)
        self.routing_threshold = check_threshold("routing_threshold", self.routing_threshold)
        self.min_exit_layer = check_min_exit_layer(self.min_exit_layer)
        if self.exit_criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion must be one of {', '.join(EXIT_CRITERIA)}, got {self.exit_criterion!r}")
        self.weight_decay = check_real("weight_decay", self.weight_decay, 0.0)
        if self.grad_clip is not None:
            self.grad_clip = check_real(
                "grad_clip", self.grad_clip, 0.0, above=True, expected="a finite number > 0 or None"
            )
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        # The range NumPy's global seed accepts (ease.data.set_seed seeds NumPy too).
        self.seed = check_int("seed", self.seed, 0, 2**32 - 1, expected="an integer in [0, 2**32)")
        self.verbose = check_bool("verbose", self.verbose)
        self.fused_loss = check_bool("fused_loss", self.fused_loss)
        if self.distributed not in _DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {_DISTRIBUTED_MODES}, got {self.distributed!r}")
        self.grad_accumulation_steps = check_int("grad_accumulation_steps", self.grad_accumulation_steps, 1)
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
                raise ValueError(f"checkpoint_dir must be a non-empty path or None, got {self.checkpoint_dir!r}")
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        self.resume = check_bool("resume", self.resume)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, 0)
        self.min_lr_ratio = check_real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("max_steps", "max_tokens", "eval_every"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), 1, expected="an integer >= 1 or None"))
        self.layer_dropout = check_real("layer_dropout", self.layer_dropout, 0.0, 1.0, below=True, expected="in [0, 1)")
        if self.layer_dropout_shape not in LAYER_DROPOUT_SHAPES:
            raise ValueError(
                f"layer_dropout_shape must be one of {', '.join(LAYER_DROPOUT_SHAPES)}, got {self.layer_dropout_shape!r}"
            )
        if self.exit_curriculum not in CURRICULA:
            raise ValueError(f"exit_curriculum must be one of {', '.join(CURRICULA)}, got {self.exit_curriculum!r}")
        self.curriculum_period = check_int("curriculum_period", self.curriculum_period, 1)
        if self.log_dir is not None:
            if not isinstance(self.log_dir, (str, os.PathLike)) or not str(self.log_dir):
                raise ValueError(f"log_dir must be a non-empty path or None, got {self.log_dir!r}")
            self.log_dir = os.fspath(self.log_dir)
        self.log_every = check_int("log_every", self.log_every, 1)
        self.compile = check_bool("compile", self.compile)

    @property
    def uses_step_budget(self) -> bool:
        """Whether training is counted in steps (a step or token budget, or ``eval_every``)."""
        return self.max_steps is not None or self.max_tokens is not None or self.eval_every is not None

    # -- checks that need the model ---------------------------------------------------------
    def validate_for(self, model: EarlyExitDecoder) -> None:
        """Check the layer options against ``model`` (its ``num_layers`` and kind).

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder` (its ``num_layers`` and
                ``trains_every_layer``).

        Raises:
            ValueError: a ``layer_weights`` or ``layer_lr_scales`` key outside
                ``1..num_layers``; ``min_exit_layer > num_layers``; or a non-zero weight
                below the last layer of a model that does not support early exit (a
                :class:`~ease.models.StandardTransformer` is trained on its final layer
                only, so such a weight would be a silent misconfiguration).
        """
        num_layers = model.num_layers
        for name in ("layer_weights", "layer_lr_scales"):
            for layer in getattr(self, name) or {}:
                if layer > num_layers:
                    raise ValueError(
                        f"{name} has layer {layer}, but the model has num_layers={num_layers} "
                        f"(layers count from 1 to {num_layers})"
                    )
        check_min_exit_layer(self.min_exit_layer, num_layers)
        if not model.trains_every_layer:
            below = {l: w for l, w in (self.layer_weights or {}).items() if l < num_layers and w != 0}
            if below:
                raise ValueError(
                    f"layer_weights gives weight to layers {sorted(below)} below the last layer "
                    f"({num_layers}) of {type(model).__name__}, which is trained on its final layer "
                    f"only; use create_standard_config({num_layers}) or a DeepSupervisionTransformer"
                )

    def check_recipe_for(self, model: EarlyExitDecoder) -> None:
        """Recipe options that need the model: an exit curriculum always supervises the last layer.

        Raises:
            ValueError: ``exit_curriculum`` is set while the last layer has weight 0, or the
                model trains its final layer only.
        """
        if self.exit_curriculum == "none":
            return
        weights = self.weights_for(model)
        if not weights[model.num_layers] > 0:
            raise ValueError(
                f"exit_curriculum={self.exit_curriculum!r} supervises the last layer at every step, but "
                f"layer_weights gives layer {model.num_layers} weight 0"
            )

    def weights_for(self, model: EarlyExitDecoder) -> dict[int, float]:
        """The loss weight of every layer of ``model``, after :meth:`validate_for`.

        Returns:
            ``{layer: weight}`` for each layer ``1..num_layers``; layers left out of
            ``layer_weights`` weigh 0, and ``layer_weights=None`` gives
            ``{num_layers: 1.0}`` with 0 elsewhere.
        """
        self.validate_for(model)
        num_layers = model.num_layers
        given = self.layer_weights if self.layer_weights is not None else {num_layers: 1.0}
        return {layer: given.get(layer, 0.0) for layer in range(1, num_layers + 1)}

    def lr_scale(self, layer: int) -> float:
        """The learning-rate multiplier of ``layer`` (1.0 when not listed)."""
        return (self.layer_lr_scales or {}).get(layer, 1.0)


def _check_num_layers(num_layers: object) -> int:
    return check_int("num_layers", num_layers, 1)


def _config_with_weights(helper: str, weights: dict[int, float], kwargs: dict[str, Any]) -> TrainingConfig:
    if "layer_weights" in kwargs:
        raise TypeError(f"{helper} sets layer_weights itself; build a TrainingConfig instead")
    return TrainingConfig(layer_weights=weights, **kwargs)


def create_standard_config(num_layers: int, **kwargs: Any) -> TrainingConfig:
    """Final-layer-only training: ``layer_weights={1: 0, ..., num_layers - 1: 0, num_layers: 1}``.

    Args:
        num_layers: depth of the model.
        **kwargs: any other :class:`TrainingConfig` field.

    Raises:
        ValueError: ``num_layers`` is not an integer >= 1.
        TypeError: ``layer_weights`` passed in ``kwargs`` (this helper sets it).
    """
    num_layers = _check_num_layers(num_layers)
    weights = {layer: 0.0 for layer in range(1, num_layers)}
    weights[num_layers] = 1.0
    return _config_with_weights("create_standard_config", weights, kwargs)


def create_deep_supervision_config(num_layers: int, **kwargs: Any) -> TrainingConfig:
    """Deep supervision with equal weights: ``layer_weights={l: 1 / num_layers}`` for every layer.

    Args:
        num_layers: depth of the model.
        **kwargs: any other :class:`TrainingConfig` field.

    Raises:
        ValueError: ``num_layers`` is not an integer >= 1.
        TypeError: ``layer_weights`` passed in ``kwargs`` (this helper sets it).
    """
    num_layers = _check_num_layers(num_layers)
    weights = {layer: 1 / num_layers for layer in range(1, num_layers + 1)}
    return _config_with_weights("create_deep_supervision_config", weights, kwargs)

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

    Raises:
        ValueError: naming the field, for any value outside the ranges above.
    """

    layer_weights: dict[int, float] | None = None
    layer_lr_scales: dict[int, float] | None = None
    routing_threshold: float | None = None
    min_exit_layer: int = 1
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

    def __post_init__(self) -> None:
        self.layer_weights = _check_layer_dict("layer_weights", self.layer_weights, positive=False)
        if self.layer_weights is not None and not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError(
                f"layer_weights must give at least one layer a weight > 0, got {self.layer_weights}"
            )
        self.layer_lr_scales = _check_layer_dict("layer_lr_scales", self.layer_lr_scales, positive=True)
        self.routing_threshold = check_threshold("routing_threshold", self.routing_threshold)
        self.min_exit_layer = check_min_exit_layer(self.min_exit_layer)
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

"""Training, evaluation and early stopping of EASE decoders.

:class:`Trainer` applies a :class:`~ease.config.TrainingConfig`'s three options:

- ``layer_weights``: the training loss is ``sum_l w_l * CE_l``, where ``CE_l`` is the
  token-mean cross-entropy of layer ``l``'s exit head; only layers with ``w_l > 0``
  compute logits.
- ``layer_lr_scales``: :meth:`Trainer.create_optimizer` gives each layer its own AdamW
  parameter groups with ``lr = base_lr * scale_l``.
- ``routing_threshold``: :meth:`Trainer.evaluate` reports where tokens would exit (the
  first layer whose top-1 softmax probability reaches the threshold, read by
  :func:`ease_kernels.exit_confidence`) and the accuracy of those answers.

Batches are ``[B, T + 1]`` integer tensors (inputs ``[:, :-1]``, targets ``[:, 1:]``) or
``(inputs, targets)`` pairs of ``[B, T]`` tensors; targets equal to ``IGNORE_INDEX``
(-100) are left out of every loss, accuracy and token count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import ease_kernels
from ease.config import TrainingConfig
from ease.data import set_seed, split_batch

IGNORE_INDEX = -100
"""Target value that is left out of losses, accuracies and token counts."""

# A batch as train_epoch and evaluate take it: [B, T + 1] ids, or an (inputs, targets) pair of [B, T].
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _perplexity(loss: float) -> float:
    # math.exp overflows (OverflowError) past ~709; such a perplexity is infinite in float64 anyway.
    return math.exp(loss) if loss < 709.0 else math.inf


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _token_sum_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over non-ignored targets; logits ``(B, T, V)`` upcast to float32."""
    # float32 because log-softmax over a large vocabulary in bf16 loses ~2 digits.
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class EarlyStoppingResult:
    """What :meth:`Trainer.train_with_early_stopping` did.

    Attributes:
        best_epoch: the epoch (1-based) whose weights the model holds at the end.
        best_val_loss: validation objective (``evaluate()["objective"]``) of that epoch.
        epochs_run: epochs trained.
        stopped_early: True when training stopped before ``max_epochs`` because the
            validation objective failed to improve for ``patience`` epochs in a row.
        history: one dict per epoch: ``epoch`` (1-based), ``train_loss`` (token-weighted
            mean training loss), ``val_loss`` (the monitored validation objective),
            ``val`` (the full :meth:`Trainer.evaluate` dict) and ``seconds`` (wall time of
            training plus evaluation).
    """

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict copy for ``json.dumps`` (integer layer keys become strings there)."""
        return dataclasses.asdict(self)


class Trainer:
    """Trains and evaluates an early-exit decoder under a :class:`TrainingConfig`.

    Args:
        config: the training options.
        vocab_size: vocabulary size of the models this trainer is used with; targets
            must lie in ``[0, vocab_size)`` or equal ``IGNORE_INDEX``.

    Building a trainer seeds Python, NumPy and torch with ``config.seed``
    (:func:`ease.data.set_seed`), so build it before the model for reproducible
    initialisation.

    Raises:
        TypeError: ``config`` is not a :class:`TrainingConfig`.
        ValueError: ``vocab_size`` is not an integer >= 1.
    """

    def __init__(self, config: TrainingConfig, vocab_size: int) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        self.config = config
        self.vocab_size = int(vocab_size)
        set_seed(config.seed)

    # -- checks ---------------------------------------------------------------------------
    def _layer_weights(self, model: nn.Module) -> dict[int, float]:
        """Check ``model`` against the trainer and config; return every layer's loss weight."""
        if model.vocab_size != self.vocab_size:
            raise ValueError(
                f"model has vocab_size={model.vocab_size} but the trainer was built with "
                f"vocab_size={self.vocab_size}"
            )
        return self.config.weights_for(model)

    def _check_targets(self, targets: torch.Tensor) -> None:
        # Checked before cross_entropy: an out-of-range target is a device-side assert on
        # CUDA, which kills the process's CUDA context instead of raising.
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= self.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"targets must be token ids in [0, {self.vocab_size}) or ignore_index={IGNORE_INDEX}, "
                f"got {int(targets[bad][0])} ({int(bad.sum())} such targets)"
            )

    def _prepare(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Split and check a batch where it lies (usually the CPU), then move it to ``device``.

        Returns ``(inputs, targets, tokens)`` with ``tokens`` the count of non-ignored targets.
        """
        inputs, targets = split_batch(batch)
        self._check_targets(targets)
        tokens = int((targets != IGNORE_INDEX).sum())
        return (
            inputs.to(device, non_blocking=True),
            targets.to(device, dtype=torch.long, non_blocking=True),
            tokens,
        )

    # -- loss -----------------------------------------------------------------------------
    def _loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weights: Mapping[int, float]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        active = [layer for layer, weight in weights.items() if weight > 0]
        # Only the weighted layers are asked for: the others compute no logits.
        logits = model(inputs, exit_layers=active)
        # clamp: a batch whose targets are all ignored gives loss 0 (and zero gradient), not 0/0.
        tokens = (targets != IGNORE_INDEX).sum().clamp_min(1)
        loss = None
        per_layer = {}
        for layer in active:
            ce = _token_sum_ce(logits[layer], targets) / tokens
            per_layer[layer] = ce.detach()
            loss = weights[layer] * ce if loss is None else loss + weights[layer] * ce
        return loss, per_layer

    def compute_loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The weighted deep-supervision loss ``sum_l w_l * CE_l`` of one batch.

        ``w_l`` are the config's ``layer_weights`` as given (not renormalised); ``CE_l`` is
        the mean cross-entropy over non-ignored targets of layer ``l``'s exit head, with
        logits upcast to float32. Only layers with ``w_l > 0`` are passed to the model as
        ``exit_layers``, so zero-weight layers compute no logits. A batch whose targets
        are all ignored gives 0.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            inputs: ``(B, T)`` token ids.
            targets: ``(B, T)`` next-token ids in ``[0, vocab_size)`` or ``IGNORE_INDEX``.
                Both are moved to the model's device.

        Returns:
            ``(loss, per_layer)``: ``loss`` a scalar float32 tensor with a graph;
            ``per_layer`` ``{layer: CE_l}`` detached scalar tensors for the weighted layers.

        Raises:
            ValueError: targets out of range, mismatched or non-2-D shapes, a model whose
                vocabulary differs from the trainer's, or a config that does not fit the
                model (:meth:`TrainingConfig.validate_for`).
            TypeError: non-tensor or non-integer inputs or targets.
        """
        weights = self._layer_weights(model)
        for name, tensor in (("inputs", inputs), ("targets", targets)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {getattr(tensor, 'dtype', type(tensor))}")
            if tensor.dim() != 2:
                raise ValueError(f"{name} must have shape (B, T), got {tuple(tensor.shape)}")
        if inputs.shape != targets.shape:
            raise ValueError(
                f"inputs and targets must have the same shape, got {tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        self._check_targets(targets)
        device = model.device
        return self._loss(model, inputs.to(device), targets.to(device, dtype=torch.long), weights)

    # -- optimiser ------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module, base_lr: float) -> torch.optim.AdamW:
        """AdamW with per-layer learning rates and no weight decay on norms and biases.

        Parameter groups, each with keys ``lr``, ``weight_decay``, ``layer`` (1-based, or
        ``None``), ``lr_scale`` and ``name``:

        - ``"layer{l}"`` (weight matrices of ``model.layers[l - 1]``, decayed) and
          ``"layer{l}.no_decay"`` (its norm weights and biases), both with
          ``lr = base_lr * layer_lr_scales.get(l, 1.0)``;
        - ``"embeddings_head"`` (token embedding and, when untied, output projection,
          decayed) and ``"embeddings_head.no_decay"`` (the final norm), with ``lr = base_lr``.

        Each trainable parameter appears exactly once: a tied embedding/head weight is one
        parameter. Empty groups are left out; frozen parameters (``requires_grad=False``)
        are not optimised.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            base_lr: learning rate before the per-layer scales, > 0.

        Returns:
            A ``torch.optim.AdamW`` with ``betas`` and ``weight_decay`` from the config
            (fused on CUDA).

        Raises:
            ValueError: ``base_lr`` not a finite number > 0, or a config that does not fit
                the model (a layer key above ``num_layers``, ...).
        """
        if not _is_real(base_lr) or not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
        self._layer_weights(model)
        seen: set[int] = set()

        def unseen(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
            # By identity, so a parameter shared between modules (tied weights) is taken once.
            fresh = []
            for param in params:
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    fresh.append(param)
            return fresh

        groups: list[dict[str, Any]] = []

        def add(name: str, layer: int | None, scale: float, params: list[nn.Parameter]) -> None:
            # Matrices are decayed; vectors (norm scales, biases) are not: decaying a norm
            # scale pulls it towards 0 and shrinks the layer's output for no regularising gain.
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            for suffix, members, weight_decay in (("", decay, self.config.weight_decay), (".no_decay", no_decay, 0.0)):
                if members:
                    groups.append(
                        {
                            "params": members,
                            "lr": base_lr * scale,
                            "weight_decay": weight_decay,
                            "layer": layer,
                            "lr_scale": scale,
                            "name": name + suffix,
                        }
                    )

        for layer, block in enumerate(model.layers, start=1):
            scale = self.config.lr_scale(layer)
            add(f"layer{layer}", layer, scale, unseen(block.parameters()))
        add("embeddings_head", None, 1.0, unseen(model.parameters()))

        params = [p for group in groups for p in group["params"]]
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            groups, lr=base_lr, betas=self.config.betas, weight_decay=self.config.weight_decay, fused=fused or None
        )

    # -- training -------------------------------------------------------------------------
    def train_epoch(
        self,
        model: nn.Module,
        train_batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        verbose: bool | None = None,
    ) -> float:
        """One pass over ``train_batches``: forward, weighted loss, backward, clip, step.

        Runs in ``model.train()`` mode, with bf16 autocast on CUDA (losses in float32) and
        the global gradient norm clipped to ``config.grad_clip``.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            train_batches: any re-iterable of batches (list, ``DataLoader``): ``[B, T + 1]``
                integer tensors or ``(inputs, targets)`` pairs of ``[B, T]``; moved to the
                model's device.
            optimizer: usually from :meth:`create_optimizer`.
            verbose: show a progress bar with the running loss (default ``config.verbose``).

        Returns:
            The token-weighted mean training loss of the epoch,
            ``sum_b loss_b * tokens_b / sum_b tokens_b``, ``tokens_b`` the non-ignored
            targets of batch ``b``.

        Raises:
            ValueError: ``train_batches`` yields no batch or no target token; bad targets.
            FloatingPointError: a non-finite loss or gradient norm, naming the step (1-based
                batch index) and the layer. Raised before the optimiser step, so the
                weights are those before the failing batch.
        """
        weights = self._layer_weights(model)
        verbose = self.config.verbose if verbose is None else verbose
        device = model.device
        grad_clip = self.config.grad_clip
        model.train()

        loss_sum = 0.0
        token_sum = 0
        steps = 0
        progress = tqdm(train_batches, desc="train", unit="batch", disable=not verbose, leave=False, dynamic_ncols=True)
        try:
            for step, batch in enumerate(progress, start=1):
                steps = step
                inputs, targets, tokens = self._prepare(batch, device)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device):
                    loss, per_layer = self._loss(model, inputs, targets, weights)
                loss.backward()
                checks = [loss.detach().float()]
                if grad_clip is not None:
                    checks.append(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).float())
                # One host sync per step reads both the loss and the gradient norm.
                values = torch.stack(checks).tolist()
                if not math.isfinite(values[0]):
                    raise FloatingPointError(self._non_finite_message(step, values[0], per_layer))
                if len(values) > 1 and not math.isfinite(values[1]):
                    raise FloatingPointError(
                        f"non-finite gradient norm {values[1]} at step {step} (loss {values[0]:.4f} was finite; "
                        f"per-layer losses {self._format_layers(per_layer)})"
                    )
                optimizer.step()
                loss_sum += values[0] * tokens
                token_sum += tokens
                if verbose:
                    progress.set_postfix(loss=f"{loss_sum / max(token_sum, 1):.4f}", refresh=False)
        finally:
            progress.close()

        if steps == 0:
            raise ValueError(
                "train_batches yielded no batch (a generator is exhausted after one pass: "
                "pass a list or a DataLoader)"
            )
        if token_sum == 0:
            raise ValueError(f"train_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")
        return loss_sum / token_sum

    @staticmethod
    def _format_layers(per_layer: Mapping[int, torch.Tensor]) -> str:
        return "{" + ", ".join(f"{layer}: {float(ce):.4g}" for layer, ce in per_layer.items()) + "}"

    def _non_finite_message(self, step: int, value: float, per_layer: Mapping[int, torch.Tensor]) -> str:
        bad = [layer for layer, ce in per_layer.items() if not math.isfinite(float(ce))]
        where = (
            f"layer {bad[0]} cross-entropy is {float(per_layer[bad[0]])}"
            if bad
            else "every layer's cross-entropy is finite, their weighted sum is not"
        )
        return (
            f"non-finite training loss {value} at step {step}: {where} "
            f"(per-layer losses {self._format_layers(per_layer)}); lower the learning rate or "
            "check the inputs"
        )

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        val_batches: Iterable[Batch],
        routing_threshold: float | None = None,
        min_exit_layer: int | None = None,
    ) -> dict[str, Any]:
        """Loss, perplexity, accuracy and early-exit statistics on ``val_batches``.

        Runs in eval mode without gradients (the model's previous mode is restored).
        Every statistic is token-weighted over all batches: sums over non-ignored
        targets, divided once at the end.

        Early exit: a token exits at the first layer ``l >= min_exit_layer`` whose
        ``ease_kernels.exit_confidence(logits_l, threshold).exit`` is True (top-1 softmax
        probability ``>= threshold``); the last layer answers every token left. The
        statistics are measured by computing every layer's logits, so
        ``compute_saved = 1 - mean_exit_layer / num_layers`` is the fraction of blocks an
        exiting inference would skip, not a timing. A model that does not support early
        exit (:class:`~ease.models.StandardTransformer`) gets no ``"early_exit"`` entry
        even with a threshold: its intermediate exit heads were never trained, so their
        confidences mean nothing.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            val_batches: re-iterable of batches, as for :meth:`train_epoch`.
            routing_threshold: exit threshold in (0, 1]; default ``config.routing_threshold``.
            min_exit_layer: earliest exit layer; default ``config.min_exit_layer``.

        Returns:
            ``{"loss", "ppl", "accuracy", "objective", "tokens"}``: the final layer's mean
            cross-entropy, ``exp(loss)``, top-1 next-token accuracy; the weighted training
            objective ``sum_l w_l * CE_l`` on this data (what early stopping monitors); the
            count of non-ignored targets. A model supporting early exit adds ``"layers"``:
            ``{l: {"loss", "ppl", "accuracy"}}`` for every layer ``1..num_layers``; with a
            threshold it adds ``"early_exit"``: ``{"threshold", "min_exit_layer",
            "accuracy", "exit_fractions": {l: fraction}`` (every layer, summing to 1)
            ``, "mean_exit_layer", "compute_saved"}``.

        Raises:
            ValueError: ``val_batches`` yields no batch or no target token; a threshold
                outside (0, 1]; ``min_exit_layer`` outside ``1..num_layers``; bad targets.
        """
        weights = self._layer_weights(model)
        num_layers = model.num_layers
        threshold = self.config.routing_threshold if routing_threshold is None else routing_threshold
        if threshold is not None and (not _is_real(threshold) or not 0.0 < threshold <= 1.0):
            raise ValueError(f"routing_threshold must be in (0, 1] or None, got {threshold!r}")
        min_exit = self.config.min_exit_layer if min_exit_layer is None else min_exit_layer
        if not _is_int(min_exit) or not 1 <= min_exit <= num_layers:
            raise ValueError(f"min_exit_layer must be an integer in 1..{num_layers}, got {min_exit!r}")

        every_layer = bool(getattr(model, "supports_early_exit", False))
        early_exit = every_layer and threshold is not None
        layers = sorted(
            set(range(1, num_layers + 1)) if every_layer else {num_layers} | {l for l, w in weights.items() if w > 0}
        )
        device = model.device
        # Accumulated on the device so the loop never waits on the host.
        ce_sums = {layer: torch.zeros((), dtype=torch.float64, device=device) for layer in layers}
        correct = {layer: torch.zeros((), dtype=torch.long, device=device) for layer in layers}
        exit_counts = torch.zeros(num_layers + 1, dtype=torch.long, device=device)
        exit_correct = torch.zeros((), dtype=torch.long, device=device)
        tokens = 0
        batches = 0

        was_training = model.training
        model.eval()
        try:
            for batch in val_batches:
                batches += 1
                inputs, targets, batch_tokens = self._prepare(batch, device)
                tokens += batch_tokens
                counted = targets != IGNORE_INDEX
                with _autocast(device):
                    # Hidden states first, then one layer's logits at a time: only one
                    # (B, T, V) tensor is alive, which matters for large vocabularies.
                    hidden = model.hidden_states(inputs, layers)
                exit_layer = torch.full_like(targets, num_layers)
                exit_prediction = torch.zeros_like(targets)
                undecided = torch.ones_like(counted)
                for layer in layers:  # ascending: the first confident layer wins
                    with _autocast(device):
                        logits = model.exit_head(hidden.pop(layer))  # (B, T, V)
                    ce_sums[layer] += _token_sum_ce(logits, targets).double()
                    exits_here = early_exit and min_exit <= layer < num_layers
                    # One fused pass gives the prediction and, where a token may exit, the decision.
                    decision = ease_kernels.exit_confidence(logits, threshold if exits_here else None)
                    correct[layer] += ((decision.prediction == targets) & counted).sum()
                    if exits_here:
                        leaving = undecided & decision.exit
                        exit_layer = torch.where(leaving, layer, exit_layer)
                        exit_prediction = torch.where(leaving, decision.prediction, exit_prediction)
                        undecided &= ~leaving
                    elif early_exit and layer == num_layers:  # the last layer answers the rest
                        exit_prediction = torch.where(undecided, decision.prediction, exit_prediction)
                if early_exit:
                    exit_counts += torch.bincount(exit_layer[counted], minlength=num_layers + 1)
                    exit_correct += ((exit_prediction == targets) & counted).sum()
        finally:
            model.train(was_training)

        if batches == 0:
            raise ValueError(
                "val_batches yielded no batch (a generator is exhausted after one pass: "
                "pass a list or a DataLoader)"
            )
        if tokens == 0:
            raise ValueError(f"val_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")

        losses = {layer: float(ce_sums[layer]) / tokens for layer in layers}
        accuracies = {layer: int(correct[layer]) / tokens for layer in layers}
        result: dict[str, Any] = {
            "loss": losses[num_layers],
            "ppl": _perplexity(losses[num_layers]),
            "accuracy": accuracies[num_layers],
            "objective": sum(weight * losses[layer] for layer, weight in weights.items() if weight > 0),
            "tokens": tokens,
        }
        if every_layer:
            result["layers"] = {
                layer: {"loss": losses[layer], "ppl": _perplexity(losses[layer]), "accuracy": accuracies[layer]}
                for layer in layers
            }
        if early_exit:
            counts = exit_counts.tolist()
            mean_exit_layer = sum(layer * counts[layer] for layer in range(1, num_layers + 1)) / tokens
            result["early_exit"] = {
                "threshold": float(threshold),
                "min_exit_layer": min_exit,
                "accuracy": int(exit_correct) / tokens,
                "exit_fractions": {layer: counts[layer] / tokens for layer in range(1, num_layers + 1)},
                "mean_exit_layer": mean_exit_layer,
                "compute_saved": 1.0 - mean_exit_layer / num_layers,
            }
        return result

    # -- early stopping -------------------------------------------------------------------
    def train_with_early_stopping(
        self,
        model: nn.Module,
        train_batches: Iterable[Batch],
        val_batches: Iterable[Batch],
        optimizer: torch.optim.Optimizer,
        max_epochs: int = 100,
        patience: int = 1,
        verbose: bool = True,
        min_delta: float = 0.0,
    ) -> EarlyStoppingResult:
        """Train epoch by epoch until the validation objective stops improving.

        After each epoch :meth:`evaluate` runs on ``val_batches`` and its ``"objective"``
        (the weighted training loss on validation data) is monitored. An epoch improves
        when its objective is below ``best - min_delta``. Training stops once
        ``patience`` epochs in a row fail to improve, or after ``max_epochs``. The best
        epoch's weights are copied to the CPU when reached and always loaded back into
        ``model`` at the end (the optimiser's state is left as it is).

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            train_batches: re-iterable training batches (list, ``DataLoader``).
            val_batches: re-iterable validation batches.
            optimizer: usually from :meth:`create_optimizer`.
            max_epochs: most epochs to train, >= 1.
            patience: epochs without improvement before stopping, >= 1.
            verbose: progress bars and one line per epoch.
            min_delta: the least decrease that counts as an improvement, >= 0.

        Returns:
            :class:`EarlyStoppingResult`.

        Raises:
            ValueError: ``max_epochs`` or ``patience`` not an integer >= 1, ``min_delta``
                not a finite number >= 0, or any error of :meth:`train_epoch` /
                :meth:`evaluate`.
            FloatingPointError: a non-finite training loss or validation objective.
        """
        for name, value in (("max_epochs", max_epochs), ("patience", patience)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_real(min_delta) or not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self._layer_weights(model)

        best_val = math.inf
        best_epoch = 0
        best_state: dict[str, torch.Tensor] | None = None
        epochs_without_improvement = 0
        history: list[dict[str, Any]] = []
        epoch = 0
        for epoch in range(1, max_epochs + 1):
            start = time.perf_counter()
            train_loss = self.train_epoch(model, train_batches, optimizer, verbose=verbose)
            val = self.evaluate(model, val_batches)
            seconds = time.perf_counter() - start
            val_loss = val["objective"]
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite validation objective {val_loss} after epoch {epoch}")
            history.append(
                {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val": val, "seconds": seconds}
            )
            improved = val_loss < best_val - min_delta
            if improved:
                best_val, best_epoch = val_loss, epoch
                # A CPU copy: the live tensors keep changing, and the copy must not hold GPU memory.
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
            if verbose:
                tqdm.write(
                    f"epoch {epoch:3d} | train {train_loss:.4f} | val objective {val_loss:.4f} | "
                    f"val loss {val['loss']:.4f} | ppl {val['ppl']:.2f} | acc {val['accuracy']:.3f} | "
                    f"{seconds:.1f}s{' *' if improved else ''}"
                )
            if epochs_without_improvement >= patience:
                break

        stopped_early = epoch < max_epochs
        # Never None: the first epoch's finite objective always improves on inf.
        if best_state is not None:
            model.load_state_dict(best_state)
        if verbose:
            how = f"stopped early after epoch {epoch}" if stopped_early else f"ran all {epoch} epochs"
            tqdm.write(f"{how}; restored epoch {best_epoch} (val objective {best_val:.4f})")
        return EarlyStoppingResult(
            best_epoch=best_epoch,
            best_val_loss=best_val,
            epochs_run=epoch,
            stopped_early=stopped_early,
            history=history,
        )

"""One training epoch: forward, weighted loss, backward, clip, step, for every batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ease.config import TrainingConfig
from ease.data import IGNORE_INDEX, Batch, split_batch
from ease.models import EarlyExitDecoder
from ease.training import distributed as dist_utils
from ease.training.batches import prepare_shards
from ease.training.curriculum import ExitCurriculum
from ease.training.distributed import DistributedContext, WrappedModel
from ease.training.layer_dropout import LayerDropout
from ease.training.loss import supervised_layers, uses_fused_loss, weighted_loss
from ease.training.schedule import LRSchedule


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def format_layers(per_layer: Mapping[int, torch.Tensor | float]) -> str:
    """``{layer: value}`` with 4 significant digits, for messages."""
    return "{" + ", ".join(f"{layer}: {float(ce):.4g}" for layer, ce in per_layer.items()) + "}"


def non_finite_message(step: int, value: float, per_layer: Mapping[int, torch.Tensor | float]) -> str:
    """What a non-finite training loss says: the step, the first bad layer, every layer's loss."""
    bad = [layer for layer, ce in per_layer.items() if not math.isfinite(float(ce))]
    where = (
        f"layer {bad[0]} cross-entropy is {float(per_layer[bad[0]])}"
        if bad
        else "every layer's cross-entropy is finite, their weighted sum is not"
    )
    return (
        f"non-finite training loss {value} at step {step}: {where} "
        f"(per-layer losses {format_layers(per_layer)}); lower the learning rate or check the inputs"
    )


@dataclass
class StepFigures:
    """What one optimiser step measured, summed over ranks and micro-batches.

    Attributes:
        tokens: the step's non-ignored target tokens.
        loss_sum: the loss times ``tokens`` (the loss is ``loss_sum / tokens``).
        layer_ce_sums: per supervised layer, its cross-entropy times ``tokens``.
        layer_correct: per supervised layer, correct top-1 predictions.
        grad_norm: the global gradient norm before clipping.
        lr: the learning rate of the last parameter group (the embeddings', unscaled
            by ``layer_lr_scales``) in this step.
    """

    tokens: int
    loss_sum: float
    layer_ce_sums: dict[int, float]
    layer_correct: dict[int, int]
    grad_norm: float
    lr: float


@dataclass
class StepRunner:
    """Everything one optimiser step needs, gathered once per epoch by the trainer.

    Attributes:
        model, wrapped: the bare decoder and how it runs (DDP/FSDP2 or bare).
        optimizer: stepped once per batch.
        weights: every layer's loss weight (before the curriculum).
        config: ``grad_clip``, ``grad_accumulation_steps``, ``fused_loss``, ...
        context: this process's place in a torchrun launch.
        vocab_size: targets must lie below it.
        schedule: the learning-rate schedule (applied unless it is the identity).
        dropout: layer dropout (drawn only when enabled).
        curriculum: which exits each step supervises.
        loss_fn: :func:`ease.training.loss.weighted_loss`, or its compiled form.
    """

    model: EarlyExitDecoder
    wrapped: WrappedModel
    optimizer: torch.optim.Optimizer
    weights: Mapping[int, float]
    config: TrainingConfig
    context: DistributedContext
    vocab_size: int
    schedule: LRSchedule
    dropout: LayerDropout
    curriculum: ExitCurriculum
    loss_fn: Callable[..., Any] = weighted_loss

    def step(self, batch: Batch, step: int, presharded: bool) -> StepFigures:
        """Forward, backward, clip and step on one global batch; ``step`` is 0-based.

        Raises:
            FloatingPointError: a non-finite loss or gradient norm, raised before the
                optimiser step (the weights are unchanged); :func:`train_epoch` names the
                step and the layer in its message.
        """
        model, config, context = self.model, self.config, self.context
        device = model.device
        weights = self.curriculum.weights(self.weights, step)
        active = supervised_layers(weights)
        fused = uses_fused_loss(model, config)
        # Drawn for every row of the batch as given (the global batch), before it is split.
        keep = self.dropout.keep(step, split_batch(batch)[0].shape[0]) if self.dropout.enabled else None
        shards, tokens = prepare_shards(
            batch, self.vocab_size, device, context, config.grad_accumulation_steps, presharded, keep=keep
        )
        if not self.schedule.is_identity:
            self.schedule.apply(self.optimizer, step)
        self.optimizer.zero_grad(set_to_none=True)
        # Token-weighted sums of the loss and of each layer's CE, and correct counts, over
        # this rank's micro-batches; summed over ranks they give the step's global figures.
        sums = torch.zeros(1 + 2 * len(active), dtype=torch.float64, device=device)
        for index, (inputs, targets, shard_tokens, shard_keep) in enumerate(shards, start=1):
            # Gradients are reduced over ranks once, with the last micro-batch.
            with self.wrapped.gradient_sync(index == len(shards)):
                with autocast(device):
                    loss, per_layer, correct = self.wrapped.run(
                        self.loss_fn, inputs, targets, weights, fused, shard_keep
                    )
                scale = dist_utils.loss_scale(shard_tokens, tokens, context.world_size)
                # == 1.0 on one process without accumulation: the plain loss, bit for bit.
                (loss if scale == 1.0 else loss * scale).backward()
            values = torch.stack([loss.detach(), *(per_layer[layer].detach() for layer in active)])
            counts = torch.stack([correct[layer] for layer in active]).double() if active else values[:0]
            sums += torch.cat([values.double() * shard_tokens, counts])
        sums = dist_utils.all_reduce_sum(sums, context)
        if config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        else:
            # Measured even without clipping: a non-finite gradient must stop the step
            # before the optimiser writes NaN into the weights.
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        norm = dist_utils.reduce_grad_norm(norm).double().reshape(1).to(device)
        # One host sync per step reads the losses, the counts and the gradient norm.
        values = torch.cat([sums, norm]).tolist()
        count = len(active)
        figures = StepFigures(
            tokens=tokens,
            loss_sum=values[0],
            layer_ce_sums={layer: values[1 + i] for i, layer in enumerate(active)},
            layer_correct={layer: int(round(values[1 + count + i])) for i, layer in enumerate(active)},
            grad_norm=values[-1],
            lr=self.optimizer.param_groups[-1]["lr"],
        )
        step_loss = figures.loss_sum / max(tokens, 1)
        if not math.isfinite(step_loss) or not math.isfinite(figures.grad_norm):
            raise _NonFiniteStep(figures, step_loss, active)
        self.optimizer.step()
        return figures


class _NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm is not finite; the caller names the step."""

    def __init__(self, figures: StepFigures, step_loss: float, active: list[int]) -> None:
        super().__init__(step_loss)
        self.figures = figures
        self.step_loss = step_loss
        self.layers = {layer: figures.layer_ce_sums[layer] / max(figures.tokens, 1) for layer in active}

    def message(self, step: int) -> str:
        if not math.isfinite(self.step_loss):
            return non_finite_message(step, self.step_loss, self.layers)
        return (
            f"non-finite gradient norm {self.figures.grad_norm} at step {step} (loss {self.step_loss:.4f} was "
            f"finite; per-layer losses {format_layers(self.layers)})"
        )


def train_epoch(
    runner: StepRunner,
    batches: Iterable[Batch],
    show_progress: bool,
    first_step: int,
    on_step: Callable[[StepFigures], bool | None] = lambda figures: None,
    skip: int = 0,
) -> tuple[float, int, bool]:
    """One pass over ``batches``; each batch is one optimiser step. See :meth:`ease.Trainer.train_epoch`.

    Args:
        runner: the step's parts.
        batches: re-iterable global batches.
        show_progress: a progress bar with the running loss (the caller decides the rank).
        first_step: optimiser steps taken before this epoch (0-based index of its first).
        on_step: called after every optimiser step with its figures; returning True
            stops the epoch there (a step budget is spent, or early stopping decided).
        skip: batches at the start of the epoch already trained (a resume mid-epoch).

    Returns:
        ``(mean loss, batches seen, stopped)``: the token-weighted mean training loss of
        the steps taken, the batches consumed including skipped ones, and whether
        ``on_step`` stopped the epoch.

    Raises:
        ValueError: no batch, or no target token.
        FloatingPointError: a non-finite loss or gradient norm, naming the 1-based step of
            the epoch and the layer.
    """
    presharded = runner.context.enabled and dist_utils.has_distributed_sampler(batches)
    runner.model.train()
    loss_sum = 0.0
    token_sum = 0
    seen = 0
    taken = 0
    stopped = False
    bar = tqdm(batches, desc="train", unit="batch", disable=not show_progress, leave=False, dynamic_ncols=True)
    try:
        for seen, batch in enumerate(bar, start=1):
            if seen <= skip:
                continue
            try:
                figures = runner.step(batch, first_step + taken, presharded)
            except _NonFiniteStep as error:
                raise FloatingPointError(error.message(seen)) from None
            taken += 1
            loss_sum += figures.loss_sum
            token_sum += figures.tokens
            if show_progress:
                bar.set_postfix(loss=f"{loss_sum / max(token_sum, 1):.4f}", refresh=False)
            if on_step(figures):
                stopped = True
                break
    finally:
        bar.close()

    if seen == 0:
        raise ValueError(
            "train_batches yielded no batch (a generator is exhausted after one pass: pass a list or a DataLoader)"
        )
    if taken and token_sum == 0:
        raise ValueError(f"train_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")
    return (loss_sum / token_sum if token_sum else math.nan), seen, stopped

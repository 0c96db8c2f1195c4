"""One training epoch: forward, weighted loss, backward, clip, step, for every batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ease.config import TrainingConfig
from ease.data import IGNORE_INDEX, Batch
from ease.models import EarlyExitDecoder
from ease.training import distributed as dist_utils
from ease.training.batches import prepare_shards
from ease.training.distributed import DistributedContext, WrappedModel
from ease.training.loss import supervised_layers, uses_fused_loss, weighted_loss


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


def train_epoch(
    model: EarlyExitDecoder,
    wrapped: WrappedModel,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    weights: Mapping[int, float],
    config: TrainingConfig,
    context: DistributedContext,
    vocab_size: int,
    show_progress: bool,
    on_step: Callable[[], None] = lambda: None,
) -> float:
    """One pass over ``batches``; each batch is one optimiser step. See :meth:`ease.Trainer.train_epoch`.

    Args:
        model: the bare decoder; ``wrapped`` is how it runs (DDP/FSDP2 or bare).
        batches: re-iterable global batches.
        optimizer: steps once per batch.
        weights: every layer's loss weight.
        config: for ``grad_clip``, ``grad_accumulation_steps`` and ``fused_loss``.
        context: this process's place in a torchrun launch.
        vocab_size: targets must lie below it.
        show_progress: a progress bar with the running loss (the caller decides the rank).
        on_step: called after every optimiser step (the trainer counts steps with it).

    Returns:
        The token-weighted mean training loss of the epoch.
    """
    device = model.device
    grad_clip = config.grad_clip
    micro_batches = config.grad_accumulation_steps
    fused = uses_fused_loss(model, config)
    presharded = context.enabled and dist_utils.has_distributed_sampler(batches)
    active = supervised_layers(weights)
    model.train()

    loss_sum = 0.0
    token_sum = 0
    steps = 0
    bar = tqdm(batches, desc="train", unit="batch", disable=not show_progress, leave=False, dynamic_ncols=True)
    try:
        for step, batch in enumerate(bar, start=1):
            steps = step
            shards, tokens = prepare_shards(batch, vocab_size, device, context, micro_batches, presharded)
            optimizer.zero_grad(set_to_none=True)
            # Token-weighted sums of the loss and of each layer's CE over this rank's
            # micro-batches; summed over ranks they give the step's global means.
            sums = torch.zeros(1 + len(active), dtype=torch.float64, device=device)
            for index, (inputs, targets, shard_tokens) in enumerate(shards, start=1):
                # Gradients are reduced over ranks once, with the last micro-batch.
                with wrapped.gradient_sync(index == len(shards)):
                    with autocast(device):
                        loss, per_layer = wrapped.run(weighted_loss, inputs, targets, weights, fused)
                    scale = dist_utils.loss_scale(shard_tokens, tokens, context.world_size)
                    # == 1.0 on one process without accumulation: the plain loss, bit for bit.
                    (loss if scale == 1.0 else loss * scale).backward()
                values = torch.stack([loss.detach(), *(per_layer[layer].detach() for layer in active)])
                sums += values.double() * shard_tokens
            sums = dist_utils.all_reduce_sum(sums, context)
            if grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            else:
                # Measured even without clipping: a non-finite gradient must stop the step
                # before the optimiser writes NaN into the weights.
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            norm = dist_utils.reduce_grad_norm(norm).double().reshape(1).to(device)
            # One host sync per step reads the losses and the gradient norm.
            values = torch.cat([sums, norm]).tolist()
            step_loss = values[0] / max(tokens, 1)
            bad_loss = not math.isfinite(step_loss)
            if bad_loss or not math.isfinite(values[-1]):
                # Only a failing step pays for the per-layer figures its message names.
                step_layers = {layer: values[1 + i] / max(tokens, 1) for i, layer in enumerate(active)}
                if bad_loss:
                    raise FloatingPointError(non_finite_message(step, step_loss, step_layers))
                raise FloatingPointError(
                    f"non-finite gradient norm {values[-1]} at step {step} (loss {step_loss:.4f} was finite; "
                    f"per-layer losses {format_layers(step_layers)})"
                )
            optimizer.step()
            on_step()
            loss_sum += values[0]
            token_sum += tokens
            if show_progress:
                bar.set_postfix(loss=f"{loss_sum / max(token_sum, 1):.4f}", refresh=False)
    finally:
        bar.close()

    if steps == 0:
        raise ValueError(
            "train_batches yielded no batch (a generator is exhausted after one pass: pass a list or a DataLoader)"
        )
    if token_sum == 0:
        raise ValueError(f"train_batches hold no target tokens: all targets are ignore_index={IGNORE_INDEX}")
    return loss_sum / token_sum

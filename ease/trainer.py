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
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import ease_kernels
from ease import distributed as dist_utils
from ease.checkpoint import (
    CHECKPOINT_NAME,
    TrainingProgress,
    data_generators,
    latest_checkpoint,
)
from ease.checkpoint import load_checkpoint as _load_checkpoint
from ease.checkpoint import save_checkpoint as _save_checkpoint
from ease.config import TrainingConfig
from ease_kernels._validation import is_int as _is_int
from ease_kernels._validation import is_real as _is_real
from ease.data import set_seed, split_batch

IGNORE_INDEX = -100
"""Target value that is left out of losses, accuracies and token counts."""

# A batch as train_epoch and evaluate take it: [B, T + 1] ids, or an (inputs, targets) pair of [B, T].
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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

    Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set) the trainer joins
    the process group (NCCL on CUDA, Gloo on the CPU) and, on first use of a model, moves
    it to this rank's device and wraps it in DDP, or shards it with FSDP2
    (``config.distributed``); build the optimiser with :meth:`create_optimizer` after
    that, never before. Batches are global batches: each rank takes its own rows, the
    loss is the global token mean, and figures are reduced over ranks weighted by token
    count, so steps, learning rates and results do not depend on the number of ranks.
    Progress bars, printed lines and checkpoints come from rank 0 only. See
    :mod:`ease.distributed`.

    Attributes:
        distributed: this process's :class:`~ease.distributed.DistributedContext`.
        progress: the :class:`~ease.checkpoint.TrainingProgress` of the last (or
            current) :meth:`train_with_early_stopping` run: epoch, step and
            early-stopping state, as checkpoints store it.

    Raises:
        TypeError: ``config`` is not a :class:`TrainingConfig`.
        ValueError: ``vocab_size`` is not an integer >= 1; ``config.distributed`` is
            ``"ddp"`` or ``"fsdp"`` outside a torchrun launch.
    """

    def __init__(self, config: TrainingConfig, vocab_size: int) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        self.config = config
        self.vocab_size = int(vocab_size)
        set_seed(config.seed)
        # Joins the process group of a torchrun launch; a context of one process otherwise.
        self.distributed = dist_utils.setup_distributed(config.distributed)
        self.progress = TrainingProgress()
        self._wrapped: dict[int, dist_utils.WrappedModel] = {}
        # The model and optimiser last trained: what save_checkpoint(path) saves.
        self._last: tuple[nn.Module, torch.optim.Optimizer | None] | None = None
        self._generators: list[torch.Generator] = []

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 (and on one process): the rank that prints and writes files."""
        return self.distributed.is_main

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

    def _prepare_shards(
        self, batch: Batch, device: torch.device, pieces: int, presharded: bool, global_count: bool = True
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], int]:
        """This rank's rows of a global batch, cut into ``pieces`` micro-batches on ``device``.

        The batch is split and checked where it lies (usually the CPU), whole, on every
        rank (so all ranks raise together), then moved to ``device``. Without
        a ``DistributedSampler`` (``presharded=False``) every rank holds the whole global
        batch and takes its contiguous slice of rows (:func:`ease.distributed.shard_rows`).

        Returns:
            ``(shards, global_tokens)``: ``shards`` a list of ``(inputs, targets,
            tokens)``; ``global_tokens`` the non-ignored targets of the step over all
            ranks (counted locally, or all-reduced for a ``DistributedSampler``'s batches
            when ``global_count``; else this rank's count).
        """
        inputs, targets = split_batch(batch)
        self._check_targets(targets)
        context = self.distributed
        global_tokens = None
        if context.enabled and not presharded:
            global_tokens = int((targets != IGNORE_INDEX).sum())
            inputs, targets = dist_utils.shard_rows(inputs, targets, context.world_size, IGNORE_INDEX)[context.rank]
        pieces_ = dist_utils.shard_rows(inputs, targets, pieces, IGNORE_INDEX) if pieces > 1 else [(inputs, targets)]
        shards = [
            (
                piece_inputs.to(device, non_blocking=True),
                piece_targets.to(device, dtype=torch.long, non_blocking=True),
                int((piece_targets != IGNORE_INDEX).sum()),
            )
            for piece_inputs, piece_targets in pieces_
        ]
        if global_tokens is None:
            global_tokens = sum(shard[2] for shard in shards)
            if context.enabled and global_count:
                global_tokens = int(dist_utils.all_reduce_sum(torch.tensor([global_tokens]), context)[0])
        return shards, global_tokens

    def _wrap(self, model: nn.Module) -> dist_utils.WrappedModel:
        """The model as this trainer runs it: wrapped (DDP, FSDP2) on first use under torchrun."""
        wrapped = self._wrapped.get(id(model))
        if wrapped is None or wrapped.model is not model:
            weights = self._layer_weights(model)
            deepest = max(layer for layer, weight in weights.items() if weight > 0)
            # Blocks above the deepest weighted layer never run in training: DDP must be told.
            wrapped = dist_utils.wrap_model(
                model, self.distributed, find_unused_parameters=deepest < model.num_layers
            )
            self._wrapped[id(model)] = wrapped
        return wrapped

    def _check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.distributed.mode != "fsdp":
            return
        current = {id(p) for p in model.parameters()}
        if any(id(p) not in current for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer holds parameters the model no longer has: FSDP2 replaced them with "
                "shards; build the optimizer with trainer.create_optimizer(model, ...) (it shards the "
                "model first)"
            )

    # -- loss -----------------------------------------------------------------------------
    def _loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weights: Mapping[int, float]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        active = [layer for layer, weight in weights.items() if weight > 0]
        if self.config.fused_loss and getattr(model, "supports_early_exit", False):
            # Deep supervision, fused: the exit head's norm, projection and cross-entropy
            # walk the tokens in chunks, so one chunk of logits exists instead of every
            # layer's. Only the weighted layers' hidden states are asked for.
            hidden = model.hidden_states(inputs, active)
            fused = ease_kernels.exit_head_loss(
                [hidden[layer] for layer in active],
                model.norm.weight,
                model.lm_head.weight,
                targets,
                [weights[layer] for layer in active],
                model.norm.eps,
                ignore_index=IGNORE_INDEX,
            )
            return fused.loss, {layer: fused.layer_losses[i] for i, layer in enumerate(active)}
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
        are all ignored gives 0. With ``config.fused_loss`` (the default) a model that
        supports early exit computes the same loss with
        :func:`ease_kernels.exit_head_loss` from ``model.hidden_states(inputs, layers)``
        of the weighted layers: the tokens are walked in chunks, so the logits of every
        layer never exist at once.

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
        inputs, targets = split_batch((inputs, targets))  # types and shapes, named in errors
        self._check_targets(targets)
        # Under torchrun, through the DDP/FSDP2 wrapper: FSDP2's shards are gathered and a
        # backward of this loss reduces gradients over ranks (this rank's rows only).
        wrapped = self._wrap(model)
        device = model.device
        return wrapped.run(self._loss, inputs.to(device), targets.to(device, dtype=torch.long), weights)

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

        Under torchrun the model is first moved to this rank's device and wrapped (DDP)
        or sharded (FSDP2, which replaces the parameters in place on the same modules),
        so the groups hold the parameters that will be trained, with the same per-layer
        learning rates as on one process.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder` (the bare model, not a DDP or
                FSDP wrapper).
            base_lr: learning rate before the per-layer scales, > 0.

        Returns:
            A ``torch.optim.AdamW`` with ``betas`` and ``weight_decay`` from the config
            (fused on CUDA, except over FSDP2 shards).

        Raises:
            ValueError: ``base_lr`` not a finite number > 0, or a config that does not fit
                the model (a layer key above ``num_layers``, ...).
        """
        if not _is_real(base_lr) or not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
        self._layer_weights(model)
        self._wrap(model)
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
        fused = (
            bool(params)
            and all(p.is_cuda and p.is_floating_point() for p in params)
            # The fused kernel takes plain tensors; FSDP2 shards go through foreach.
            and not dist_utils.uses_dtensors(params)
        )
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

        Each batch is one optimiser step. With ``config.grad_accumulation_steps = k`` it is
        cut into ``k`` micro-batches of rows whose gradients add up before the step. Under
        torchrun each rank takes its own rows of the (global) batch, or uses a
        ``DistributedSampler``'s batches as they are. In every case each micro-batch's
        token-mean loss is scaled by ``tokens * world_size / step_tokens``
        (:func:`ease.distributed.loss_scale`), so the gradient is that of the whole
        step's token-mean loss, as on one process with no accumulation.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            train_batches: any re-iterable of batches (list, ``DataLoader``): ``[B, T + 1]``
                integer tensors or ``(inputs, targets)`` pairs of ``[B, T]``; moved to the
                model's device. Under torchrun every rank must be given the same global
                batches (or a ``DataLoader`` with a ``DistributedSampler``).
            optimizer: usually from :meth:`create_optimizer`.
            verbose: show a progress bar with the running loss (default ``config.verbose``;
                rank 0 only).

        Returns:
            The token-weighted mean training loss of the epoch,
            ``sum_b loss_b * tokens_b / sum_b tokens_b``, ``tokens_b`` the non-ignored
            targets of batch ``b`` (over all ranks).

        Raises:
            ValueError: ``train_batches`` yields no batch or no target token; bad targets;
                under FSDP2, an optimizer built before the model was sharded.
            FloatingPointError: a non-finite loss or gradient norm, naming the step (1-based
                batch index) and the layer, on every rank alike. Raised before the
                optimiser step, so the weights are those before the failing batch.
        """
        weights = self._layer_weights(model)
        verbose = self.config.verbose if verbose is None else verbose
        wrapped = self._wrap(model)
        self._check_optimizer(model, optimizer)
        self._last = (model, optimizer)
        context = self.distributed
        device = model.device
        grad_clip = self.config.grad_clip
        micro_batches = self.config.grad_accumulation_steps
        presharded = context.enabled and dist_utils.has_distributed_sampler(train_batches)
        active = [layer for layer, weight in weights.items() if weight > 0]
        model.train()

        loss_sum = 0.0
        token_sum = 0
        steps = 0
        progress = tqdm(
            train_batches,
            desc="train",
            unit="batch",
            disable=not (verbose and context.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            for step, batch in enumerate(progress, start=1):
                steps = step
                shards, tokens = self._prepare_shards(batch, device, micro_batches, presharded)
                optimizer.zero_grad(set_to_none=True)
                # Token-weighted sums of the loss and of each layer's CE over this rank's
                # micro-batches; summed over ranks they give the step's global means.
                sums = torch.zeros(1 + len(active), dtype=torch.float64, device=device)
                for index, (inputs, targets, shard_tokens) in enumerate(shards, start=1):
                    # Gradients are reduced over ranks once, with the last micro-batch.
                    with wrapped.gradient_sync(index == len(shards)):
                        with _autocast(device):
                            loss, per_layer = wrapped.run(self._loss, inputs, targets, weights)
                        scale = dist_utils.loss_scale(shard_tokens, tokens, context.world_size)
                        # == 1.0 on one process without accumulation: the plain loss, bit for bit.
                        (loss if scale == 1.0 else loss * scale).backward()
                    values = torch.stack([loss.detach(), *(per_layer[layer].detach() for layer in active)])
                    sums += values.double() * shard_tokens
                sums = dist_utils.all_reduce_sum(sums, context)
                checks = [sums]
                if grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    checks.append(dist_utils.reduce_grad_norm(norm).double().reshape(1).to(device))
                # One host sync per step reads the losses and the gradient norm.
                values = torch.cat(checks).tolist()
                step_loss = values[0] / max(tokens, 1)
                bad_loss = not math.isfinite(step_loss)
                if bad_loss or (grad_clip is not None and not math.isfinite(values[-1])):
                    # Only a failing step pays for the per-layer figures its message names.
                    step_layers = {
                        layer: torch.tensor(values[1 + i] / max(tokens, 1)) for i, layer in enumerate(active)
                    }
                    if bad_loss:
                        raise FloatingPointError(self._non_finite_message(step, step_loss, step_layers))
                    raise FloatingPointError(
                        f"non-finite gradient norm {values[-1]} at step {step} (loss {step_loss:.4f} was finite; "
                        f"per-layer losses {self._format_layers(step_layers)})"
                    )
                optimizer.step()
                self.progress.step += 1
                loss_sum += values[0]
                token_sum += tokens
                if verbose and context.is_main:
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

        Under torchrun each rank evaluates its own rows of every batch (or a
        ``DistributedSampler``'s batches) and the sums (cross-entropies, correct
        predictions, exit counts, tokens) are all-reduced before dividing, so every rank
        returns the figures of the whole data: the same as one process, up to the order
        of float additions (about 1e-7 relative in the losses).

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
        wrapped = self._wrap(model)
        presharded = self.distributed.enabled and dist_utils.has_distributed_sampler(val_batches)
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
        gathered = contextlib.ExitStack()
        try:
            # FSDP2: gather the root's parameters so hidden_states and exit_head can be called.
            gathered.enter_context(wrapped.gathered())
            for batch in val_batches:
                batches += 1
                [(inputs, targets, batch_tokens)], _ = self._prepare_shards(
                    batch, device, 1, presharded, global_count=False
                )
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
            gathered.close()
            model.train(was_training)

        if self.distributed.enabled:
            tokens, exit_correct = self._reduce_evaluation(tokens, ce_sums, correct, exit_counts, exit_correct)
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

    def _reduce_evaluation(
        self,
        tokens: int,
        ce_sums: dict[int, torch.Tensor],
        correct: dict[int, torch.Tensor],
        exit_counts: torch.Tensor,
        exit_correct: torch.Tensor,
    ) -> tuple[int, torch.Tensor]:
        """Sum :meth:`evaluate`'s accumulators over ranks in one all-reduce.

        Packed in float64, where counts stay exact up to 2**53. ``ce_sums``, ``correct``
        and ``exit_counts`` are updated in place; returns ``(tokens, exit_correct)``.
        """
        layers = list(ce_sums)
        count = len(layers)
        device = exit_counts.device
        packed = torch.cat(
            [
                torch.tensor([tokens], dtype=torch.float64, device=device),
                torch.stack([ce_sums[layer] for layer in layers]),
                torch.stack([correct[layer] for layer in layers]).double(),
                exit_counts.double(),
                exit_correct.double().reshape(1),
            ]
        )
        packed = dist_utils.all_reduce_sum(packed, self.distributed)
        for index, layer in enumerate(layers):
            ce_sums[layer] = packed[1 + index]
            correct[layer] = packed[1 + count + index].round().long()
        exit_counts.copy_(packed[1 + 2 * count : 1 + 2 * count + exit_counts.numel()].round().long())
        return int(packed[0].item()), packed[-1].round().long()

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
        resume_from: str | os.PathLike | None = None,
    ) -> EarlyStoppingResult:
        """Train epoch by epoch until the validation objective stops improving.

        After each epoch :meth:`evaluate` runs on ``val_batches`` and its ``"objective"``
        (the weighted training loss on validation data) is monitored. An epoch improves
        when its objective is below ``best - min_delta``. Training stops once
        ``patience`` epochs in a row fail to improve, or after ``max_epochs``. The best
        epoch's weights are copied to the CPU when reached (a full state dict, held by
        rank 0 under torchrun) and always loaded back into ``model`` at the end (the
        optimiser's state is left as it is). Under torchrun the decision is taken from
        figures reduced over ranks, so every rank stops at the same epoch.

        With ``config.checkpoint_dir`` set, ``checkpoint_dir/last.pt`` is written
        atomically after every finished epoch (:meth:`save_checkpoint`); an epoch that
        fails (a non-finite loss) writes nothing, so the last good checkpoint stays.
        ``resume_from`` (or ``config.resume`` with a checkpoint in ``checkpoint_dir``)
        continues a stopped run from its last finished epoch: weights, optimiser,
        early-stopping state, history and RNG states are restored, so on the CPU the run
        ends with the same weights, bit for bit, as one never stopped. ``max_epochs``
        counts from the start of the original run.

        Args:
            model: an :class:`~ease.models.EarlyExitDecoder`.
            train_batches: re-iterable training batches (list, ``DataLoader``). A
                ``DataLoader``'s ``DistributedSampler`` gets ``set_epoch(epoch)`` each epoch.
            val_batches: re-iterable validation batches.
            optimizer: usually from :meth:`create_optimizer`.
            max_epochs: most epochs to train, >= 1.
            patience: epochs without improvement before stopping, >= 1.
            verbose: progress bars and one line per epoch (rank 0 only).
            min_delta: the least decrease that counts as an improvement, >= 0.
            resume_from: a checkpoint to resume from, or ``None``.

        Returns:
            :class:`EarlyStoppingResult`; after a resume its history holds every epoch
            since the start of the original run.

        Raises:
            ValueError: ``max_epochs`` or ``patience`` not an integer >= 1, ``min_delta``
                not a finite number >= 0, an unreadable checkpoint, or any error of
                :meth:`train_epoch` / :meth:`evaluate`.
            FileNotFoundError: ``resume_from`` does not exist.
            FloatingPointError: a non-finite training loss (naming the epoch, the step and
                the layer) or validation objective.
        """
        for name, value in (("max_epochs", max_epochs), ("patience", patience)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_real(min_delta) or not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self._layer_weights(model)
        context = self.distributed
        self._wrap(model)
        self._last = (model, optimizer)
        self._generators = data_generators(train_batches)
        checkpoint_path = (
            Path(self.config.checkpoint_dir) / CHECKPOINT_NAME if self.config.checkpoint_dir is not None else None
        )
        if resume_from is None and self.config.resume:
            # Rank 0 looks, so that every rank decides alike even without a shared file system.
            found = latest_checkpoint(self.config.checkpoint_dir) if context.is_main else None
            resume_from = dist_utils.broadcast_object(found, context)
        if resume_from is not None:
            self.progress = _load_checkpoint(
                resume_from, model, optimizer, context=context, generators=self._generators
            )
        else:
            self.progress = TrainingProgress()
        progress = self.progress
        verbose_here = verbose and context.is_main
        if verbose_here and resume_from is not None:
            tqdm.write(f"resumed from {resume_from} after epoch {progress.epoch} (step {progress.step})")

        finished = progress.epochs_without_improvement >= patience
        for epoch in range(progress.epoch + 1, max_epochs + 1):
            if finished:
                break
            dist_utils.set_sampler_epoch(train_batches, epoch)
            start = time.perf_counter()
            try:
                train_loss = self.train_epoch(model, train_batches, optimizer, verbose=verbose)
            except FloatingPointError as error:
                kept = (
                    f"; the last good checkpoint, {checkpoint_path} (epoch {progress.epoch}), is left as it was"
                    if checkpoint_path is not None and progress.epoch > 0
                    else ""
                )
                raise FloatingPointError(f"epoch {epoch}: {error}{kept}") from error
            val = self.evaluate(model, val_batches)
            seconds = time.perf_counter() - start
            val_loss = val["objective"]
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite validation objective {val_loss} after epoch {epoch}")
            progress.history.append(
                {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val": val, "seconds": seconds}
            )
            improved = val_loss < progress.best_val_loss - min_delta
            if improved:
                progress.best_val_loss, progress.best_epoch = val_loss, epoch
                # A CPU copy (rank 0 only under torchrun): the live tensors keep changing,
                # and the copy must not hold GPU memory.
                progress.best_state = dist_utils.full_model_state_dict(model, context) or None
                progress.epochs_without_improvement = 0
            else:
                progress.epochs_without_improvement += 1
            progress.epoch = epoch
            if checkpoint_path is not None:
                # After an improving epoch the best state is the model's state, gathered
                # just above: the checkpoint takes it rather than gathering it again.
                self._write_checkpoint(
                    checkpoint_path, model, optimizer, model_state=(progress.best_state or {}) if improved else None
                )
            if verbose_here:
                tqdm.write(
                    f"epoch {epoch:3d} | train {train_loss:.4f} | val objective {val_loss:.4f} | "
                    f"val loss {val['loss']:.4f} | ppl {val['ppl']:.2f} | acc {val['accuracy']:.3f} | "
                    f"{seconds:.1f}s{' *' if improved else ''}"
                )
            finished = progress.epochs_without_improvement >= patience

        epochs_run = progress.epoch
        stopped_early = epochs_run < max_epochs
        # best_epoch is the same on every rank; best_state is held by rank 0 alone.
        if progress.best_epoch > 0:
            dist_utils.load_full_model_state_dict(model, progress.best_state or {}, context)
        if verbose_here:
            how = f"stopped early after epoch {epochs_run}" if stopped_early else f"ran all {epochs_run} epochs"
            tqdm.write(f"{how}; restored epoch {progress.best_epoch} (val objective {progress.best_val_loss:.4f})")
        return EarlyStoppingResult(
            best_epoch=progress.best_epoch,
            best_val_loss=progress.best_val_loss,
            epochs_run=epochs_run,
            stopped_early=stopped_early,
            history=list(progress.history),
        )

    # -- checkpoints ----------------------------------------------------------------------
    def _model_and_optimizer(
        self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        if model is None:
            if self._last is None:
                raise ValueError("no model to checkpoint: pass model= (and optimizer=), or train one first")
            return self._last
        if optimizer is None and self._last is not None and self._last[0] is model:
            optimizer = self._last[1]
        return model, optimizer

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Path:
        """Write a checkpoint to ``path`` atomically (a temporary file, then a rename).

        It holds the model's full state dict, the optimiser's, :attr:`progress` (epoch,
        step, early-stopping state with the best epoch's weights, history) and every RNG
        state of every rank (Python, NumPy, torch CPU and CUDA, a ``DataLoader``'s
        generator); see :mod:`ease.checkpoint`. A crash or an error during the write
        leaves the previous file at ``path`` intact. Under torchrun every rank must call
        it; rank 0 writes.

        Args:
            path: the file to write (its folder is created).
            model: default: the model this trainer trained last.
            optimizer: default: the optimiser it was trained with.

        Returns:
            ``path`` as a ``Path``.

        Raises:
            ValueError: no model given and none trained yet.
            OSError: the write failed (the previous checkpoint is kept).
        """
        model, optimizer = self._model_and_optimizer(model, optimizer)
        return self._write_checkpoint(path, model, optimizer)

    def _write_checkpoint(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        # model_state: the model's full state dict when the caller holds it already.
        self._layer_weights(model)
        self._wrap(model)
        return _save_checkpoint(
            path, model, optimizer, self.progress, context=self.distributed, generators=self._generators,
            model_state=model_state,
        )

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_batches: Iterable[Batch] | None = None,
        restore_rng: bool = True,
    ) -> TrainingProgress:
        """Load a checkpoint of :meth:`save_checkpoint` into ``model`` and ``optimizer``.

        Restores the weights, the optimiser state, :attr:`progress` and (by default) every
        RNG state. :meth:`train_with_early_stopping` calls it for ``resume_from``; call it
        directly to inspect or fine-tune from a checkpoint. Under FSDP2 build the
        optimiser with :meth:`create_optimizer` first (it shards the model).

        Args:
            path: a checkpoint file.
            model: default: the model this trainer trained last.
            optimizer: loaded when given (default: the one trained with ``model``).
            train_batches: the training batches whose ``DataLoader`` generator was saved,
                if any; default: those of the last :meth:`train_with_early_stopping`.
            restore_rng: restore every RNG state (needed for an exact resume).

        Returns:
            The restored :class:`~ease.checkpoint.TrainingProgress`.

        Raises:
            FileNotFoundError, ValueError: no such file, not a readable ease checkpoint,
                or no optimiser state in it while an optimiser is given.
            RuntimeError: the weights do not fit ``model``.
        """
        model, optimizer = self._model_and_optimizer(model, optimizer)
        self._layer_weights(model)
        self._wrap(model)
        if train_batches is not None:
            self._generators = data_generators(train_batches)
        self.progress = _load_checkpoint(
            path,
            model,
            optimizer,
            context=self.distributed,
            generators=self._generators,
            restore_rng=restore_rng,
        )
        return self.progress

"""The :class:`Trainer`: the user's API over the training parts.

:class:`Trainer` applies a :class:`~ease.config.TrainingConfig`'s three options:

- ``layer_weights``: the training loss is ``sum_l w_l * CE_l``, where ``CE_l`` is the
  token-mean cross-entropy of layer ``l``'s exit head; only layers with ``w_l > 0``
  compute logits (:mod:`ease.training.loss`).
- ``layer_lr_scales``: :meth:`Trainer.create_optimizer` gives each layer its own AdamW
  parameter groups with ``lr = base_lr * scale_l`` (:mod:`ease.training.optim`).
- ``routing_threshold``: :meth:`Trainer.evaluate` reports where tokens would exit
  (:class:`ease.exits.ExitRule`) and the accuracy of those answers (:mod:`ease.evaluation`).

Batches are ``[B, T + 1]`` integer tensors (inputs ``[:, :-1]``, targets ``[:, 1:]``) or
``(inputs, targets)`` pairs of ``[B, T]`` tensors; targets equal to ``IGNORE_INDEX``
(-100) are left out of every loss, accuracy and token count.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ease import evaluation
from ease.config import TrainingConfig
from ease.data import Batch, set_seed, split_batch
from ease.exits import ExitRule
from ease.models import EarlyExitDecoder
from ease.training import distributed as dist_utils
from ease.training import early_stopping, loop, loss, optim
from ease.training.checkpoint import TrainingProgress, data_generators
from ease.training.checkpoint import load_checkpoint as _load_checkpoint
from ease.training.checkpoint import save_checkpoint as _save_checkpoint
from ease.training.curriculum import ExitCurriculum
from ease.training.early_stopping import EarlyStoppingResult
from ease.training.layer_dropout import LayerDropout
from ease.training.metrics import MetricsLog, discard_after
from ease.training.schedule import LRSchedule
from ease.validation import check_int

__all__ = ["EarlyStoppingResult", "Trainer"]


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

    The trainer is a thin front over small parts, each usable alone:
    :mod:`ease.training.loss` (the objective), :mod:`ease.training.optim` (parameter
    groups), :mod:`ease.training.loop` (one epoch), :mod:`ease.evaluation`,
    :mod:`ease.training.early_stopping`, :mod:`ease.training.checkpoint` and
    :mod:`ease.training.distributed`. It keeps no reference to the models it trains: the
    model and optimiser that :meth:`save_checkpoint` defaults to are held weakly.

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
        self.config = config
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        set_seed(config.seed)
        # Joins the process group of a torchrun launch; a context of one process otherwise.
        self.distributed = dist_utils.setup_distributed(config.distributed)
        self.progress = TrainingProgress()
        # The model and optimiser last trained, what save_checkpoint(path) saves: weak
        # references, so that the trainer never keeps a model alive.
        self._last: tuple[weakref.ref, weakref.ref | None] | None = None
        self._generators: list[torch.Generator] = []
        self._compiled_loss = None
        self._metrics: MetricsLog | None = None
        self._tokens_seen = 0
        # The steps of the whole run, for a decaying schedule and the gradual curriculum:
        # set by train_with_early_stopping; config.max_steps otherwise.
        self.horizon: int | None = None

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 (and on one process): the rank that prints and writes files."""
        return self.distributed.is_main

    # -- the parts every method needs ----------------------------------------------------------
    def _prepare(self, model: EarlyExitDecoder) -> tuple[dict[int, float], dist_utils.WrappedModel]:
        """Check ``model`` against the trainer and config; its layer weights and how it runs."""
        weights = loss.layer_weights(model, self.config, self.vocab_size)
        deepest = max(loss.supervised_layers(weights))
        # Blocks above the deepest weighted layer never run in training: DDP must be told.
        wrapped = dist_utils.wrapped_model(model, self.distributed, find_unused_parameters=deepest < model.num_layers)
        return weights, wrapped

    def _remember(self, model: EarlyExitDecoder, optimizer: torch.optim.Optimizer | None) -> None:
        self._last = (weakref.ref(model), None if optimizer is None else weakref.ref(optimizer))

    def _check_optimizer(self, model: EarlyExitDecoder, optimizer: torch.optim.Optimizer) -> None:
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
    def compute_loss(
        self, model: EarlyExitDecoder, inputs: torch.Tensor, targets: torch.Tensor
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
        weights, wrapped = self._prepare(model)
        inputs, targets = split_batch((inputs, targets))  # types and shapes, named in errors
        loss.check_targets(targets, self.vocab_size)
        device = model.device
        # Under torchrun, through the DDP/FSDP2 wrapper: FSDP2's shards are gathered and a
        # backward of this loss reduces gradients over ranks (this rank's rows only).
        value, per_layer, _ = wrapped.run(
            loss.weighted_loss,
            inputs.to(device),
            targets.to(device, dtype=torch.long),
            weights,
            loss.uses_fused_loss(model, self.config),
        )
        return value, per_layer

    # -- optimiser ------------------------------------------------------------------------
    def create_optimizer(self, model: EarlyExitDecoder, base_lr: float) -> torch.optim.AdamW:
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
        optim.check_base_lr(base_lr)
        self._prepare(model)  # under torchrun the groups must hold the wrapped (sharded) parameters
        return optim.create_optimizer(model, self.config, base_lr)

    # -- training -------------------------------------------------------------------------
    def train_epoch(
        self,
        model: EarlyExitDecoder,
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
        verbose = self.config.verbose if verbose is None else verbose
        runner = self.step_runner(model, optimizer)  # checks the model and wraps it first
        self._check_optimizer(model, optimizer)
        self._remember(model, optimizer)
        mean, _, _ = loop.train_epoch(
            runner, train_batches, show_progress=verbose and self.distributed.is_main,
            first_step=self.progress.step, on_step=self.count_step,
        )  # fmt: skip
        return mean

    # -- the parts of a step ------------------------------------------------------------------
    def step_runner(self, model: EarlyExitDecoder, optimizer: torch.optim.Optimizer) -> loop.StepRunner:
        """The recipe of one optimiser step for ``model``: schedule, layer dropout, curriculum, loss.

        The schedule's and the gradual curriculum's horizon is ``config.max_steps``, or
        the run's ``max_epochs * len(train_batches)`` inside
        :meth:`train_with_early_stopping`.

        Raises:
            ValueError: a decaying schedule or a gradual curriculum without a known number
                of steps; a curriculum while the last layer has weight 0.
        """
        weights, wrapped = self._prepare(model)
        config = self.config
        config.check_recipe_for(model)
        horizon = self.horizon if self.horizon is not None else config.max_steps
        if config.compile and self._compiled_loss is None:
            self._compiled_loss = torch.compile(loss.weighted_loss)
        return loop.StepRunner(
            model=model,
            wrapped=wrapped,
            optimizer=optimizer,
            weights=weights,
            config=config,
            context=self.distributed,
            vocab_size=self.vocab_size,
            schedule=LRSchedule(config.lr_schedule, config.warmup_steps, horizon, config.min_lr_ratio),
            dropout=LayerDropout(model.num_layers, config.layer_dropout, config.layer_dropout_shape, config.seed),
            curriculum=ExitCurriculum(config.exit_curriculum, model.num_layers, config.curriculum_period, horizon),
            loss_fn=self._compiled_loss if config.compile else loss.weighted_loss,
        )

    def count_step(self, figures: loop.StepFigures) -> None:
        """Account for one optimiser step: :attr:`progress`, and the metrics log when configured."""
        self.progress.step += 1
        self._tokens_seen += figures.tokens
        if self.progress.position is not None:  # what a checkpoint of a step-counted run stores
            self.progress.position["tokens"] = self._tokens_seen
        if self.config.log_dir is not None:
            self.metrics.step(
                self.progress.step, self._tokens_seen, figures.tokens, figures.lr, figures.loss_sum,
                figures.layer_ce_sums, figures.layer_correct, figures.grad_norm,
            )  # fmt: skip

    @property
    def metrics(self) -> MetricsLog:
        """The metrics log of ``config.log_dir`` (opened on first use; rank 0 writes)."""
        if self._metrics is None:
            self._metrics = MetricsLog(self.config.log_dir, self.config.log_every, enabled=self.distributed.is_main)
        return self._metrics

    @property
    def data_generators(self) -> list[torch.Generator]:
        """The ``torch.Generator`` objects of the training ``DataLoader`` of the current run."""
        return self._generators

    @property
    def tokens_seen(self) -> int:
        """Target tokens trained on by this trainer (since the start of the run, after a resume)."""
        return self._tokens_seen

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(
        self,
        model: EarlyExitDecoder,
        val_batches: Iterable[Batch],
        routing_threshold: float | None = None,
        min_exit_layer: int | None = None,
        exit_criterion: str | None = None,
    ) -> dict[str, Any]:
        """Loss, perplexity, accuracy and early-exit statistics on ``val_batches``.

        Runs in eval mode without gradients (the model's previous mode is restored).
        Every statistic is token-weighted over all batches: sums over non-ignored
        targets, divided once at the end.

        Early exit: a token exits at the first layer ``l >= min_exit_layer`` whose exit
        score (``exit_criterion``; the top-1 softmax probability by default, read by
        ``ease_kernels.exit_confidence``) reaches the threshold; the last layer answers
        every token left (:class:`ease.exits.ExitRule`). The
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
            exit_criterion: the exit score (:data:`ease.exits.EXIT_CRITERIA`); default
                ``config.exit_criterion``.

        Returns:
            ``{"loss", "ppl", "accuracy", "objective", "tokens"}``: the final layer's mean
            cross-entropy, ``exp(loss)``, top-1 next-token accuracy; the weighted training
            objective ``sum_l w_l * CE_l`` on this data (what early stopping monitors); the
            count of non-ignored targets. A model supporting early exit adds ``"layers"``:
            ``{l: {"loss", "ppl", "accuracy"}}`` for every layer ``1..num_layers``; with a
            threshold it adds ``"early_exit"``: ``{"threshold", "min_exit_layer",
            "criterion", "accuracy", "agreement", "exit_fractions": {l: fraction}`` (every
            layer, summing to 1) ``, "mean_exit_layer", "compute_saved",
            "check_cost"}``: ``agreement`` is the fraction of tokens whose early-exit
            prediction equals the last layer's; ``check_cost`` the mean cost of the exit
            checks per token in units of one block (the exit head's projection for the
            logit criteria, the classifier for ``"classifier"``), which ``compute_saved``
            leaves out.

        Raises:
            ValueError: ``val_batches`` yields no batch or no target token; a threshold
                outside (0, 1]; ``min_exit_layer`` outside ``1..num_layers``; bad targets.
        """
        weights, wrapped = self._prepare(model)
        rule = ExitRule.for_model(
            model,
            self.config.routing_threshold if routing_threshold is None else routing_threshold,
            self.config.min_exit_layer if min_exit_layer is None else min_exit_layer,
            self.config.exit_criterion if exit_criterion is None else exit_criterion,
        )
        return evaluation.evaluate(model, wrapped, val_batches, weights, rule, self.distributed, self.vocab_size)

    # -- early stopping -------------------------------------------------------------------
    def train_with_early_stopping(
        self,
        model: EarlyExitDecoder,
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
        return early_stopping.train_with_early_stopping(
            self, model, train_batches, val_batches, optimizer, max_epochs, patience, verbose, min_delta, resume_from
        )

    def begin_run(
        self,
        model: EarlyExitDecoder,
        optimizer: torch.optim.Optimizer | None,
        train_batches: Iterable[Batch] | None = None,
    ) -> TrainingProgress:
        """Start a fresh run: :attr:`progress` reset, ``model`` and ``optimizer`` remembered.

        :meth:`train_with_early_stopping` calls it when it does not resume; the RNG
        generators of ``train_batches``' ``DataLoader`` (if any) are what checkpoints save.
        """
        self._prepare(model)
        self._remember(model, optimizer)
        self._generators = data_generators(train_batches) if train_batches is not None else []
        self.progress = TrainingProgress()
        self._tokens_seen = 0
        if self.config.uses_step_budget or self.config.log_dir is not None:
            self.progress.position = {
                "tokens": 0, "batch_in_epoch": 0, "evaluations": 0, "best_step": 0, "epoch_generators": [],
            }  # fmt: skip
        return self.progress

    # -- checkpoints ----------------------------------------------------------------------
    def _model_and_optimizer(
        self, model: EarlyExitDecoder | None, optimizer: torch.optim.Optimizer | None
    ) -> tuple[EarlyExitDecoder, torch.optim.Optimizer | None]:
        last_model = self._last[0]() if self._last is not None else None
        last_optimizer = self._last[1]() if self._last is not None and self._last[1] is not None else None
        if model is None:
            if last_model is None:
                raise ValueError("no model to checkpoint: pass model= (and optimizer=), or train one first")
            return last_model, last_optimizer
        if optimizer is None and last_model is model:
            optimizer = last_optimizer
        return model, optimizer

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        model: EarlyExitDecoder | None = None,
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
        return self.write_checkpoint(path, model, optimizer)

    def write_checkpoint(
        self,
        path: str | os.PathLike,
        model: EarlyExitDecoder,
        optimizer: torch.optim.Optimizer | None,
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """:meth:`save_checkpoint` of an explicit model and optimiser.

        Args:
            path, model, optimizer: as for :meth:`save_checkpoint`, without defaults.
            model_state: the model's full state dict when the caller holds it already
                (early stopping after an improving epoch), so it is not gathered again.
        """
        self._prepare(model)
        return _save_checkpoint(
            path, model, optimizer, self.progress, context=self.distributed, generators=self._generators,
            model_state=model_state,
        )  # fmt: skip

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        model: EarlyExitDecoder | None = None,
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
        self._prepare(model)
        self._remember(model, optimizer)
        if train_batches is not None:
            self._generators = data_generators(train_batches)
        chosen = optim.hyperparameters(optimizer) if optimizer is not None else None
        self.progress = _load_checkpoint(
            path, model, optimizer, context=self.distributed, generators=self._generators, restore_rng=restore_rng
        )
        self._tokens_seen = self.progress.position["tokens"] if self.progress.position else 0
        if self.config.log_dir is not None and self.distributed.is_main:
            # The steps after the checkpoint are trained, and logged, again.
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            discard_after(self.config.log_dir, self.progress.step)
        if chosen is not None:
            # The optimiser's state dict carries the checkpoint's learning rates; the
            # optimiser given was built with this run's base_lr and layer_lr_scales.
            changed = optim.restore_hyperparameters(optimizer, chosen)
            if changed and self.distributed.is_main:
                warnings.warn(
                    f"resumed from {path} with other optimiser settings than it was saved with; "
                    f"using this run's: {'; '.join(changed)}",
                    stacklevel=2,
                )
        return self.progress

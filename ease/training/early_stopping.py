"""Early stopping: train epoch by epoch until the validation objective stops improving.

The monitored figure is ``evaluate()["objective"]``, the weighted training loss
``sum_l w_l * CE_l`` on validation data (the SPEC's "validation loss"; for a model trained
on its final layer only it is that layer's loss). ``patience`` epochs in a row without
improvement stop the run, and the best epoch's weights are restored at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ease.config import TrainingConfig
from ease.data import IGNORE_INDEX, Batch, split_batch
from ease.models import EarlyExitDecoder
from ease.training import distributed as dist_utils
from ease.training import loop
from ease.training.checkpoint import CHECKPOINT_NAME, TrainingProgress, latest_checkpoint
from ease.training.distributed import DistributedContext
from ease.validation import check_int, check_real

if TYPE_CHECKING:
    from ease.training.trainer import Trainer


@dataclass
class EarlyStoppingResult:
    """What :meth:`~ease.Trainer.train_with_early_stopping` did.

    Attributes:
        best_epoch: the epoch (1-based) whose weights the model holds at the end.
        best_val_loss: the monitored validation figure of that epoch: the objective
            ``evaluate()["objective"]`` (the weighted loss ``sum_l w_l * CE_l``), not the
            final layer's ``evaluate()["loss"]``; also readable as
            :attr:`best_val_objective`.
        epochs_run: epochs trained.
        stopped_early: True when training stopped before ``max_epochs`` because the
            validation objective failed to improve for ``patience`` epochs in a row.
        history: one dict per epoch: ``epoch`` (1-based), ``train_loss`` (token-weighted
            mean training loss), ``val_loss`` (the monitored validation objective),
            ``val`` (the full :meth:`~ease.Trainer.evaluate` dict) and ``seconds`` (wall
            time of training plus evaluation). A run counted in steps has one dict per
            evaluation, with ``step`` and ``tokens`` too.
        best_step: a run counted in steps (``max_steps``, ``max_tokens`` or
            ``eval_every``): the optimiser step whose weights the model holds; else None.
        steps_run: a run counted in steps: optimiser steps taken; else None.
    """

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    steps_run: int | None = None

    @property
    def best_val_objective(self) -> float:
        """:attr:`best_val_loss` under the name of what it is: the weighted validation objective."""
        return self.best_val_loss

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict copy for ``json.dumps`` (integer layer keys become strings there)."""
        return dataclasses.asdict(self)


def check_writable_directory(name: str, directory: Path) -> None:
    """Create ``directory`` and write a probe file in it, before any training is spent.

    Raises:
        OSError: naming the argument and the folder, when it cannot be created or written.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ease-write-check-"):
            pass
    except OSError as error:
        raise type(error)(
            error.errno, f"{name}={str(directory)!r} cannot be written ({error.strerror or error}); "
            "fix it before training: checkpoints go there after every epoch",
        ) from error


def keep_if_best(
    progress: TrainingProgress,
    model: EarlyExitDecoder,
    context: DistributedContext,
    val_loss: float,
    epoch: int,
    min_delta: float,
) -> bool:
    """Count one evaluation: keep the model's state when ``val_loss`` improves on the best.

    An improvement is ``val_loss < best - min_delta``; it resets the count of evaluations
    without improvement, which otherwise grows by one. Returns whether it improved.
    """
    improved = val_loss < progress.best_val_loss - min_delta
    if improved:
        progress.best_val_loss, progress.best_epoch = val_loss, epoch
        # A CPU copy (rank 0 only under torchrun): the live tensors keep changing, and the
        # copy must not hold GPU memory.
        progress.best_state = dist_utils.full_model_state_dict(model, context) or None
        progress.epochs_without_improvement = 0
    else:
        progress.epochs_without_improvement += 1
    return improved


def evaluate_and_keep(
    trainer: Trainer,
    model: EarlyExitDecoder,
    val_batches: Iterable[Batch],
    epoch: int,
    train_loss: float,
    start: float,
    min_delta: float,
    where: str,
    **extra: Any,
) -> tuple[dict[str, Any], bool]:
    """Evaluate, log, append to the history and keep the best state: one evaluation of a run.

    Args:
        epoch: the epoch the evaluation falls in (1-based).
        train_loss: the training loss since the previous evaluation.
        start: when that training began (``time.perf_counter()``): the entry's ``seconds``
            are training plus evaluation.
        where: how the non-finite error names the moment (``"after epoch 3"``).
        **extra: more history fields (``step``, ``tokens`` of a run counted in steps).

    Returns:
        ``(figures, improved)``: :meth:`~ease.Trainer.evaluate`'s dict and whether it
        improved on the best (see :func:`keep_if_best`).

    Raises:
        FloatingPointError: a non-finite validation objective.
    """
    progress = trainer.progress
    val = trainer.evaluate(model, val_batches)
    seconds = time.perf_counter() - start
    if trainer.config.log_dir is not None:
        trainer.metrics.evaluation(progress.step, trainer.tokens_seen, val)
    val_loss = val["objective"]
    if not math.isfinite(val_loss):
        raise FloatingPointError(f"non-finite validation objective {val_loss} {where}")
    progress.history.append(
        {"epoch": epoch, **extra, "train_loss": train_loss, "val_loss": val_loss, "val": val, "seconds": seconds}
    )
    return val, keep_if_best(progress, model, trainer.distributed, val_loss, epoch, min_delta)


def _failure(error: FloatingPointError, epoch: int, checkpoint_path: Path | None, last_good: str | None) -> FloatingPointError:
    """The error of a failed epoch, saying which checkpoint was left as it was (``last_good``)."""
    kept = f"; the last good checkpoint, {checkpoint_path} ({last_good}), is left as it was" if checkpoint_path and last_good else ""
    return FloatingPointError(f"epoch {epoch}: {error}{kept}")


def planned_steps(config: TrainingConfig, train_batches: Iterable[Batch], max_epochs: int) -> int | None:
    """The optimiser steps a run plans: what a decaying schedule and the gradual curriculum span.

    ``max_steps`` when set; else, under a token budget, the steps that budget takes at the
    first batch's token count (batches given as a list or tuple: a ``DataLoader`` is never
    drawn from here, which would load a batch and move its shuffling generator); capped
    by (or else) ``max_epochs * len(train_batches)``; None when neither is known.
    """
    if config.max_steps is not None:
        return config.max_steps
    by_epochs = max_epochs * len(train_batches) if hasattr(train_batches, "__len__") else None
    if config.max_tokens is not None and isinstance(train_batches, (list, tuple)):
        first = train_batches[0] if train_batches else None
        if first is not None:
            _, targets = split_batch(first)
            per_step = max(int((targets != IGNORE_INDEX).sum()), 1)
            by_tokens = -(-config.max_tokens // per_step)  # ceiling: the step that reaches the budget
            return by_tokens if by_epochs is None else min(by_tokens, by_epochs)
    return by_epochs


def train_with_early_stopping(
    trainer: Trainer,
    model: EarlyExitDecoder,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    patience: int,
    verbose: bool,
    min_delta: float,
    resume_from: str | os.PathLike | None,
) -> EarlyStoppingResult:
    """The loop of :meth:`ease.Trainer.train_with_early_stopping` (which documents it)."""
    check_int("max_epochs", max_epochs, 1)
    check_int("patience", patience, 1)
    check_real("min_delta", min_delta, 0.0)
    context = trainer.distributed
    config = trainer.config
    checkpoint_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir is not None else None
    if checkpoint_path is not None and context.is_main:
        check_writable_directory("checkpoint_dir", checkpoint_path.parent)
    if resume_from is None and config.resume:
        # Rank 0 looks, so that every rank decides alike even without a shared file system.
        found = latest_checkpoint(config.checkpoint_dir) if context.is_main else None
        resume_from = dist_utils.broadcast_object(found, context)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from, model, optimizer, train_batches=train_batches)
    else:
        trainer.begin_run(model, optimizer, train_batches)
    progress = trainer.progress
    verbose_here = verbose and context.is_main
    if verbose_here and resume_from is not None:
        tqdm.write(f"resumed from {resume_from} after epoch {progress.epoch} (step {progress.step})")
    trainer.horizon = planned_steps(config, train_batches, max_epochs)
    if config.uses_step_budget:
        return _train_by_steps(
            trainer, model, train_batches, val_batches, optimizer, max_epochs, patience, verbose, min_delta,
            checkpoint_path,
        )  # fmt: skip

    finished = progress.epochs_without_improvement >= patience
    for epoch in range(progress.epoch + 1, max_epochs + 1):
        if finished:
            break
        dist_utils.set_sampler_epoch(train_batches, epoch)
        start = time.perf_counter()
        try:
            train_loss = trainer.train_epoch(model, train_batches, optimizer, verbose=verbose)
        except FloatingPointError as error:
            raise _failure(error, epoch, checkpoint_path, f"epoch {progress.epoch}" if progress.epoch else None) from error
        val, improved = evaluate_and_keep(
            trainer, model, val_batches, epoch, train_loss, start, min_delta, where=f"after epoch {epoch}"
        )
        val_loss, seconds = val["objective"], progress.history[-1]["seconds"]
        progress.epoch = epoch
        if checkpoint_path is not None:
            # After an improving epoch the best state is the model's state, gathered
            # just above: the checkpoint takes it rather than gathering it again.
            trainer.write_checkpoint(
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


def _train_by_steps(
    trainer: Trainer,
    model: EarlyExitDecoder,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    patience: int,
    verbose: bool,
    min_delta: float,
    checkpoint_path: Path | None,
) -> EarlyStoppingResult:
    """Early stopping counted in evaluations: every ``eval_every`` steps, until a budget is spent.

    Training stops at the first of: ``max_steps`` optimiser steps, ``max_tokens`` target
    tokens, ``patience`` evaluations in a row without improvement, or ``max_epochs``
    passes over the data. Without ``eval_every`` it evaluates at the end of every epoch
    and when a budget is spent. A checkpoint follows every evaluation, with the position
    in the epoch, so a resume continues from the next batch.
    """
    config, context, progress = trainer.config, trainer.distributed, trainer.progress
    position = progress.position
    verbose_here = verbose and context.is_main
    runner = trainer.step_runner(model, optimizer)
    generators = trainer.data_generators

    def spent() -> bool:
        return (config.max_steps is not None and progress.step >= config.max_steps) or (
            config.max_tokens is not None and position["tokens"] >= config.max_tokens
        )

    def evaluate(epoch: int) -> bool:
        """Evaluate the training since the last evaluation, keep the best state, checkpoint;
        True when patience ran out or a budget is spent."""
        train_loss = window["loss"] / max(window["tokens"], 1)
        val, improved = evaluate_and_keep(
            trainer, model, val_batches, epoch, train_loss, window["start"], min_delta,
            where=f"at step {progress.step}", step=progress.step, tokens=trainer.tokens_seen,
        )  # fmt: skip
        window.update(loss=0.0, tokens=0, start=time.perf_counter())
        val_loss, seconds = val["objective"], progress.history[-1]["seconds"]
        position["evaluations"] += 1
        if improved:
            position["best_step"] = progress.step
        if checkpoint_path is not None:
            position["checkpoint_step"] = progress.step
            trainer.write_checkpoint(
                checkpoint_path, model, optimizer, model_state=(progress.best_state or {}) if improved else None
            )
        if verbose_here:
            tqdm.write(
                f"step {progress.step:6d} | train {train_loss:.4f} | val objective {val_loss:.4f} | "
                f"val loss {val['loss']:.4f} | acc {val['accuracy']:.3f} | {seconds:.1f}s{' *' if improved else ''}"
            )
        return progress.epochs_without_improvement >= patience or spent()

    finished = progress.epochs_without_improvement >= patience or spent()
    window = {"loss": 0.0, "tokens": 0, "start": time.perf_counter()}
    while not finished and progress.epoch < max_epochs:
        epoch = progress.epoch + 1
        skip = position["batch_in_epoch"]
        if skip and position["epoch_generators"]:
            # The epoch's order comes from the generators' states at its start.
            for generator, state in zip(generators, position["epoch_generators"]):
                generator.set_state(state)
        else:
            position["epoch_generators"] = [generator.get_state() for generator in generators]
        dist_utils.set_sampler_epoch(train_batches, epoch)

        def on_step(figures, epoch=epoch) -> bool:
            nonlocal finished
            trainer.count_step(figures)
            position["batch_in_epoch"] += 1
            window["loss"] += figures.loss_sum
            window["tokens"] += figures.tokens
            due = config.eval_every is not None and progress.step % config.eval_every == 0
            if due or spent():
                finished = evaluate(epoch)
            return finished

        try:
            _, _, stopped = loop.train_epoch(
                runner, train_batches, show_progress=verbose_here, first_step=progress.step, on_step=on_step,
                skip=skip,
            )  # fmt: skip
        except FloatingPointError as error:
            last_good = f"step {position['checkpoint_step']}" if "checkpoint_step" in position else None
            raise _failure(error, epoch, checkpoint_path, last_good) from error
        if not stopped:
            progress.epoch = epoch
            position["batch_in_epoch"] = 0
            if config.eval_every is None and window["tokens"]:
                finished = evaluate(epoch)

    if progress.best_epoch > 0:
        dist_utils.load_full_model_state_dict(model, progress.best_state or {}, context)
    if verbose_here:
        tqdm.write(
            f"stopped at step {progress.step} after {position['evaluations']} evaluations; restored step "
            f"{position['best_step']} (val objective {progress.best_val_loss:.4f})"
        )
    budget_left = not spent() and progress.epoch < max_epochs
    return EarlyStoppingResult(
        best_epoch=progress.best_epoch,
        best_val_loss=progress.best_val_loss,
        epochs_run=progress.epoch + (1 if position["batch_in_epoch"] else 0),
        stopped_early=budget_left,
        history=list(progress.history),
        best_step=position["best_step"],
        steps_run=progress.step,
    )

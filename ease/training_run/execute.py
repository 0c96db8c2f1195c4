"""Train a :class:`~ease.training_run.spec.RunSpec` and write its output folder: model, tokenizer, metrics, checkpoints, summary, plots."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from ease.training_run.plots import plot_accuracy_per_layer, plot_loss_per_layer
from ease.training_run.spec import (
    ACCURACY_PLOT,
    CHECKPOINT_DIR,
    LOSS_PLOT,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    ConfigError,
    RunSpec,
    dotted_error,
)


def default_threads() -> int | None:
    """1 on a machine with at most 4 cores, else None (torch's own default)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 1 if cores <= 4 else None


def _device(spec: RunSpec, world_size: int):
    """The device the model trains on; under torchrun the trainer places it (None here)."""
    import torch

    if world_size > 1:
        return None
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def _load_data(spec: RunSpec):
    """:func:`ease.data.load_data` of the spec; its errors become ConfigErrors naming ``data``."""
    from ease.data import load_data

    kwargs = dict(spec.data_kwargs)
    path = kwargs.pop("path")
    try:
        return load_data(path, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"data: {error}") from None


def _clear_previous_run(out: Path) -> None:
    """``output.overwrite``: remove the files a previous run left (only those this command writes)."""
    import shutil

    for name in (METRICS_FILE, SUMMARY_FILE, LOSS_PLOT, ACCURACY_PLOT, f"{CHECKPOINT_DIR}/last.pt"):
        (out / name).unlink(missing_ok=True)
    if (out / MODEL_DIR).is_dir():
        shutil.rmtree(out / MODEL_DIR)


def _save_model(model, tokenizer, directory: Path) -> Path:
    """``save_pretrained`` into ``directory`` and ``tokenizer.json`` beside it, each atomically."""
    from ease._io import atomic_path

    model.save_pretrained(directory)
    with atomic_path(directory / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    return directory


def _finite_json(value: Any) -> Any:
    """``value`` ready for strict JSON: string keys, lists for tuples, None for NaN and infinity."""
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the packages a run depends on."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("ease", "torch", "numpy", "tokenizers", "triton", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _data_sizes(data) -> dict[str, Any]:
    """Token, batch and file counts of a :class:`~ease.data.DataBundle`."""
    return {
        "vocab_size": data.vocab_size,
        "train_tokens": data.train_tokens,
        "val_tokens": data.val_tokens,
        "train_batches": len(data.train_batches),
        "val_batches": len(data.val_batches),
        "train_files": len(data.train_files),
        "val_files": len(data.val_files),
    }


def _model_to_save(model, context, spec: RunSpec, vocab_size: int):
    """The model rank 0 saves: itself, or a CPU copy gathered from FSDP2 shards (every rank calls)."""
    from ease.training import distributed as dist_utils

    if context.mode != "fsdp":
        return model
    state = dist_utils.full_model_state_dict(model, context)
    if not context.is_main:
        return None
    copy = spec.build_model(vocab_size)
    copy.load_state_dict(state)
    return copy


def _final_figures(trainer, model, val_batches, result) -> dict[str, Any]:
    """``evaluate()`` of the restored (best) weights: the figures measured when they were best.

    The model holds the weights of the best evaluation, so that evaluation's figures are
    what evaluating again would give, without another pass over the validation data;
    only when the history has no such entry is the model evaluated again.
    """
    for entry in result.history:
        best = entry.get("step") == result.best_step if result.best_step is not None else None
        if best or (best is None and entry["epoch"] == result.best_epoch):
            return entry["val"]
    return trainer.evaluate(model, val_batches)


def _note_epoch_cap(spec: RunSpec, max_epochs: int, train_batches: int) -> None:
    """Print a note when ``training.max_epochs`` ends the run before ``training.max_steps``."""
    steps = max_epochs * train_batches
    if spec.config.max_steps is not None and steps < spec.config.max_steps:
        print(
            f"note: training.max_epochs={max_epochs} ends the run after {steps} steps ({train_batches} per epoch), "
            f"before training.max_steps={spec.config.max_steps}; leave max_epochs out to follow max_steps"
        )


def run(spec: RunSpec, verbose: bool = True) -> dict[str, Any]:
    """Train the spec's model with early stopping and write the output folder; the summary.

    Under torchrun every rank trains and evaluates; rank 0 alone writes (the metrics log,
    checkpoints, model, summary and plots).

    Returns:
        The ``summary.json`` dict (on every rank; only rank 0 writes it).

    Raises:
        ConfigError: ``training.distributed`` asks for a torchrun launch outside one, or the
            data cannot be loaded (no file is written then).
    """
    import torch

    from ease.data import unigram_baseline
    from ease.training import Trainer
    from ease.training.distributed import setup_distributed

    start = time.perf_counter()
    try:
        context = setup_distributed(spec.config.distributed)
    except ValueError as error:  # "ddp" or "fsdp" outside a torchrun launch
        raise dotted_error(error, {"distributed": "training"}, "training") from None
    data = _load_data(spec)
    writer = context.is_main
    if writer:
        if spec.overwrite:
            _clear_previous_run(spec.out)
        spec.out.mkdir(parents=True, exist_ok=True)
    # The trainer seeds every RNG: built before the model, so the initialisation follows the seed.
    trainer = Trainer(spec.config, vocab_size=data.vocab_size)
    model = spec.build_model(data.vocab_size)
    device = _device(spec, context.world_size)
    if device is not None:
        model = model.to(device)
    optimizer = trainer.create_optimizer(model, base_lr=spec.base_lr)
    tokens_per_step = spec.data_kwargs["batch_size"] * spec.data_kwargs["seq_len"]
    max_epochs = spec.epochs_for(len(data.train_batches), tokens_per_step)
    if verbose and writer:
        _note_epoch_cap(spec, max_epochs, len(data.train_batches))
    train_start = time.perf_counter()
    try:
        result = trainer.train_with_early_stopping(
            model=model, train_batches=data.train_batches, val_batches=data.val_batches, optimizer=optimizer,
            max_epochs=max_epochs, patience=spec.patience, verbose=verbose, min_delta=spec.min_delta,
        )  # fmt: skip
    finally:
        trainer.metrics.close()
    train_seconds = time.perf_counter() - train_start
    final = _final_figures(trainer, model, data.val_batches, result)
    saved = _model_to_save(model, context, spec, data.vocab_size)
    summary = {
        "config_file": spec.config_file,
        "overrides": spec.overrides,
        "config": spec.tables | {"training": spec.tables["training"] | {"max_epochs": max_epochs}},
        "model": {"class": spec.model_class, "parameters": sum(p.numel() for p in model.parameters()),
                  "config": dataclasses.asdict(model.config)},
        "data": _data_sizes(data),
        "unigram_baseline": unigram_baseline(data.train_ids, data.val_ids, data.vocab_size),
        "early_stopping": result.as_dict(),
        "evaluation": final,
        "train_seconds": train_seconds,
        "wall_seconds": None,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "world_size": context.world_size,
        "versions": _versions(),
    }  # fmt: skip
    if writer:
        _write_outputs(spec.out, saved, data.tokenizer, summary, start, verbose)
    summary["wall_seconds"] = time.perf_counter() - start
    return _finite_json(summary)


def _write_outputs(out: Path, model, tokenizer, summary: dict[str, Any], start: float, verbose: bool) -> None:
    """Rank 0: the model and tokenizer, the plots, then ``summary.json`` (last, with the wall time)."""
    from ease._io import atomic_write_text

    _save_model(model, tokenizer, out / MODEL_DIR)
    plots = plot_loss_per_layer(out / METRICS_FILE, out / LOSS_PLOT) is not None
    plots = plot_accuracy_per_layer(summary["evaluation"], out / ACCURACY_PLOT) is not None and plots
    if not plots and verbose:
        print("matplotlib is not installed: skipping the plots (pip install 'ease[plots]')")
    summary["wall_seconds"] = time.perf_counter() - start
    atomic_write_text(out / SUMMARY_FILE, json.dumps(_finite_json(summary), indent=2, allow_nan=False))


# -------------------------------------------------------------------------------- plots

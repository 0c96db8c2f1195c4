"""``python -m ease.experiments --suite depth``: which recipe gives the best quality at a
given depth, and how much real generation speed does it buy?

Five recipes (:mod:`ease.depth_suite.recipes`) train the same 12-layer model on the
standard-library corpus, one token budget and one seed; each trained model is then
measured (:mod:`ease.depth_suite.measure`) and the folder gets ``results.json``,
``results.md`` and the figures (:mod:`ease.depth_suite.report`). A model trained with the
same settings is loaded from the folder instead of retrained (``--retrain`` to force), so
the measurements can be rerun alone.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ease._io import atomic_write_text, jsonable
from ease.data import DataBundle, load_data, set_seed
from ease.depth_suite.measure import criterion_sweeps, generation_settings, generation_speed, layer_quality, train_classifier
from ease.depth_suite.recipes import GPU_PRESET, RECIPES, DepthSuiteSettings, Recipe, build_recipes, check_suite_settings
from ease.depth_suite.report import plot_suite, suite_table
from ease.models import load_model
from ease.training import Trainer

__all__ = ["GPU_PRESET", "RECIPES", "DepthSuiteSettings", "run_depth_suite"]

# The settings that decide a trained model: a saved model is reused only when they match.
_TRAINING_KEYS = ("corpus", "vocab_size", "dim", "num_layers", "num_heads", "seq_len", "batch_size", "lr",
                  "max_steps", "warmup_steps", "eval_every", "eval_batches", "min_exit_layer", "seed")


def _training_signature(settings: DepthSuiteSettings, recipe: Recipe) -> dict[str, Any]:
    return {"settings": {k: getattr(settings, k) for k in _TRAINING_KEYS}, "recipe": recipe.describe()}


def _log(settings: DepthSuiteSettings, message: str) -> None:
    if settings.verbose:
        print(message, flush=True)


def train_recipe(
    recipe: Recipe, settings: DepthSuiteSettings, data: DataBundle, folder: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``recipe`` (or load it from ``folder`` when trained with the same settings); the
    model, in eval mode on the suite's device, and its training record."""
    record_path = folder / "training.json"
    signature = _training_signature(settings, recipe)
    if not settings.retrain and record_path.is_file() and (folder / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("signature") == jsonable(signature):
            _log(settings, f"{recipe.name}: loaded from {folder} (trained with these settings)")
            return load_model(folder).to(settings.device).eval(), record
    set_seed(settings.seed)
    model = recipe.model_class(
        data.vocab_size, settings.dim, settings.num_layers, num_heads=settings.num_heads, max_seq_len=1024
    ).to(settings.device)
    trainer = Trainer(recipe.config, vocab_size=data.vocab_size)
    optimizer = trainer.create_optimizer(model, base_lr=settings.lr)
    start = time.perf_counter()
    stopping = trainer.train_with_early_stopping(
        model=model, train_batches=data.train_batches, val_batches=data.val_batches[: settings.eval_batches],
        optimizer=optimizer, max_epochs=100, patience=100, verbose=settings.verbose,
    )
    record = {
        "signature": jsonable(signature),
        "train_seconds": time.perf_counter() - start,
        "steps": stopping.steps_run,
        "tokens": stopping.steps_run * settings.batch_size * settings.seq_len if stopping.steps_run else None,
        "best_step": stopping.best_step,
        "history": jsonable(stopping.history),
    }
    model.save_pretrained(folder, tokenizer=data.tokenizer)
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return model.eval(), record


def _prompts(data: DataBundle, settings: DepthSuiteSettings) -> list[list[int]]:
    """``settings.prompts`` windows of ``prompt_len`` tokens spread evenly over the held-out text."""
    val = data.val_ids.tolist()
    stride = (len(val) - settings.prompt_len) // settings.prompts
    return [val[i * stride : i * stride + settings.prompt_len] for i in range(settings.prompts)]


def measure_recipe(model, settings: DepthSuiteSettings, data: DataBundle) -> dict[str, Any]:
    """Every figure of one trained model (see :mod:`ease.depth_suite.measure`)."""
    n = settings.eval_batches
    calibration_batches, check_batches = data.val_batches[:n], data.val_batches[n : 2 * n]
    started = time.perf_counter()
    layers = layer_quality(model, check_batches)
    classifier = train_classifier(model, data.train_batches[-settings.classifier_batches :])
    sweeps = criterion_sweeps(model, calibration_batches, check_batches, settings.targets, settings.confidence,
                              settings.min_exit_layer)
    timed = generation_speed(
        model, _prompts(data, settings),
        generation_settings(sweeps, settings.targets, settings.min_exit_layer, settings.draft_tokens),
        settings.batch_sizes, settings.new_tokens, settings.repeats,
    )
    return {"layers": layers, "classifier": classifier, "criteria": sweeps, "generation": timed,
            "measure_seconds": time.perf_counter() - started}


def _environment(settings: DepthSuiteSettings) -> dict[str, Any]:
    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": settings.device,
    }
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_depth_suite(settings: DepthSuiteSettings, data: DataBundle | None = None) -> dict[str, Any]:
    """Train (or load) and measure every recipe, write the output folder, return the results."""
    check_suite_settings(settings)
    data = data if data is not None else load_data(
        corpus=settings.corpus, vocab_size=settings.vocab_size, seq_len=settings.seq_len,
        batch_size=settings.batch_size, seed=settings.seed,
    )
    if len(data.val_batches) < 2 * settings.eval_batches:
        # The thresholds are calibrated on one set of eval_batches and checked on another.
        raise ValueError(f"--eval-batches {settings.eval_batches}: the corpus has only {len(data.val_batches)} "
                         f"validation batches, and calibration and its check need {2 * settings.eval_batches}")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "settings": jsonable(asdict(settings)), "environment": _environment(settings),
        "data": {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "vocab_size": data.vocab_size},
        "recipes": {},
    }
    for recipe in build_recipes(settings):
        _log(settings, f"\n== {recipe.name} ==")
        model, training = train_recipe(recipe, settings, data, out / "models" / recipe.name)
        _log(settings, f"{recipe.name}: measuring")
        results["recipes"][recipe.name] = {"recipe": recipe.describe(), "training": training,
                                           **measure_recipe(model, settings, data)}
        # Written after every recipe: a run stopped part-way keeps what it measured.
        atomic_write_text(out / "results.json", json.dumps(jsonable(results), indent=2))
    results["seconds"] = time.perf_counter() - started
    results["table"] = suite_table(results)
    atomic_write_text(out / "results.json", json.dumps(jsonable(results), indent=2))
    atomic_write_text(out / "results.md", results["table"])
    results["figures"] = [str(p) for p in plot_suite(results, out)]
    return results

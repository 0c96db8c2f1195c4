"""``python -m ease.train --config run.toml`` (or ``ease-train``): one training run from a TOML file.

    python -m ease.train --config examples/configs/deep_supervision.toml --set training.max_steps=200

The file has five tables; every key is optional and a key left out takes its default
(the defaults of :class:`~ease.config.TrainingConfig` and :class:`~ease.models.ModelConfig`
where the key is theirs). TOML has no null: write ``"none"`` for a key whose value may
be None (``max_steps = "none"``, ``routing_threshold = "none"``).

``[model]``
    ``class`` (``"standard"``, ``"deep_supervision"`` (default), or the class names
    ``"StandardTransformer"`` / ``"DeepSupervisionTransformer"``), ``dim`` (128),
    ``num_layers`` (3), and the other :class:`~ease.models.ModelConfig` fields:
    ``num_heads``, ``num_kv_heads``, ``ffn_dim``, ``max_seq_len`` (default:
    ``data.seq_len``), ``rope_theta``, ``rope_scaling``, ``norm_eps``, ``dropout``,
    ``tie_embeddings``. The vocabulary size is the tokenizer's.
``[data]``
    ``corpus`` (``"docs"`` or ``"stdlib"``) or ``text`` (a UTF-8 file), not both; neither
    means ``"docs"``. ``vocab_size`` (1000, or 8192 for ``"stdlib"``), ``seq_len`` (64),
    ``batch_size`` (32), ``val_fraction`` (0.1 of the tokens, or 0.05 of the files for
    ``"stdlib"``), ``seed`` (the training-window shuffle; default ``training.seed``).
``[l3t]``
    The three options (L3T: Layer-wise Loss, LR and Threshold). ``layer_weights``: a
    table with layer numbers as string keys (``{"1" = 0.7, "2" = 0, "3" = 0.3}``), a list
    of one weight per layer, ``"standard"`` (the last layer only; the default of
    ``class = "standard"``), ``"deep_supervision"`` (``1 / num_layers`` each; the default
    of ``class = "deep_supervision"``) or a depth shape of
    :func:`~ease.training.curriculum.depth_loss_weights` (``"uniform"``, ``"linear"``,
    ``"sqrt"``, ``"inverse"``, ``"inverse_sqrt"``, ``"sum"``), summing to 1.
    ``layer_lr_scales``: a table or a list, as ``layer_weights``. ``routing_threshold``.
``[training]``
    ``base_lr`` (3e-3), ``max_epochs`` (enough epochs for ``max_steps`` /
    ``max_tokens`` when one is set, else 100), ``patience`` (1), ``min_delta`` (0),
    ``device`` (``"auto"``: CUDA when present; or a torch device such as ``"cpu"``),
    and every other :class:`~ease.config.TrainingConfig` field (``weight_decay``,
    ``grad_clip``, ``betas``, ``seed``, ``lr_schedule``, ``warmup_steps``,
    ``min_lr_ratio``, ``max_steps``, ``max_tokens``, ``eval_every``, ``layer_dropout``,
    ``layer_dropout_shape``, ``exit_curriculum``, ``curriculum_period``, ``log_every``,
    ``compile``, ``fused_loss``, ``grad_accumulation_steps``, ``distributed``,
    ``min_exit_layer``) except those the command sets itself: ``log_dir``,
    ``checkpoint_dir``, ``resume`` (see ``[output]``) and ``verbose`` (``--quiet``).
``[output]``
    ``dir`` (default ``runs/<config file name>``), ``resume`` (false: continue from
    ``dir/checkpoints/last.pt`` when it exists), ``overwrite`` (false: a folder that
    holds a previous run is refused unless resuming or overwriting), ``checkpoints``
    (true: write ``dir/checkpoints/last.pt`` after every evaluation).

Paths are relative to the current directory. ``--set table.key=value`` overrides one
key (repeatable); the value is read as a TOML value, and as a plain string when it is
not one (``--set data.corpus=stdlib``).

Everything is checked before any data is loaded or any file written: an unknown table
or key, or a bad value, prints one line ``error: ...`` naming the key (``training.max_steps``)
and exits with status 2.

The output folder gets ``metrics.jsonl`` (:mod:`ease.training.metrics`), ``checkpoints/``,
``model/`` (``save_pretrained`` plus ``tokenizer.json``), ``summary.json`` (the resolved
config, data sizes, the early-stopping result, the final evaluation, wall time and
versions) and, with matplotlib installed, ``loss_per_layer.png`` and
``accuracy_per_layer.png``; each file is written atomically. Under ``torchrun`` every
rank trains and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "RunSpec",
    "apply_overrides",
    "build_parser",
    "check_keys",
    "default_threads",
    "load_run_spec",
    "main",
    "parse_override",
    "parse_value",
    "plot_accuracy_per_layer",
    "plot_loss_per_layer",
    "read_config_file",
    "read_metrics",
    "resolve_layer_weights",
    "run",
]

TABLES = ("model", "data", "l3t", "training", "output")
"""The tables of a run file, in the order the documentation lists them."""

MODEL_CLASS_NAMES = {
    "standard": "StandardTransformer",
    "deep_supervision": "DeepSupervisionTransformer",
    "StandardTransformer": "StandardTransformer",
    "DeepSupervisionTransformer": "DeepSupervisionTransformer",
}
"""``model.class`` values and the class each names."""

WEIGHT_SHORTHANDS = ("standard", "deep_supervision")
"""``l3t.layer_weights`` strings besides the depth shapes of ``depth_loss_weights``."""

# TrainingConfig fields the command sets itself, and where the user sets them instead.
_SET_BY_COMMAND = {
    "log_dir": "output.dir (metrics.jsonl is written there)",
    "checkpoint_dir": "output.dir (checkpoints go to dir/checkpoints)",
    "resume": "output.resume",
    "verbose": "the --quiet flag",
}
_L3T_KEYS = ("layer_weights", "layer_lr_scales", "routing_threshold")
_RUN_KEYS = {"base_lr": 3e-3, "max_epochs": None, "patience": 1, "min_delta": 0.0, "device": "auto"}
_DEFAULT_MAX_EPOCHS = 100  # Trainer.train_with_early_stopping's default
_MIN_VOCAB_SIZE = 257  # 256 bytes + <|endoftext|>, as ease.data requires
NONE = "none"
"""The string that stands for None in a run file (TOML has no null)."""

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOSS_PLOT = "loss_per_layer.png"
ACCURACY_PLOT = "accuracy_per_layer.png"


class ConfigError(ValueError):
    """A run file, an override or its data that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------- schema


def _schema() -> dict[str, dict[str, Any]]:
    """``{table: {key: default}}`` of every key a run file may hold.

    The ``[model]`` and ``[training]`` keys are read off :class:`ModelConfig` and
    :class:`TrainingConfig`, so that a field added there is accepted here without an edit.
    """
    from ease.config import TrainingConfig
    from ease.models import ModelConfig

    model = {"class": "deep_supervision", "dim": 128, "num_layers": 3}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("vocab_size", "dim", "num_layers"):
            model[f.name] = None if f.name == "max_seq_len" else f.default
    training = dict(_RUN_KEYS)
    for f in dataclasses.fields(TrainingConfig):
        if f.name not in _L3T_KEYS and f.name not in _SET_BY_COMMAND:
            training[f.name] = f.default
    return {
        "model": model,
        "data": {
            "corpus": None, "text": None, "vocab_size": None, "seq_len": 64, "batch_size": 32,
            "val_fraction": None, "seed": None,
        },
        "l3t": {key: None for key in _L3T_KEYS},
        "training": training,
        "output": {"dir": None, "resume": False, "overwrite": False, "checkpoints": True},
    }  # fmt: skip


def _optional_keys() -> set[str]:
    """Dotted names of the keys whose value may be None (written ``"none"``)."""
    from ease.config import TrainingConfig
    from ease.models import ModelConfig

    optional = {f"{table}.{key}" for table, keys in _schema().items() for key, default in keys.items() if default is None}
    for table, cls in (("model", ModelConfig), ("training", TrainingConfig)):
        optional |= {f"{table}.{f.name}" for f in dataclasses.fields(cls) if "None" in str(f.type)}
    return optional


def _suggestion(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(raw: dict[str, Any], schema: dict[str, dict[str, Any]]) -> None:
    """Refuse an unknown table or key, naming it dotted, with the known ones and a close match.

    Raises:
        ConfigError: a top-level value that is not a table, an unknown table, or an
            unknown key (a key of another table, or one the command sets itself, says where
            it goes).
    """
    homes = {key: table for table in TABLES for key in schema[table]}
    for table, keys in raw.items():
        if table not in schema:
            if not isinstance(keys, dict) and table in homes:
                raise ConfigError(f"{table!r} must be set inside a table: {homes[table]}.{table}")
            raise ConfigError(f"unknown table [{table}]{_suggestion(table, list(TABLES))}; known tables: {', '.join(TABLES)}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{table} must be a table ([{table}]), got {keys!r}")
        for key in keys:
            if key in schema[table]:
                continue
            dotted = f"{table}.{key}"
            if table == "training" and key in _SET_BY_COMMAND:
                raise ConfigError(f"{dotted} is set by the command; use {_SET_BY_COMMAND[key]}")
            if key in homes:
                hint = f" (it belongs in [{homes[key]}]: {homes[key]}.{key})"
            else:
                close = difflib.get_close_matches(key, list(schema[table]), n=1, cutoff=0.6)
                hint = f" (did you mean {table}.{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {dotted}{hint}; known keys of [{table}]: {', '.join(schema[table])}")


# ------------------------------------------------------------------------- reading a run


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The tables of a TOML run file.

    Raises:
        ConfigError: no such file, or not valid TOML (with the parser's line and column).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"no config file {str(path)!r}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``2000``, ``0.9``, ``true``, ``"stdlib"``, ``{1 = 0.7}``),
    else the text itself as a string (``stdlib``)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"table.key=value"`` -> ``(table, key, value)``.

    Raises:
        ConfigError: no ``=``, or a name that is not ``table.key``.
    """
    name, equals, value = text.partition("=")
    parts = name.strip().split(".")
    if not equals or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set takes table.key=value (e.g. training.max_steps=2000), got {text!r}")
    return parts[0], parts[1], parse_value(value.strip())


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``--set table.key=value`` applied in order."""
    merged = {table: dict(keys) if isinstance(keys, dict) else keys for table, keys in raw.items()}
    for text in overrides:
        table, key, value = parse_override(text)
        section = merged.setdefault(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {text}: {table} is not a table in the config file")
        section[key] = value
    return merged


def _with_defaults(raw: dict[str, Any], schema: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every key of every table, the file's value or the default; ``"none"`` -> None where allowed."""
    optional = _optional_keys()
    tables = {}
    for table, defaults in schema.items():
        given = raw.get(table, {})
        values = {}
        for key, default in defaults.items():
            value = given.get(key, default)
            if isinstance(value, str) and value.lower() == NONE and f"{table}.{key}" in optional:
                value = None
            values[key] = value
        tables[table] = values
    return tables


def _dotted(error: Exception, homes: dict[str, str], context: str) -> ConfigError:
    """``error`` re-raised with the dotted name of the key its message starts with.

    ``"max_steps must be ..."`` under ``homes={"max_steps": "training"}`` becomes
    ``"training.max_steps must be ..."``; a message that names no key gets ``context: ``.
    """
    message = str(error)
    match = re.match(r"[A-Za-z_]+", message)
    if match and match.group() in homes:
        return ConfigError(f"{homes[match.group()]}.{message}")
    return ConfigError(f"{context}: {message}")


# ------------------------------------------------------------------------- checking values


def _check(dotted: str, check, *args: Any, **kwargs: Any) -> Any:
    """``check(dotted, *args, **kwargs)`` (an :mod:`ease.validation` check) as a ConfigError."""
    try:
        return check(dotted, *args, **kwargs)
    except ValueError as error:  # ArgumentTypeError is a ValueError too
        raise ConfigError(str(error)) from None


def _layer_table(dotted: str, value: Any, num_layers: int) -> dict[int, Any] | None:
    """A ``{layer: value}`` option written as a TOML table with string keys, or a list per layer.

    The values are left for :class:`TrainingConfig` to check.
    """
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != num_layers:
            raise ConfigError(
                f"{dotted} as a list needs one value per layer, {num_layers} (model.num_layers), got {len(value)}"
            )
        return {layer: number for layer, number in enumerate(value, start=1)}
    if isinstance(value, dict):
        table = {}
        for key, number in value.items():
            if not re.fullmatch(r"\s*\d+\s*", key):
                raise ConfigError(
                    f"{dotted} keys must be layer numbers (integers >= 1, layers count from 1) written as "
                    f'strings, e.g. {{"1" = 0.7}}; got {key!r}'
                )
            table[int(key)] = number
        return table
    raise ConfigError(
        f'{dotted} must be a table of layer numbers ({{"1" = 0.7, "3" = 0.3}}), a list of one value per layer '
        f"or {NONE!r}, got {value!r}"
    )


def resolve_layer_weights(value: Any, num_layers: int, model_class: str) -> dict[int, Any]:
    """``l3t.layer_weights`` as ``{layer: weight}``: a table, a list, a shorthand or a depth shape.

    None takes the model class's own rule: the last layer alone for ``StandardTransformer``,
    ``1 / num_layers`` each for ``DeepSupervisionTransformer``.

    Raises:
        ConfigError: an unknown string, bad keys, or a list of the wrong length.
    """
    from ease.training.curriculum import DEPTH_SCALES, depth_loss_weights

    if value is None:
        value = "standard" if model_class == "StandardTransformer" else "deep_supervision"
    if isinstance(value, str):
        if value == "standard":
            return {layer: float(layer == num_layers) for layer in range(1, num_layers + 1)}
        if value == "deep_supervision":
            return {layer: 1 / num_layers for layer in range(1, num_layers + 1)}
        if value in DEPTH_SCALES:
            return depth_loss_weights(num_layers, value)
        names = (*WEIGHT_SHORTHANDS, *DEPTH_SCALES)
        raise ConfigError(
            f"l3t.layer_weights must be a table, a list or one of {', '.join(names)}, got {value!r}"
            f"{_suggestion(value, list(names))}"
        )
    return _layer_table("l3t.layer_weights", value, num_layers)


def _resolve_model(values: dict[str, Any], seq_len: int) -> tuple[str, dict[str, Any]]:
    """``(class name, keyword arguments of the constructor)`` of ``[model]``, checked for type."""
    cls = values["class"]
    if not isinstance(cls, str) or cls not in MODEL_CLASS_NAMES:
        raise ConfigError(f"model.class must be one of {', '.join(MODEL_CLASS_NAMES)}, got {cls!r}")
    kwargs = {key: value for key, value in values.items() if key != "class"}
    if kwargs["max_seq_len"] is None:
        kwargs["max_seq_len"] = seq_len
    return MODEL_CLASS_NAMES[cls], kwargs


def _resolve_data(values: dict[str, Any], training_seed: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`ease.data.load_data` from ``[data]``."""
    from ease.data import CORPORA
    from ease.validation import check_int, check_real

    corpus, text = values["corpus"], values["text"]
    if corpus is not None and corpus not in CORPORA:
        raise ConfigError(f"data.corpus must be one of {', '.join(CORPORA)} or {NONE!r}, got {corpus!r}")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"data.text must be the path of a UTF-8 text file, got {text!r}")
        if corpus is not None:
            raise ConfigError(
                f"data.corpus and data.text are both set ({corpus!r}, {text!r}): set one "
                f'(--set data.corpus=none to train on the text)'
            )
        if not Path(text).is_file():
            raise ConfigError(f"data.text: no such file {text!r}")
    seed_name, seed = ("data.seed", values["seed"]) if values["seed"] is not None else ("training.seed", training_seed)
    kwargs = {
        "path": text,
        "corpus": corpus,
        "seq_len": _check("data.seq_len", check_int, values["seq_len"], 1),
        "batch_size": _check("data.batch_size", check_int, values["batch_size"], 1),
        "seed": _check(seed_name, check_int, seed, 0, 2**32 - 1, expected="an integer in [0, 2**32)"),
        "vocab_size": None,
        "val_fraction": None,
    }
    if values["vocab_size"] is not None:
        kwargs["vocab_size"] = _check(
            "data.vocab_size", check_int, values["vocab_size"], _MIN_VOCAB_SIZE,
            expected=f"an integer >= {_MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>) or {NONE!r}",
        )  # fmt: skip
    if values["val_fraction"] is not None:
        kwargs["val_fraction"] = _check(
            "data.val_fraction", check_real, values["val_fraction"], 0.0, 1.0, above=True, below=True,
            expected="a number strictly between 0 and 1",
        )  # fmt: skip
    return kwargs


def _resolve_run_options(values: dict[str, Any]) -> dict[str, Any]:
    """``base_lr``, ``max_epochs``, ``patience``, ``min_delta`` and ``device`` of ``[training]``, checked."""
    import torch

    from ease.validation import check_int, check_real

    options = {
        "base_lr": _check("training.base_lr", check_real, values["base_lr"], 0.0, above=True,
                          expected="a finite number > 0"),
        "max_epochs": None if values["max_epochs"] is None else _check(
            "training.max_epochs", check_int, values["max_epochs"], 1, expected=f"an integer >= 1 or {NONE!r}"),
        "patience": _check("training.patience", check_int, values["patience"], 1),
        "min_delta": _check("training.min_delta", check_real, values["min_delta"], 0.0),
    }  # fmt: skip
    device = values["device"]
    if not isinstance(device, str):
        raise ConfigError(f"training.device must be 'auto' or a torch device such as 'cpu' or 'cuda', got {device!r}")
    if device != "auto":
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"training.device must be 'auto' or a torch device such as 'cpu' or 'cuda', got {device!r}") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"training.device is {device!r}, but CUDA is not available here")
    options["device"] = device
    return options


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding a previous run unless resuming or overwriting (nothing is written)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir {str(out)!r} exists and is not a folder")
    if resume or overwrite:
        return
    previous = [name for name in (METRICS_FILE, SUMMARY_FILE, f"{CHECKPOINT_DIR}/last.pt", MODEL_DIR) if (out / name).exists()]
    if previous:
        raise ConfigError(
            f"output.dir {str(out)!r} holds a previous run ({', '.join(previous)}): set output.resume = true "
            "to continue it, output.overwrite = true to start over, or another output.dir"
        )


# ------------------------------------------------------------------------- the run spec


@dataclass
class RunSpec:
    """A checked run: everything :func:`run` needs, resolved from a file and its overrides.

    Attributes:
        model_class: ``"StandardTransformer"`` or ``"DeepSupervisionTransformer"``.
        model_kwargs: the constructor's keyword arguments besides ``vocab_size``.
        data_kwargs: :func:`ease.data.load_data`'s keyword arguments.
        config: the :class:`TrainingConfig` (its ``log_dir`` and ``checkpoint_dir`` in ``out``).
        base_lr, max_epochs, patience, min_delta: of ``train_with_early_stopping``;
            ``max_epochs`` None: enough for the step or token budget, else 100.
        device: ``"auto"`` or a torch device string.
        out: the output folder.
        overwrite: remove a previous run's files from ``out`` before training.
        tables: the resolved tables, as ``summary.json`` records them.
        config_file: the run file; overrides: the ``--set`` arguments.
    """

    model_class: str
    model_kwargs: dict[str, Any]
    data_kwargs: dict[str, Any]
    config: Any
    base_lr: float
    max_epochs: int | None
    patience: int
    min_delta: float
    device: str
    out: Path
    overwrite: bool
    tables: dict[str, dict[str, Any]]
    config_file: str | None = None
    overrides: list[str] = field(default_factory=list)

    def build_model(self, vocab_size: int):
        """A fresh model of :attr:`model_class` (on the current default device)."""
        from ease.models import MODEL_CLASSES

        return MODEL_CLASSES[self.model_class](vocab_size, **self.model_kwargs)

    def epochs_for(self, train_batches: int, tokens_per_step: int) -> int:
        """``max_epochs``, or the epochs that cover ``max_steps`` / ``max_tokens`` when unset."""
        if self.max_epochs is not None:
            return self.max_epochs
        budgets = []
        if self.config.max_steps is not None:
            budgets.append(self.config.max_steps)
        if self.config.max_tokens is not None:
            budgets.append(math.ceil(self.config.max_tokens / max(tokens_per_step, 1)))
        if not budgets:
            return _DEFAULT_MAX_EPOCHS
        return max(1, math.ceil(min(budgets) / max(train_batches, 1)))


def _training_config(
    tables: dict[str, dict[str, Any]],
    weights: dict[int, Any],
    scales: dict[int, Any] | None,
    out: Path,
    checkpoints: bool,
    resume: bool,
    verbose: bool,
):
    """The :class:`TrainingConfig` of the resolved tables; its errors name the dotted key."""
    from ease.config import TrainingConfig

    fields = {key: value for key, value in tables["training"].items() if key not in _RUN_KEYS}
    homes = {key: "training" for key in fields} | {key: "l3t" for key in _L3T_KEYS}
    try:
        return TrainingConfig(
            layer_weights=weights,
            layer_lr_scales=scales,
            routing_threshold=tables["l3t"]["routing_threshold"],
            log_dir=str(out),
            checkpoint_dir=str(out / CHECKPOINT_DIR) if checkpoints else None,
            resume=resume,
            verbose=verbose,
            **fields,
        )
    except (ValueError, TypeError) as error:
        raise _dotted(error, homes, "training") from None


def _check_against_model(spec: RunSpec, vocab_size: int) -> None:
    """Build the model on the meta device (no memory, no weights) and check the config against it."""
    import torch

    from ease.models import ModelConfig

    homes = {f.name: "model" for f in dataclasses.fields(ModelConfig)}
    try:
        with torch.device("meta"):
            model = spec.build_model(vocab_size)
    except (ValueError, TypeError) as error:
        raise _dotted(error, homes, "model") from None
    if model.config.max_seq_len < spec.data_kwargs["seq_len"]:
        raise ConfigError(
            f"model.max_seq_len={model.config.max_seq_len} is shorter than data.seq_len={spec.data_kwargs['seq_len']}"
        )
    homes = {key: "l3t" for key in _L3T_KEYS} | {"min_exit_layer": "training", "exit_curriculum": "training"}
    try:
        spec.config.validate_for(model)
        spec.config.check_recipe_for(model)
    except ValueError as error:
        raise _dotted(error, homes, "l3t") from None


def load_run_spec(
    path: str | os.PathLike | None,
    overrides: list[str] = (),
    verbose: bool = True,
    raw: dict[str, Any] | None = None,
) -> RunSpec:
    """Read, merge and check a run file and its ``--set`` overrides; nothing is loaded or written.

    Args:
        path: the TOML file (None with ``raw``).
        overrides: ``"table.key=value"`` strings, applied in order after the file.
        verbose: the config's ``verbose`` (progress bars and per-evaluation lines).
        raw: the tables themselves instead of a file (the defaults fill the rest).

    Returns:
        The :class:`RunSpec`; its model was built once on the meta device so that every
        check that needs the depth (layer numbers, a standard model with early weights,
        a curriculum without the last layer) has run.

    Raises:
        ConfigError: naming the dotted key, for an unknown table or key, a value of the
            wrong type or out of range, or an output folder holding a previous run.
    """
    from ease.validation import check_bool, check_int

    schema = _schema()
    raw = read_config_file(path) if raw is None else raw
    merged = apply_overrides(raw, list(overrides))
    check_keys(merged, schema)
    tables = _with_defaults(merged, schema)
    data_kwargs = _resolve_data(tables["data"], tables["training"]["seed"])
    model_class, model_kwargs = _resolve_model(tables["model"], data_kwargs["seq_len"])
    num_layers = _check("model.num_layers", check_int, model_kwargs["num_layers"], 1, expected="a positive integer")
    weights = resolve_layer_weights(tables["l3t"]["layer_weights"], num_layers, model_class)
    scales = _layer_table("l3t.layer_lr_scales", tables["l3t"]["layer_lr_scales"], num_layers)
    output = tables["output"]
    stem = Path(path).stem if path is not None else "run"
    out_dir = output["dir"] if output["dir"] is not None else f"runs/{stem}"
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"output.dir must be a non-empty path, got {out_dir!r}")
    resume = _check("output.resume", check_bool, output["resume"])
    overwrite = _check("output.overwrite", check_bool, output["overwrite"])
    checkpoints = _check("output.checkpoints", check_bool, output["checkpoints"])
    if resume and not checkpoints:
        raise ConfigError("output.resume = true needs output.checkpoints = true (it resumes from dir/checkpoints)")
    if resume and overwrite:
        raise ConfigError("output.resume and output.overwrite are both true: choose one")
    out = Path(out_dir)
    config = _training_config(tables, weights, scales, out, checkpoints, resume, verbose)
    options = _resolve_run_options(tables["training"])
    tables["model"]["max_seq_len"] = model_kwargs["max_seq_len"]
    tables["data"]["seed"] = data_kwargs["seed"]
    tables["l3t"] = {"layer_weights": config.layer_weights, "layer_lr_scales": config.layer_lr_scales,
                     "routing_threshold": config.routing_threshold}  # fmt: skip
    tables["output"]["dir"] = out_dir
    spec = RunSpec(
        model_class=model_class, model_kwargs=model_kwargs, data_kwargs=data_kwargs, config=config,
        out=out, overwrite=overwrite, tables=tables, overrides=list(overrides),
        config_file=None if path is None else str(path), **options,
    )  # fmt: skip
    placeholder_vocab = data_kwargs["vocab_size"] or 1000  # the vocabulary changes no check
    _check_against_model(spec, placeholder_vocab)
    _check_output_dir(out, resume, overwrite)
    return spec


# ------------------------------------------------------------------------------ running


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
        raise _dotted(error, {"distributed": "training"}, "training") from None
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


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train lines, eval lines)`` of a ``metrics.jsonl``, in step order.

    A resumed run appends lines again for the steps after its last checkpoint; the line
    written last for a step is the one kept.
    """
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                kept[(record["kind"], record["step"])] = record
    lines = sorted(kept.values(), key=lambda r: r["step"])
    return [r for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "eval"]


def _figure():
    """A matplotlib figure and axes without pyplot (no global state, no GUI), or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5))
    return fig, fig.subplots()


def _save_figure(fig, ax, path: Path) -> Path:
    """Add the legend and write ``path`` as PNG, atomically."""
    from ease._io import atomic_path

    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def plot_loss_per_layer(metrics_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """``loss_per_layer.png``: each layer's training loss over steps, evaluations as markers.

    Training lines come from the ``"train"`` lines of ``metrics.jsonl`` (a layer is drawn
    where it was supervised); markers are each evaluation's per-layer validation loss
    (the final layer's alone for a model trained on its last layer).

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    made = _figure()
    if made is None:
        return None
    fig, ax = made
    train, evals = read_metrics(metrics_path)
    layers = sorted({int(l) for r in train for l in r["layers"]} | {int(l) for r in evals for l in r.get("layers", {})})
    colors = {}
    for layer in layers:
        points = [(r["step"], r["layers"][str(layer)]["loss"]) for r in train if str(layer) in r["layers"]]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            (line,) = ax.plot(*zip(*points), "-", lw=1, label=f"layer {layer} train")
            colors[layer] = line.get_color()
    last = max(layers) if layers else None
    for layer in layers:
        points = [(r["step"], r["layers"][str(layer)]["loss"]) for r in evals if str(layer) in r.get("layers", {})]
        if not points and layer == last:
            points = [(r["step"], r["loss"]) for r in evals]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), "o", ms=5, color=colors.get(layer), label=f"layer {layer} validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss per layer")
    return _save_figure(fig, ax, Path(path))


def plot_accuracy_per_layer(evaluation: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """``accuracy_per_layer.png``: each layer's validation accuracy at the end, as bars.

    ``evaluation`` is :meth:`~ease.Trainer.evaluate`'s dict; a model trained on its last
    layer has that layer's bar alone. With a routing threshold the early-exit accuracy is
    drawn as a horizontal line, labelled with the mean exit layer.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    made = _figure()
    if made is None:
        return None
    fig, ax = made
    per_layer = {int(l): v["accuracy"] for l, v in evaluation.get("layers", {}).items()}
    if not per_layer:
        num_layers = None
        per_layer = {"final": evaluation["accuracy"]}
    else:
        num_layers = max(per_layer)
    names = [str(l) for l in per_layer]
    bars = ax.bar(names, list(per_layer.values()), color="tab:blue", label="validation accuracy (top-1)")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    exit_stats = evaluation.get("early_exit")
    if exit_stats:
        ax.axhline(
            exit_stats["accuracy"], color="tab:red", ls="--",
            label=f"early exit τ={exit_stats['threshold']:g}: mean layer {exit_stats['mean_exit_layer']:.2f}"
            + (f" of {num_layers}" if num_layers else ""),
        )  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("next-token accuracy")
    ax.set_title("validation accuracy per layer")
    return _save_figure(fig, ax, Path(path))


# --------------------------------------------------------------------------- the command


def _keys_epilog() -> str:
    """The tables and their keys, for ``--help``."""
    import textwrap

    lines = ["keys of a run file (every one optional; write \"none\" for None):"]
    for table, keys in _schema().items():
        lines += textwrap.wrap(", ".join(keys), width=88, initial_indent=f"  [{table}] ", subsequent_indent="    ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m ease.train",
        description="Train one EASE model from a TOML run file (tables [model], [data], [l3t], [training], "
        "[output]; see the module documentation of ease.cli.train).",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the TOML run file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
        help="override one key, the value read as TOML (repeatable): --set training.max_steps=2000 "
        "--set l3t.routing_threshold=0.9 --set data.corpus=stdlib",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads(N). Default: 1 on a machine with at most 4 cores, else torch's default: "
        "on a small shared machine OpenMP's spin-waiting threads made training 5-6x slower",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars, per-evaluation lines or report")
    return parser


def _report(summary: dict[str, Any], out: Path) -> str:
    """The lines printed at the end of a run: final figures per layer, where the files went."""
    ev, stop = summary["evaluation"], summary["early_stopping"]
    lines = [
        f"best {'step ' + str(stop['best_step']) if stop['best_step'] is not None else 'epoch ' + str(stop['best_epoch'])}"
        f" | val loss {ev['loss']:.4f} | ppl {ev['ppl']:.2f} | accuracy {ev['accuracy']:.4f} | "
        f"train {summary['train_seconds']:.1f} s, wall {summary['wall_seconds']:.1f} s",
    ]
    for layer, figures in ev.get("layers", {}).items():
        lines.append(f"  layer {layer}: loss {figures['loss']:.4f}, accuracy {figures['accuracy']:.4f}")
    if ev.get("early_exit"):
        e = ev["early_exit"]
        lines.append(
            f"  early exit (threshold {e['threshold']:g}): accuracy {e['accuracy']:.4f}, mean exit layer "
            f"{e['mean_exit_layer']:.2f}, compute saved {e['compute_saved']:.1%}"
        )
    lines.append(f"wrote {out.resolve()}/ ({MODEL_DIR}/, {METRICS_FILE}, {SUMMARY_FILE}, plots)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ease.train`` and ``ease-train``; returns the exit status.

    0 after a run; 2, with one line ``error: ...`` on stderr and nothing written, for a
    run file, override or data that cannot be used.
    """
    import torch

    args = build_parser().parse_args(argv)
    threads = args.threads if args.threads is not None else default_threads()
    if threads is not None:
        if threads < 1:
            print(f"error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(threads)
    verbose = not args.quiet
    try:
        spec = load_run_spec(args.config, args.overrides, verbose=verbose)
        summary = run(spec, verbose=verbose)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ease.training.distributed import setup_distributed

    if verbose and setup_distributed(spec.config.distributed).is_main:
        print(_report(summary, spec.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A run file checked into a :class:`RunSpec`: its schema, ``--set`` overrides and every check, before any data is loaded or file written."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def run_file_schema() -> dict[str, dict[str, Any]]:
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

    optional = {f"{table}.{key}" for table, keys in run_file_schema().items() for key, default in keys.items() if default is None}
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


def dotted_error(error: Exception, homes: dict[str, str], context: str) -> ConfigError:
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
        raise dotted_error(error, homes, "training") from None


def _check_against_model(spec: RunSpec, vocab_size: int) -> None:
    """Build the model on the meta device (no memory, no weights) and check the config against it."""
    import torch

    from ease.models import ModelConfig

    homes = {f.name: "model" for f in dataclasses.fields(ModelConfig)}
    try:
        with torch.device("meta"):
            model = spec.build_model(vocab_size)
    except (ValueError, TypeError) as error:
        raise dotted_error(error, homes, "model") from None
    if model.config.max_seq_len < spec.data_kwargs["seq_len"]:
        raise ConfigError(
            f"model.max_seq_len={model.config.max_seq_len} is shorter than data.seq_len={spec.data_kwargs['seq_len']}"
        )
    homes = {key: "l3t" for key in _L3T_KEYS} | {"min_exit_layer": "training", "exit_curriculum": "training"}
    try:
        spec.config.validate_for(model)
        spec.config.check_recipe_for(model)
    except ValueError as error:
        raise dotted_error(error, homes, "l3t") from None


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

    schema = run_file_schema()
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

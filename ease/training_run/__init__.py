"""Training runs described by a TOML file: the format, its checks, the run and its report.

``python -m ease.train --config run.toml`` (or ``ease-train``, :mod:`ease.cli.train`) reads a file,
:mod:`ease.training_run.spec` checks it into a :class:`~ease.training_run.spec.RunSpec`, :mod:`ease.training_run.execute`
trains it and writes the output folder, :mod:`ease.training_run.plots` draws its figures.

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

from ease.training_run.execute import default_threads, run
from ease.training_run.plots import plot_accuracy_per_layer, plot_loss_per_layer, read_metrics
from ease.training_run.spec import (
    ConfigError,
    RunSpec,
    apply_overrides,
    check_keys,
    load_run_spec,
    parse_override,
    parse_value,
    read_config_file,
    resolve_layer_weights,
)

__all__ = [
    "ConfigError",
    "RunSpec",
    "apply_overrides",
    "check_keys",
    "default_threads",
    "load_run_spec",
    "parse_override",
    "parse_value",
    "plot_accuracy_per_layer",
    "plot_loss_per_layer",
    "read_config_file",
    "read_metrics",
    "resolve_layer_weights",
    "run",
]

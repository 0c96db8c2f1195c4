"""The comparison EASE exists for, on the built-in corpus: ``python -m ease.experiments``.

Three runs with early stopping, same data, same seed, same model size:

- ``standard``: :class:`StandardTransformer`, loss on the last layer only;
- ``deep_supervision``: :class:`DeepSupervisionTransformer`, uniform layer weights;
- ``asymmetric``: the SPEC's example, ``layer_weights={1: 0.7, 2: 0, 3: 0.3}``,
  ``layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}``, ``routing_threshold=0.95``.

Then a routing-threshold sweep for the deep-supervision models. Writes
``results.json``, ``results.md``, ``loss_curves.png``, ``exit_tradeoff.png`` and each
trained model (``save_pretrained`` plus ``tokenizer.json``) to the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ease._io import atomic_path, atomic_write_text, jsonable
from ease.calibration import calibrate_threshold
from ease.config import TrainingConfig, create_deep_supervision_config, create_standard_config
from ease.data import DataBundle, load_data, set_seed, unigram_baseline
from ease.exits import DEFAULT_THRESHOLDS
from ease.models import DeepSupervisionTransformer, EarlyExitDecoder, ExitSettings, ModelConfig, StandardTransformer
from ease.validation import check_int, check_real, check_threshold
from ease.training import Trainer
from ease.training.distributed import setup_distributed



@dataclass
class ExperimentSettings:
    """Knobs of one comparison run (the command-line flags)."""

    text: str | None = None
    out: str = "runs/experiments"
    vocab_size: int = 1000
    dim: int = 128
    num_layers: int = 3
    seq_len: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    max_epochs: int = 10
    patience: int = 1
    threshold: float = 0.95
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # the one default grid of ease.exits
    seed: int = 0
    verbose: bool = True
    runs: tuple[str, ...] = ("standard", "deep_supervision", "asymmetric")  # a subset of RUN_NAMES


SERVED_POSITIONS = 1024
"""The positions the saved models serve (their ``max_seq_len``) unless ``seq_len`` is longer:
generation is not capped at the training length. RoPE tables cost ``2 x positions x
head_dim`` floats and the rows below ``seq_len`` are the same whatever the length, so
training and every figure are unchanged."""


def served_positions(settings: ExperimentSettings) -> int:
    """``max_seq_len`` of the experiments' models: :data:`SERVED_POSITIONS`, or ``seq_len`` if longer."""
    return max(SERVED_POSITIONS, settings.seq_len)


def check_settings(settings: ExperimentSettings) -> ExperimentSettings:
    """Check every setting before anything is loaded or written.

    Raises:
        FileNotFoundError: ``text`` names no file.
        ValueError: a size, rate or count out of range, a threshold outside (0, 1], no
            threshold to sweep, an unknown run, a model shape the decoder refuses
            (``dim`` not divisible into even-width heads), or the asymmetric run with
            fewer than 2 layers; each message names the setting as its flag reads.
    """
    if settings.text is not None and not Path(settings.text).is_file():
        raise FileNotFoundError(f"--text {settings.text}: no such file")
    check_int("--vocab-size", settings.vocab_size, 257, expected="an integer >= 257 (256 bytes + end of text)")
    for flag in ("dim", "num_layers", "seq_len", "batch_size", "max_epochs", "patience"):
        check_int("--" + flag.replace("_", "-"), getattr(settings, flag), 1)
    check_int("--seed", settings.seed, 0)
    check_real("--lr", settings.lr, 0.0, above=True, expected="a finite number > 0")
    check_threshold("--threshold", settings.threshold, allow_none=False)
    if not settings.thresholds:
        raise ValueError("--thresholds must name at least one threshold")
    for threshold in settings.thresholds:
        check_threshold("--thresholds", threshold, allow_none=False)
    unknown = [name for name in settings.runs if name not in RUN_NAMES]
    if unknown or not settings.runs:
        raise ValueError(f"--runs must name some of {','.join(RUN_NAMES)}, got {','.join(settings.runs) or 'none'}")
    if "asymmetric" in settings.runs and settings.num_layers < 2:
        raise ValueError(f"--num-layers must be >= 2 for the asymmetric run, got {settings.num_layers}")
    try:
        ModelConfig(settings.vocab_size, settings.dim, settings.num_layers, max_seq_len=served_positions(settings))
    except ValueError as error:
        raise ValueError(f"--dim {settings.dim}: {error}") from error
    return settings


def load_experiment_data(settings: ExperimentSettings) -> DataBundle:
    """The corpus, tokenizer and batches of a comparison (nothing is written but the tokenizer cache)."""
    return load_data(
        settings.text, vocab_size=settings.vocab_size, seq_len=settings.seq_len,
        batch_size=settings.batch_size, seed=settings.seed,
    )  # fmt: skip


def asymmetric_options(num_layers: int) -> tuple[dict[int, float], dict[int, float]]:
    """The SPEC's asymmetric example, ``{1: 0.7, 2: 0, 3: 0.3}`` / ``{1: 1.0, 2: 0.5, 3: 0.1}``.

    For other depths it generalises the same shape: weight 0.7 on the first layer and 0.3
    on the last, none between; learning-rate scales falling linearly from 1.0 to 0.1.
    """
    if num_layers == 3:
        return {1: 0.7, 2: 0.0, 3: 0.3}, {1: 1.0, 2: 0.5, 3: 0.1}
    if num_layers < 2:
        raise ValueError(f"the asymmetric run needs num_layers >= 2, got {num_layers}")
    weights = {layer: 0.0 for layer in range(1, num_layers + 1)}
    weights[1], weights[num_layers] = 0.7, 0.3
    scales = {layer: round(1.0 - 0.9 * (layer - 1) / (num_layers - 1), 4) for layer in weights}
    return weights, scales


RUN_NAMES = ("standard", "deep_supervision", "asymmetric")
"""The runs of the comparison, in the order they are trained and reported."""


def build_runs(settings: ExperimentSettings) -> list[tuple[str, type[EarlyExitDecoder], TrainingConfig]]:
    """The (name, model class, config) triples of the runs ``settings.runs`` names, in :data:`RUN_NAMES` order.

    Raises:
        ValueError: a name in ``settings.runs`` that is not one of :data:`RUN_NAMES`, or none.
    """
    unknown = [name for name in settings.runs if name not in RUN_NAMES]
    if unknown or not settings.runs:
        raise ValueError(f"runs must name some of {', '.join(RUN_NAMES)}, got {', '.join(settings.runs) or 'none'}")
    layers, verbose = settings.num_layers, settings.verbose
    weights, scales = asymmetric_options(layers) if "asymmetric" in settings.runs else ({}, {})
    runs = [
        ("standard", StandardTransformer, create_standard_config(layers, seed=settings.seed, verbose=verbose)),
        (
            "deep_supervision",
            DeepSupervisionTransformer,
            create_deep_supervision_config(
                layers, routing_threshold=settings.threshold, seed=settings.seed, verbose=verbose
            ),
        ),
        (
            "asymmetric",
            DeepSupervisionTransformer,
            TrainingConfig(
                layer_weights=weights,
                layer_lr_scales=scales,
                routing_threshold=settings.threshold,
                seed=settings.seed,
                verbose=verbose,
            )
            if weights
            else None,
        ),
    ]
    return [run for run in runs if run[0] in settings.runs]


def run_experiments(settings: ExperimentSettings, data: DataBundle | None = None) -> dict:
    """Train and evaluate every run, write the output folder, and return the results.

    Every setting is checked (:func:`check_settings`) and the data loaded (unless given,
    from :func:`load_experiment_data`) before the output folder is created.

    Under ``torchrun`` every rank trains (DDP, each rank on its rows of every batch) and
    returns the same results; rank 0 alone prints and writes the output folder.

    The saved models serve :func:`served_positions` positions, not only ``seq_len``; the
    deep-supervision models carry the threshold :func:`ease.calibrate_threshold` picks
    (at most one point of accuracy lost on the validation data) as their
    ``exit_settings``, the default of their ``generate``.
    """
    check_settings(settings)
    data = load_experiment_data(settings) if data is None else data
    out = Path(settings.out)
    # The Trainers join this same process group; it tells which rank writes.
    writer = setup_distributed("auto").is_main
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "tokenizer.json") as tmp:
            data.tokenizer.save(str(tmp))
    baseline = unigram_baseline(data.train_ids, data.val_ids, data.vocab_size)
    results = {
        "settings": asdict(settings),
        "data": {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "vocab_size": data.vocab_size},
        "unigram_baseline": baseline,
        "runs": {},
    }
    for name, model_cls, config in build_runs(settings):
        if settings.verbose and writer:
            print(f"\n== {name} ==", flush=True)
        set_seed(settings.seed)
        model = model_cls(data.vocab_size, settings.dim, settings.num_layers, max_seq_len=served_positions(settings))
        trainer = Trainer(config, vocab_size=data.vocab_size)
        optimizer = trainer.create_optimizer(model, base_lr=settings.lr)
        start = time.perf_counter()
        stopping = trainer.train_with_early_stopping(
            model=model, train_batches=data.train_batches, val_batches=data.val_batches,
            optimizer=optimizer, max_epochs=settings.max_epochs, patience=settings.patience,
            verbose=settings.verbose,
        )
        seconds = time.perf_counter() - start
        # The restored weights are the best epoch's, evaluated already during training.
        stats = next(h["val"] for h in stopping.history if h["epoch"] == stopping.best_epoch)
        sweep = []
        if model.trains_every_layer:
            # One pass over the validation data scores every threshold (the same exit rule
            # and figures as evaluate(routing_threshold=...), without a pass per threshold).
            calibration = calibrate_threshold(model, data.val_batches, thresholds=settings.thresholds)
            model.exit_settings = ExitSettings.from_calibration(calibration)
            points = {point.threshold: point for point in calibration.sweep}
            sweep = [
                {key: getattr(points[float(t)], key) for key in ("threshold", "accuracy", "mean_exit_layer", "compute_saved")}
                for t in settings.thresholds
            ]
        if writer:
            model.save_pretrained(out / "models" / name, tokenizer=data.tokenizer)
        results["runs"][name] = {
            "model_class": model_cls.__name__,
            "layer_weights": jsonable(config.layer_weights or {}),
            "layer_lr_scales": jsonable(config.layer_lr_scales or {}),
            "train_seconds": seconds,
            "early_stopping": stopping.as_dict(),
            "evaluation": jsonable(stats),
            "threshold_sweep": sweep,
        }
    table = results_table(results)
    results["table"] = table
    if writer:
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        atomic_write_text(out / "results.md", table)
        plot_results(results, out)
    return results


def results_table(results: dict) -> str:
    """Markdown: one row per run plus the unigram baseline, then the threshold sweeps."""
    base = results["unigram_baseline"]
    lines = [
        "| run | val loss | PPL | final-layer acc | early-exit acc | mean exit layer | compute saved | epochs | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| unigram baseline | {base['loss']:.3f} | {base['ppl']:.1f} | {base['accuracy']:.3f} | | | | | |",
    ]
    for name, run in results["runs"].items():
        ev, stop = run["evaluation"], run["early_stopping"]
        exit_stats = ev.get("early_exit")
        exit_cells = (
            f"{exit_stats['accuracy']:.3f} (τ={exit_stats['threshold']:g}) | {exit_stats['mean_exit_layer']:.2f} | "
            f"{exit_stats['compute_saved']:.1%}"
            if exit_stats else "n/a | n/a | n/a"
        )
        lines.append(
            f"| {name} | {ev['loss']:.3f} | {ev['ppl']:.1f} | {ev['accuracy']:.3f} | {exit_cells} | "
            f"{stop['epochs_run']} (best {stop['best_epoch']}) | {run['train_seconds']:.0f} s |"
        )
    for name, run in results["runs"].items():
        if not run["threshold_sweep"]:
            continue
        per_layer = run["evaluation"].get("layers", {})
        layer_acc = ", ".join(f"L{k}: {v['accuracy']:.3f}" for k, v in per_layer.items())
        lines += [
            "", f"Threshold sweep, {name} (per-layer accuracy {layer_acc}):", "",
            "| threshold | accuracy | mean exit layer | compute saved |", "| ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {row['threshold']:g} | {row['accuracy']:.3f} | {row['mean_exit_layer']:.2f} | {row['compute_saved']:.1%} |"
            for row in run["threshold_sweep"]
        ]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out: Path) -> list[Path]:
    """Loss curves and accuracy against mean layers used; nothing when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install 'ease[plots]')")
        return []
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in results["runs"].items():
        history = run["early_stopping"]["history"]
        epochs = [h["epoch"] for h in history]
        line, = ax.plot(epochs, [h["train_loss"] for h in history], "--", label=f"{name} train (objective)")
        ax.plot(epochs, [h["val"]["loss"] for h in history], "-", color=line.get_color(), label=f"{name} val (final layer)")
    ax.axhline(results["unigram_baseline"]["loss"], color="grey", lw=0.8, label="unigram baseline")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    written.append(_save_figure(fig, ax, out / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    num_layers = results["settings"]["num_layers"]
    for name, run in results["runs"].items():
        if run["threshold_sweep"]:
            sweep = run["threshold_sweep"]
            line, = ax.plot([r["mean_exit_layer"] for r in sweep], [r["accuracy"] for r in sweep], "o-", label=name)
            _label_thresholds(ax, sweep, line.get_color())
        else:
            ax.plot([num_layers], [run["evaluation"]["accuracy"]], "s", label=f"{name} (full depth)")
    ax.set_xlabel("mean layers used per token")
    ax.set_ylabel("next-token accuracy")
    ax.set_title("early exit: accuracy against computation (points labelled τ)")
    written.append(_save_figure(fig, ax, out / "exit_tradeoff.png"))
    return written


def _label_thresholds(ax, sweep: list[dict], color: str) -> None:
    """Write each point's threshold beside it, skipping points that would overprint the last label."""
    x_span = max(r["mean_exit_layer"] for r in sweep) - min(r["mean_exit_layer"] for r in sweep) or 1.0
    y_span = max(r["accuracy"] for r in sweep) - min(r["accuracy"] for r in sweep) or 1.0
    last = None
    for row in sweep:
        x, y = row["mean_exit_layer"], row["accuracy"]
        # A label is about a tenth of the x span wide at this size; closer points in x and y share one.
        if last is not None and abs(x - last[0]) < 0.1 * x_span and abs(y - last[1]) < 0.1 * y_span:
            continue
        ax.annotate(f"τ={row['threshold']:g}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                    color=color)
        last = (x, y)


def _save_figure(fig, ax, path: Path) -> Path:
    """Add the legend, write ``path`` atomically and close the figure."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m ease.experiments
    import sys

    from ease.cli.experiments import main

    sys.exit(main())

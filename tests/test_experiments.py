"""Tests of ease.experiments: a tiny comparison run end to end, its table, flags and plots.

The runs use a slice of the built-in corpus, a 300-token BPE and a 16-wide model, so
one full comparison (three trainings, the sweep, the files) takes a few seconds. The
torchrun test checks that two ranks print one table and that rank 0 alone writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _torchrun import environment, run_torchrun
from ease import Trainer, TrainingConfig, experiments
from ease.cli import experiments as experiments_cli
from ease.data import load_data, load_default_text
from ease.models import load_model

THRESHOLDS = (0.05, 0.3, 0.6, 0.99)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_flags(text: Path, out: Path) -> list[str]:
    return [
        "--text", str(text), "--out", str(out), "--vocab-size", "300", "--dim", "16", "--seq-len", "16",
        "--batch-size", "8", "--max-epochs", "2", "--patience", "1",
        "--thresholds", ",".join(map(str, THRESHOLDS)), "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 40 kB of the built-in corpus: enough for several batches of each split."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(load_default_text()[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> tuple[dict, Path]:
    """``(results, output folder)`` of one tiny comparison through the command-line entry."""
    out = tmp_path_factory.mktemp("experiments")
    cache = tmp_path_factory.mktemp("bpe-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EASE_CACHE_DIR", str(cache))  # never the user's ~/.cache
        results = experiments_cli.run(tiny_flags(corpus, out))
    return results, out


def test_every_run_is_trained_and_written(finished) -> None:
    results, out = finished
    assert list(results["runs"]) == ["standard", "deep_supervision", "asymmetric"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "results.md").read_text() == results["table"]
    for name, run in results["runs"].items():
        stopping = run["early_stopping"]
        assert 1 <= stopping["best_epoch"] <= stopping["epochs_run"] <= 2
        assert len(stopping["history"]) == stopping["epochs_run"]
        assert (out / "models" / name / "tokenizer.json").is_file()


def test_saved_models_are_the_evaluated_ones(finished, corpus, tmp_path) -> None:
    # Each saved model, reloaded and evaluated on the same validation batches, gives the
    # figures in results.json: the restored best state is what was saved.
    results, out = finished
    settings = results["settings"]
    data = load_data(
        corpus, vocab_size=settings["vocab_size"], seq_len=settings["seq_len"],
        batch_size=settings["batch_size"], seed=settings["seed"], cache_dir=tmp_path,
    )  # fmt: skip
    for name, run in results["runs"].items():
        model = load_model(out / "models" / name)
        assert type(model).__name__ == run["model_class"]
        figures = Trainer(TrainingConfig(verbose=False), data.vocab_size).evaluate(model, data.val_batches)
        assert figures["loss"] == pytest.approx(run["evaluation"]["loss"], rel=1e-6), name
        assert figures["accuracy"] == run["evaluation"]["accuracy"], name


def test_asymmetric_run_uses_the_spec_example(finished) -> None:
    results, _ = finished
    asymmetric = results["runs"]["asymmetric"]
    assert asymmetric["layer_weights"] == {"1": 0.7, "2": 0.0, "3": 0.3}
    assert asymmetric["layer_lr_scales"] == {"1": 1.0, "2": 0.5, "3": 0.1}
    # Layer 2 has weight 0: it is evaluated, but never trained through its own head.
    assert set(asymmetric["evaluation"]["layers"]) == {"1", "2", "3"}


def test_threshold_sweep_trades_accuracy_for_computation(finished) -> None:
    results, _ = finished
    assert results["runs"]["standard"]["threshold_sweep"] == []
    for name in ("deep_supervision", "asymmetric"):
        sweep = results["runs"][name]["threshold_sweep"]
        assert [row["threshold"] for row in sweep] == list(THRESHOLDS)
        exit_layers = [row["mean_exit_layer"] for row in sweep]
        saved = [row["compute_saved"] for row in sweep]
        # A higher threshold lets fewer tokens leave early: later exits, less saved.
        assert exit_layers == sorted(exit_layers), f"{name}: {exit_layers}"
        assert saved == sorted(saved, reverse=True), f"{name}: {saved}"
        assert all(1.0 <= layer <= 3.0 for layer in exit_layers)
        # Only tokens that left early can change the answer, and each of them saves at
        # least 1/3 of the layers: |accuracy - final-layer accuracy| <= 3 * compute saved.
        final = results["runs"][name]["evaluation"]["accuracy"]
        for row in sweep:
            assert abs(row["accuracy"] - final) <= 3 * row["compute_saved"] + 1e-9, f"{name}: {row}"


def test_table_has_the_baseline_and_one_row_per_run(finished) -> None:
    results, _ = finished
    rows = [line for line in results["table"].splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:5] == ["run", "unigram baseline", "standard", "deep_supervision", "asymmetric"]
    standard = rows[names.index("standard")]
    assert "n/a" in standard  # no exit heads to sweep
    ppl = results["runs"]["deep_supervision"]["evaluation"]["ppl"]
    assert f"| {ppl:.1f} |" in rows[names.index("deep_supervision")]
    assert results["table"].count("Threshold sweep,") == 2


def test_plots_are_png_files(finished) -> None:
    pytest.importorskip("matplotlib")
    _, out = finished
    for name in ("loss_curves.png", "exit_tradeoff.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert not list(out.rglob("*.tmp"))


def test_asymmetric_options_generalise_to_other_depths() -> None:
    assert experiments.asymmetric_options(3) == ({1: 0.7, 2: 0.0, 3: 0.3}, {1: 1.0, 2: 0.5, 3: 0.1})
    weights, scales = experiments.asymmetric_options(5)
    assert weights == {1: 0.7, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.3}
    assert scales[1] == 1.0 and scales[5] == pytest.approx(0.1)
    assert list(scales.values()) == sorted(scales.values(), reverse=True)
    with pytest.raises(ValueError, match="num_layers >= 2"):
        experiments.asymmetric_options(1)


def test_flags_map_onto_settings() -> None:
    settings = experiments_cli.parse_args(["--num-layers", "4", "--thresholds", "0.5, 0.9", "--quiet"])
    assert (settings.num_layers, settings.thresholds, settings.verbose) == (4, (0.5, 0.9), False)
    assert experiments_cli.parse_args([]) == experiments.ExperimentSettings()


def test_bad_thresholds_flag_names_the_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        experiments_cli.parse_args(["--thresholds", "0.5,high"])
    assert "--thresholds must be comma-separated numbers" in capsys.readouterr().err


def test_under_torchrun_rank_zero_alone_prints_and_writes(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    # One run of one epoch: what is tested is who prints and writes, not the training.
    flags = [*tiny_flags(corpus, out), "--runs", "deep_supervision", "--max-epochs", "1"]
    completed = run_torchrun(
        ["-m", "ease.experiments", *flags],
        env=environment(EASE_CACHE_DIR=str(tmp_path / "cache")),
        before_retry=lambda: shutil.rmtree(out, ignore_errors=True),
    )
    assert completed.stdout.count("| unigram baseline |") == 1, completed.stdout
    assert completed.stdout.count("wrote ") == 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["deep_supervision"]
    assert not list(out.rglob("*.tmp"))


# -- flags are checked before any file is written; one error line, exit status 2 ----------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text", "no/such/file.txt"], "--text no/such/file.txt: no such file"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
        (["--thresholds", "0.5,0"], "--thresholds must be in (0, 1], got 0.0"),
        (["--dim", "30"], "--dim 30: num_heads must be >= 1 and divide dim=30"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--vocab-size", "100"], "--vocab-size must be an integer >= 257"),
        (["--num-layers", "1"], "--num-layers must be >= 2 for the asymmetric run"),
        (["--runs", "standard,bogus"], "--runs must name some of standard,deep_supervision,asymmetric"),
        (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    ],
)
def test_bad_flags_are_one_error_line_before_any_file(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "out"
    assert experiments_cli.main(["--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_argparse_errors_are_one_line_too(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        experiments_cli.parse_args(["--dim", "wide"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --dim")


def test_a_corpus_too_small_is_an_error_line_not_a_traceback(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("EASE_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "tiny.txt"
    text.write_text("too short", encoding="utf-8")
    assert experiments_cli.main(["--text", str(text), "--out", str(tmp_path / "out"), "--quiet",
                                 "--vocab-size", "300"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_default_threads_is_one_on_small_machines(monkeypatch) -> None:
    monkeypatch.setattr(experiments_cli.os, "cpu_count", lambda: 2)
    assert experiments_cli.default_threads() == 1
    monkeypatch.setattr(experiments_cli.os, "cpu_count", lambda: 32)
    assert experiments_cli.default_threads() == 8


# -- saved models: tokenizer, positions beyond the training length, calibrated settings -----
def test_saved_models_serve_more_positions_than_they_trained_on(finished) -> None:
    from tokenizers import Tokenizer

    results, out = finished
    folder = out / "models" / "deep_supervision"
    model = load_model(folder)
    assert model.config.max_seq_len == experiments.SERVED_POSITIONS > results["settings"]["seq_len"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    generated = model.generate([tokenizer.encode("The").ids], 200)
    assert generated.new_tokens.shape == (1, 200)
    # The calibrated threshold travels with the model, as generate's default.
    settings = model.exit_settings
    assert settings.calibration["max_accuracy_drop"] == 0.01
    assert settings.routing_threshold == settings.calibration["threshold"]
    assert load_model(out / "models" / "standard").exit_settings.routing_threshold is None


def test_a_longer_rope_table_changes_nothing_in_training() -> None:
    import torch

    from ease import DeepSupervisionTransformer, create_deep_supervision_config

    batch = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(0))
    losses, states = [], []
    for positions in (16, experiments.SERVED_POSITIONS):
        torch.manual_seed(0)
        model = DeepSupervisionTransformer(300, 16, 3, max_seq_len=positions)
        trainer = Trainer(create_deep_supervision_config(3, verbose=False), vocab_size=300)
        loss, _ = trainer.compute_loss(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        losses.append(loss.item())
        states.append({name: p.grad.clone() for name, p in model.named_parameters()})
        states[-1]["rope_cos"] = model.rope_cos[:16].clone()
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_tradeoff_points_are_labelled_with_their_threshold() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    sweep = [{"threshold": t, "mean_exit_layer": 3 - t, "accuracy": 0.2 + t / 10} for t in (0.2, 0.5, 0.9)]
    sweep.append({"threshold": 0.95, "mean_exit_layer": 2.1, "accuracy": 0.29})  # on top of 0.9: not relabelled
    experiments._label_thresholds(ax, sweep, "C0")
    assert [text.get_text() for text in ax.texts] == ["τ=0.2", "τ=0.5", "τ=0.9"]
    plt.close(fig)

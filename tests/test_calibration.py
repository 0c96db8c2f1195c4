"""Tests of ease.calibration: the threshold sweep, the choice, the plot, the errors."""

import json
import sys

import pytest
import torch

from _builders import random_batches, tiny_model
import ease
from ease import Trainer, TrainingConfig, calibrate_threshold
from ease.calibration import DEFAULT_THRESHOLDS, CalibrationResult
from ease.data import IGNORE_INDEX

VOCAB = 50



def random_model(num_layers=4, seed=0):
    """Wide random weights (std 0.3): confidences spread over about 0.1..0.6."""
    return tiny_model(
        vocab_size=VOCAB, num_layers=num_layers, seed=seed, weight_std=0.3, eval_mode=True,
        max_seq_len=32, tie_embeddings=False,
    )  # fmt: skip


def batches(count=3, seed=1):
    return random_batches(count, rows=4, columns=17, vocab_size=VOCAB, seed=seed)


THRESHOLDS = [0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]


@pytest.mark.parametrize("min_exit_layer", [1, 2])
def test_sweep_equals_trainer_evaluate_at_each_threshold(min_exit_layer):
    """Every sweep point equals the trainer's early-exit figures at that threshold."""
    model, val = random_model(), batches()
    result = calibrate_threshold(model, val, thresholds=THRESHOLDS, min_exit_layer=min_exit_layer)
    trainer = Trainer(TrainingConfig(verbose=False), vocab_size=VOCAB)
    assert [p.threshold for p in result.sweep] == THRESHOLDS
    assert result.num_tokens == 3 * 4 * 16
    full = trainer.evaluate(model, val)
    assert result.full_depth_accuracy == pytest.approx(full["accuracy"], abs=1e-12)
    for layer, accuracy in result.layer_accuracy.items():
        assert accuracy == pytest.approx(full["layers"][layer]["accuracy"], abs=1e-12)
    for point in result.sweep:
        expected = trainer.evaluate(model, val, routing_threshold=point.threshold, min_exit_layer=min_exit_layer)
        early = expected["early_exit"]
        assert point.accuracy == pytest.approx(early["accuracy"], abs=1e-12)
        assert point.mean_exit_layer == pytest.approx(early["mean_exit_layer"], abs=1e-12)
        assert point.compute_saved == pytest.approx(early["compute_saved"], abs=1e-12)
        for layer, fraction in point.exit_fractions.items():
            assert fraction == pytest.approx(early["exit_fractions"][layer], abs=1e-12)
    assert len({p.mean_exit_layer for p in result.sweep}) >= 4, "the sweep should span several depths"


def test_mean_exit_layer_grows_with_threshold_and_respects_min_exit_layer():
    result = calibrate_threshold(random_model(), batches(), thresholds=THRESHOLDS, min_exit_layer=2)
    depths = [p.mean_exit_layer for p in result.sweep]
    assert depths == sorted(depths)
    assert all(p.exit_fractions[1] == 0 for p in result.sweep)
    assert all(sum(p.exit_fractions.values()) == pytest.approx(1.0) for p in result.sweep)


@pytest.mark.parametrize("max_accuracy_drop", [0.0, 0.01, 0.03, 0.1, 1.0])
def test_chosen_threshold_is_the_lowest_within_the_drop(max_accuracy_drop):
    result = calibrate_threshold(random_model(), batches(), max_accuracy_drop, thresholds=THRESHOLDS)
    within = [p for p in result.sweep if result.full_depth_accuracy - p.accuracy <= max_accuracy_drop + 1e-12]
    if within:
        assert result.threshold == within[0].threshold
        assert result.chosen is within[0]
        # The lowest qualifying threshold saves the most compute among those that qualify.
        assert result.chosen.compute_saved == max(p.compute_saved for p in within)
    else:
        assert result.threshold is None and result.chosen is None
    if max_accuracy_drop == 1.0:
        assert result.threshold == THRESHOLDS[0]


def test_no_threshold_qualifies():
    """At threshold 1.0 no random-model confidence exits, so 1.0 matches full depth; without
    1.0 in the sweep and with a zero drop, nothing may qualify."""
    model, val = random_model(), batches()
    result = calibrate_threshold(model, val, 0.0, thresholds=[1.0])
    assert result.threshold == 1.0 and result.chosen.mean_exit_layer == 4.0
    low = calibrate_threshold(model, val, 0.0, thresholds=[0.01])
    assert low.sweep[0].mean_exit_layer == 1.0
    if low.sweep[0].accuracy < low.full_depth_accuracy:
        assert low.threshold is None


def test_model_runs_once_per_batch_whatever_the_number_of_thresholds():
    model, val = random_model(), batches()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    calibrate_threshold(model, val)
    assert len(calls) == len(val)
    assert [p.threshold for p in calibrate_threshold(model, val).sweep] == sorted(DEFAULT_THRESHOLDS)


def test_ignored_targets_are_skipped_and_pairs_accepted():
    model, val = random_model(), batches(1)
    inputs, targets = val[0][:, :-1], val[0][:, 1:].clone()
    targets[:, :8] = IGNORE_INDEX
    result = calibrate_threshold(model, [(inputs, targets)], thresholds=[0.3])
    assert result.num_tokens == 4 * 8
    expected = Trainer(TrainingConfig(verbose=False), VOCAB).evaluate(model, [(inputs, targets)], routing_threshold=0.3)
    assert result.sweep[0].accuracy == pytest.approx(expected["early_exit"]["accuracy"])


def test_mode_is_restored():
    model = random_model().train()
    calibrate_threshold(model, batches(1), thresholds=[0.5])
    assert model.training


def test_to_dict_is_json_and_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    result = calibrate_threshold(random_model(), batches(), 0.05)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["threshold"] == result.threshold and len(payload["sweep"]) == len(DEFAULT_THRESHOLDS)
    figure = result.plot(tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    assert figure.axes[0].get_xlabel() == "mean layers used per token"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    result = CalibrationResult(None, 0.5, 0.01, 1, 2, 10, {1: 0.4, 2: 0.5}, [])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="matplotlib"):
        result.plot()


def test_errors():
    model, val = random_model(), batches(1)
    with pytest.raises(ValueError, match="thresholds"):
        calibrate_threshold(model, val, thresholds=[0.0, 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        calibrate_threshold(model, val, thresholds=[1.2])
    with pytest.raises(ValueError, match="thresholds"):
        calibrate_threshold(model, val, thresholds=[])
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        calibrate_threshold(model, val, -0.01)
    with pytest.raises(ValueError, match="min_exit_layer"):
        calibrate_threshold(model, val, min_exit_layer=5)
    with pytest.raises(ValueError, match="no batch"):
        calibrate_threshold(model, [])
    inputs = val[0][:, :-1]
    with pytest.raises(ValueError, match="no target tokens"):
        calibrate_threshold(model, [(inputs, torch.full_like(inputs, IGNORE_INDEX))])


def test_exported_from_the_package():
    assert ease.calibrate_threshold is calibrate_threshold
    assert ease.CalibrationResult is CalibrationResult

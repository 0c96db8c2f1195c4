"""Tests of ease.calibration: the threshold sweep, the choice, the plot, the errors, and the
risk-controlled choice (its p-values, its fixed-sequence test, its guarantee)."""

import json
import math
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from _builders import random_batches, tiny_model
import ease
from ease import Trainer, TrainingConfig, calibrate_threshold
from ease.calibration import (
    DEFAULT_THRESHOLDS,
    CalibrationResult,
    _log_binomial_cdf,
    binomial_tail_p_value,
    fixed_sequence_rejections,
    hoeffding_bentkus_p_value,
    risk_controlled_threshold,
)
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
        assert point.agreement == pytest.approx(early["agreement"], abs=1e-12)
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



# --- Risk control ------------------------------------------------------------------------


def exact_binomial_cdf(k, n, p):
    """``P(Binomial(n, p) <= k)`` as an exact fraction (``p`` a Fraction)."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


# Float results against exact rational sums: the only error is the float64 rounding of a
# few thousand log terms, well under 1e-10 relative.
@pytest.mark.parametrize("n", [1, 2, 5, 12, 30])
@pytest.mark.parametrize("eps", [Fraction(1, 100), Fraction(1, 10), Fraction(37, 100), Fraction(9, 10)])
def test_binomial_tail_p_value_equals_the_exact_sum(n, eps):
    for k in range(n + 1):
        exact = float(exact_binomial_cdf(k, n, eps))
        assert binomial_tail_p_value(k, n, float(eps)) == pytest.approx(exact, rel=1e-10, abs=1e-300), (k, n)


def test_binomial_tail_is_computed_in_log_space():
    """Large n, and a tail far below float64's smallest number: the log is still right."""
    n, eps = 2000, Fraction(1, 100)
    for k in (0, 5, 20, 40):
        exact = exact_binomial_cdf(k, n, eps)
        assert binomial_tail_p_value(k, n, 0.01) == pytest.approx(float(exact), rel=1e-10)
    exact = exact_binomial_cdf(3, n, Fraction(1, 2))  # about 1e-591
    log_exact = math.log(exact.numerator) - math.log(exact.denominator)
    assert _log_binomial_cdf(3, n, 0.5) == pytest.approx(log_exact, rel=1e-12)
    assert binomial_tail_p_value(3, n, 0.5) == 0.0


def test_p_value_edges():
    assert binomial_tail_p_value(0, 10, 0.0) == 1.0  # a zero risk can never be certified
    assert binomial_tail_p_value(10, 10, 1.0) == 0.0  # a risk above 1 is impossible
    assert binomial_tail_p_value(10, 10, 0.3) == 1.0
    assert hoeffding_bentkus_p_value(0.0, 10, 0.0) == 1.0
    assert hoeffding_bentkus_p_value(1.0, 10, 1.0) == 0.0
    assert hoeffding_bentkus_p_value(0.3, 50, 0.2) == 1.0  # estimate above the level
    with pytest.raises(ValueError):
        binomial_tail_p_value(11, 10, 0.1)
    with pytest.raises(ValueError):
        hoeffding_bentkus_p_value(1.5, 10, 0.1)


@pytest.mark.parametrize("risk, n, eps", [(0.05, 100, 0.1), (0.0, 40, 0.2), (0.123, 57, 0.3), (0.01, 1000, 0.02)])
def test_hoeffding_bentkus_is_the_smaller_of_its_two_bounds(risk, n, eps):
    a = risk
    entropy = (a * math.log(a / eps) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
    hoeffding = math.exp(-n * entropy)
    bentkus = math.e * float(exact_binomial_cdf(math.ceil(n * risk - 1e-9), n, Fraction(eps)))
    assert hoeffding_bentkus_p_value(risk, n, eps) == pytest.approx(min(1.0, hoeffding, bentkus), rel=1e-10)
    # On 0/1 losses the exact binomial tail is valid and never larger.
    k = round(n * risk)
    assert binomial_tail_p_value(k, n, eps) <= hoeffding_bentkus_p_value(k / n, n, eps)


DELTAS = [0.01, 0.05, 0.1, 0.2, 0.5]


@pytest.mark.parametrize("n", [5, 20, 60])
@pytest.mark.parametrize("true_risk", [0.2, 0.25, 0.4])
def test_p_values_are_valid_for_a_0_1_loss_exactly(n, true_risk):
    """Under "risk > eps" (here risk >= eps = 0.2, its closure), P(p <= delta) <= delta,
    summed exactly over every outcome k of Binomial(n, risk)."""
    eps = 0.2
    pmf = [math.comb(n, k) * true_risk**k * (1 - true_risk) ** (n - k) for k in range(n + 1)]
    for p_value in (lambda k: binomial_tail_p_value(k, n, eps), lambda k: hoeffding_bentkus_p_value(k / n, n, eps)):
        values = [p_value(k) for k in range(n + 1)]
        for delta in DELTAS:
            assert sum(q for q, p in zip(pmf, values) if p <= delta) <= delta + 1e-12


@pytest.mark.parametrize("probabilities", [(0.7, 0.2, 0.1), (0.6, 0.4, 0.0), (0.8, 0.0, 0.2), (0.5, 0.3, 0.2)])
def test_hoeffding_bentkus_is_valid_for_a_bounded_loss_exactly(probabilities):
    """A loss in {0, 1/2, 1} with mean >= eps = 0.2: P(p <= delta) <= delta, summed exactly
    over every outcome of n = 12 draws (the multinomial counts)."""
    n, eps = 12, 0.2
    q0, q1, q2 = probabilities
    assert q1 / 2 + q2 >= eps - 1e-12
    rejected = {delta: 0.0 for delta in DELTAS}
    for halves in range(n + 1):
        for ones in range(n + 1 - halves):
            zeros = n - halves - ones
            probability = math.factorial(n) / (math.factorial(zeros) * math.factorial(halves) * math.factorial(ones))
            probability *= q0**zeros * q1**halves * q2**ones
            p = hoeffding_bentkus_p_value((halves / 2 + ones) / n, n, eps)
            for delta in DELTAS:
                rejected[delta] += probability if p <= delta else 0.0
    for delta, rate in rejected.items():
        assert rate <= delta + 1e-12, (delta, rate)


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence_rejections([0.01, 0.2, 0.01], 0.1) == 1
    assert fixed_sequence_rejections([0.2, 0.01], 0.1) == 0
    assert fixed_sequence_rejections([0.1, 0.05, 0.0], 0.1) == 3  # p <= delta rejects
    assert fixed_sequence_rejections([0.01, math.nan, 0.01], 0.1) == 1
    assert fixed_sequence_rejections([], 0.1) == 0


def losses_with_counts(counts, n):
    """(S, n) 0/1 losses with ``counts[s]`` ones in row s."""
    return np.array([[1.0] * k + [0.0] * (n - k) for k in counts])


def test_risk_controlled_threshold_on_hand_made_losses():
    # thresholds given in increasing order; tested from 0.9 down
    thresholds, eps, delta, n = [0.3, 0.5, 0.9], 0.1, 0.1, 100
    # 0.9: p = 0.9 ** 100; 0.5: p = P(Bin(100, 0.1) <= 5) = 0.058; 0.3: p = P(... <= 30), about 1
    result = risk_controlled_threshold(losses_with_counts([30, 5, 0], n), thresholds, eps, delta)
    assert result.threshold == 0.5 and result.p_value == "binomial" and result.num_samples == n
    np.testing.assert_allclose(result.risk_estimates, [0.3, 0.05, 0.0])
    expected = [float(exact_binomial_cdf(k, n, Fraction(1, 10))) for k in (30, 5, 0)]
    np.testing.assert_allclose(result.p_values, expected, rtol=1e-10)
    # A failure stops the sequence even when a lower threshold would pass on its own.
    assert risk_controlled_threshold(losses_with_counts([0, 30, 0], n), thresholds, eps, delta).threshold == 0.9
    # The first (highest) threshold fails: nothing is certified.
    assert risk_controlled_threshold(losses_with_counts([0, 0, 30], n), thresholds, eps, delta).threshold is None
    # delta below the 0.058 of 0.5: it stops at 0.9.
    assert risk_controlled_threshold(losses_with_counts([30, 5, 0], n), thresholds, eps, 0.05).threshold == 0.9
    # Not 0/1: Hoeffding–Bentkus, which is more conservative than the binomial tail.
    halves = losses_with_counts([30, 5, 0], n) / 2
    bounded = risk_controlled_threshold(halves, thresholds, eps, delta)
    assert bounded.p_value == "hoeffding_bentkus"
    assert bounded.p_values[1] == pytest.approx(hoeffding_bentkus_p_value(0.025, n, eps))
    forced = risk_controlled_threshold(losses_with_counts([30, 5, 0], n), thresholds, eps, delta, "hoeffding_bentkus")
    # (equal at k = 0, where Hoeffding's Chernoff bound (1 - eps)^n is the exact tail)
    assert np.all(forced.p_values >= result.p_values * (1 - 1e-12))


def test_risk_controlled_threshold_errors():
    losses = losses_with_counts([1, 0], 10)
    with pytest.raises(ValueError, match="losses must be"):
        risk_controlled_threshold(losses, [0.5], 0.1, 0.1)
    with pytest.raises(ValueError, match="losses must be"):
        risk_controlled_threshold(np.zeros((2, 0)), [0.5, 0.9], 0.1, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        risk_controlled_threshold(losses * 2, [0.5, 0.9], 0.1, 0.1)
    with pytest.raises(ValueError, match="0/1"):
        risk_controlled_threshold(losses / 2, [0.5, 0.9], 0.1, 0.1, "binomial")
    with pytest.raises(ValueError, match="p_value"):
        risk_controlled_threshold(losses, [0.5, 0.9], 0.1, 0.1, "bonferroni")
    with pytest.raises(ValueError, match="delta"):
        risk_controlled_threshold(losses, [0.5, 0.9], 0.1, 1.0)
    with pytest.raises(ValueError, match="max_risk"):
        risk_controlled_threshold(losses, [0.5, 0.9], -0.1, 0.1)


@pytest.mark.parametrize("p_value", ["binomial", "hoeffding_bentkus"])
def test_the_guarantee_holds_on_synthetic_data(p_value):
    """The risk of the chosen threshold exceeds eps in at most a delta fraction of
    calibration draws; the plain rule (lowest threshold with measured risk <= eps), on
    the same draws, exceeds it far more often.

    The population: 100 000 tokens, each with a critical threshold c (0 for 80% of them,
    evenly spread over (0, 1) for the rest); a token's loss at threshold t is 1 when
    t < c, so losses grow as the threshold falls (a token that disagrees at t disagrees
    below it) and the risk is 0.2 (1 - t), exactly 0.1 = eps at t = 0.5. For the
    Hoeffding–Bentkus case each token's loss is the mean of two such indicators (values
    0, 1/2, 1; same risk). Each repetition draws n = 300 calibration tokens from the
    population with replacement, so the population's mean is the exact test risk (an
    infinite test set: no test-split noise). Slack: 3 binomial standard deviations of a
    violation rate of delta over the repetitions, sqrt(delta (1 - delta) / R).
    """
    grid = [round(0.05 * i, 2) for i in range(1, 21)]  # 0.05 .. 1.0
    population, hard = 100_000, 20_000
    critical = np.zeros(population)
    critical[:hard] = (np.arange(hard) + 0.5) / hard
    population_losses = (np.array(grid)[:, None] < critical[None, :]).astype(np.float64)  # (S, M)
    if p_value == "hoeffding_bentkus":
        shuffled = np.random.default_rng(1).permutation(population)
        population_losses = (population_losses + population_losses[:, shuffled]) / 2
    true_risk = population_losses.mean(1)
    assert true_risk[grid.index(0.5)] == pytest.approx(0.1, abs=1e-12)

    eps, delta, n, repetitions = 0.1, 0.1, 300, 1000
    draws = np.random.default_rng(0).integers(0, population, size=(repetitions, n))
    controlled, plain, chosen_risk = [], [], []
    for rows in draws:
        losses = population_losses[:, rows]
        result = risk_controlled_threshold(losses, grid, eps, delta, p_value)
        if result.threshold is not None:
            risk = true_risk[grid.index(result.threshold)]
            chosen_risk.append(risk)
            controlled.append(risk > eps)
        else:
            controlled.append(False)  # nothing certified: no false claim
        within = np.flatnonzero(losses.mean(1) <= eps)
        plain.append(within.size > 0 and true_risk[within.min()] > eps)
    slack = 3 * math.sqrt(delta * (1 - delta) / repetitions)  # 0.028
    controlled_rate, plain_rate = np.mean(controlled), np.mean(plain)
    assert controlled_rate <= delta + slack, (controlled_rate, plain_rate)
    assert plain_rate > delta + slack, (controlled_rate, plain_rate)
    # Not vacuous: a threshold is certified nearly always, and it spends part of the budget.
    assert len(chosen_risk) >= 0.95 * repetitions
    assert np.mean(chosen_risk) >= eps / 3


@pytest.mark.parametrize("risk", ["agreement", "accuracy"])
def test_risk_controlled_calibration(risk, tmp_path):
    model, val = random_model(), batches()
    eps, confidence = 0.3, 0.9
    result = calibrate_threshold(model, val, eps, thresholds=THRESHOLDS, confidence=confidence, risk=risk)
    plain = calibrate_threshold(model, val, eps, thresholds=THRESHOLDS, risk=risk)
    assert result.risk == risk and result.confidence == confidence
    assert result.tested_tokens == result.num_tokens == 3 * 4 * 16
    # The sweep's figures are the plain call's; the choice and its evidence differ.
    for point, reference in zip(result.sweep, plain.sweep):
        assert (point.accuracy, point.mean_exit_layer, point.agreement) == (
            reference.accuracy, reference.mean_exit_layer, reference.agreement
        )  # fmt: skip
        assert reference.p_value is None
        k = round(point.risk_estimate * result.tested_tokens)
        assert point.risk_estimate == pytest.approx(k / result.tested_tokens, abs=1e-12)
        assert point.p_value == pytest.approx(binomial_tail_p_value(k, result.tested_tokens, eps), rel=1e-12)
        if risk == "agreement":
            assert point.risk_estimate == pytest.approx(1 - point.agreement, abs=1e-12)
            assert reference.risk_estimate == pytest.approx(1 - reference.agreement, abs=1e-12)
        else:  # the tested loss bounds the drop from above, and is at most the disagreement
            assert point.accuracy_drop - 1e-12 <= point.risk_estimate <= 1 - point.agreement + 1e-12
            assert reference.risk_estimate == pytest.approx(reference.accuracy_drop, abs=1e-12)
    # Fixed sequence from the highest threshold down: the leading run of p <= delta.
    descending = result.sweep[::-1]
    run = fixed_sequence_rejections([p.p_value for p in descending], 1 - confidence)
    assert result.threshold == (descending[run - 1].threshold if run else None)
    assert result.threshold is not None and result.threshold != THRESHOLDS[-1], "the case should certify an exit"
    assert plain.guarantee is None and plain.confidence is None and plain.tested_tokens is None
    claim = "agreement with full depth >= 0.7" if risk == "agreement" else "accuracy drop from full depth <= 0.3"
    assert result.guarantee == (
        f"{claim} at threshold {result.threshold:g}, with probability >= 0.9 over 192 calibration tokens, "
        "taken as exchangeable"
    )
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["guarantee"] == result.guarantee and payload["sweep"][0]["p_value"] == result.sweep[0].p_value
    pytest.importorskip("matplotlib")
    figure = result.plot(tmp_path / "guaranteed.png")
    assert any("guaranteed" in text.get_text() for text in figure.axes[0].get_legend().get_texts())


def test_risk_controlled_calibration_per_sequence_and_when_nothing_is_certified():
    model, val = random_model(), batches()
    result = calibrate_threshold(model, val, 0.3, thresholds=THRESHOLDS, confidence=0.9, per_sequence=True)
    assert result.tested_tokens == 3 * 4  # one token of each row
    assert result.guarantee.endswith("over 12 calibration tokens, one per sequence")
    assert result.to_dict() == calibrate_threshold(
        model, val, 0.3, thresholds=THRESHOLDS, confidence=0.9, per_sequence=True
    ).to_dict()  # fmt: skip  (the draw is seeded)
    # At eps = 0 no risk can be certified (every p-value is 1).
    none = calibrate_threshold(model, val, 0.0, thresholds=THRESHOLDS, confidence=0.9, risk="agreement")
    assert none.threshold is None and none.chosen is None
    assert none.guarantee.startswith("none: no swept threshold certified agreement with full depth >= 1")


def test_risk_controlled_calibration_errors():
    model, val = random_model(), batches(1)
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            calibrate_threshold(model, val, confidence=confidence)
    with pytest.raises(ValueError, match="risk"):
        calibrate_threshold(model, val, confidence=0.9, risk="loss")
    with pytest.raises(ValueError, match="per_sequence"):
        calibrate_threshold(model, val, per_sequence=True)


def test_a_guaranteed_calibration_travels_with_the_model(tmp_path):
    from ease import ExitSettings, load_model

    model, val = random_model(), batches()
    result = calibrate_threshold(model, val, 0.3, confidence=0.9, risk="agreement")
    model.exit_settings = ExitSettings.from_calibration(result)
    model.save_pretrained(tmp_path)
    stored = load_model(tmp_path).exit_settings.calibration
    assert stored["risk"] == "agreement" and stored["confidence"] == 0.9
    assert stored["guarantee"] == result.guarantee and "probability >= 0.9" in result.guarantee

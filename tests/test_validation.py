"""One verdict per value: every entry point that takes an argument checks it with the same
function of ease.validation, so the same value gets the same answer and message everywhere.

For each argument the test runs every entry point that takes it on one value and
compares what comes back: accepted everywhere, or the same exception type and the same
message at every entry point. NumPy scalars count as numbers; bools never do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _builders import random_batches, tiny_model
from ease import Trainer, TrainingConfig, calibrate_threshold
from ease.exits import ExitRule
from ease.generation import generate
from ease.validation import check_int, check_real

VOCAB = 30
LAYERS = 3
MODEL = tiny_model(vocab_size=VOCAB, dim=16, num_layers=LAYERS, num_heads=2, max_seq_len=16)
VAL = random_batches(1, rows=2, columns=6, vocab_size=VOCAB)
PROMPT = [[1, 2, 3]]


def verdict(call) -> tuple[str, str] | str:
    """``"ok"``, or the exception's type and message."""
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error).__name__, str(error)
    return "ok"


def same_everywhere(verdicts: dict[str, tuple[str, str] | str]) -> None:
    distinct = set(verdicts.values())
    assert len(distinct) == 1, "different verdicts:\n" + "\n".join(f"  {k}: {v}" for k, v in verdicts.items())


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(TrainingConfig(verbose=False, **kwargs), VOCAB)


THRESHOLDS = [0.5, np.float32(0.5), np.float64(1.0), 1, 0.0, 1.5, -1, math.nan, True, "0.5", [0.5]]


@pytest.mark.parametrize("value", THRESHOLDS, ids=repr)
def test_routing_threshold(value) -> None:
    verdicts = {
        "TrainingConfig": verdict(lambda: TrainingConfig(routing_threshold=value)),
        "Trainer.evaluate": verdict(lambda: quiet_trainer().evaluate(MODEL, VAL, routing_threshold=value)),
        "generate": verdict(lambda: generate(MODEL, PROMPT, 2, routing_threshold=value)),
        "model.generate": verdict(lambda: MODEL.generate(PROMPT, 2, routing_threshold=value)),
        "ExitRule.for_model": verdict(lambda: ExitRule.for_model(MODEL, value)),
    }
    same_everywhere(verdicts)
    valid = not isinstance(value, (bool, str, list)) and not math.isnan(value) and 0 < value <= 1
    assert (verdicts["generate"] == "ok") == valid
    if not valid:
        assert "routing_threshold" in verdicts["generate"][1]


# None is left out: Trainer.evaluate reads it as "the config's value".
MIN_EXIT_LAYERS = [1, np.int64(2), np.int32(3), 0, 4, -1, True, 2.0, "1"]


@pytest.mark.parametrize("value", MIN_EXIT_LAYERS, ids=repr)
def test_min_exit_layer(value) -> None:
    def config_then_evaluate():
        trainer = quiet_trainer(routing_threshold=0.5, min_exit_layer=value)
        trainer.evaluate(MODEL, VAL)

    verdicts = {
        "TrainingConfig + evaluate": verdict(config_then_evaluate),
        "Trainer.evaluate": verdict(
            lambda: quiet_trainer().evaluate(MODEL, VAL, routing_threshold=0.5, min_exit_layer=value)
        ),
        "calibrate_threshold": verdict(lambda: calibrate_threshold(MODEL, VAL, min_exit_layer=value)),
        "generate": verdict(lambda: generate(MODEL, PROMPT, 2, routing_threshold=0.5, min_exit_layer=value)),
        "ExitRule.for_model": verdict(lambda: ExitRule.for_model(MODEL, 0.5, value)),
    }
    same_everywhere(verdicts)
    valid = not isinstance(value, (bool, str, float)) and 1 <= int(value) <= LAYERS
    assert (verdicts["generate"] == "ok") == valid
    if not valid:
        assert "min_exit_layer" in verdicts["generate"][1]


LAYER_NUMBERS = [2, np.int64(2), 0, 4, True, 2.0, "2"]


@pytest.mark.parametrize("value", LAYER_NUMBERS, ids=repr)
def test_layer_numbers(value) -> None:
    ids = VAL[0][:, :-1]
    verdicts = {
        "forward": verdict(lambda: MODEL(ids, exit_layers=[value])),
        "hidden_states": verdict(lambda: MODEL.hidden_states(ids, [value], None)),
        "check_layers": verdict(lambda: MODEL.check_layers([value])),
    }
    same_everywhere(verdicts)
    valid = not isinstance(value, (bool, str, float)) and 1 <= int(value) <= LAYERS
    assert (verdicts["forward"] == "ok") == valid
    # A bare layer number where a list is wanted is named, not "'int' object is not iterable".
    error = verdict(lambda: MODEL(ids, exit_layers=2))
    assert error[0] == "ArgumentTypeError" and "exit_layers must be a list of layer numbers" in error[1]


@pytest.mark.parametrize("value", [np.int64(2), np.int32(1), {np.int64(1): np.float32(0.5), 3: 0.5}])
def test_layer_option_keys_take_numpy_integers(value) -> None:
    weights = value if isinstance(value, dict) else {int(value): 1.0, LAYERS: 1.0}
    config = TrainingConfig(layer_weights=weights, layer_lr_scales={np.int64(1): np.float64(0.5)})
    assert all(type(layer) is int and type(w) is float for layer, w in config.layer_weights.items())
    assert config.lr_scale(1) == 0.5


def test_layer_option_keys_refuse_bools() -> None:
    with pytest.raises(ValueError, match=r"layer_weights keys must be layer numbers .*got True"):
        TrainingConfig(layer_weights={True: 1.0})


MAX_NEW_TOKENS = [0, 3, np.int64(3), -1, True, 2.0, "3", None]


@pytest.mark.parametrize("value", MAX_NEW_TOKENS, ids=repr)
def test_max_new_tokens(value) -> None:
    verdicts = {
        "generate": verdict(lambda: generate(MODEL, PROMPT, value)),
        "model.generate": verdict(lambda: MODEL.generate(PROMPT, value)),
        "generate early exit": verdict(lambda: generate(MODEL, PROMPT, value, routing_threshold=0.5)),
        "generate speculative": verdict(lambda: generate(MODEL, PROMPT, value, draft_layers=1)),
    }
    same_everywhere(verdicts)
    valid = not isinstance(value, (bool, str, float, type(None))) and int(value) >= 0
    assert (verdicts["generate"] == "ok") == valid
    if not valid:
        assert "max_new_tokens" in verdicts["generate"][1]


def test_numbers_come_back_as_python_numbers() -> None:
    assert type(check_int("n", np.int64(3))) is int
    assert type(check_real("x", np.float32(0.25))) is float
    assert type(TrainingConfig(routing_threshold=np.float32(0.5)).routing_threshold) is float
    # Wrong types are both TypeError and ValueError, so callers' old except clauses hold.
    with pytest.raises(TypeError):
        check_int("n", "3")
    with pytest.raises(ValueError):
        check_int("n", "3")

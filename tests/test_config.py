"""Tests of ease.config: every validation error (with the field it names) and the helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ease import (
    DeepSupervisionTransformer,
    StandardTransformer,
    Trainer,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
)

VOCAB = 50


@pytest.fixture(scope="module")
def deep_model() -> DeepSupervisionTransformer:
    return DeepSupervisionTransformer(vocab_size=VOCAB, dim=32, num_layers=3, max_seq_len=32)


@pytest.fixture(scope="module")
def standard_model() -> StandardTransformer:
    return StandardTransformer(vocab_size=VOCAB, dim=32, num_layers=3, max_seq_len=32)


# -- defaults ------------------------------------------------------------------------------
def test_defaults_are_the_documented_ones() -> None:
    config = TrainingConfig()
    assert config.layer_weights is None
    assert config.layer_lr_scales is None
    assert config.routing_threshold is None
    assert config.min_exit_layer == 1
    assert config.weight_decay == 0.1
    assert config.grad_clip == 1.0
    assert config.betas == (0.9, 0.95)
    assert config.seed == 0
    assert config.verbose is True


def test_weights_none_means_final_layer_only(deep_model) -> None:
    assert TrainingConfig().weights_for(deep_model) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_unlisted_layers_weigh_zero_and_weights_are_not_renormalised(deep_model) -> None:
    config = TrainingConfig(layer_weights={2: 3.0})
    assert config.weights_for(deep_model) == {1: 0.0, 2: 3.0, 3: 0.0}


def test_config_copies_the_user_dicts() -> None:
    weights = {1: 0.5, 3: 0.5}
    config = TrainingConfig(layer_weights=weights)
    weights[2] = 7.0
    assert config.layer_weights == {1: 0.5, 3: 0.5}


def test_numpy_numbers_are_accepted() -> None:
    config = TrainingConfig(layer_weights={np.int64(1): np.float32(0.5)}, layer_lr_scales={2: np.float64(0.25)})
    assert config.layer_weights == {1: 0.5}
    assert type(next(iter(config.layer_weights))) is int
    assert config.lr_scale(2) == 0.25 and config.lr_scale(1) == 1.0


# -- __post_init__ errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer_weights": {0: 1.0}}, r"layer_weights keys must be layer numbers .*got 0"),
        ({"layer_weights": {-2: 1.0}}, r"layer_weights keys .*got -2"),
        ({"layer_weights": {"1": 1.0}}, r"layer_weights keys .*got '1'"),
        ({"layer_weights": {1.0: 1.0}}, r"layer_weights keys .*got 1\.0"),
        ({"layer_weights": {True: 1.0}}, r"layer_weights keys .*got True"),
        ({"layer_weights": [1.0, 2.0]}, r"layer_weights must be a dict"),
        ({"layer_weights": {1: -0.1, 2: 1.0}}, r"layer_weights\[1\] must be >= 0, got -0\.1"),
        ({"layer_weights": {1: math.nan}}, r"layer_weights\[1\] must be a finite number"),
        ({"layer_weights": {1: math.inf}}, r"layer_weights\[1\] must be a finite number"),
        ({"layer_weights": {1: "0.5"}}, r"layer_weights\[1\] must be a finite number"),
        ({"layer_weights": {1: 0, 2: 0.0}}, r"layer_weights must give at least one layer a weight > 0"),
        ({"layer_weights": {}}, r"layer_weights must give at least one layer a weight > 0"),
        ({"layer_lr_scales": {0: 1.0}}, r"layer_lr_scales keys .*got 0"),
        ({"layer_lr_scales": {1: 0.0}}, r"layer_lr_scales\[1\] must be > 0, got 0\.0"),
        ({"layer_lr_scales": {2: -1.0}}, r"layer_lr_scales\[2\] must be > 0, got -1\.0"),
        ({"layer_lr_scales": {2: math.inf}}, r"layer_lr_scales\[2\] must be a finite number"),
        ({"routing_threshold": 0.0}, r"routing_threshold must be in \(0, 1\] or None, got 0\.0"),
        ({"routing_threshold": 1.5}, r"routing_threshold must be in \(0, 1\] or None, got 1\.5"),
        ({"routing_threshold": -1}, r"routing_threshold must be in \(0, 1\] or None, got -1"),
        ({"routing_threshold": math.nan}, r"routing_threshold must be in \(0, 1\]"),
        ({"routing_threshold": True}, r"routing_threshold must be in \(0, 1\]"),
        ({"min_exit_layer": 0}, r"min_exit_layer must be an integer >= 1.*got 0"),
        ({"min_exit_layer": 1.0}, r"min_exit_layer must be an integer >= 1"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got -0\.1"),
        ({"grad_clip": 0.0}, r"grad_clip must be a finite number > 0 or None, got 0\.0"),
        ({"grad_clip": -1.0}, r"grad_clip must be a finite number > 0 or None"),
        ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\), got -1"),
        ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"verbose": 1}, r"verbose must be True or False"),
    ],
)
def test_post_init_rejects(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**kwargs)


def test_accepted_edge_values() -> None:
    config = TrainingConfig(routing_threshold=1, grad_clip=None, weight_decay=0, betas=[0.0, 0.5])
    assert config.routing_threshold == 1.0 and isinstance(config.routing_threshold, float)
    assert config.betas == (0.0, 0.5)
    # A weight of exactly 0 for some layers is fine as long as one is positive.
    assert TrainingConfig(layer_weights={1: 0, 2: 1e-12}).layer_weights == {1: 0.0, 2: 1e-12}


# -- errors that need the model -------------------------------------------------------------
@pytest.mark.parametrize("field", ["layer_weights", "layer_lr_scales"])
def test_key_above_num_layers_is_rejected_once_the_model_is_known(deep_model, field) -> None:
    config = TrainingConfig(**{field: {1: 1.0, 4: 0.5}})  # fine until the depth is known
    message = rf"{field} has layer 4, but the model has num_layers=3"
    with pytest.raises(ValueError, match=message):
        config.validate_for(deep_model)
    with pytest.raises(ValueError, match=message):
        Trainer(config, vocab_size=VOCAB).create_optimizer(deep_model, base_lr=1e-3)


def test_min_exit_layer_above_num_layers(deep_model) -> None:
    with pytest.raises(ValueError, match=r"min_exit_layer=4 exceeds the model's num_layers=3"):
        TrainingConfig(min_exit_layer=4).validate_for(deep_model)


def test_standard_model_rejects_weight_below_last_layer(standard_model) -> None:
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3})
    with pytest.raises(ValueError, match=r"layer_weights gives weight to layers \[1\] below the last layer \(3\) of StandardTransformer"):
        config.validate_for(standard_model)
    trainer = Trainer(config, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"StandardTransformer"):
        trainer.create_optimizer(standard_model, base_lr=1e-3)


def test_standard_model_accepts_final_layer_configs(standard_model) -> None:
    for config in (TrainingConfig(), create_standard_config(3), TrainingConfig(layer_weights={1: 0, 3: 2.0})):
        config.validate_for(standard_model)
    assert TrainingConfig(layer_weights={3: 2.0}).weights_for(standard_model) == {1: 0.0, 2: 0.0, 3: 2.0}


def test_deep_supervision_config_on_standard_model_is_rejected(standard_model) -> None:
    with pytest.raises(ValueError, match=r"below the last layer"):
        create_deep_supervision_config(3).validate_for(standard_model)


# -- helpers -------------------------------------------------------------------------------
def test_create_standard_config() -> None:
    assert create_standard_config(num_layers=3).layer_weights == {1: 0, 2: 0, 3: 1}
    assert create_standard_config(1).layer_weights == {1: 1.0}
    config = create_standard_config(4, routing_threshold=0.9, seed=3)
    assert config.layer_weights == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}
    assert config.routing_threshold == 0.9 and config.seed == 3


def test_create_deep_supervision_config() -> None:
    assert create_deep_supervision_config(num_layers=3).layer_weights == {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}
    weights = create_deep_supervision_config(7, layer_lr_scales={1: 2.0}).layer_weights
    assert list(weights) == list(range(1, 8))
    assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("helper", [create_standard_config, create_deep_supervision_config])
def test_helpers_validate(helper) -> None:
    with pytest.raises(ValueError, match=r"num_layers must be an integer >= 1, got 0"):
        helper(0)
    with pytest.raises(TypeError, match=r"sets layer_weights itself"):
        helper(3, layer_weights={1: 1.0})
    with pytest.raises(ValueError, match=r"routing_threshold"):
        helper(3, routing_threshold=2.0)

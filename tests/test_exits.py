"""Tests of the exit rule (ease.exits) and its criteria, and of the learned exit classifier:
every criterion is honoured alike by evaluate, calibrate_threshold and generate.

Scores are recomputed here from their definitions in float64 (the softmax top-2, the
cosine of successive states, the classifier's sigmoid) and compared per token with what
the rule decided; the rule computes in float32, so a token whose score lies within 1e-5
of the threshold could round either way and is not counted against it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _builders import random_batches, tiny_model
from ease import DeepSupervisionTransformer, Trainer, TrainingConfig, calibrate_threshold, load_model
from ease.exit_classifier import train_exit_classifier
from ease.exits import EXIT_CRITERIA, ExitRule, first_exit_layer
from test_generation import early_exit_reference

VOCAB = 50
LAYERS = 4
THRESHOLDS = {"max_prob": 0.25, "margin": 0.1, "saturation": 0.9, "classifier": 0.5}


def wide_model(seed: int = 0) -> DeepSupervisionTransformer:
    """Wide random weights: confidences, margins and cosines spread where the thresholds are."""
    return tiny_model(
        vocab_size=VOCAB, num_layers=LAYERS, seed=seed, weight_std=0.3, eval_mode=True,
        max_seq_len=48, tie_embeddings=False, num_kv_heads=2,
    )  # fmt: skip


def val_batches(count: int = 2) -> list[torch.Tensor]:
    return random_batches(count, rows=3, columns=13, vocab_size=VOCAB, seed=1)


def with_classifier(model: DeepSupervisionTransformer) -> DeepSupervisionTransformer:
    torch.manual_seed(5)
    train_exit_classifier(model, val_batches(3), epochs=2, hidden=16)
    return model


def reference_score(criterion: str, model, logits, hidden, previous, layer) -> torch.Tensor:
    """The criterion's score from its definition, in float64."""
    if criterion == "max_prob":
        return logits.double().softmax(-1).amax(-1)
    if criterion == "margin":
        top = logits.double().softmax(-1).topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if criterion == "saturation":
        return F.cosine_similarity(hidden.double(), previous.double(), dim=-1)
    clf = model.exit_classifier
    x = hidden.double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + clf.norm_eps)
    h = F.gelu(F.linear(x, clf.proj.weight.double(), clf.proj.bias.double()) + clf.layer_embedding.weight[layer - 1].double())
    return torch.sigmoid(F.linear(h, clf.out.weight.double(), clf.out.bias.double()).squeeze(-1))


def model_for(criterion: str) -> DeepSupervisionTransformer:
    model = wide_model()
    return with_classifier(model) if criterion == "classifier" else model


def test_first_exit_layer_takes_the_first_true_and_the_last_layer_otherwise() -> None:
    exits = torch.tensor([[False, True, False], [False, True, True], [True, False, False]])  # layers 2, 3, 4
    assert first_exit_layer(exits, 2, 5).tolist() == [4, 2, 3]
    assert first_exit_layer(torch.zeros(0, 3, dtype=torch.bool), 5, 5).tolist() == [5, 5, 5]


def test_unknown_criterion_and_missing_classifier_are_named() -> None:
    with pytest.raises(ValueError, match=r"exit_criterion must be one of max_prob, margin, saturation, classifier, got 'entropy'"):
        TrainingConfig(exit_criterion="entropy")
    with pytest.raises(ValueError, match=r"exit_criterion='classifier' needs the model's exit classifier"):
        ExitRule.for_model(wide_model(), 0.5, 1, "classifier")


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
def test_evaluate_exits_where_the_definition_says(criterion: str) -> None:
    model, val = model_for(criterion), val_batches()
    threshold = THRESHOLDS[criterion]
    stats = Trainer(TrainingConfig(verbose=False), VOCAB).evaluate(
        model, val, routing_threshold=threshold, min_exit_layer=2, exit_criterion=criterion
    )["early_exit"]
    # The definition, token by token.
    counts, agree, ambiguous, tokens = [0] * (LAYERS + 1), 0, 0, 0
    with torch.no_grad():
        for batch in val:
            inputs = batch[:, :-1]
            states = model.hidden_states(inputs, range(1, LAYERS + 1))
            states[0] = model.embed(inputs)
            logits = {l: model.exit_head(states[l]) for l in range(1, LAYERS + 1)}
            final = logits[LAYERS].argmax(-1)
            exit_layer = torch.full(final.shape, LAYERS)
            for layer in range(LAYERS - 1, 1, -1):  # the first layer that passes wins
                s = reference_score(criterion, model, logits[layer], states[layer], states[layer - 1], layer)
                exit_layer = torch.where(s >= threshold, layer, exit_layer)
                ambiguous += int(((s - threshold).abs() < 1e-5).sum())
            chosen = torch.stack([logits[l] for l in range(1, LAYERS + 1)]).argmax(-1)  # (L, B, T)
            prediction = chosen.gather(0, (exit_layer - 1)[None])[0]
            for layer in range(1, LAYERS + 1):
                counts[layer] += int((exit_layer == layer).sum())
            agree += int((prediction == final).sum())
            tokens += final.numel()
    assert ambiguous == 0
    assert stats["criterion"] == criterion
    assert stats["exit_fractions"] == pytest.approx({l: counts[l] / tokens for l in range(1, LAYERS + 1)})
    assert stats["agreement"] == pytest.approx(agree / tokens)
    assert 0 < stats["exit_fractions"][LAYERS] < 1  # the threshold leaves decisions to make
    assert stats["check_cost"] > 0


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
def test_calibration_sweep_equals_evaluate_for_every_criterion(criterion: str) -> None:
    model, val = model_for(criterion), val_batches()
    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    thresholds = [0.1, THRESHOLDS[criterion], 0.95]
    result = calibrate_threshold(model, val, thresholds=thresholds, exit_criterion=criterion)
    for point in result.sweep:
        stats = trainer.evaluate(model, val, routing_threshold=point.threshold, exit_criterion=criterion)["early_exit"]
        assert point.accuracy == pytest.approx(stats["accuracy"])
        assert point.mean_exit_layer == pytest.approx(stats["mean_exit_layer"])


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
def test_generate_follows_the_criterion_token_by_token(criterion: str) -> None:
    model = model_for(criterion)
    threshold = THRESHOLDS[criterion]

    def score(logits, hidden, previous, layer):
        return float(reference_score(criterion, model, logits, hidden, previous, layer))

    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    batch = model.generate(prompts, 10, routing_threshold=threshold, exit_criterion=criterion)
    seen = set()
    for row, prompt in enumerate(prompts):
        tokens, exits = early_exit_reference(model, prompt, 10, threshold, score=score)
        assert batch.new_tokens[row].tolist() == tokens
        assert batch.token_exit_layers[row].tolist() == exits
        seen.update(exits)
    assert len(seen) > 1  # some tokens exit early, some do not


def test_classifier_is_trained_saved_and_loaded(tmp_path) -> None:
    model = wide_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(0)
    stats = train_exit_classifier(model, val_batches(4), epochs=40, lr=1e-2, hidden=16)
    assert stats.steps == 160 and set(stats.accuracy) == {1, 2, 3}
    assert stats.final_loss < 0.9 * stats.first_loss
    # At least as good as always answering each layer's majority label, on what it learnt.
    majority = sum(max(p, 1 - p) for p in stats.positive_rate.values()) / 3
    assert sum(stats.accuracy.values()) / 3 >= majority - 0.02
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.config.exit_classifier_dim == 16
    hidden = torch.randn(5, 32)
    torch.testing.assert_close(loaded.exit_classifier(hidden, 2), model.exit_classifier(hidden, 2))
    # The model's own weights did not move.
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in before.items())


def test_classifier_needs_two_layers() -> None:
    model = tiny_model(vocab_size=VOCAB, num_layers=1, max_seq_len=16)
    with pytest.raises(ValueError, match=r"needs num_layers >= 2"):
        train_exit_classifier(model, val_batches(1))


def test_saturation_check_costs_less_than_the_head() -> None:
    model, val = wide_model(), val_batches()
    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    costs = {
        c: trainer.evaluate(model, val, routing_threshold=0.99, exit_criterion=c)["early_exit"]["check_cost"]
        for c in ("max_prob", "saturation")
    }
    assert costs["saturation"] < costs["max_prob"] / 10
    assert math.isfinite(costs["max_prob"])

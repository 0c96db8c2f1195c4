"""Tests of ease.training (the Trainer): the weighted loss, the optimiser groups, training, evaluation with
early exit, and early stopping.

Losses are compared against float64 cross-entropies computed here from the model's own
logits. The trainer computes in float32, so ``rel=1e-5`` leaves room for float32 rounding
of a sum over a few hundred tokens (about 1e-7 each) and no room for a wrong weighting or a
wrong token count, which move the loss by 1e-2 or more.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import _builders as builders
import ease_kernels
from ease import (
    IGNORE_INDEX,
    DeepSupervisionTransformer,
    EarlyStoppingResult,
    StandardTransformer,
    Trainer,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
)

VOCAB = 50
LAYERS = 3
REL = 1e-5  # float32 trainer vs float64 test, see the module docstring


def tiny_model(cls=DeepSupervisionTransformer, **kwargs) -> torch.nn.Module:
    return builders.tiny_model(cls, VOCAB, 32, LAYERS, max_seq_len=32, **kwargs)


def random_batches(n: int, batch: int = 4, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    return builders.random_batches(n, rows=batch, columns=seq + 1, vocab_size=VOCAB, seed=seed)


def periodic_batches(n: int, batch: int = 8, seq: int = 24, period: int = 5, seed: int = 0) -> list[torch.Tensor]:
    """A learnable task: each row repeats a random pattern, so token t+period equals token t."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        pattern = torch.randint(0, VOCAB, (batch, period), generator=generator)
        batches.append(pattern.repeat(1, seq // period + 2)[:, : seq + 1].contiguous())
    return batches


def manual_ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Token-mean cross-entropy in float64 over non-ignored targets."""
    return F.cross_entropy(
        logits.double().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX
    ).item()


def quiet(config: TrainingConfig) -> TrainingConfig:
    config.verbose = False
    return config


# -- construction --------------------------------------------------------------------------
def test_trainer_seeds_every_rng() -> None:
    Trainer(TrainingConfig(seed=123), VOCAB)
    first = torch.rand(3)
    Trainer(TrainingConfig(seed=123), VOCAB)
    assert torch.equal(torch.rand(3), first)


def test_trainer_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="config must be a TrainingConfig"):
        Trainer({"layer_weights": None}, VOCAB)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        Trainer(TrainingConfig(), 0)
    trainer = Trainer(TrainingConfig(), VOCAB + 1)
    with pytest.raises(ValueError, match=r"model has vocab_size=50 but the trainer was built with vocab_size=51"):
        trainer.create_optimizer(tiny_model(), base_lr=1e-3)


# -- compute_loss --------------------------------------------------------------------------
def test_loss_is_the_hand_computed_weighted_sum_without_renormalisation() -> None:
    weights = {1: 0.7, 2: 0.0, 3: 0.9}  # sums to 1.6: a renormalising trainer would differ
    trainer = Trainer(TrainingConfig(layer_weights=weights), VOCAB)
    model = tiny_model()
    inputs, targets = random_batches(1)[0][:, :-1], random_batches(1)[0][:, 1:]
    loss, per_layer = trainer.compute_loss(model, inputs, targets)

    with torch.no_grad():
        logits = model(inputs, exit_layers=[1, 2, 3])
    expected_ce = {layer: manual_ce(logits[layer], targets) for layer in (1, 3)}
    expected = sum(weights[layer] * ce for layer, ce in expected_ce.items())

    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(expected, rel=REL)
    assert set(per_layer) == {1, 3}
    for layer, ce in expected_ce.items():
        assert not per_layer[layer].requires_grad
        assert per_layer[layer].item() == pytest.approx(ce, rel=REL)


def test_default_weights_use_the_final_layer_only() -> None:
    trainer = Trainer(TrainingConfig(), VOCAB)
    model = tiny_model()
    batch = random_batches(1)[0]
    loss, per_layer = trainer.compute_loss(model, batch[:, :-1], batch[:, 1:])
    with torch.no_grad():
        final = model(batch[:, :-1], exit_layers=[3])[3]
    assert list(per_layer) == [3]
    assert loss.item() == pytest.approx(manual_ce(final, batch[:, 1:]), rel=REL)


def test_ignored_targets_are_left_out() -> None:
    trainer = Trainer(create_deep_supervision_config(LAYERS), VOCAB)
    model = tiny_model()
    batch = random_batches(1, seq=16)[0]
    inputs, targets = batch[:, :-1].clone(), batch[:, 1:].clone()
    targets[:, -4:] = IGNORE_INDEX
    targets[0, 2] = IGNORE_INDEX
    loss, _ = trainer.compute_loss(model, inputs, targets)

    # Causal attention: changing the last inputs changes only the logits at those
    # (ignored) positions, which must not move the loss.
    changed = inputs.clone()
    changed[:, -4:] = (changed[:, -4:] + 7) % VOCAB
    loss_changed, _ = trainer.compute_loss(model, changed, targets)
    assert loss_changed.item() == pytest.approx(loss.item(), rel=1e-6)

    # Dropping the ignored tail must give the same token mean (the count excludes them).
    loss_short, _ = trainer.compute_loss(model, inputs[:, :-4], targets[:, :-4])
    assert loss_short.item() == pytest.approx(loss.item(), rel=1e-6)

    with torch.no_grad():
        logits = model(inputs, exit_layers=[1, 2, 3])
    expected = sum(manual_ce(logits[layer], targets) / LAYERS for layer in (1, 2, 3))
    assert loss.item() == pytest.approx(expected, rel=REL)

    counted = int((targets != IGNORE_INDEX).sum())
    assert trainer.evaluate(model, [(inputs, targets)])["tokens"] == counted == 4 * 12 - 1


def test_all_ignored_batch_gives_zero_loss() -> None:
    trainer = Trainer(TrainingConfig(), VOCAB)
    inputs = random_batches(1)[0][:, :-1]
    loss, _ = trainer.compute_loss(tiny_model(), inputs, torch.full_like(inputs, IGNORE_INDEX))
    assert loss.item() == 0.0


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 10, -1, -101])
def test_out_of_range_targets_are_a_value_error(bad: int) -> None:
    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    model = tiny_model()
    batch = random_batches(1)[0]
    targets = batch[:, 1:].clone()
    targets[1, 3] = bad
    message = rf"targets must be token ids in \[0, {VOCAB}\) or ignore_index=-100, got {bad}"
    with pytest.raises(ValueError, match=message):
        trainer.compute_loss(model, batch[:, :-1], targets)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    with pytest.raises(ValueError, match=message):
        trainer.train_epoch(model, [(batch[:, :-1], targets)], optimizer)
    with pytest.raises(ValueError, match=message):
        trainer.evaluate(model, [(batch[:, :-1], targets)])


def test_compute_loss_checks_shapes() -> None:
    trainer = Trainer(TrainingConfig(), VOCAB)
    batch = random_batches(1)[0]
    with pytest.raises(ValueError, match="inputs and targets must have the same shape"):
        trainer.compute_loss(tiny_model(), batch[:, :-1], batch[:, 2:])
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        trainer.compute_loss(tiny_model(), batch[:, :-1], batch[:, 1:].float())


class ExitLayerSpy:
    """Records the layers of every hidden-state pass and counts output-projection calls.

    Every loss path asks ``model.hidden_states`` for the layers it supervises (``forward``
    too), so the layers that compute logits are those recorded here.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.exit_layers: list[list[int]] = []
        self.head_calls = 0
        hidden_states = model.hidden_states

        def recording_hidden_states(input_ids, layers, *rest):
            self.exit_layers.append(list(layers))
            return hidden_states(input_ids, layers, *rest)

        model.hidden_states = recording_hidden_states
        model.lm_head.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.head_calls += 1


def test_zero_weight_layers_compute_no_logits() -> None:
    # The plain loss: the model's forward is asked for the weighted layers' logits only.
    trainer = Trainer(quiet(TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3}, fused_loss=False)), VOCAB)
    model = tiny_model()
    spy = ExitLayerSpy(model)
    batch = random_batches(1)[0]
    trainer.compute_loss(model, batch[:, :-1], batch[:, 1:])
    assert spy.exit_layers == [[1, 3]]
    assert spy.head_calls == 2

    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, random_batches(3), optimizer)
    assert spy.exit_layers[1:] == [[1, 3]] * 3
    assert spy.head_calls == 2 + 2 * 3


class HiddenStateSpy:
    """Records the layers of every ``hidden_states`` call and what ``exit_head_loss`` gets."""

    def __init__(self, model: torch.nn.Module, monkeypatch) -> None:
        self.layers: list[list[int]] = []
        self.fused_calls: list[tuple[int, list[float]]] = []  # (number of hidden states, weights)
        self.head_calls = 0
        hidden_states = model.hidden_states
        fused = ease_kernels.exit_head_loss

        def recording_hidden_states(input_ids, layers):
            self.layers.append(list(layers))
            return hidden_states(input_ids, layers)

        def recording_fused(hidden, norm_weight, head_weight, targets, layer_weights, eps, **kwargs):
            self.fused_calls.append((len(hidden), list(layer_weights)))
            return fused(hidden, norm_weight, head_weight, targets, layer_weights, eps, **kwargs)

        model.hidden_states = recording_hidden_states
        monkeypatch.setattr(ease_kernels, "exit_head_loss", recording_fused)
        model.lm_head.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.head_calls += 1


def test_zero_weight_layers_compute_nothing_in_the_fused_loss(monkeypatch) -> None:
    # The fused loss (the default): hidden states and exit-head losses of the weighted
    # layers only, and no full logits through the lm_head module at all.
    trainer = Trainer(quiet(TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3})), VOCAB)
    model = tiny_model()
    spy = HiddenStateSpy(model, monkeypatch)
    batch = random_batches(1)[0]
    loss, per_layer = trainer.compute_loss(model, batch[:, :-1], batch[:, 1:])
    assert spy.layers == [[1, 3]]
    assert spy.fused_calls == [(2, [0.7, 0.3])]
    assert spy.head_calls == 0
    assert set(per_layer) == {1, 3}

    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, random_batches(3), optimizer)
    assert spy.layers[1:] == [[1, 3]] * 3
    assert spy.fused_calls[1:] == [(2, [0.7, 0.3])] * 3
    assert spy.head_calls == 0


@pytest.mark.parametrize("fused_loss", [False, True], ids=["plain", "fused"])
def test_fused_and_plain_loss_agree(fused_loss: bool) -> None:
    """compute_loss gives the hand-computed weighted sum and its gradient on both paths."""
    config = quiet(TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3}, fused_loss=fused_loss))
    trainer = Trainer(config, VOCAB)
    model = tiny_model()
    batch = random_batches(1)[0]
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX
    loss, per_layer = trainer.compute_loss(model, inputs, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(inputs, exit_layers=[1, 3])
    ces = {layer: F.cross_entropy(logits[layer].reshape(-1, VOCAB), targets.reshape(-1)) for layer in (1, 3)}
    (0.7 * ces[1] + 0.3 * ces[3]).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.7 * ces[1].item() + 0.3 * ces[3].item(), rel=REL)
    for layer in (1, 3):
        assert per_layer[layer].item() == pytest.approx(ces[layer].item(), rel=REL)
    for name, p in model.named_parameters():
        # float32 both ways; relative to the largest entry, as everywhere in the kernels' tests.
        error = (grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-4, f"{name}: relative error {float(error):.3g}"


def test_final_layer_only_runs_one_head() -> None:
    trainer = Trainer(quiet(create_standard_config(LAYERS)), VOCAB)
    model = tiny_model(StandardTransformer)
    spy = ExitLayerSpy(model)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, random_batches(2), optimizer)
    assert spy.exit_layers == [[3], [3]]
    assert spy.head_calls == 2


# -- create_optimizer ----------------------------------------------------------------------
def groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in found, f"parameter in two groups: {group['name']}"
            found[id(param)] = group
    return found


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_each_parameter_sits_in_the_group_with_its_layer_lr(tie_embeddings: bool) -> None:
    config = TrainingConfig(layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}, weight_decay=0.05, betas=(0.8, 0.9))
    trainer = Trainer(config, VOCAB)
    model = tiny_model(tie_embeddings=tie_embeddings)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    where = groups_by_param(optimizer)

    # Every trainable parameter exactly once (a tied weight is one parameter).
    params = list(model.parameters())
    assert set(where) == {id(p) for p in params}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in params)
    assert (model.lm_head.weight is model.embed.weight) == tie_embeddings

    for layer, expected_lr in ((1, 1e-3), (2, 5e-4), (3, 1e-4)):
        for name, param in model.layers[layer - 1].named_parameters():
            group = where[id(param)]
            assert group["lr"] == pytest.approx(expected_lr, rel=1e-12), name
            assert group["layer"] == layer
            assert group["name"].startswith(f"layer{layer}")
            assert group["weight_decay"] == (0.0 if name.endswith("norm.weight") else 0.05), name
    for param in (model.embed.weight, model.lm_head.weight):
        assert where[id(param)]["lr"] == 1e-3 and where[id(param)]["weight_decay"] == 0.05
        assert where[id(param)]["layer"] is None
    assert where[id(model.norm.weight)]["lr"] == 1e-3
    assert where[id(model.norm.weight)]["weight_decay"] == 0.0
    assert all(group["betas"] == (0.8, 0.9) for group in optimizer.param_groups)


def test_frozen_parameters_are_left_out() -> None:
    trainer = Trainer(TrainingConfig(), VOCAB)
    model = tiny_model()
    model.layers[0].requires_grad_(False)
    where = groups_by_param(trainer.create_optimizer(model, base_lr=1e-3))
    assert not any(id(p) in where for p in model.layers[0].parameters())
    assert all(group["layer"] != 1 for group in where.values())


@pytest.mark.parametrize("base_lr", [0.0, -1e-3, math.nan, math.inf, "1e-3"])
def test_create_optimizer_rejects_bad_base_lr(base_lr) -> None:
    with pytest.raises(ValueError, match="base_lr must be a finite number > 0"):
        Trainer(TrainingConfig(), VOCAB).create_optimizer(tiny_model(), base_lr=base_lr)


def test_layer_lr_scales_move_layers_at_their_own_rate() -> None:
    # A layer with scale ~0 must barely move while the others change.
    trainer = Trainer(quiet(TrainingConfig(layer_lr_scales={2: 1e-9}, grad_clip=None, weight_decay=0.0)), VOCAB)
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train_epoch(model, random_batches(2), trainer.create_optimizer(model, base_lr=1e-2))
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert max(v for n, v in moved.items() if n.startswith("layers.1.")) < 1e-9
    assert min(v for n, v in moved.items() if n.startswith(("layers.0.", "layers.2."))) > 1e-4


# -- train_epoch ---------------------------------------------------------------------------
def test_train_epoch_returns_the_token_weighted_mean() -> None:
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS, grad_clip=None)), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    for group in optimizer.param_groups:  # lr 0: the weights, hence the losses, stay fixed
        group["lr"] = 0.0
    pairs = []
    for keep, batch in zip((1, 30, 48), random_batches(3)):  # 1, 30 and 48 counted targets
        targets = batch[:, 1:].clone().reshape(-1)
        targets[keep:] = IGNORE_INDEX
        pairs.append((batch[:, :-1], targets.reshape(4, 12)))

    losses = [trainer.compute_loss(model, *pair)[0].item() for pair in pairs]
    counts = [1, 30, 48]
    expected = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    plain_mean = sum(losses) / len(losses)
    assert abs(expected - plain_mean) > 1e-3  # the test can tell the two apart

    assert trainer.train_epoch(model, pairs, optimizer) == pytest.approx(expected, rel=REL)
    assert model.training


def test_train_epoch_accepts_dataloaders_and_pairs() -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    data = torch.cat(random_batches(2))  # (8, 13)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    assert math.isfinite(trainer.train_epoch(model, loader, optimizer))
    assert math.isfinite(trainer.train_epoch(model, [(b[:, :-1], b[:, 1:]) for b in random_batches(2)], optimizer))


def test_train_epoch_rejects_empty_and_exhausted_iterables() -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    with pytest.raises(ValueError, match="train_batches yielded no batch"):
        trainer.train_epoch(model, [], optimizer)
    generator = iter(random_batches(1))
    trainer.train_epoch(model, generator, optimizer)
    with pytest.raises(ValueError, match="train_batches yielded no batch.*generator"):
        trainer.train_epoch(model, generator, optimizer)
    ignored = torch.full((2, 8), IGNORE_INDEX)
    with pytest.raises(ValueError, match="train_batches hold no target tokens"):
        trainer.train_epoch(model, [(torch.zeros(2, 8, dtype=torch.long), ignored)], optimizer)


@pytest.mark.parametrize("fused_loss", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("bad_step", [1, 2])
def test_non_finite_loss_names_step_and_layer(bad_step: int, fused_loss: bool) -> None:
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS, fused_loss=fused_loss)), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    # Both losses take the hidden states from model.hidden_states: poison layer 2's.
    name = "hidden_states"
    original = getattr(model, name)
    calls = {"n": 0}

    def poisoned(input_ids, *args, **kwargs):
        calls["n"] += 1
        outputs = original(input_ids, *args, **kwargs)
        if calls["n"] == bad_step:
            outputs[2] = outputs[2] * math.nan
        return outputs

    setattr(model, name, poisoned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=rf"non-finite training loss nan at step {bad_step}: layer 2 cross-entropy is nan"):
        trainer.train_epoch(model, random_batches(3), optimizer)
    if bad_step == 1:  # raised before the optimiser step: the weights are untouched
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_gradient_norm_is_reported() -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    model.layers[0].ffn.down_proj.weight.register_hook(lambda grad: grad * math.inf)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm .* at step 1"):
        trainer.train_epoch(model, random_batches(2), optimizer)


def test_progress_bar_only_when_verbose(capsys) -> None:
    model = tiny_model()
    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, random_batches(2), optimizer)
    assert "train" not in capsys.readouterr().err
    trainer.train_epoch(model, random_batches(2), optimizer, verbose=True)
    assert "train:" in capsys.readouterr().err


# -- training on a learnable task, and evaluation with early exit ----------------------------
@pytest.fixture(scope="module")
def trained():
    """A deep-supervision model trained a few epochs on periodic sequences."""
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS)), VOCAB)
    model = tiny_model()
    train, val = periodic_batches(20), periodic_batches(3, seed=1)
    before = trainer.evaluate(model, val)
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    losses = [trainer.train_epoch(model, train, optimizer) for _ in range(5)]
    return trainer, model, val, before, losses


def test_training_reduces_loss(trained) -> None:
    trainer, model, val, before, losses = trained
    after = trainer.evaluate(model, val)
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert after["loss"] < before["loss"] - 0.5
    assert after["objective"] < before["objective"] - 0.5
    assert after["accuracy"] > before["accuracy"] + 0.2


def test_evaluate_reports_every_layer(trained) -> None:
    trainer, model, val, _, _ = trained
    stats = trainer.evaluate(model, val)
    assert "early_exit" not in stats  # no threshold in the config
    assert set(stats["layers"]) == {1, 2, 3}
    assert stats["tokens"] == sum(b[:, 1:].numel() for b in val)
    with torch.no_grad():
        for layer in (1, 2, 3):
            logits = [model(b[:, :-1], exit_layers=[layer])[layer] for b in val]
            targets = torch.cat([b[:, 1:] for b in val])
            logits = torch.cat(logits)
            assert stats["layers"][layer]["loss"] == pytest.approx(manual_ce(logits, targets), rel=REL)
            accuracy = (logits.argmax(-1) == targets).double().mean().item()
            assert stats["layers"][layer]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
            assert stats["layers"][layer]["ppl"] == pytest.approx(math.exp(stats["layers"][layer]["loss"]))
    assert stats["loss"] == stats["layers"][3]["loss"] and stats["accuracy"] == stats["layers"][3]["accuracy"]
    assert stats["ppl"] == pytest.approx(math.exp(stats["loss"]))
    objective = sum(stats["layers"][layer]["loss"] / 3 for layer in (1, 2, 3))
    assert stats["objective"] == pytest.approx(objective, rel=1e-12)


def test_evaluate_aggregates_token_weighted_across_batches(trained) -> None:
    trainer, model, val, _, _ = trained
    pairs = []
    for keep, batch in zip((3, 100, 190), val):
        targets = batch[:, 1:].clone().reshape(-1)
        targets[keep:] = IGNORE_INDEX
        pairs.append((batch[:, :-1], targets.reshape(batch.shape[0], -1)))
    merged = [(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))]
    split, whole = trainer.evaluate(model, pairs, routing_threshold=0.5), trainer.evaluate(model, merged, routing_threshold=0.5)
    assert split["tokens"] == whole["tokens"] == 3 + 100 + 190
    for key in ("loss", "accuracy", "objective"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6), key
    for key in ("accuracy", "mean_exit_layer"):
        assert split["early_exit"][key] == pytest.approx(whole["early_exit"][key], rel=1e-12), key


def test_evaluate_restores_mode_and_checks_arguments(trained) -> None:
    trainer, model, val, _, _ = trained
    model.train()
    trainer.evaluate(model, val)
    assert model.training
    model.eval()
    trainer.evaluate(model, val)
    assert not model.training
    with pytest.raises(ValueError, match=r"routing_threshold must be in \(0, 1\]"):
        trainer.evaluate(model, val, routing_threshold=1.5)
    with pytest.raises(ValueError, match=r"min_exit_layer must be an integer in 1..3, got 4"):
        trainer.evaluate(model, val, routing_threshold=0.5, min_exit_layer=4)
    with pytest.raises(ValueError, match="val_batches yielded no batch"):
        trainer.evaluate(model, [])


def check_exit_consistency(early_exit: dict) -> None:
    fractions = early_exit["exit_fractions"]
    assert list(fractions) == [1, 2, 3]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-12)
    mean = sum(layer * fraction for layer, fraction in fractions.items())
    assert early_exit["mean_exit_layer"] == pytest.approx(mean, rel=1e-12)
    assert early_exit["compute_saved"] == pytest.approx(1 - mean / LAYERS, rel=1e-12)


def test_unreachable_threshold_sends_every_token_to_the_last_layer(trained) -> None:
    trainer, model, val, _, _ = trained
    stats = trainer.evaluate(model, val, routing_threshold=1.0)
    layers = stats["layers"]
    assert layers[1]["accuracy"] != layers[3]["accuracy"]  # so the test can fail
    with torch.no_grad():  # precondition: no top-1 probability reaches 1.0
        top = max(F.softmax(model(b[:, :-1])[l].double(), -1).max().item() for b in val for l in (1, 2))
    assert top < 1.0
    early = stats["early_exit"]
    assert early["exit_fractions"] == {1: 0.0, 2: 0.0, 3: 1.0}
    assert early["accuracy"] == layers[3]["accuracy"] == stats["accuracy"]
    assert early["mean_exit_layer"] == 3.0 and early["compute_saved"] == 0.0
    assert early["threshold"] == 1.0 and early["min_exit_layer"] == 1
    check_exit_consistency(early)


@pytest.mark.parametrize("min_exit_layer", [1, 2, 3])
def test_tiny_threshold_sends_every_token_to_the_first_allowed_layer(trained, min_exit_layer: int) -> None:
    trainer, model, val, _, _ = trained
    stats = trainer.evaluate(model, val, routing_threshold=1e-9, min_exit_layer=min_exit_layer)
    early = stats["early_exit"]
    assert early["exit_fractions"] == {l: float(l == min_exit_layer) for l in (1, 2, 3)}
    assert early["accuracy"] == stats["layers"][min_exit_layer]["accuracy"]
    assert early["mean_exit_layer"] == min_exit_layer
    assert early["compute_saved"] == pytest.approx(1 - min_exit_layer / 3)
    assert early["min_exit_layer"] == min_exit_layer
    check_exit_consistency(early)


def test_config_threshold_and_min_exit_layer_are_the_defaults(trained) -> None:
    _, model, val, _, _ = trained
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS, routing_threshold=1e-9, min_exit_layer=2)), VOCAB)
    early = trainer.evaluate(model, val)["early_exit"]
    assert early["threshold"] == 1e-9 and early["exit_fractions"][2] == 1.0
    assert trainer.evaluate(model, val, routing_threshold=1.0)["early_exit"]["exit_fractions"][3] == 1.0


def test_mixed_exits_match_a_per_token_recount(trained, monkeypatch) -> None:
    trainer, model, val, _, _ = trained
    with torch.no_grad():
        logits = {l: torch.cat([model(b[:, :-1])[l] for b in val]).double() for l in (1, 2, 3)}
    targets = torch.cat([b[:, 1:] for b in val])
    confidence = {l: F.softmax(logits[l], -1).max(-1).values for l in (1, 2, 3)}
    # A threshold halfway between two neighbouring layer-1 confidences near the median, so
    # float32 vs float64 rounding cannot flip a decision.
    ordered = confidence[1].flatten().sort().values
    gaps = ordered[1:] - ordered[:-1]
    middle = len(ordered) // 2
    index = middle + int(gaps[middle : middle + 50].argmax())
    threshold = float(ordered[index] + ordered[index + 1]) / 2

    exit_layer = torch.full_like(targets, 3)
    for layer in (2, 1):  # the first layer that is confident enough wins
        exit_layer = torch.where(confidence[layer] >= threshold, layer, exit_layer)
    prediction = torch.gather(
        torch.stack([logits[l].argmax(-1) for l in (1, 2, 3)]), 0, (exit_layer - 1).unsqueeze(0)
    ).squeeze(0)
    counts = torch.bincount(exit_layer.flatten(), minlength=4)[1:].double() / targets.numel()
    assert (counts > 0).sum() >= 2  # a real mix of exits

    calls = []
    real = ease_kernels.exit_confidence

    def spy(logits, threshold=None):
        calls.append(threshold)
        return real(logits, threshold)

    monkeypatch.setattr(ease_kernels, "exit_confidence", spy)
    early = trainer.evaluate(model, val, routing_threshold=threshold)["early_exit"]
    assert early["exit_fractions"] == pytest.approx({l: counts[l - 1].item() for l in (1, 2, 3)}, abs=1e-12)
    assert early["accuracy"] == pytest.approx((prediction == targets).double().mean().item(), abs=1e-12)
    check_exit_consistency(early)
    # The decisions come from ease_kernels.exit_confidence, with the threshold where a token may exit.
    assert calls == [threshold, threshold, None] * len(val)


def test_standard_model_gets_no_early_exit_entry() -> None:
    trainer = Trainer(quiet(create_standard_config(LAYERS, routing_threshold=0.5)), VOCAB)
    model = tiny_model(StandardTransformer)
    spy = ExitLayerSpy(model)
    val = random_batches(2)
    stats = trainer.evaluate(model, val, routing_threshold=1e-9)
    assert "early_exit" not in stats and "layers" not in stats
    assert spy.head_calls == 2  # one head per batch: its intermediate heads are never computed
    with torch.no_grad():
        logits = torch.cat([model(b[:, :-1])[3] for b in val])
    assert stats["loss"] == pytest.approx(manual_ce(logits, torch.cat([b[:, 1:] for b in val])), rel=REL)
    assert stats["objective"] == stats["loss"]


# -- early stopping ------------------------------------------------------------------------
def scripted(trainer: Trainer, monkeypatch, objectives: list[float]) -> list[dict[str, torch.Tensor]]:
    """Make evaluate return ``objectives`` in turn; return the weights after each epoch."""
    sequence = iter(objectives)
    snapshots: list[dict[str, torch.Tensor]] = []
    real_train_epoch = trainer.train_epoch

    def fake_evaluate(model, val_batches, routing_threshold=None, min_exit_layer=None):
        value = next(sequence)
        return {"loss": value, "ppl": math.exp(value), "accuracy": 0.0, "objective": value, "tokens": 1}

    def recording_train_epoch(model, train_batches, optimizer, verbose=None):
        loss = real_train_epoch(model, train_batches, optimizer, verbose=verbose)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return loss

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    monkeypatch.setattr(trainer, "train_epoch", recording_train_epoch)
    return snapshots


def same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_after_patience_and_restores_the_best(monkeypatch, patience: int) -> None:
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS)), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    objectives = [3.0, 2.0, 1.5, 1.7, 1.9, 2.1, 2.3]  # best at epoch 3
    snapshots = scripted(trainer, monkeypatch, objectives)

    result = trainer.train_with_early_stopping(
        model, random_batches(2), random_batches(1), optimizer, max_epochs=7, patience=patience, verbose=False
    )
    assert isinstance(result, EarlyStoppingResult)
    assert result.best_epoch == 3
    assert result.best_val_loss == 1.5
    assert result.epochs_run == 3 + patience == len(snapshots)
    assert result.stopped_early is True
    assert [h["epoch"] for h in result.history] == list(range(1, 4 + patience))
    assert [h["val_loss"] for h in result.history] == objectives[: 3 + patience]
    assert all(h["val"]["objective"] == h["val_loss"] and h["seconds"] >= 0 for h in result.history)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert not same_weights(model, snapshots[-1])  # training moved on after epoch 3 ...
    assert same_weights(model, snapshots[2])  # ... and epoch 3's weights were restored


def test_early_stopping_runs_max_epochs_while_improving(monkeypatch) -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    snapshots = scripted(trainer, monkeypatch, [5.0, 4.0, 3.0, 2.0])
    result = trainer.train_with_early_stopping(
        model, random_batches(1), random_batches(1), optimizer, max_epochs=4, verbose=False
    )
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (4, 4, False)
    assert same_weights(model, snapshots[-1])


def test_patience_counts_epochs_in_a_row(monkeypatch) -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    scripted(trainer, monkeypatch, [3.0, 3.1, 2.0, 2.1, 2.2, 1.0])
    result = trainer.train_with_early_stopping(
        model, random_batches(1), random_batches(1), optimizer, max_epochs=6, patience=2, verbose=False
    )
    # epoch 2 fails, epoch 3 improves (the count restarts), epochs 4 and 5 fail: stop at 5.
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (5, 3, True)


def test_min_delta(monkeypatch) -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    scripted(trainer, monkeypatch, [3.0, 2.95, 2.0])
    result = trainer.train_with_early_stopping(
        model, random_batches(1), random_batches(1), optimizer, max_epochs=3, min_delta=0.1, verbose=False
    )
    assert (result.epochs_run, result.best_epoch, result.best_val_loss) == (2, 1, 3.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_epochs": 0}, "max_epochs must be an integer >= 1, got 0"),
        ({"max_epochs": 2.5}, "max_epochs must be an integer >= 1"),
        ({"patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"patience": True}, "patience must be an integer >= 1, got True"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
    ],
)
def test_early_stopping_validates_arguments(kwargs, message) -> None:
    trainer = Trainer(quiet(TrainingConfig()), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    with pytest.raises(ValueError, match=message):
        trainer.train_with_early_stopping(model, random_batches(1), random_batches(1), optimizer, **kwargs)


def test_early_stopping_end_to_end_prints_and_serialises(capsys) -> None:
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS, routing_threshold=0.5)), VOCAB)
    model = tiny_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    result = trainer.train_with_early_stopping(
        model, periodic_batches(4), periodic_batches(1, seed=1), optimizer, max_epochs=3, verbose=True
    )
    out = capsys.readouterr().out
    assert out.count("| val objective ") == result.epochs_run
    assert f"restored epoch {result.best_epoch}" in out
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == result.best_val_loss
    assert result.best_val_loss == pytest.approx(trainer.evaluate(model, periodic_batches(1, seed=1))["objective"], rel=1e-6)
    payload = json.loads(json.dumps(result.as_dict()))
    assert payload["best_epoch"] == result.best_epoch
    assert set(payload["history"][0]["val"]["early_exit"]["exit_fractions"]) == {"1", "2", "3"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_with_bf16_autocast() -> None:
    trainer = Trainer(quiet(create_deep_supervision_config(LAYERS, routing_threshold=0.5)), VOCAB)
    model = tiny_model().cuda()
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    train, val = periodic_batches(20), periodic_batches(3, seed=1)
    before = trainer.evaluate(model, val)
    losses = [trainer.train_epoch(model, train, optimizer) for _ in range(5)]
    after = trainer.evaluate(model, val)
    assert losses[-1] < 0.8 * losses[0]
    assert after["loss"] < before["loss"] - 0.5
    check_exit_consistency(after["early_exit"])

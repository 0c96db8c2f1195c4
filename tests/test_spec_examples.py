"""The code examples of SPEC.md, run as written (same names, same arguments) on small data."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

VOCAB = 1000



def windows(count: int, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens from a learnable stream.

    The stream repeats one fixed 37-token phrase; ``seed`` picks where each window starts,
    so training and validation windows (different seeds) share the phrase.
    """
    phrase = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1234))
    stream = phrase.repeat(seq_len // 37 + 2)
    offsets = torch.randint(0, 37, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[o : o + seq_len + 1] for o in offsets.tolist()])


def test_the_api_as_the_user_writes_it() -> None:
    train_batches = list(windows(16).split(4))
    val_batches = list(windows(8, seed=1).split(4))

    from ease import DeepSupervisionTransformer, Trainer, TrainingConfig

    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)

    config = TrainingConfig(
        layer_weights={1: 0.7, 2: 0, 3: 0.3},      # loss weight per layer
        layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1},  # learning rate per layer
        routing_threshold=0.95,                    # early-exit threshold
    )

    trainer = Trainer(config, vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    loss = trainer.train_epoch(model, train_batches, optimizer)
    stats = trainer.evaluate(model, val_batches)

    assert isinstance(loss, float) and math.isfinite(loss)
    assert 0 < loss < 2 * math.log(1000)
    assert {"loss", "ppl", "accuracy", "objective", "tokens", "layers", "early_exit"} <= set(stats)
    assert stats["tokens"] == 8 * 16
    assert stats["ppl"] == pytest.approx(math.exp(stats["loss"]))
    assert 0.0 <= stats["accuracy"] <= 1.0
    # The objective is the configured weighting of the per-layer losses.
    layers = stats["layers"]
    assert stats["objective"] == pytest.approx(0.7 * layers[1]["loss"] + 0.3 * layers[3]["loss"], rel=1e-12)
    early_exit = stats["early_exit"]
    assert early_exit["threshold"] == 0.95
    assert sum(early_exit["exit_fractions"].values()) == pytest.approx(1.0)
    assert 1.0 <= early_exit["mean_exit_layer"] <= 3.0
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["layer1"] == 1e-3 and lrs["layer2"] == pytest.approx(5e-4) and lrs["layer3"] == pytest.approx(1e-4)


def test_helpers() -> None:
    from ease import create_deep_supervision_config, create_standard_config

    assert create_standard_config(num_layers=3).layer_weights == {1: 0, 2: 0, 3: 1}
    assert create_deep_supervision_config(num_layers=3).layer_weights == {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}


def test_early_stopping() -> None:
    from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config

    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)
    trainer = Trainer(create_deep_supervision_config(num_layers=3, verbose=False), vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=3e-3)
    train_loader = torch.utils.data.DataLoader(windows(16), batch_size=4)
    val_loader = torch.utils.data.DataLoader(windows(8, seed=1), batch_size=4)

    result = trainer.train_with_early_stopping(
        model=model, train_batches=train_loader, val_batches=val_loader,
        optimizer=optimizer, max_epochs=4, patience=1, verbose=True,
    )

    assert 1 <= result.best_epoch <= result.epochs_run <= 4
    assert isinstance(result.stopped_early, bool)
    assert result.stopped_early == (result.epochs_run < 4)
    assert len(result.history) == result.epochs_run
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "val", "seconds"}
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    # "The best model's state is kept and restored when training ends."
    assert trainer.evaluate(model, val_loader)["objective"] == pytest.approx(result.best_val_loss, rel=1e-6)
    # The repeated phrase is learnable: the first epochs improve.
    assert result.history[1]["val_loss"] < result.history[0]["val_loss"]


def test_patience_defaults_to_one() -> None:
    from ease import Trainer

    parameters = inspect.signature(Trainer.train_with_early_stopping).parameters
    assert parameters["patience"].default == 1
    assert parameters["max_epochs"].default == 100
    assert parameters["verbose"].default is True


def test_uniform_guess_has_loss_ln_vocab_and_ppl_vocab() -> None:
    from ease import DeepSupervisionTransformer, Trainer, TrainingConfig

    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform guess over 1000 tokens
    stats = Trainer(TrainingConfig(), vocab_size=1000).evaluate(model, [windows(4)])
    assert stats["loss"] == pytest.approx(math.log(1000), rel=1e-6)  # ≈ 6.9
    assert stats["ppl"] == pytest.approx(1000, rel=1e-5)

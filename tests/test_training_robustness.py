"""Training and evaluation on hostile input: non-finite gradients, empty batches, changed
optimiser settings on resume, unwritable checkpoint folders, float16 parameters, and
calibration where no token can exit. Each test failed before its fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from _builders import random_batches, tiny_model
from ease import DeepSupervisionTransformer, Trainer, TrainingConfig, calibrate_threshold

VOCAB = 40


def tiny(num_layers: int = 3) -> DeepSupervisionTransformer:
    return tiny_model(vocab_size=VOCAB, dim=16, num_layers=num_layers, num_heads=2, max_seq_len=32)


def batches(n: int, rows: int = 4, seq: int = 9, seed: int = 0) -> list[torch.Tensor]:
    return random_batches(n, rows=rows, columns=seq, vocab_size=VOCAB, seed=seed)


def test_non_finite_gradient_stops_the_step_without_clipping() -> None:
    # The reproduction: grad_clip=None used to step on an infinite gradient and
    # leave NaN in the weights, returning a finite loss.
    torch.manual_seed(0)
    model = tiny()
    trainer = Trainer(
        TrainingConfig(layer_weights={1: 0.3, 2: 0.3, 3: 0.4}, fused_loss=False, grad_clip=None, verbose=False),
        VOCAB,
    )
    optimizer = trainer.create_optimizer(model, 1e3)
    with pytest.raises(FloatingPointError, match=r"non-finite (gradient norm|training loss)"):
        for _ in range(20):
            trainer.train_epoch(model, batches(6), optimizer)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches_are_refused_by_name(shape: tuple[int, int]) -> None:
    model = tiny()
    trainer = Trainer(TrainingConfig(verbose=False, routing_threshold=0.5), VOCAB)
    empty = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\] with batch >= 1 and seq >= 1"):
        model(empty)
    with pytest.raises(ValueError, match=r"batch inputs must have at least one row and one position"):
        trainer.compute_loss(model, empty, empty)
    tensor_batch = torch.zeros((0, 6) if shape[0] == 0 else (2, 1), dtype=torch.long)
    message = r"batch must have at least one row" if shape[0] == 0 else r"batch needs at least 2 columns"
    optimizer = trainer.create_optimizer(model, 1e-3)
    with pytest.raises(ValueError, match=message):
        trainer.train_epoch(model, [tensor_batch], optimizer)
    with pytest.raises(ValueError, match=message):
        trainer.evaluate(model, [tensor_batch])
    with pytest.raises(ValueError, match=message):
        calibrate_threshold(model, [tensor_batch])


def test_calibration_where_no_token_can_exit() -> None:
    # min_exit_layer == num_layers (documented as valid) and any 1-layer model used to
    # crash in argmax over an empty layer dimension.
    data = batches(2)
    for model, min_exit_layer in ((tiny(3), 3), (tiny(1), 1)):
        result = calibrate_threshold(model, data, min_exit_layer=min_exit_layer)
        full = result.full_depth_accuracy
        for point in result.sweep:
            assert point.mean_exit_layer == model.num_layers
            assert point.accuracy == full and point.compute_saved == 0.0
        assert result.threshold == min(p.threshold for p in result.sweep)
        stats = Trainer(TrainingConfig(verbose=False), VOCAB).evaluate(
            model, data, routing_threshold=0.5, min_exit_layer=min_exit_layer
        )
        assert stats["early_exit"]["mean_exit_layer"] == model.num_layers


def test_resume_applies_the_new_learning_rates_and_says_so(tmp_path: Path) -> None:
    config = TrainingConfig(layer_lr_scales={1: 0.5}, checkpoint_dir=str(tmp_path), verbose=False)
    model = tiny()
    trainer = Trainer(config, VOCAB)
    optimizer = trainer.create_optimizer(model, 1e-3)
    trainer.train_with_early_stopping(model, batches(2), batches(1, seed=1), optimizer, max_epochs=1, verbose=False)

    resumed_config = TrainingConfig(layer_lr_scales={1: 0.5}, checkpoint_dir=str(tmp_path), verbose=False)
    model = tiny()
    trainer = Trainer(resumed_config, VOCAB)
    optimizer = trainer.create_optimizer(model, 2e-3)
    wanted = [group["lr"] for group in optimizer.param_groups]
    with pytest.warns(UserWarning, match=r"other optimiser settings.*layer1 lr 0\.0005 -> 0\.001; layer1\.no_decay lr"):
        trainer.load_checkpoint(tmp_path / "last.pt", model, optimizer)
    assert [group["lr"] for group in optimizer.param_groups] == wanted
    # The settings it was saved with resume silently.
    trainer = Trainer(config, VOCAB)
    optimizer = trainer.create_optimizer(model, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.load_checkpoint(tmp_path / "last.pt", model, optimizer)


def test_unwritable_checkpoint_dir_is_found_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = TrainingConfig(checkpoint_dir=str(blocker / "checkpoints"), verbose=False)
    trainer = Trainer(config, VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 1e-3)
    trained = []
    trainer.train_epoch = lambda *args, **kwargs: trained.append(1)  # type: ignore[method-assign]
    with pytest.raises(OSError, match=r"checkpoint_dir=.*a-file/checkpoints.* cannot be written"):
        trainer.train_with_early_stopping(model, batches(1), batches(1), optimizer, max_epochs=1, verbose=False)
    assert trained == []


def test_float16_parameters_are_refused_with_the_way_out() -> None:
    # Pure float16 AdamW: exp_avg_sq and eps underflow to 0, the weights are NaN at step 2.
    model = tiny().half()
    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    with pytest.raises(ValueError, match=r"float16 parameters .*autocast"):
        trainer.create_optimizer(model, 1e-3)
    trainer.create_optimizer(tiny().to(torch.bfloat16), 1e-3)  # bfloat16 keeps float32's range


def test_trainer_keeps_no_model_alive() -> None:
    import gc
    import weakref

    trainer = Trainer(TrainingConfig(verbose=False), VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 1e-3)
    trainer.train_epoch(model, batches(1), optimizer)
    trainer.evaluate(model, batches(1))
    alive = weakref.ref(model)
    del model, optimizer
    gc.collect()
    assert alive() is None
    with pytest.raises(ValueError, match="no model to checkpoint"):
        trainer.save_checkpoint("unused.pt")

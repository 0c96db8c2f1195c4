"""Tests of ease.training.checkpoint and Trainer checkpoints on one process (the CPU).

Exact resume is checked bit for bit (``torch.equal``): on the CPU, one process, the same
operations in the same order give the same bits, so any difference means some state
(weights, optimiser moments, step count, dropout RNG, data order, early-stopping state)
was not restored. The runs use dropout and a shuffling ``DataLoader`` with its own
generator so that the RNG states matter; a control run that skips restoring them
diverges. The torchrun versions of these checks are in tests/test_distributed.py.
"""

from __future__ import annotations

import errno
import math
import random
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _builders import tiny_model
from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config
from ease.training.checkpoint import (
    CHECKPOINT_NAME,
    TrainingProgress,
    capture_rng_state,
    data_generators,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

VOCAB = 50
LAYERS = 3
STEPS_PER_EPOCH = 4  # 24 rows in batches of 6



def periodic(rows: int, seed: int, seq: int = 16, period: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, VOCAB, (rows, period), generator=generator)
    return pattern.repeat(1, seq // period + 2)[:, : seq + 1].contiguous()


def shuffled_loader() -> DataLoader:
    """24 rows in 4 shuffled batches per epoch; the order comes from the loader's own generator."""
    return DataLoader(periodic(24, seed=0), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(7))


VAL = [periodic(6, seed=1)]


def make(checkpoint_dir: Path | None = None, dropout: float = 0.1, **config):
    """A fresh trainer, model and optimiser, as a new process would build them."""
    trainer = Trainer(
        create_deep_supervision_config(
            LAYERS, verbose=False, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), **config
        ),
        VOCAB,
    )
    model = tiny_model(vocab_size=VOCAB, num_layers=LAYERS, max_seq_len=32, dropout=dropout)
    optimizer = trainer.create_optimizer(model, base_lr=3e-3)
    return trainer, model, optimizer


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}"


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# -- exact resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_after_epoch_k_ends_with_the_same_weights(tmp_path: Path, stop_after: int) -> None:
    trainer, model, optimizer = make(tmp_path / "straight")
    straight = trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3)
    straight_final = {k: v.clone() for k, v in model.state_dict().items()}

    trainer, model, optimizer = make(tmp_path / "stopped")
    trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=stop_after, patience=3)
    del trainer, model, optimizer  # the "process" ends here; only the file remains

    trainer, model, optimizer = make(tmp_path / "stopped")
    resumed = trainer.train_with_early_stopping(
        model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3,
        resume_from=tmp_path / "stopped" / CHECKPOINT_NAME,
    )  # fmt: skip

    assert_equal_states(model.state_dict(), straight_final)  # the best epoch's, restored
    last_straight = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    last_resumed = read_checkpoint(tmp_path / "stopped" / CHECKPOINT_NAME)
    assert_equal_states(last_resumed["model"], last_straight["model"])  # the last epoch's
    for name, state in last_straight["optimizer"]["state"].items():
        assert_equal_states(last_resumed["optimizer"]["state"][name], state)
    assert last_resumed["trainer"]["step"] == last_straight["trainer"]["step"] == 3 * STEPS_PER_EPOCH
    assert without_seconds(resumed.history) == without_seconds(straight.history)
    assert (resumed.best_epoch, resumed.epochs_run, resumed.stopped_early) == (
        straight.best_epoch,
        straight.epochs_run,
        straight.stopped_early,
    )


def test_resume_without_the_rng_states_diverges(tmp_path: Path) -> None:
    """The control: weights, optimiser and progress alone do not give the same third epoch."""
    trainer, model, optimizer = make(tmp_path / "straight")
    trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3)
    trainer, model, optimizer = make(tmp_path / "stopped")
    trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=2, patience=3)

    trainer, model, optimizer = make()
    loader = shuffled_loader()
    trainer.load_checkpoint(tmp_path / "stopped" / CHECKPOINT_NAME, model, optimizer, loader, restore_rng=False)
    trainer.train_epoch(model, loader, optimizer)
    third_epoch = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["model"]
    assert not all(torch.equal(v, third_epoch[k]) for k, v in model.state_dict().items())


def test_config_resume_picks_up_the_last_checkpoint(tmp_path: Path) -> None:
    trainer, model, optimizer = make(tmp_path, resume=True)
    first = trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=1, patience=3)
    assert first.epochs_run == 1  # nothing to resume from: a fresh start

    trainer, model, optimizer = make(tmp_path, resume=True)
    second = trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=2, patience=3)
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0]["train_loss"] == first.history[0]["train_loss"]
    assert trainer.progress.epoch == 2 and trainer.progress.step == 2 * STEPS_PER_EPOCH

    # A finished run resumed with the same limits trains nothing more.
    trainer, model, optimizer = make(tmp_path, resume=True)
    again = trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=2, patience=3)
    assert again.epochs_run == 2 and without_seconds(again.history) == without_seconds(second.history)


# -- what a checkpoint holds ----------------------------------------------------------------------
def test_checkpoint_holds_everything_to_resume(tmp_path: Path) -> None:
    trainer, model, optimizer = make(tmp_path)
    loader = shuffled_loader()
    trainer.train_with_early_stopping(model, loader, VAL, optimizer, max_epochs=2, patience=3)
    payload = read_checkpoint(tmp_path / CHECKPOINT_NAME)  # weights_only=True inside
    assert payload["format"] == "ease-checkpoint" and payload["world_size"] == 1
    assert set(payload["trainer"]) == {
        "epoch", "step", "best_val_loss", "best_epoch", "epochs_without_improvement", "best_state", "history",
    }  # fmt: skip
    assert (payload["trainer"]["epoch"], payload["trainer"]["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert payload["trainer"]["best_state"].keys() == model.state_dict().keys()
    assert set(payload["optimizer"]["state"]) == {name for name, _ in model.named_parameters()}
    assert [g["name"] for g in payload["optimizer"]["param_groups"]] == [g["name"] for g in optimizer.param_groups]
    (rng,) = payload["rng"]
    assert set(rng) == {"python", "numpy", "torch", "cuda", "generators"}
    assert len(rng["generators"]) == 1  # the loader's shuffling generator
    # save_checkpoint(path) with no model saves what was trained last.
    again = trainer.save_checkpoint(tmp_path / "again.pt")
    assert_equal_states(read_checkpoint(again)["model"], model.state_dict())


def test_an_improving_epoch_writes_its_weights_once(tmp_path: Path) -> None:
    """After an improving epoch the model's state is the best state: the checkpoint stores
    one copy of the tensors (shared storage), not a second gather of the same weights."""
    trainer, model, optimizer = make(tmp_path)
    result = trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=1, patience=3)
    assert result.best_epoch == 1  # the first epoch always improves on inf
    payload = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    best = payload["trainer"]["best_state"]
    for name, tensor in payload["model"].items():
        assert tensor.untyped_storage().data_ptr() == best[name].untyped_storage().data_ptr(), name
    assert_equal_states(payload["model"], model.state_dict())


def test_rng_state_round_trip() -> None:
    generator = torch.Generator().manual_seed(3)
    state = capture_rng_state([generator])

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist(), torch.rand(1, generator=generator)

    first = draw()
    restore_rng_state(state, [generator])
    again = draw()
    assert again[:3] == first[:3] and torch.equal(again[3], first[3])
    with pytest.raises(ValueError, match="1 data-loader generator state"):
        restore_rng_state(state, [generator, torch.Generator()])
    with pytest.warns(UserWarning, match="no generator was given"):
        restore_rng_state(state, [])


def test_data_generators_finds_the_loaders_generator() -> None:
    loader = shuffled_loader()
    assert data_generators(loader) == [loader.generator]
    assert data_generators([torch.zeros(2, 3)]) == []


def test_training_progress_round_trip() -> None:
    progress = TrainingProgress(epoch=3, step=12, best_val_loss=1.5, best_epoch=2, history=[{"epoch": 1}])
    assert TrainingProgress.from_dict(progress.as_dict()) == progress
    assert math.isinf(TrainingProgress().best_val_loss)


# -- crash safety -------------------------------------------------------------------------------
def failing_save(real_save, fail_on_call: int):
    """A torch.save that, on call ``fail_on_call``, writes half a file then fails as a full disk would."""
    calls = {"n": 0}

    def save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != fail_on_call:
            return real_save(obj, handle, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        raise OSError(28, "No space left on device (simulated)")

    return save


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    trainer, model, optimizer = make(tmp_path)
    monkeypatch.setattr(torch, "save", failing_save(torch.save, fail_on_call=2))
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3)
    path = tmp_path / CHECKPOINT_NAME
    payload = read_checkpoint(path)  # the epoch-1 checkpoint, whole
    assert payload["trainer"]["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp")), "the half-written temporary file must be removed"

    # It still resumes: two more epochs from epoch 1.
    monkeypatch.undo()
    trainer, model, optimizer = make(tmp_path)
    result = trainer.train_with_early_stopping(
        model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3, resume_from=path
    )
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_a_killed_writer_leaves_only_a_stray_temporary_file(tmp_path: Path) -> None:
    """A SIGKILL mid-write skips every cleanup: what is left is a partial temporary file
    beside an intact checkpoint, never a partial checkpoint under the real name."""
    trainer, model, optimizer = make(tmp_path)
    trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=1, patience=3)
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    (tmp_path / f".{CHECKPOINT_NAME}.killed.tmp").write_bytes(data[: len(data) // 3])
    assert read_checkpoint(path)["trainer"]["epoch"] == 1
    # What a non-atomic writer would have left is unreadable: the reason for the rename.
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(truncated)


def test_a_full_disk_raises_oserror_enospc_naming_the_path(tmp_path: Path, monkeypatch) -> None:
    """torch's zip writer turns the OSError of a full disk into a RuntimeError ("unexpected
    pos ...") raised while handling it; the caller gets the OSError back, with the path."""
    trainer, model, optimizer = make(tmp_path)
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer)
    before = path.read_bytes()

    def full_disk_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 the first bytes")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # as torch.serialization's writer does on closing the archive
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, model, optimizer)
    assert caught.value.errno == errno.ENOSPC
    assert str(path) in str(caught.value) and "No space left on device" in str(caught.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_nan_stops_training_naming_step_and_layer_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    trainer, model, optimizer = make(tmp_path, dropout=0.0)
    training_calls = {"n": 0}

    def poison(module, inputs, output):
        # Block 2's output turns to NaN on the second step of epoch 2 (training only).
        if module.training:
            training_calls["n"] += 1
            if training_calls["n"] == STEPS_PER_EPOCH + 2:
                return output * math.nan
        return output

    model.layers[1].register_forward_hook(poison)
    after_epoch_1 = {}
    evaluate = trainer.evaluate

    def recording_evaluate(model, val_batches, routing_threshold=None, min_exit_layer=None):
        if not after_epoch_1:
            after_epoch_1.update({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, val_batches, routing_threshold, min_exit_layer)

    trainer.evaluate = recording_evaluate
    with pytest.raises(
        FloatingPointError,
        match=r"epoch 2: non-finite training loss nan at step 2: layer 2 cross-entropy is nan.*"
        r"last good checkpoint, .*last\.pt \(epoch 1\), is left as it was",
    ):
        trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=3, patience=3)

    payload = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert (payload["trainer"]["epoch"], payload["trainer"]["step"]) == (1, STEPS_PER_EPOCH)
    assert_equal_states(payload["model"], after_epoch_1)
    fresh_trainer, fresh_model, fresh_optimizer = make(dropout=0.0)
    fresh_trainer.load_checkpoint(tmp_path / CHECKPOINT_NAME, fresh_model, fresh_optimizer, shuffled_loader())
    assert math.isfinite(fresh_trainer.evaluate(fresh_model, VAL)["loss"])


# -- errors ---------------------------------------------------------------------------------------
def test_load_errors(tmp_path: Path) -> None:
    trainer, model, optimizer = make()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        trainer.load_checkpoint(tmp_path / "missing.pt", model, optimizer)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an ease checkpoint"):
        read_checkpoint(other)

    weights_only = save_checkpoint(tmp_path / "weights.pt", model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        trainer.load_checkpoint(weights_only, model, optimizer)
    wider = DeepSupervisionTransformer(vocab_size=VOCAB, dim=64, num_layers=LAYERS, max_seq_len=32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        trainer.load_checkpoint(weights_only, wider)
    with pytest.raises(ValueError, match="no model to checkpoint"):
        make()[0].save_checkpoint(tmp_path / "nothing.pt")


def flip_a_byte_inside_a_tensor(path: Path) -> None:
    """Invert one byte in the middle of the largest tensor stored in the zip at ``path``."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    # The local file header: 30 bytes, then the name and the extra field (lengths at 26, 28).
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
    start = member.header_offset + 30 + name_length + extra_length
    data[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path: Path) -> None:
    trainer, model, optimizer = make(tmp_path)
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, model, optimizer)
    flip_a_byte_inside_a_tensor(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt.*CRC"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt"):
        trainer.load_checkpoint(path, model, optimizer)


def crafted(tmp_path: Path, change) -> Path:
    """A real checkpoint after one epoch, loaded, changed by ``change(payload)`` and saved again."""
    trainer, model, optimizer = make(tmp_path)
    trainer.train_with_early_stopping(model, shuffled_loader(), VAL, optimizer, max_epochs=1, patience=3)
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda p: p.pop("optimizer"), "'optimizer'"),
        (lambda p: p.pop("model"), "'model'"),
        (lambda p: p.update(rng=[]), "rng"),
        (lambda p: p["rng"][0].pop("torch"), "rng"),
        (lambda p: p.update(world_size=0), "world_size"),
        (lambda p: p["trainer"].update(epoch="1"), "trainer.epoch"),
        (lambda p: p["trainer"].update(epoch=-1), "trainer.epoch"),
        (lambda p: p["trainer"].update(epoch=10**9), "trainer.epoch"),
        (lambda p: p["trainer"].update(step=2.5), "trainer.step"),
        (lambda p: p["trainer"].pop("history"), "trainer.history"),
        (lambda p: p["trainer"].update(best_epoch=2), "trainer.best_epoch"),
        (lambda p: p["trainer"].update(best_val_loss="low"), "trainer.best_val_loss"),
        (lambda p: p.update(trainer=[1]), "'trainer'"),
    ],
    ids=[
        "no-optimizer", "no-model", "empty-rng", "rng-entry", "world-size", "string-epoch", "negative-epoch",
        "huge-epoch", "float-step", "no-history", "best-epoch-ahead", "string-loss", "trainer-list",
    ],
)  # fmt: skip
def test_a_crafted_checkpoint_is_refused_naming_the_file_and_field(tmp_path: Path, change, field: str) -> None:
    path = crafted(tmp_path, change)
    trainer, model, optimizer = make()
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{re.escape(field)}"):
        trainer.load_checkpoint(path, model, optimizer, shuffled_loader())


def test_save_refuses_a_progress_it_could_not_read_back(tmp_path: Path) -> None:
    trainer, model, optimizer = make()
    with pytest.raises(ValueError, match=r"trainer_state\.epoch must be"):
        save_checkpoint(tmp_path / "x.pt", model, optimizer, TrainingProgress(epoch=-1))
    assert not (tmp_path / "x.pt").exists()

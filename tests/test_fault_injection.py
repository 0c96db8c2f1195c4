"""Fault injection: a training run killed by SIGKILL at random points, and inside a
checkpoint write, resumes to the uninterrupted run's weights bit for bit.

Each run is a child process (``CHILD`` below) training a tiny model for ``EPOCHS`` epochs
with ``TrainingConfig(checkpoint_dir=..., resume=True)``: started again after a kill, it
resumes from ``last.pt``. The child's own hook slows its checkpoint writes (half the
bytes, a pause, the rest) so that a kill can land inside one, and it can announce a
write with a marker file and wait there, so that the parent kills it inside that write
for certain. One thread per
child (``OMP_NUM_THREADS=1``) keeps the runs' arithmetic identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ease.training.checkpoint import CHECKPOINT_NAME, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
WRITE_PAUSE_S = 0.15  # per checkpoint write in the slowed children: the window a kill can hit

CHILD = r"""
import io, os, sys, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config

checkpoint_dir, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
pause = float(os.environ.get("FAULT_WRITE_PAUSE", "0"))
announce_at = int(os.environ.get("FAULT_ANNOUNCE_WRITE", "0"))  # the n-th write of this process
real_save = torch.save
writes = 0


def slow_save(obj, handle, *args, **kwargs):
    # Half the file, a pause (with a marker when asked), the rest: a kill in the pause
    # leaves a partial temporary file, as a kill in a real, slow write would.
    global writes
    writes += 1
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    if writes == announce_at:
        (checkpoint_dir / f"writing-{writes}").touch()
        time.sleep(120)  # until the parent's SIGKILL, however late it comes on a loaded machine
    time.sleep(pause)
    handle.write(data[len(data) // 2 :])


if pause or announce_at:
    torch.save = slow_save

torch.manual_seed(0)
rows = torch.randint(0, 20, (24, 4), generator=torch.Generator().manual_seed(0)).repeat(1, 5)[:, :17]
loader = DataLoader(rows, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(7))
val = [rows[:6]]
config = create_deep_supervision_config(2, verbose=False, checkpoint_dir=str(checkpoint_dir), resume=True)
trainer = Trainer(config, 20)
model = DeepSupervisionTransformer(vocab_size=20, dim=16, num_layers=2, max_seq_len=24, dropout=0.1)
optimizer = trainer.create_optimizer(model, base_lr=3e-3)
checkpoint_dir.mkdir(parents=True, exist_ok=True)
(checkpoint_dir / "started").touch()
trainer.train_with_early_stopping(model, loader, val, optimizer, max_epochs=epochs, patience=epochs)
real_save(model.state_dict(), out)
"""


def child(checkpoint_dir: Path, out: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    for marker in checkpoint_dir.glob("writing-*"):
        marker.unlink()
    (checkpoint_dir / "started").unlink(missing_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(checkpoint_dir), str(out), str(EPOCHS)],
        cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(process: subprocess.Popen, marker: Path, timeout: float = 60.0) -> bool:
    """Wait until ``marker`` exists (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        if process.poll() is not None:
            return marker.exists()
        time.sleep(0.005)
    raise TimeoutError(f"neither {marker} nor the end of the child within {timeout} s")


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr


def last_epoch(checkpoint_dir: Path) -> int:
    path = checkpoint_dir / CHECKPOINT_NAME
    return read_checkpoint(path)["trainer"]["epoch"] if path.exists() else 0


def temporaries(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.glob("*.tmp"))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and pid-checked temporary files are POSIX")
def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight_dir, straight_out = tmp_path / "straight", tmp_path / "straight.pt"
    straight_dir.mkdir()
    finish(child(straight_dir, straight_out))

    killed_dir, killed_out = tmp_path / "killed", tmp_path / "killed.pt"
    killed_dir.mkdir()
    pause = {"FAULT_WRITE_PAUSE": str(WRITE_PAUSE_S)}
    rng = random.Random(0)
    epochs_seen = []

    # 1. Killed inside its second checkpoint write, half the file written.
    process = child(killed_dir, killed_out, FAULT_ANNOUNCE_WRITE="2", **pause)
    assert wait_for(process, killed_dir / "writing-2")
    kill(process)
    assert len(temporaries(killed_dir)) == 1, "the kill must land inside the write"
    assert last_epoch(killed_dir) == 1  # the epoch-1 checkpoint is whole; epoch 2's is not published
    epochs_seen.append(1)

    # 2, 3. Killed at random moments of training (often inside a slowed write).
    for _ in range(2):
        process = child(killed_dir, killed_out, **pause)
        if wait_for(process, killed_dir / "started"):
            time.sleep(rng.uniform(0.0, EPOCHS * WRITE_PAUSE_S))
        kill(process)
        epochs_seen.append(last_epoch(killed_dir))

    # 4. Killed inside a write once more, if epochs are left to write.
    if last_epoch(killed_dir) < EPOCHS:
        process = child(killed_dir, killed_out, FAULT_ANNOUNCE_WRITE="1", **pause)
        if wait_for(process, killed_dir / "writing-1"):
            kill(process)
            assert temporaries(killed_dir), "the kill must land inside the write"
        else:
            finish(process)
        epochs_seen.append(last_epoch(killed_dir))

    # 5. Left to finish.
    finish(child(killed_dir, killed_out))
    assert epochs_seen == sorted(epochs_seen), f"a resume lost progress: {epochs_seen}"

    straight, resumed = torch.load(straight_out), torch.load(killed_out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), f"{name} differs after {epochs_seen}"
    straight_last, resumed_last = read_checkpoint(straight_dir / CHECKPOINT_NAME), read_checkpoint(
        killed_dir / CHECKPOINT_NAME
    )
    for name, tensor in straight_last["model"].items():
        assert torch.equal(resumed_last["model"][name], tensor), name
    assert resumed_last["trainer"]["epoch"] == EPOCHS
    assert temporaries(killed_dir) == [], "temporary files of killed writers must be cleaned up"

    # A byte flipped inside a tensor of the checkpoint is refused, naming the file.
    data = bytearray((killed_dir / CHECKPOINT_NAME).read_bytes())
    flipped = tmp_path / "flipped.pt"
    position = data.find(resumed_last["model"]["embed.weight"].numpy().tobytes()[:64])
    assert position > 0
    data[position + 8] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.pt is corrupt"):
        read_checkpoint(flipped)

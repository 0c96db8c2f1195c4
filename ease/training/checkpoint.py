"""Training checkpoints: one file, written atomically, from which a run resumes exactly.

A checkpoint is one ``torch.save`` file holding

- ``"model"``: the full (unsharded) state dict of the bare decoder;
- ``"optimizer"``: the optimiser's full state dict, keyed by parameter names
  (``torch.distributed.checkpoint.state_dict``), so it loads under DDP, FSDP2 or one
  process alike;
- ``"trainer"``: :class:`TrainingProgress` as a dict: epoch, optimiser step,
  early-stopping state (best objective, best epoch, epochs without improvement, the best
  epoch's weights) and the history of finished epochs;
- ``"rng"``: every RNG state of every rank (Python, NumPy, torch CPU, torch CUDA, and the
  ``torch.Generator`` of a shuffling ``DataLoader``), one entry per rank.

It is written to a temporary file beside the target and renamed onto it
(:func:`ease._io.atomic_path`), so a crash or an error during the write leaves the
previous checkpoint whole. Under ``torchrun`` every rank takes part in gathering the
state, rank 0 alone writes, and all ranks wait for the write to finish.

Resuming on the CPU from the checkpoint of epoch ``k`` ends with the same weights, bit
for bit, as a run that was never stopped: the data order of the next epoch depends only
on restored RNG states, and dropout draws from the restored torch RNG.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ease._io import atomic_path
from ease.training import distributed as dist_utils
from ease.training.distributed import DistributedContext
from ease.validation import check_int, is_real

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "TrainingProgress",
    "capture_rng_state",
    "check_progress",
    "data_generators",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_NAME = "last.pt"
"""File name the trainer writes in ``TrainingConfig.checkpoint_dir`` after every epoch."""

CHECKPOINT_FORMAT = "ease-checkpoint"
_VERSION = 1


@dataclass
class TrainingProgress:
    """Where a run of :meth:`~ease.training.Trainer.train_with_early_stopping` stands.

    Attributes:
        epoch: epochs finished (1-based number of the last one; 0 before training).
        step: optimiser steps taken over all epochs.
        best_val_loss: best validation objective so far (``inf`` before the first epoch).
        best_epoch: the epoch that reached it (0 before the first epoch).
        epochs_without_improvement: epochs in a row since the last improvement.
        best_state: full state dict of the best epoch's weights, on the CPU, held by
            rank 0 only (``None`` on other ranks and before the first epoch).
        history: one dict per finished epoch, as in ``EarlyStoppingResult.history``.
        position: where a run counted in steps stands (a step or token budget,
            ``eval_every`` or a metrics log), else None: ``tokens`` (target tokens trained
            on), ``batch_in_epoch`` (batches of the current epoch already trained),
            ``evaluations``, ``best_step``, and ``epoch_generators`` (the data loader's
            generator states at the start of the current epoch, so that a resume in the
            middle of an epoch sees the same order).
    """

    epoch: int = 0
    step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    position: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what a checkpoint stores under ``"trainer"``).

        ``position`` is stored only when set, so epoch-counted runs write what they always did.
        """
        extra = {} if self.position is None else {"position": self.position}
        return extra | {
            "epoch": self.epoch,
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "best_state": self.best_state,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingProgress":
        """Inverse of :meth:`as_dict`; unknown keys are ignored."""
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


# --------------------------------------------------------------------------- RNG


def data_generators(batches: object) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide a ``DataLoader``'s order, if any.

    Looks at ``batches.generator``, ``batches.sampler.generator`` and
    ``batches.batch_sampler.sampler.generator``; a list of tensors has none. A loader
    without its own generator shuffles from the global torch RNG, which
    :func:`capture_rng_state` saves anyway.
    """
    candidates = [
        getattr(batches, "generator", None),
        getattr(getattr(batches, "sampler", None), "generator", None),
        getattr(getattr(getattr(batches, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    found: list[torch.Generator] = []
    for generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def capture_rng_state(generators: Sequence[torch.Generator] = (), device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state of this process, in types ``torch.load(weights_only=True)`` accepts.

    Args:
        generators: extra generators to save (a ``DataLoader``'s), in a fixed order.
        device: under ``torchrun`` with CUDA, this rank's device: only its CUDA RNG is
            saved (asking for every device's state would create a CUDA context on each).
            ``None``: every CUDA device, if CUDA is already in use.

    Returns:
        ``{"python", "numpy", "torch", "cuda", "generators"}``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    if device is not None and device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)]
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    else:
        cuda = []
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": [generator.get_state() for generator in generators],
    }


def restore_rng_state(
    state: dict[str, Any], generators: Sequence[torch.Generator] = (), device: torch.device | None = None
) -> None:
    """Set every RNG back to ``state`` (from :func:`capture_rng_state`).

    Raises:
        ValueError: ``generators`` given, but not as many as were saved (with none given,
            saved generator states are skipped with a warning).
    """
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        if device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda[0], device)
        elif len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    saved = state["generators"]
    if saved and not generators:
        warnings.warn(
            "the checkpoint holds data-loader generator states but no generator was given: the "
            "data order after resuming may differ from the original run's",
            stacklevel=2,
        )
        return
    if len(saved) != len(generators):
        raise ValueError(
            f"the checkpoint holds {len(saved)} data-loader generator state(s) but {len(generators)} "
            "generator(s) were given: resume with the same kind of train_batches"
        )
    for generator, generator_state in zip(generators, saved):
        generator.set_state(generator_state)


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the exact nested tuples getstate gave.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- checks


_RNG_KEYS = ("python", "numpy", "torch", "cuda", "generators")
# What TrainingProgress.as_dict always writes (``position`` only when a run counts steps).
_PROGRESS_FIELDS = (
    "epoch", "step", "best_val_loss", "best_epoch", "epochs_without_improvement", "best_state", "history",
)  # fmt: skip


def check_progress(values: object, name: str) -> dict[str, Any]:
    """``values`` (a :meth:`TrainingProgress.as_dict`) checked field by field; returned as is.

    ``epoch`` and ``step`` must be integers >= 0; ``best_epoch`` and
    ``epochs_without_improvement`` are at most ``epoch``. A run counted in epochs (no
    ``position``) has one ``history`` dict per finished epoch, as the trainer writes it:
    that bounds ``epoch`` by what the file holds, so a crafted ``epoch=10**9`` (which
    would skip every epoch of the resumed run) is refused without an arbitrary cap.

    Args:
        values: the dict to check.
        name: how the message names it (``"<file>: trainer"``, ``"trainer_state"``).

    Raises:
        ValueError: the first field that is missing or wrong, named ``<name>.<field>``.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be a dict of the training progress, got {type(values).__name__}")
    missing = [field for field in _PROGRESS_FIELDS if field not in values]
    if missing:
        raise ValueError(f"{name}.{missing[0]} is missing (the training progress needs {missing})")
    epoch = check_int(f"{name}.epoch", values["epoch"], 0, expected="an integer >= 0")
    step = check_int(f"{name}.step", values["step"], 0, expected="an integer >= 0")
    # A run counted in steps checkpoints inside an epoch (its best can be the epoch under
    # way) and counts evaluations, at most one per step, without improvement.
    counted_in_steps = isinstance(values.get("position"), dict)
    best_limit, wait_limit = (epoch + 1, step) if counted_in_steps else (epoch, epoch)
    check_int(
        f"{name}.best_epoch", values["best_epoch"], 0, best_limit, expected=f"an integer in 0..{best_limit}"
    )
    check_int(
        f"{name}.epochs_without_improvement", values["epochs_without_improvement"], 0, wait_limit,
        expected=f"an integer in 0..{wait_limit}",
    )  # fmt: skip
    loss = values["best_val_loss"]
    if not is_real(loss) or math.isnan(loss):
        raise ValueError(f"{name}.best_val_loss must be a number (inf before the first epoch), got {loss!r}")
    history = values["history"]
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError(f"{name}.history must be a list of dicts, got {type(history).__name__}")
    position = values.get("position")
    if position is not None and not isinstance(position, dict):
        raise ValueError(f"{name}.position must be None or a dict, got {type(position).__name__}")
    if position is None and len(history) != epoch:
        raise ValueError(
            f"{name}.epoch must equal the number of epochs in {name}.history ({len(history)}), got {epoch}"
        )
    best_state = values["best_state"]
    if best_state is not None and not _is_state_dict(best_state):
        raise ValueError(f"{name}.best_state must be None or a dict of tensors")
    return values


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def _check_rng_entry(entry: object, name: str) -> None:
    if not isinstance(entry, dict) or any(key not in entry for key in _RNG_KEYS):
        raise ValueError(f"{name} must be a dict with keys {list(_RNG_KEYS)}, got {_describe(entry)}")
    numpy_state = entry["numpy"]
    if not (
        isinstance(entry["python"], (tuple, list))
        and isinstance(numpy_state, dict)
        and isinstance(numpy_state.get("keys"), torch.Tensor)
        and all(key in numpy_state for key in ("kind", "position", "has_gauss", "cached_gaussian"))
        and isinstance(entry["torch"], torch.Tensor)
        and entry["torch"].dtype == torch.uint8
        and isinstance(entry["cuda"], list)
        and isinstance(entry["generators"], list)
        and all(isinstance(state, torch.Tensor) for state in [*entry["cuda"], *entry["generators"]])
    ):
        raise ValueError(f"{name} does not hold RNG states as capture_rng_state writes them")


def _describe(value: object) -> str:
    return f"a dict with keys {sorted(map(str, value))}" if isinstance(value, dict) else type(value).__name__


def _check_payload(payload: dict[str, Any], path: Path) -> None:
    """Every field :func:`load_checkpoint` reads, checked before anything is loaded."""
    fields = ("model", "optimizer", "trainer", "rng", "world_size")
    for name in fields:
        if name not in payload:
            raise ValueError(f"{path}: the checkpoint has no {name!r} field (it needs {list(fields)})")
    if not _is_state_dict(payload["model"]):
        raise ValueError(f"{path}: the 'model' field must be a state dict (names to tensors)")
    optimizer = payload["optimizer"]
    if optimizer is not None and not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        raise ValueError(f"{path}: the 'optimizer' field must be None or an optimizer state dict")
    if payload["trainer"] is not None:
        if not isinstance(payload["trainer"], dict):
            raise ValueError(f"{path}: the 'trainer' field must be None or a dict, got {_describe(payload['trainer'])}")
        check_progress(payload["trainer"], f"{path}: trainer")
    world_size = check_int(f"{path}: world_size", payload["world_size"], 1, expected="an integer >= 1")
    rng = payload["rng"]
    if not isinstance(rng, list) or not 1 <= len(rng) <= world_size:
        raise ValueError(
            f"{path}: rng must be a list of 1..world_size={world_size} RNG states (one per rank), got "
            + (f"a list of {len(rng)}" if isinstance(rng, list) else type(rng).__name__)
        )
    for rank, entry in enumerate(rng):
        _check_rng_entry(entry, f"{path}: rng[{rank}]")


# --------------------------------------------------------------------------- write and read


def _write(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed onto ``path``.

    Raises:
        OSError: the write failed, with the cause's errno (``ENOSPC`` for a full disk)
            and ``path`` as its filename.
    """
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())  # the bytes are on disk before the rename publishes them
    except (OSError, RuntimeError) as error:
        cause = _os_error_of(error)
        if cause is None:
            raise
        raise OSError(cause.errno, f"{cause.strerror or cause}; could not write the checkpoint", str(path)) from error


def _os_error_of(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one it was raised from or while handling.

    torch's zip writer reports a failed write (a full disk) as a ``RuntimeError``
    ("unexpected pos ...") raised while handling the file's ``OSError``.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: TrainingProgress | dict[str, Any] | None = None,
    *,
    context: DistributedContext | None = None,
    generators: Sequence[torch.Generator] = (),
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint of ``model``, ``optimizer``, the trainer's progress and every RNG.

    Collective under DDP and FSDP2: every rank must call it with the same arguments;
    rank 0 gathers the full state dicts and writes, and every rank returns once the file
    is in place.

    Args:
        path: the checkpoint file; its folder is created. An existing file is replaced
            only once the new one is complete.
        model: the bare decoder (sharded in place under FSDP2).
        optimizer: its optimiser, or ``None`` to save the weights alone.
        trainer_state: a :class:`TrainingProgress` (or its dict), or ``None``.
        context: the run's :class:`~ease.training.distributed.DistributedContext`; ``None`` is one
            process.
        generators: data-loader generators to save with the RNG states.
        model_state: ``model``'s full state dict when the caller gathered it already
            (rank 0's; ignored elsewhere), e.g. the best state just taken from the same
            weights: it is not gathered again, and tensors it shares with
            ``trainer_state`` are written once. ``None``: gathered here.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``trainer_state`` that :func:`read_checkpoint` would refuse
            (:func:`check_progress`); nothing is written.
        OSError: the file could not be written (``errno.ENOSPC``: the disk is full);
            the previous checkpoint at ``path``, if any, is left as it was and no
            temporary file remains.
    """
    context = context or DistributedContext()
    path = Path(path)
    if model_state is None:
        model_state = dist_utils.full_model_state_dict(model, context)
    optimizer_state = (
        dist_utils.full_optimizer_state_dict(model, optimizer, context) if optimizer is not None else None
    )
    rng = dist_utils.all_gather_objects(capture_rng_state(generators, context.device), context)
    if isinstance(trainer_state, TrainingProgress):
        trainer_state = trainer_state.as_dict()
    elif trainer_state is not None:
        trainer_state = TrainingProgress.from_dict(trainer_state).as_dict() if isinstance(trainer_state, dict) else trainer_state
    if trainer_state is not None:
        check_progress(trainer_state, "trainer_state")  # what read_checkpoint would refuse is not written
    error = None
    if context.is_main:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": _VERSION,
            "model": model_state,
            "optimizer": optimizer_state,
            "trainer": trainer_state,
            "rng": rng,
            "world_size": context.world_size,
            "torch_version": str(torch.__version__),  # a plain str: weights_only loading refuses TorchVersion
        }
        try:
            _write(payload, path)
        except BaseException as caught:  # re-raised below, after the other ranks know
            error = caught
    # Every rank learns whether the write worked, so none goes on (or hangs) alone.
    failed = dist_utils.broadcast_object(error is not None, context)
    if error is not None:
        raise error
    if failed:
        raise OSError(f"rank 0 failed to write the checkpoint {path}")
    return path


def _check_crc(path: Path) -> None:
    """Verify every member of the zip archive ``torch.save`` wrote against its CRC-32.

    ``torch.load`` does not check the CRCs: a flipped bit inside a tensor would load as
    a changed weight. This reads the whole file once more.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if bad is not None:
        raise ValueError(f"{path} is corrupt: its record {bad!r} fails the zip CRC check")


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file as a dict (``torch.load`` with ``weights_only=True``).

    The file's zip CRCs are verified first, and every field :func:`load_checkpoint`
    uses is checked (types, and a training progress consistent with itself:
    :func:`check_progress`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an ease checkpoint, is truncated or corrupt (a CRC
            mismatch), or misses a field or holds a wrong one; the message names the
            file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_crc(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # truncated zip: RuntimeError
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an ease checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    if payload.get("version") != _VERSION:
        raise ValueError(f"{path} has checkpoint version {payload.get('version')!r}; this ease reads {_VERSION}")
    _check_payload(payload, path)
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    context: DistributedContext | None = None,
    generators: Sequence[torch.Generator] = (),
    restore_rng: bool = True,
) -> TrainingProgress:
    """Load a checkpoint into ``model`` (and ``optimizer``), restore the RNGs, return the progress.

    Collective under DDP and FSDP2: rank 0 reads the file (other ranks need no access to
    it) and its states are broadcast; each rank restores its own RNG states when the
    world size is the one the checkpoint was written with, rank 0's otherwise.

    Args:
        path: a file written by :func:`save_checkpoint`.
        model: the bare decoder, already wrapped as it will be trained (FSDP2 shards
            it in place before loading).
        optimizer: loaded when given; the checkpoint must then hold optimiser state.
        context: the run's :class:`~ease.training.distributed.DistributedContext`.
        generators: data-loader generators to restore, as passed when saving.
        restore_rng: set every RNG to its saved state (needed for an exact resume).

    Returns:
        The saved :class:`TrainingProgress` (``best_state`` on rank 0 only); a fresh one
        when the checkpoint holds none.

    Raises:
        FileNotFoundError, ValueError: from :func:`read_checkpoint`, or a checkpoint
            without optimiser state when ``optimizer`` is given.
        RuntimeError: the weights do not fit ``model`` (missing or unexpected keys,
            wrong shapes).
    """
    context = context or DistributedContext()
    payload = None
    error = None
    if context.is_main:
        try:
            payload = read_checkpoint(path)
            if optimizer is not None and payload["optimizer"] is None:
                raise ValueError(f"{path} holds no optimizer state (saved with optimizer=None)")
        except (FileNotFoundError, ValueError) as caught:
            error = caught
    failed = dist_utils.broadcast_object(repr(error) if error is not None else None, context)
    if error is not None:
        raise error
    if failed is not None:
        raise ValueError(f"rank 0 could not load the checkpoint {path}: {failed}")

    dist_utils.load_full_model_state_dict(model, payload["model"] if payload else {}, context)
    if optimizer is not None:
        dist_utils.load_full_optimizer_state_dict(model, optimizer, payload["optimizer"] if payload else {}, context)

    # Small things are broadcast; the best epoch's weights stay on rank 0, which alone uses them.
    trainer = dict(payload["trainer"] or {}) if payload else {}
    best_state = trainer.pop("best_state", None)
    shared = dist_utils.broadcast_object(
        (trainer, payload["rng"], payload["world_size"]) if payload else None, context
    )
    trainer, rng, world_size = shared
    progress = TrainingProgress.from_dict(trainer)
    progress.best_state = best_state if context.is_main else None
    if restore_rng:
        entry = rng[context.rank] if world_size == context.world_size and context.rank < len(rng) else rng[0]
        restore_rng_state(entry, generators, context.device)
    return progress


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """``directory/last.pt`` if it exists, else ``None``."""
    path = Path(directory) / CHECKPOINT_NAME
    return path if path.is_file() else None

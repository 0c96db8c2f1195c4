"""AdamW with one learning rate per layer (``layer_lr_scales``) and no decay on norms and biases."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ease.config import TrainingConfig
from ease.models import EarlyExitDecoder
from ease.training import distributed as dist_utils
from ease.validation import check_real


def check_base_lr(base_lr: object) -> float:
    """``base_lr`` as a float: a finite number > 0."""
    return check_real("base_lr", base_lr, 0.0, above=True, expected="a finite number > 0")


def parameter_groups(model: EarlyExitDecoder, config: TrainingConfig, base_lr: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, each with ``lr``, ``peak_lr``, ``weight_decay``, ``layer``, ``lr_scale``, ``name``.

    - ``"layer{l}"`` (weight matrices of ``model.layers[l - 1]``, decayed) and
      ``"layer{l}.no_decay"`` (its norm weights and biases), both with
      ``lr = base_lr * layer_lr_scales.get(l, 1.0)``;
    - ``"embeddings_head"`` (token embedding and, when untied, output projection,
      decayed) and ``"embeddings_head.no_decay"`` (the final norm), with ``lr = base_lr``.

    Each trainable parameter appears exactly once (a tied embedding/head weight is one
    parameter); empty groups are left out; frozen parameters are not optimised.
    """
    seen: set[int] = set()

    def unseen(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        # By identity, so a parameter shared between modules (tied weights) is taken once.
        fresh = []
        for param in params:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                fresh.append(param)
        return fresh

    groups: list[dict[str, Any]] = []

    def add(name: str, layer: int | None, scale: float, params: list[nn.Parameter]) -> None:
        # Matrices are decayed; vectors (norm scales, biases) are not: decaying a norm
        # scale pulls it towards 0 and shrinks the layer's output for no regularising gain.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        for suffix, members, weight_decay in (("", decay, config.weight_decay), (".no_decay", no_decay, 0.0)):
            if members:
                groups.append(
                    {
                        "params": members,
                        "lr": base_lr * scale,
                        # The rate a learning-rate schedule scales (ease.training.schedule).
                        "peak_lr": base_lr * scale,
                        "weight_decay": weight_decay,
                        "layer": layer,
                        "lr_scale": scale,
                        "name": name + suffix,
                    }
                )

    for layer, block in enumerate(model.layers, start=1):
        add(f"layer{layer}", layer, config.lr_scale(layer), unseen(block.parameters()))
    add("embeddings_head", None, 1.0, unseen(model.parameters()))
    return groups


def create_optimizer(model: EarlyExitDecoder, config: TrainingConfig, base_lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, with the config's ``betas`` and ``weight_decay``.

    Fused on CUDA, except over FSDP2 shards (the fused kernel takes plain tensors).

    Raises:
        ValueError: ``base_lr`` is not a finite number > 0, or the model has float16
            parameters (AdamW's state underflows in float16; use autocast instead).
    """
    base_lr = check_base_lr(base_lr)
    groups = parameter_groups(model, config, base_lr)
    params = [p for group in groups for p in group["params"]]
    half = next((name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16), None)
    if half is not None:
        # AdamW keeps its moments in the parameters' dtype: in float16 the second moment
        # (grad**2, often below 6e-8) and eps=1e-8 round to 0, the update divides by zero,
        # and the weights turn NaN at the second step.
        raise ValueError(
            f"create_optimizer got float16 parameters ({half} and others): AdamW's state underflows in "
            "float16 (the weights become NaN after a step or two). Keep the parameters in float32 (or "
            "bfloat16) and train under autocast: on CUDA the trainer runs bfloat16 autocast itself"
        )
    fused = (
        bool(params)
        and all(p.is_cuda and p.is_floating_point() for p in params)
        and not dist_utils.uses_dtensors(params)
    )
    return torch.optim.AdamW(groups, lr=base_lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused or None)


_HYPERPARAMETERS = ("lr", "peak_lr", "weight_decay", "betas")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's ``lr``, ``weight_decay`` and ``betas`` (and ``name``), copied."""
    return [
        {key: group[key] for key in (*_HYPERPARAMETERS, "name") if key in group} for group in optimizer.param_groups
    ]


def restore_hyperparameters(optimizer: torch.optim.Optimizer, chosen: list[dict[str, Any]]) -> list[str]:
    """Put ``chosen`` (from :func:`hyperparameters`) back into ``optimizer``'s groups.

    A checkpoint's optimiser state brings the learning rates it was saved with; a resumed
    run must use the ones its optimiser was built with (a new ``base_lr`` or
    ``layer_lr_scales``), never keep the old ones silently. Groups with a ``peak_lr`` (a
    learning-rate schedule scales it) are compared by their peak; their current ``lr``
    keeps the schedule's factor at the saved step.

    Returns:
        One line per value that differed, ``"<group> <key> <saved> -> <chosen>"``.
    """
    changed = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, chosen)):
        name = wanted.get("name", f"group {index}")
        scheduled = "peak_lr" in group and "peak_lr" in wanted
        if scheduled and group["peak_lr"] != wanted["peak_lr"]:
            changed.append(f"{name} lr {group['peak_lr']!r} -> {wanted['peak_lr']!r}")
            factor = group["lr"] / group["peak_lr"] if group["peak_lr"] else 1.0
            group["peak_lr"], group["lr"] = wanted["peak_lr"], wanted["peak_lr"] * factor
        for key in ("weight_decay", "betas") if scheduled else ("lr", "weight_decay", "betas"):
            if key not in wanted or key not in group:
                continue
            saved = group[key]
            # A loaded state dict may hold betas as a list where the optimiser built a tuple.
            same = tuple(saved) == tuple(wanted[key]) if isinstance(saved, (list, tuple)) else saved == wanted[key]
            if not same:
                changed.append(f"{name} {key} {saved!r} -> {wanted[key]!r}")
                group[key] = wanted[key]
    return changed

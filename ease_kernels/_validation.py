"""Argument checks shared by the ops: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(value: object) -> bool:
    """An integer, not a bool (``{True: 1.0}`` is a mistake, never a layer number)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {tensor.dtype}"
        )
    return tensor


def check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in (0, 1] or None, got {type(threshold).__name__}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


CRITERIA = ("max_prob", "margin")
"""The exit head's confidence criteria: top-1 softmax probability, or top-1 minus top-2."""


def check_criterion(criterion: object) -> str:
    """``criterion`` of :func:`~ease_kernels.exit_confidence`: one of :data:`CRITERIA`."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")
    return criterion


def check_eps(eps: object) -> float:
    """The epsilon of an RMSNorm: a finite real number ``>= 0`` (Python or NumPy; not a bool).

    Returns it as a Python float. Raises ``TypeError`` for a non-number (``None``, a string,
    a tensor) or a bool, ``ValueError`` for a negative, infinite or NaN number; both name
    ``eps`` and what was expected.
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a finite real number >= 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return float(eps)

"""Argument checks of the public API: one function per kind of argument, one verdict per value.

Every public entry point checks its arguments with these functions, so the same value
gets the same answer and the same message (naming the public argument) wherever it is
passed: ``TrainingConfig``, ``Trainer``, ``calibrate_threshold``, ``generate``, the model
constructors. The rules:

- Integers are Python ``int`` or NumPy integer scalars; reals are those plus ``float``
  and NumPy floating scalars. Both come back as plain Python ``int`` / ``float``.
- ``bool`` is never a number (``{True: 1.0}`` or ``min_exit_layer=True`` is a mistake).
- A value of the wrong type raises :class:`ArgumentTypeError`, which is both a
  ``TypeError`` and a ``ValueError``; a value of the right type outside its range raises
  ``ValueError``. Messages read ``"<name> must be <what>, got <value>"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

__all__ = [
    "ArgumentTypeError",
    "check_bool",
    "check_int",
    "check_layer",
    "check_layers",
    "check_min_exit_layer",
    "check_real",
    "check_threshold",
    "is_int",
    "is_real",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError`` that ``except ValueError`` catches too.

    Bad arguments were reported as either in the past, depending on the entry point;
    being both keeps every caller's ``except`` working while the verdict is one.
    """


def is_int(value: object) -> bool:
    """An integer (``int`` or a NumPy integer scalar), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (``int``, ``float`` or a NumPy scalar of either), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, expected: str, value: object, wrong_type: bool) -> Exception:
    error = ArgumentTypeError if wrong_type else ValueError
    return error(f"{name} must be {expected}, got {value!r}")


def check_bool(name: str, value: object) -> bool:
    """``value`` itself when it is ``True`` or ``False``; raise otherwise (``1`` is not a bool)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, wrong_type=True)
    return value


def check_int(
    name: str,
    value: object,
    minimum: int | None = None,
    maximum: int | None = None,
    expected: str | None = None,
) -> int:
    """``value`` as a Python int, checked to lie in ``[minimum, maximum]``.

    Args:
        name: the public argument's name, as the message shows it.
        value: what the caller passed.
        minimum, maximum: inclusive bounds (None: unbounded).
        expected: the message's description of a valid value; default from the bounds.

    Raises:
        ArgumentTypeError: not an integer (a bool, a float, a string, ...).
        ValueError: outside the bounds.
    """
    if expected is None:
        if minimum is not None and maximum is not None:
            expected = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            expected = f"an integer >= {minimum}"
        elif maximum is not None:
            expected = f"an integer <= {maximum}"
        else:
            expected = "an integer"
    if not is_int(value):
        raise _fail(name, expected, value, wrong_type=True)
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(name, expected, value, wrong_type=False)
    return number


def check_real(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    expected: str | None = None,
) -> float:
    """``value`` as a finite Python float, checked against its bounds.

    Args:
        name: the public argument's name.
        value: what the caller passed.
        minimum, maximum: bounds, inclusive unless ``above`` (``> minimum``) or ``below``
            (``< maximum``).
        expected: the message's description; default from the bounds.

    Raises:
        ArgumentTypeError: not a real number.
        ValueError: NaN, infinite, or outside the bounds.
    """
    if expected is None:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if above else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"{'<' if below else '<='} {maximum:g}")
        expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if not is_real(value):
        raise _fail(name, expected, value, wrong_type=True)
    number = float(value)
    bad = not math.isfinite(number)
    if minimum is not None:
        bad = bad or (number <= minimum if above else number < minimum)
    if maximum is not None:
        bad = bad or (number >= maximum if below else number > maximum)
    if bad:
        raise _fail(name, expected, value, wrong_type=False)
    return number


def check_threshold(name: str, value: object, allow_none: bool = True) -> float | None:
    """An exit threshold: a number in (0, 1] (or None when ``allow_none``), as a float.

    Used for ``routing_threshold``, ``draft_threshold`` and each swept threshold.
    """
    if value is None and allow_none:
        return None
    expected = "in (0, 1] or None" if allow_none else "in (0, 1]"
    return check_real(name, value, 0.0, 1.0, above=True, expected=expected)


def check_layer(name: str, value: object, num_layers: int) -> int:
    """A layer number in ``1..num_layers`` (layers count from 1)."""
    return check_int(name, value, 1, num_layers)


def check_layers(name: str, values: object, num_layers: int) -> list[int]:
    """Sorted unique layer numbers, each in ``1..num_layers``; at least one.

    Raises:
        ArgumentTypeError: ``values`` is not an iterable of layer numbers (one bare
            integer included: pass ``[2]``, not ``2``).
        ValueError: a layer outside ``1..num_layers``, or no layer at all.
    """
    if is_int(values) or isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _fail(name, f"a list of layer numbers in 1..{num_layers}", values, wrong_type=True)
    checked = {check_int(name, layer, 1, num_layers, f"a list of layer numbers in 1..{num_layers}")
               for layer in values}
    if not checked:
        raise ValueError(f"{name} must name at least one layer, got {values!r}")
    return sorted(checked)


def check_min_exit_layer(value: object, num_layers: int | None = None) -> int:
    """``min_exit_layer``: an integer >= 1, and at most ``num_layers`` when the model is known.

    Without a model (``TrainingConfig``) only the lower bound can be checked; the upper one
    is checked by every entry point that has the model, with the same message.
    """
    layer = check_int("min_exit_layer", value, 1, expected="an integer >= 1 (layers count from 1)")
    if num_layers is not None and layer > num_layers:
        raise ValueError(
            f"min_exit_layer must be an integer in 1..{num_layers}, got {value!r} "
            f"(min_exit_layer={layer} exceeds the model's num_layers={num_layers})"
        )
    return layer

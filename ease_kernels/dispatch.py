"""The one rule that decides whether an op runs its Triton kernel or its reference.

``EASE_KERNELS`` (environment) or :func:`set_backend` (Python) picks the backend:

- ``auto`` (default): the Triton kernel when the tensor is on CUDA, its dtype is one the
  kernels support and Triton imports; otherwise the reference op.
- ``triton``: always the kernel, on any device (on the CPU this needs
  ``TRITON_INTERPRET=1`` set before Triton is imported: that is how the test suite runs
  the kernels without a GPU). Float64 still takes the reference, which is exact.
- ``reference``: always the plain PyTorch reference.

Every public op in :mod:`ease_kernels` calls :func:`use_triton` and nothing else to
choose, so a direct import of an op can never bypass the setting.

Once the kernel is chosen, :func:`launch` decides how it is reached: each op has one
``torch.autograd.Function`` whose forward and backward call their launchers through
:func:`launch`, which calls the launcher itself in eager mode and the ``torch.library``
custom op wrapping it while ``torch.compile`` traces. The custom ops therefore carry no
autograd of their own: one autograd definition serves both roads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

BACKENDS = ("auto", "triton", "reference")

T = TypeVar("T")

# The dtypes the Triton kernels are written for; statistics are kept in float32.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _check_backend(os.environ.get("EASE_KERNELS", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """Return the current backend name: ``"auto"``, ``"triton"`` or ``"reference"``."""
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for every ``ease_kernels`` op (overrides ``EASE_KERNELS``)."""
    global _backend
    _backend = _check_backend(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager that sets the backend inside a ``with`` block and restores it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_triton_imports: bool | None = None  # decided on first use, then fixed for the process


def triton_available() -> bool:
    """Whether Triton imports in this process."""
    # A plain global rather than functools.cache: torch.compile traces through this
    # function and would warn that it ignores the cache wrapper.
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401

            _triton_imports = True
        except Exception:
            _triton_imports = False
    return _triton_imports


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose main input is ``tensor`` should run its Triton kernel."""
    if _backend == "reference" or tensor.dtype not in KERNEL_DTYPES:
        return False
    if _backend == "triton":
        if not triton_available():
            raise RuntimeError("EASE_KERNELS=triton but Triton cannot be imported")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"EASE_KERNELS=triton got a {tensor.device.type} tensor: the kernels need CUDA tensors, "
                "or TRITON_INTERPRET=1 set before Triton is imported to run them on the CPU"
            )
        return True
    return tensor.is_cuda and triton_available()


def launch(launcher: Callable[..., T], op: Callable[..., T], *args: object) -> T:
    """Run a kernel: ``launcher(*args)`` in eager mode, ``op(*args)`` while ``torch.compile`` traces.

    ``op`` is the ``torch.library`` custom op that wraps ``launcher`` with the same
    positional arguments and a fake implementation, so that tracing sees an opaque call
    with known output shapes instead of the launcher's Python. Eager calls skip the
    custom op's dispatch: about 45 µs of host time per call on the CPU
    (``bench/bench_call_overhead.py``), as long as a kernel at 16k x 4096 on an H100.
    """
    return op(*args) if torch.compiler.is_compiling() else launcher(*args)

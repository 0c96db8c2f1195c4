"""Test set-up: run Triton kernels through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before Triton is imported, so it is set here, at the
top of the first module pytest imports.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ease_kernels  # noqa: E402

CUDA = torch.cuda.is_available()

# The device the Triton kernels run on in this process: CUDA when present (compiled
# kernels), else the CPU through the interpreter. A process cannot do both: the
# interpreter is chosen once, when Triton is imported.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
KERNEL_DEVICES = [KERNEL_DEVICE]


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreter on the CPU) for the duration of a test."""
    if not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    with ease_kernels.backend("triton"):
        yield


@pytest.fixture
def reference_backend():
    """Force the reference ops for the duration of a test."""
    with ease_kernels.backend("reference"):
        yield

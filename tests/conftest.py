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


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the suite's small models and tensors on one thread.

    At test sizes a thread pool costs more than it saves, and on a busy machine OpenMP's
    spin-waiting threads made small ops up to 100x slower. torchrun workers started by the
    tests get OMP_NUM_THREADS=1 for the same reason.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreter on the CPU) for the duration of a test."""
    if not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    with ease_kernels.backend("triton"):
        yield


@pytest.fixture(params=["eager", "custom_op"])
def triton_path(request, monkeypatch):
    """Each of the two roads from an op to its kernel, one per run of the test.

    Eager calls go through a plain ``torch.autograd.Function``; under ``torch.compile``
    (``torch.compiler.is_compiling()``) the ops call their ``torch.library`` custom ops.
    ``custom_op`` patches ``is_compiling`` so that eager tests take the compile road.
    """
    if request.param == "custom_op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.fixture
def reference_backend():
    """Force the reference ops for the duration of a test."""
    with ease_kernels.backend("reference"):
        yield

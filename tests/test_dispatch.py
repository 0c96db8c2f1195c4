"""Tests of the one dispatch rule and of the shared launch settings."""

import os
import subprocess
import sys

import pytest
import torch

import ease_kernels
from ease_kernels import _launch, dispatch


def test_backend_names_are_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        ease_kernels.set_backend("cuda")


def test_backend_context_restores_previous():
    before = ease_kernels.get_backend()
    with ease_kernels.backend("reference"):
        assert ease_kernels.get_backend() == "reference"
        assert not ease_kernels.use_triton(torch.zeros(2))
    assert ease_kernels.get_backend() == before


def test_auto_takes_reference_on_cpu_and_for_float64():
    with ease_kernels.backend("auto"):
        assert not ease_kernels.use_triton(torch.zeros(2))
    with ease_kernels.backend("triton"):
        assert not ease_kernels.use_triton(torch.zeros(2, dtype=torch.float64))


def test_environment_variable_sets_the_backend():
    code = "import ease_kernels; print(ease_kernels.get_backend())"
    env = dict(os.environ, EASE_KERNELS="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["EASE_KERNELS"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_import_and_reference_ops_without_triton():
    """With Triton unimportable, the package imports and every op runs its reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, ease_kernels\n"
        "assert not ease_kernels.triton_available()\n"
        "x = torch.randn(3, 8)\n"
        "y = ease_kernels.rms_norm(x, torch.ones(8))\n"
        "q, k = ease_kernels.apply_rope(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), *ease_kernels.rope_cos_sin(torch.arange(3), 8))\n"
        "d = ease_kernels.exit_confidence(x, 0.5)\n"
        "print(y.shape[0] + q.shape[1] + d.prediction.shape[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EASE_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "9"


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    if not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ease_kernels.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.zeros(2))


@pytest.mark.parametrize("n_cols, expected_block", [(1, 1), (7, 8), (1000, 1024), (4096, 4096)])
def test_row_block_is_the_next_power_of_two(n_cols, expected_block):
    block, num_warps = _launch.row_block(n_cols)
    assert block == expected_block and num_warps in (1, 2, 4, 8, 16, 32)


def test_row_block_caps_and_errors():
    assert _launch.row_block(10_000, max_block=4096, can_loop=True)[0] == 4096
    with pytest.raises(ValueError, match="4096"):
        _launch.row_block(10_000, max_block=4096)
    with pytest.raises(ValueError, match="max_block"):
        _launch.row_block(10, max_block=1000)
    assert 1 <= _launch.persistent_programs(3, torch.device("cpu")) <= 3

"""Tests of the one dispatch rule and of the shared launch settings."""

import os
import subprocess
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

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


# exit_confidence's running maximum starts at the lowest float; numpy (the interpreter) warns
# when |z - FLT_LOWEST| * log2(e) overflows to inf, whose exp2 is the 0 intended.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_compile_reaches_the_kernels_through_their_custom_ops(triton_backend):
    """torch.compile (AOT autograd, no compiler) traces each op's one autograd function
    without a graph break, sees the custom ops (not the launchers' Python), and gives eager's
    values and gradients: the kernels run inside the ops (the interpreter on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x, r = (torch.randn(3, 40, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(40, device=device, requires_grad=True)
    q = torch.randn(1, 3, 4, 8, device=device, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, device=device, requires_grad=True)
    cos, sin = ease_kernels.rope_cos_sin(torch.arange(3, device=device), 8)

    def step(x, w, r, q, k):
        y, s = ease_kernels.rms_norm(x, w, 1e-6, residual=r)
        y2 = ease_kernels.rms_norm(s, w, 1e-6)
        q_out, k_out = ease_kernels.apply_rope(q, k, cos, sin)
        decision = ease_kernels.exit_confidence(y2, 0.5)
        return (y * y2).sum() + q_out.square().sum() + k_out.sum(), decision.confidence

    graphs = []  # the forward and backward graphs AOT autograd hands its compilers

    def keep(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    assert torch._dynamo.explain(step)(x, w, r, q, k).graph_break_count == 0
    results = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend=backend, fullgraph=True))):
        loss, confidence = fn(x, w, r, q, k)
        results[name] = [loss.detach(), confidence, *torch.autograd.grad(loss, (x, w, r, q, k))]
    forward, backward = graphs
    for op in ("rms_norm_fwd", "apply_rope", "exit_confidence"):
        assert f"torch.ops.ease.{op}.default" in forward, op
    for op in ("rms_norm_bwd", "apply_rope"):
        assert f"torch.ops.ease.{op}.default" in backward, op
    for i, (got, want) in enumerate(zip(results["compiled"], results["eager"])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"output {i}: {m}")

"""Tests for :mod:`ease_kernels.rms_norm`.

Everything is measured against a float64 computation written here from the definition,
independently of both the reference op and the kernels: the reference must be within the
tolerances below, and the Triton kernels (the interpreter on the CPU, the GPU when there is
one) within the same tolerances and no worse than about twice the reference's own error.

Error metric, everywhere: ``max |out - truth| / max |truth|`` in float64 (absolute values,
so errors of either sign count). It is scale-free, and bounded by the unit roundoff of the
output dtype for a result computed in float32 and rounded once. One exception: ``dx`` is the
difference ``rstd * (dy * w - xhat * c)`` of two terms that cancel when the row is short
(at hidden = 1, to ``~eps / x ** 2``), which no float32 computation resolves; its
denominator is therefore at least ``max |rstd * dy * w|``, the size of the terms; and
``dweight``, a sum over rows of ``dy * xhat`` whose terms can cancel, is measured against
``max over columns of sum |dy * xhat|``, the size of what is summed.
"""

import importlib

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICES
from _parity import relative_error, worst

import ease_kernels
from ease_kernels import _launch, rms_norm, rms_norm_reference

# The module itself: ``ease_kernels.rms_norm`` as an attribute is the function it exports.
rms_norm_module = importlib.import_module("ease_kernels.rms_norm")

EPS = 1e-6

# dtype of the output -> (forward tolerance, gradient tolerance), in the metric above.
# Every output is computed in float32 and rounded once into its dtype (s = x + residual
# is checked separately, bit for bit, and the truth normalises the same s).
TOLERANCES = {
    # 24-bit significand: the rounding is negligible; the error is that of float32 sums
    # over <= 2**16 terms in another order than float64 (~1e-6 at worst); 10x margin.
    torch.float32: (1e-5, 1e-5),
    # 8-bit significand: rounding costs up to 2**-8 relative, truncation (the Triton
    # interpreter's float32 -> bfloat16 conversion, see store_ulps) up to 2**-7; 2x margin.
    torch.bfloat16: (2**-6, 2**-6),
    # 11-bit significand: rounding costs up to 2**-11 relative (the interpreter rounds
    # float16 correctly); 2x margin.
    torch.float16: (2**-10, 2**-10),
}

# Hidden sizes: odd and not powers of two, plus one longer than rms_norm.MAX_BLOCK (8192),
# which takes the looping kernels (two chunks, the second of 8 columns).
HIDDEN_SIZES = [1, 7, 100, 1000, 8200]
DTYPES = list(TOLERANCES)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def float64_truth(x, weight, eps=EPS, residual=None, dy=None, ds=None, s=None) -> dict:
    """RMSNorm from its definition in float64, with gradients by float64 autograd.

    ``s = x + residual`` is added in ``x.dtype`` (the definition returns and normalises
    the rounded sum); everything after is float64. The gradient wrt ``s`` is the gradient
    wrt both ``x`` and ``residual``. Passing ``s`` (an implementation's own sum, checked
    separately) measures that implementation's normalisation alone.
    """
    if s is None:
        s = x if residual is None else x + residual
    s64 = s.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = s64 / torch.sqrt(s64.square().mean(-1, keepdim=True) + eps) * w64
    truth = {"y": y64.detach(), "s": s.detach() if residual is not None else None}
    if dy is not None:
        loss = (y64 * dy.double()).sum()
        if ds is not None:
            loss = loss + (s64 * ds.double()).sum()
        ds_total, dweight = torch.autograd.grad(loss, (s64, w64))
        truth.update(dx=ds_total, dweight=dweight, dresidual=ds_total if residual is not None else None)
        rstd64 = torch.rsqrt(s64.detach().square().mean(-1, keepdim=True) + eps)
        truth["dx_scale"] = (rstd64 * dy.double() * w64.detach()).abs().max().item() if dy.numel() else 0.0
        # dweight sums dy * xhat over the rows; terms of either sign can cancel (at hidden 1
        # xhat = +-1, and six terms of size 1 may sum to 0.005), so its error is measured
        # against the size of the terms summed, as float32 summation resolves them.
        xhat64 = (s64.detach() * rstd64).reshape(-1, s64.shape[-1])
        dweight_terms = (dy.double().reshape(-1, s64.shape[-1]) * xhat64).abs().sum(0)
        truth["dweight_scale"] = dweight_terms.max().item() if dweight_terms.numel() else 0.0
    return truth


def forward_backward(fn, x, weight, eps=EPS, residual=None, dy=None, ds=None) -> dict:
    """Outputs of ``fn`` (``rms_norm`` or ``rms_norm_reference``) and, given ``dy``
    (and ``ds`` with a residual), the gradients of x, weight and residual."""
    x = x.detach().requires_grad_()  # detach keeps the strides: a view stays a view
    weight = weight.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    out = fn(x, weight, eps, residual)
    y, s = (out, None) if residual is None else out
    result = {"y": y.detach(), "s": None if s is None else s.detach()}
    if dy is not None:
        outputs, grad_outputs, inputs = [y], [dy], [x, weight]
        if residual is not None:
            outputs.append(s)
            grad_outputs.append(ds)
            inputs.append(residual)
        grads = torch.autograd.grad(outputs, inputs, grad_outputs)
        result.update(dx=grads[0], dweight=grads[1], dresidual=grads[2] if residual is not None else None)
    return result


def check_against_truth(result: dict, truth: dict, label: str) -> dict:
    """Assert every output and gradient of ``result`` is within the tolerance of its
    dtype in ``TOLERANCES``; return the errors by name."""
    errors = {}
    for name in ("y", "dx", "dweight", "dresidual"):
        if truth.get(name) is None:
            continue
        out = result[name]
        want_shape = tuple(truth[name].shape)
        assert out.shape == want_shape, f"{label} {name}: shape {tuple(out.shape)}, want {want_shape}"
        scale = {"dx": truth.get("dx_scale"), "dresidual": truth.get("dx_scale"), "dweight": truth.get("dweight_scale")}
        scale = scale.get(name) or 0.0
        errors[name] = relative_error(out, truth[name], scale)
        forward_tol, grad_tol = TOLERANCES[out.dtype]
        tol = forward_tol if name == "y" else grad_tol
        assert errors[name] <= tol, (
            f"{label} {name}: relative error {errors[name]:.3g} > {tol:.3g} ({worst(out, truth[name])})"
        )
    return errors


def make_inputs(shape, dtype, device, weight_dtype=None, residual=False, grads=True):
    """Fresh random inputs: x, weight, residual (or None), dy, ds (or None)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[-1], dtype=weight_dtype or dtype, device=device)
    r = torch.randn_like(x) if residual else None
    dy = torch.randn_like(x) if grads else None
    ds = torch.randn_like(x) if grads and residual else None
    return x, weight, r, dy, ds


def store_ulps(dtype: torch.dtype, device: str) -> int:
    """Units in the last place a kernel's rounded store may differ from PyTorch's.

    The Triton interpreter (``TRITON_INTERPRET=1``, Triton 3.x) converts float32 to
    bfloat16 by truncation; GPUs, like PyTorch, round to nearest even.
    """
    return 1 if dtype == torch.bfloat16 and device == "cpu" else 0


def assert_residual_sum(s: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, device: str) -> None:
    """``s`` must be ``x + residual`` computed in ``x.dtype``: bit for bit where the
    device rounds like PyTorch, within the interpreter's truncation otherwise."""
    expected = x + residual
    ulps = store_ulps(x.dtype, device)
    if ulps == 0:
        assert torch.equal(s, expected), f"s differs from x + residual ({worst(s, expected)})"
    else:
        ulp = torch.finfo(x.dtype).eps * expected.abs().float()  # an upper bound of one ulp
        assert ((s.float() - expected.float()).abs() <= ulps * ulp).all(), worst(s, expected)


# ---------------------------------------------------------------------------------------
# The reference against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_reference_matches_float64(dtype, residual):
    x, weight, r, dy, ds = make_inputs((5, 123), dtype, "cpu", residual=residual)
    result = forward_backward(rms_norm_reference, x, weight, residual=r, dy=dy, ds=ds)
    check_against_truth(result, float64_truth(x, weight, residual=r, dy=dy, ds=ds), "reference")
    if residual:
        assert torch.equal(result["s"], x + r)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_reference_gradcheck(residual):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64, requires_grad=True)
    if residual:
        r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, r: rms_norm_reference(x, w, EPS, r), (x, weight, r))
    else:
        assert torch.autograd.gradcheck(lambda x, w: rms_norm_reference(x, w, EPS), (x, weight))


# ---------------------------------------------------------------------------------------
# The Triton kernels against float64 and against the reference
# ---------------------------------------------------------------------------------------
def check_triton(x, weight, r, dy, ds, device, label):
    """Run the kernels and the reference on the same inputs; each within the table, the
    kernels no worse than twice the reference's error plus four ulps of the output dtype
    (the floor matters when the reference is nearly exact: at hidden 1 a float32 weight
    gradient summed over rows in another order differs by a couple of ulps)."""
    result = forward_backward(rms_norm, x, weight, residual=r, dy=dy, ds=ds)
    for name in ("y", "dx", "dweight"):
        assert result[name].dtype == (weight.dtype if name == "dweight" else x.dtype), name
    if r is not None:
        assert_residual_sum(result["s"], x, r, device)
        assert result["dresidual"].dtype == x.dtype
    # Against the truth of the kernel's own s: identical to x + residual where the device
    # rounds like PyTorch, one ulp off in places under the interpreter (checked above).
    truth = float64_truth(x, weight, residual=r, dy=dy, ds=ds, s=result["s"])
    errors = check_against_truth(result, truth, f"triton {label}")
    reference = forward_backward(rms_norm_reference, x, weight, residual=r, dy=dy, ds=ds)
    reference_truth = float64_truth(x, weight, residual=r, dy=dy, ds=ds)
    reference_errors = check_against_truth(reference, reference_truth, f"reference {label}")
    for name, error in errors.items():
        bound = 2 * reference_errors[name] + 4 * torch.finfo(result[name].dtype).eps
        assert error <= bound, (
            f"triton {label} {name}: error {error:.3g} > 2 x reference {reference_errors[name]:.3g} + 4 ulps"
        )
    return result


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_matches_float64(triton_backend, triton_path, device, dtype, hidden, residual):
    rows = 3 if hidden > rms_norm_module.MAX_BLOCK else 6
    inputs = make_inputs((rows, hidden), dtype, device, residual=residual)
    check_triton(*inputs, device, f"{dtype} hidden={hidden}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-x-fp32-w", "fp16-x-fp32-w", "fp32-x-bf16-w"],
)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_mixed_precision(triton_backend, device, dtype, weight_dtype, residual):
    inputs = make_inputs((2, 5, 333), dtype, device, weight_dtype=weight_dtype, residual=residual)
    result = check_triton(*inputs, device, f"{dtype} x, {weight_dtype} weight")
    assert result["dweight"].dtype == weight_dtype


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_hidden_65537(triton_backend, device, dtype):
    """A row eight blocks long (and one column): the looping kernels at LLM-scale widths."""
    inputs = make_inputs((2, 65537), dtype, device, weight_dtype=torch.float32, residual=True)
    check_triton(*inputs, device, "hidden=65537")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", [(37,), (3, 37), (2, 3, 37)], ids=["rank1", "rank2", "rank3"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_leading_shapes(triton_backend, device, shape, residual):
    inputs = make_inputs(shape, torch.float32, device, residual=residual)
    result = check_triton(*inputs, device, f"shape={shape}")
    assert result["y"].shape == shape


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "batch_slice"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_non_contiguous(triton_backend, triton_path, device, layout, residual):
    """Views the launchers must copy (transposed: columns not adjacent) or may read in
    place (slices: strided rows, adjacent columns); dy and ds non-contiguous too."""
    rows, hidden = 6, 50

    def view(dtype=torch.bfloat16):
        if layout == "transposed":
            return torch.randn(hidden, rows, dtype=dtype, device=device).t()
        if layout == "row_slice":
            return torch.randn(rows, hidden + 13, dtype=dtype, device=device)[:, 5 : 5 + hidden]
        return torch.randn(2, rows, hidden, dtype=dtype, device=device)[:, ::2]

    x = view()
    assert not x.is_contiguous()
    weight = torch.randn(hidden, dtype=torch.float32, device=device)
    r, ds = (view(), view()) if residual else (None, None)
    check_triton(x, weight, r, view(), ds, device, layout)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)], ids=["no-rows", "no-rows-rank3", "no-columns"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_empty(triton_backend, device, shape, residual):
    x, weight, r, dy, ds = make_inputs(shape, torch.float32, device, residual=residual)
    result = forward_backward(rms_norm, x, weight, residual=r, dy=dy, ds=ds)
    assert result["y"].shape == shape and result["dx"].shape == shape
    assert torch.equal(result["dweight"], torch.zeros_like(weight))  # a sum over no rows
    if residual:
        assert result["s"].shape == shape and result["dresidual"].shape == shape


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_residual_with_s_unused(triton_backend, triton_path, device):
    """When only y is used, autograd hands the backward a zero ds: x and residual still
    get the gradient through y, as with the reference."""
    x, weight, r, dy, _ = make_inputs((4, 37), torch.float32, device, residual=True)
    grads = {}
    for fn in (rms_norm, rms_norm_reference):
        inputs = [t.detach().requires_grad_() for t in (x, weight, r)]
        y, _ = fn(inputs[0], inputs[1], EPS, inputs[2])
        grads[fn] = torch.autograd.grad(y, inputs, dy)
    for name, got, want in zip(("dx", "dweight", "dresidual"), grads[rms_norm], grads[rms_norm_reference]):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_double_backward_is_refused(triton_backend, triton_path, device):
    """The backward kernel has no backward of its own: a second differentiation raises
    on both roads instead of returning a gradient that silently misses terms."""
    x, weight, _, _, _ = make_inputs((3, 16), torch.float32, device, residual=False)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(rms_norm(x, weight, EPS).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula"):
        dx.sum().backward()


def test_triton_backend_runs_the_kernel(triton_backend, monkeypatch):
    """The public op takes the kernel, not the reference, under the "triton" backend."""

    def reference_called(*args, **kwargs):
        raise AssertionError("rms_norm fell back to the reference")

    monkeypatch.setattr(rms_norm_module, "rms_norm_reference", reference_called)
    rms_norm(torch.randn(2, 8, device=KERNEL_DEVICES[-1]), torch.ones(8, device=KERNEL_DEVICES[-1]))


# ---------------------------------------------------------------------------------------
# Launchers directly: the looping kernels with many chunks
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_launchers_loop_over_chunks(device, dtype, residual):
    """``max_block=32`` walks a 100-column row in 4 chunks (the last of 4 columns); the
    result must agree with float64 as closely as the one-block kernels do. More rows than
    the backward launches programs (8 under the interpreter, 2 per SM on a GPU), so each
    program accumulates dw over several rows."""
    rows = 19 if device == "cpu" else 1000
    x, weight, r, dy, ds = make_inputs((rows, 100), dtype, device, weight_dtype=torch.float32, residual=residual)
    for max_block in (32, 128):
        y, s, rstd = rms_norm_module.rms_norm_fwd(x, weight, EPS, r, max_block=max_block)
        assert rstd.dtype == torch.float32 and rstd.shape == (rows,)
        if residual:
            assert_residual_sum(s, x, r, device)
        dx, dweight = rms_norm_module.rms_norm_bwd(dy, x if r is None else s, weight, rstd, ds, max_block=max_block)
        result = {"y": y, "dx": dx, "dweight": dweight, "dresidual": dx}  # one gradient for x and residual
        check_against_truth(result, float64_truth(x, weight, residual=r, dy=dy, ds=ds, s=s), f"max_block={max_block}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dweight_sums_many_program_partials_in_float32(device, monkeypatch):
    """More programs (21) than the dw kernel sums per step (8): three steps, the last short;
    and ``dweight_out`` adds the unrounded float32 sum into a caller's accumulator."""
    monkeypatch.setattr(_launch, "PROGRAMS_WITHOUT_CUDA", 23)  # 61 rows: 3 a program, 21 programs
    x, weight, _, dy, _ = make_inputs((61, 100), torch.bfloat16, device, weight_dtype=torch.bfloat16)
    _, _, rstd = rms_norm_module.rms_norm_fwd(x, weight, EPS)
    truth = float64_truth(x, weight, dy=dy)["dweight"]
    dx, dweight = rms_norm_module.rms_norm_bwd(dy, x, weight, rstd)
    assert dweight.dtype == torch.bfloat16
    # float32 sums rounded once to bfloat16 (2**-8) and the interpreter's truncation (2**-7).
    assert relative_error(dweight, truth) <= 2**-6
    accumulator = torch.full((100,), 0.5, dtype=torch.float32, device=device)
    for _ in range(2):
        _, out = rms_norm_module.rms_norm_bwd(dy, x, weight, rstd, dweight_out=accumulator)
        assert out is accumulator
    # Not rounded to bfloat16 on the way: float32 against float64, two sums plus 0.5.
    assert relative_error(accumulator, 2 * truth + 0.5) <= 1e-5
    with pytest.raises(ValueError, match="dweight_out must be a contiguous float32"):
        rms_norm_module.rms_norm_bwd(dy, x, weight, rstd, dweight_out=torch.zeros(100, dtype=torch.bfloat16))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_hidden_4096_bf16_more_rows_than_programs(triton_backend, device, residual):
    """The target shape's row (hidden 4096, bf16, one block of 4096, pipelined row loop)
    with more rows than programs and a short last program: 25 rows over 8 programs of 4
    rows under the interpreter (2 per SM on a GPU: 25 rows leave most SMs idle, but the
    loop and the short last program are the same code). Tolerances: the table's."""
    rows = 25 if device == "cpu" else 2 * 132 * 3 + 1
    inputs = make_inputs((rows, 4096), torch.bfloat16, device, weight_dtype=torch.bfloat16, residual=residual)
    check_triton(*inputs, device, "hidden=4096")


# ---------------------------------------------------------------------------------------
# Custom-op registration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", ["fwd", "residual_fwd", "bwd", "bwd_with_ds"])
def test_opcheck(device, case):
    """Schema, fake implementation and AOT dispatch of each op. The ops carry no autograd:
    the one autograd function (``_RMSNormFunction``) calls them under torch.compile."""
    x, weight, r, dy, ds = make_inputs((3, 20), torch.float32, device, residual=True)
    _, s, rstd = rms_norm_module.rms_norm_fwd(x, weight, EPS, r)
    if case in ("fwd", "residual_fwd"):
        op, args = torch.ops.ease.rms_norm_fwd.default, (x, weight, EPS, r if case == "residual_fwd" else None)
    else:
        op, args = torch.ops.ease.rms_norm_bwd.default, (dy, s, weight, rstd, ds if case == "bwd_with_ds" else None)
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_integer_x_is_a_type_error():
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4))


def test_weight_of_wrong_size_is_a_value_error():
    with pytest.raises(ValueError, match=r"^weight must have shape \(4,\)"):
        rms_norm(torch.ones(2, 4), torch.ones(5))


def test_residual_of_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match=r"^residual must have the shape of x"):
        rms_norm(torch.ones(2, 4), torch.ones(4), residual=torch.ones(3, 4))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_residual_of_another_dtype_promotes_like_addition(backend_name):
    """Under autocast a bf16 branch meets a float32 residual stream: s and y are float32."""
    if backend_name == "triton" and not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    device = KERNEL_DEVICES[0]
    x = torch.randn(3, 40, device=device).to(torch.bfloat16).requires_grad_()
    residual = torch.randn(3, 40, device=device, requires_grad=True)
    weight = torch.randn(40, device=device)
    with ease_kernels.backend(backend_name):
        y, s = rms_norm(x, weight, residual=residual)
    assert y.dtype == s.dtype == torch.float32
    s_true = x.detach().double() + residual.detach().double()
    assert torch.allclose(s.double(), s_true, rtol=1e-6, atol=1e-6)
    y_true = s_true * torch.rsqrt(s_true.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert (y.double() - y_true).abs().max() / y_true.abs().max() < 1e-5  # float32 compute
    (y.sum() + s.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and residual.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), residual.grad.to(torch.bfloat16).float())


@pytest.mark.parametrize(
    "eps, error, match",
    [
        (None, TypeError, r"^eps must be a finite real number >= 0, got NoneType None"),
        (True, TypeError, r"^eps must be a finite real number >= 0, got bool True"),
        ("1e-6", TypeError, r"^eps must be a finite real number >= 0, got str '1e-6'"),
        (-1e-6, ValueError, r"^eps must be a finite real number >= 0, got -1e-06"),
        (float("nan"), ValueError, r"^eps must be a finite real number >= 0, got nan"),
        (float("inf"), ValueError, r"^eps must be a finite real number >= 0, got inf"),
    ],
)
def test_bad_eps_names_eps_and_what_was_expected(eps, error, match):
    """eps is checked once, before dispatch: the same verdict on every backend."""
    with pytest.raises(error, match=match):
        rms_norm(torch.ones(2, 4), torch.ones(4), eps)


@pytest.mark.parametrize("eps", [0, 1e-5, np.float32(1e-5), np.float64(1e-6), np.int64(0)], ids=repr)
def test_eps_accepts_real_numbers_numpy_included(eps):
    x = torch.randn(2, 4)
    torch.testing.assert_close(rms_norm(x, torch.ones(4), eps), rms_norm_reference(x, torch.ones(4), float(eps)))

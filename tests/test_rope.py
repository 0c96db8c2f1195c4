"""Tests of ease_kernels.rope: reference and Triton kernel against a float64 truth, gradients,
the ``ease::apply_rope`` custom op, and argument errors.

Errors are relative: ``max|out - truth| / max|truth|`` over the whole output, with the truth
computed in float64 from the very inputs the op saw (q, k rounded to their dtype; cos/sin
the float32 tables), so only the op's own arithmetic and output rounding are measured.
"""

import os

import pytest
import torch

import ease_kernels
from _parity import assert_close_rel, relative_error

from ease_kernels import apply_rope, apply_rope_reference, rope_cos_sin

# Where the kernels can run: CUDA when present, the CPU only through the Triton interpreter
# (conftest turns it on when there is no GPU; without it Triton cannot touch CPU tensors).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)

# dtype -> largest relative error of outputs and gradients against the float64 truth.
# eps is the dtype's machine epsilon (2**-23, 2**-7, 2**-10): rounding to nearest costs at
# most eps/2 of the value.
TOLERANCE = {
    # Two products and a sum per element in float32: a few roundings of eps/2 each.
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    # Computed in float32, rounded once to bfloat16 (eps/2). A full eps because the Triton
    # interpreter truncates float32 -> bfloat16 instead of rounding (up to eps); GPUs round.
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    # Computed in float32, rounded once to float16 (eps/2); eps leaves room for the float32
    # arithmetic before the rounding.
    torch.float16: torch.finfo(torch.float16).eps,
}
# The kernel may differ from the reference in the last float32 bits (fused multiply-adds)
# and, in the interpreter, rounds bfloat16 down rather than to nearest: its error may
# exceed the reference's by at most this many eps of the dtype, relative to max|truth|.
EXTRA_EPS_OVER_REFERENCE = 1.0




# ---------------------------------------------------------------------------------------
# Float64 truth, written independently of the op: rotate-half as complex multiplication.
# Pair i is the complex number x1[i] + j x2[i]; multiplying by e^{j theta} = c + j s gives
# (x1 c - x2 s) + j (x2 c + x1 s), the rotate-half formula. The inverse multiplies by c - j s.
# ---------------------------------------------------------------------------------------
def rotate_truth(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """``x`` rotated by the angles of ``cos``/``sin`` (by minus them with ``inverse``), float64."""
    half = x.shape[-1] // 2
    x = x.detach().double()
    pairs = torch.complex(x[..., :half], x[..., half:])
    turn = torch.complex(cos.double(), -sin.double() if inverse else sin.double()).unsqueeze(-2)
    rotated = pairs * turn  # cos/sin [(B,) T, 1, D/2] broadcast over heads
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def make_inputs(
    batch, seq, q_heads, kv_heads, head_dim, dtype, device, per_row=False, fused=True, requires_grad=False
):
    """Random q, k (slices of one fused qkv tensor when ``fused``) and cos/sin tables.

    ``per_row`` gives every batch row its own position offset ([B, T, D/2] tables).
    ``requires_grad`` makes the leaves (qkv, or q and k) require grad.
    Returns ``(qkv or None, q, k, cos, sin)``.
    """
    if per_row:
        offsets = torch.randint(0, 1000, (batch, 1))
        positions = offsets + torch.arange(seq)  # [B, T]: a different start per row
    else:
        positions = torch.arange(seq) + int(torch.randint(0, 1000, ()))
    cos, sin = rope_cos_sin(positions.to(device), head_dim)
    width = (q_heads + 2 * kv_heads) * head_dim
    if fused:
        # The common layout: q, k, v are column blocks of one projection output, so q and k
        # are non-contiguous views with a token stride of (Hq + 2 Hkv) * D.
        qkv = torch.randn(batch, seq, width, device=device).to(dtype).requires_grad_(requires_grad)
        q = qkv[..., : q_heads * head_dim].view(batch, seq, q_heads, head_dim)
        k_columns = qkv[..., q_heads * head_dim : (q_heads + kv_heads) * head_dim]
        k = k_columns.view(batch, seq, kv_heads, head_dim)
        return qkv, q, k, cos, sin
    q = torch.randn(batch, seq, q_heads, head_dim, device=device).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=device).to(dtype).requires_grad_(requires_grad)
    return None, q, k, cos, sin


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_reference_matches_float64_truth(dtype, per_row):
    torch.manual_seed(0)
    _, q, k, cos, sin = make_inputs(2, 7, 4, 2, 24, dtype, "cpu", per_row=per_row, fused=False)
    q_out, k_out = apply_rope_reference(q, k, cos, sin)
    assert q_out.dtype == k_out.dtype == dtype
    assert_close_rel(q_out, rotate_truth(q, cos, sin), TOLERANCE[dtype], "reference q")
    assert_close_rel(k_out, rotate_truth(k, cos, sin), TOLERANCE[dtype], "reference k")


@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_reference_gradcheck(per_row):
    torch.manual_seed(0)
    _, q, k, cos, sin = make_inputs(
        2, 3, 2, 1, 6, torch.float64, "cpu", per_row=per_row, fused=False, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda q, k: apply_rope_reference(q, k, cos, sin), (q, k))


def test_reference_backward_is_inverse_rotation():
    """d<R x, g>/dx = R^T g = R(-theta) g: the gradient is the gradient rotated back."""
    torch.manual_seed(0)
    _, q, k, cos, sin = make_inputs(
        2, 5, 3, 3, 8, torch.float64, "cpu", per_row=True, fused=False, requires_grad=True
    )
    grad_q_out, grad_k_out = torch.randn_like(q), torch.randn_like(k)
    outputs = apply_rope_reference(q, k, cos, sin)
    grad_q, grad_k = torch.autograd.grad(outputs, (q, k), (grad_q_out, grad_k_out))
    assert_close_rel(grad_q, rotate_truth(grad_q_out, cos, sin, inverse=True), 1e-14, "grad q")
    assert_close_rel(grad_k, rotate_truth(grad_k_out, cos, sin, inverse=True), 1e-14, "grad k")


# ---------------------------------------------------------------------------------------
# Triton kernel (through the public op, so dispatch and the custom op are exercised too)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("head_dim", [6, 24, 96, 128])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa_4_2", "mha_3_3"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_kernel_forward_and_backward_match_truth(triton_backend, triton_path, device, dtype, head_dim, heads, per_row):
    torch.manual_seed(head_dim)
    q_heads, kv_heads = heads
    qkv, q, k, cos, sin = make_inputs(
        2, 5, q_heads, kv_heads, head_dim, dtype, device, per_row=per_row, requires_grad=True
    )
    assert not q.is_contiguous() and not k.is_contiguous()
    tol = TOLERANCE[dtype]

    q_out, k_out = apply_rope(q, k, cos, sin)
    assert (q_out.dtype, k_out.dtype) == (dtype, dtype)
    q_truth, k_truth = rotate_truth(q, cos, sin), rotate_truth(k, cos, sin)
    q_error = assert_close_rel(q_out, q_truth, tol, "kernel q")
    k_error = assert_close_rel(k_out, k_truth, tol, "kernel k")

    # The gradient reaches the fused qkv leaf through the views: q's and k's column blocks
    # hold R^T g, v's block nothing.
    grad_q_out, grad_k_out = torch.randn_like(q_out), torch.randn_like(k_out)
    (grad_qkv,) = torch.autograd.grad((q_out, k_out), qkv, (grad_q_out, grad_k_out))
    q_width, k_width = q_heads * head_dim, kv_heads * head_dim
    grad_q = grad_qkv[..., :q_width].unflatten(-1, (q_heads, head_dim))
    grad_k = grad_qkv[..., q_width : q_width + k_width].unflatten(-1, (kv_heads, head_dim))
    assert_close_rel(grad_q, rotate_truth(grad_q_out, cos, sin, inverse=True), tol, "kernel grad q")
    assert_close_rel(grad_k, rotate_truth(grad_k_out, cos, sin, inverse=True), tol, "kernel grad k")
    assert torch.count_nonzero(grad_qkv[..., q_width + k_width :]) == 0

    # No worse than the reference beyond one eps of the dtype.
    with ease_kernels.backend("reference"):
        q_ref, k_ref = apply_rope(q.detach(), k.detach(), cos, sin)
    slack = EXTRA_EPS_OVER_REFERENCE * torch.finfo(dtype).eps
    assert q_error <= relative_error(q_ref, q_truth) + slack
    assert k_error <= relative_error(k_ref, k_truth) + slack


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "heads",
    [(32, 8), (64, 8), (40, 40), (32, 1)],
    ids=["llama3_32_8", "64_8", "mha_40_above_the_tile", "mqa_32_1"],
)
def test_kernel_head_counts_that_matter(triton_backend, triton_path, device, heads):
    """Head dimension 128 in bfloat16 (Llama 3): 32 query + 8 key/value heads (tiles of 8),
    more query heads than one tile holds, 40 heads past the 2048-element tile (a second,
    mostly masked tile) and one key/value head; forward and backward against float64 with
    the table's bfloat16 tolerance (one rounding, a full eps for the interpreter's truncation)."""
    torch.manual_seed(sum(heads))
    q_heads, kv_heads = heads
    seq = 3 if device == "cpu" else 257
    qkv, q, k, cos, sin = make_inputs(2, seq, q_heads, kv_heads, 128, torch.bfloat16, device, per_row=True,
                                      requires_grad=True)  # fmt: skip
    tol = TOLERANCE[torch.bfloat16]
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert_close_rel(q_out, rotate_truth(q, cos, sin), tol, "q")
    assert_close_rel(k_out, rotate_truth(k, cos, sin), tol, "k")
    grad_q_out, grad_k_out = torch.randn_like(q_out), torch.randn_like(k_out)
    (grad_qkv,) = torch.autograd.grad((q_out, k_out), qkv, (grad_q_out, grad_k_out))
    q_width, k_width = q_heads * 128, kv_heads * 128
    grad_q = grad_qkv[..., :q_width].unflatten(-1, (q_heads, 128))
    grad_k = grad_qkv[..., q_width : q_width + k_width].unflatten(-1, (kv_heads, 128))
    assert_close_rel(grad_q, rotate_truth(grad_q_out, cos, sin, inverse=True), tol, "grad q")
    assert_close_rel(grad_k, rotate_truth(grad_k_out, cos, sin, inverse=True), tol, "grad k")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["q", "k"])
def test_kernel_backward_with_one_output_unused(triton_backend, triton_path, device, used):
    """Only q' (or only k') reaches the loss: the unused output's gradient arrives as None
    (nothing materialised); the used input gets R^T g, the other no gradient at all."""
    torch.manual_seed(5)
    _, q, k, cos, sin = make_inputs(2, 3, 4, 2, 8, torch.float32, device, fused=False, requires_grad=True)
    q_out, k_out = apply_rope(q, k, cos, sin)
    out, leaf = (q_out, q) if used == "q" else (k_out, k)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    other = k if used == "q" else q
    assert other.grad is None
    assert_close_rel(leaf.grad, rotate_truth(grad_out, cos, sin, inverse=True), TOLERANCE[torch.float32], used)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_backward_is_inverse_rotation_of_float64_autograd(triton_backend, device):
    """The kernel's gradient equals float64 autograd of the reference, and rotating it
    forward again gives back the incoming gradient (R R^T g = g)."""
    torch.manual_seed(1)
    _, q, k, cos, sin = make_inputs(
        2, 6, 4, 2, 96, torch.float32, device, per_row=True, fused=False, requires_grad=True
    )
    grad_q_out, grad_k_out = torch.randn_like(q), torch.randn_like(k)
    grad_q, grad_k = torch.autograd.grad(apply_rope(q, k, cos, sin), (q, k), (grad_q_out, grad_k_out))

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth_q, truth_k = torch.autograd.grad(
        apply_rope_reference(q64, k64, cos, sin), (q64, k64), (grad_q_out.double(), grad_k_out.double())
    )
    tol = TOLERANCE[torch.float32]
    assert_close_rel(grad_q, truth_q, tol, "grad q vs float64 autograd")
    assert_close_rel(grad_k, truth_k, tol, "grad k vs float64 autograd")
    back_q, back_k = apply_rope(grad_q, grad_k, cos, sin)
    assert_close_rel(back_q, grad_q_out.double(), tol, "R R^T g_q")
    assert_close_rel(back_k, grad_k_out.double(), tol, "R R^T g_k")


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_double_backward(triton_backend, triton_path, device):
    """The backward calls the op itself, so the gradient is differentiable in the incoming
    gradient g: d(R^T g)/dg = R^T, whose vector-Jacobian product with v is R v."""
    torch.manual_seed(2)
    _, q, k, cos, sin = make_inputs(1, 4, 2, 1, 6, torch.float32, device, fused=False, requires_grad=True)
    grad_q_out = torch.randn_like(q, requires_grad=True)
    grad_k_out = torch.randn_like(k, requires_grad=True)
    outputs = apply_rope(q, k, cos, sin)
    grad_q, grad_k = torch.autograd.grad(outputs, (q, k), (grad_q_out, grad_k_out), create_graph=True)
    v_q, v_k = torch.randn_like(q), torch.randn_like(k)
    second_q, second_k = torch.autograd.grad((grad_q, grad_k), (grad_q_out, grad_k_out), (v_q, v_k))
    tol = TOLERANCE[torch.float32]
    assert_close_rel(second_q, rotate_truth(v_q, cos, sin), tol, "double backward q")
    assert_close_rel(second_k, rotate_truth(v_k, cos, sin), tol, "double backward k")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "heads_first", "head_dim_strided"])
def test_kernel_other_layouts(triton_backend, triton_path, device, layout):
    """Contiguous q/k; q/k viewed from [B, H, T, D] buffers (head stride T*D, seq stride D);
    and head_dim not stride 1 (the launcher copies)."""
    torch.manual_seed(3)
    _, q, k, cos, sin = make_inputs(2, 3, 4, 2, 8, torch.float32, device, fused=False)
    # Same values, other strides: materialise a transpose, then view it back.
    dims = {"contiguous": None, "heads_first": (1, 2), "head_dim_strided": (-1, -2)}[layout]
    q_in, k_in = (x if dims is None else x.transpose(*dims).contiguous().transpose(*dims) for x in (q, k))
    if layout == "heads_first":
        assert q_in.stride(-1) == 1 and q_in.stride(2) != q.shape[-1]
    elif layout == "head_dim_strided":
        assert q_in.stride(-1) != 1
    q_out, k_out = apply_rope(q_in, k_in, cos, sin)
    tol = TOLERANCE[torch.float32]
    assert_close_rel(q_out, rotate_truth(q, cos, sin), tol, f"{layout} q")
    assert_close_rel(k_out, rotate_truth(k, cos, sin), tol, f"{layout} k")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)], ids=["empty_batch", "empty_seq"])
def test_kernel_empty_input(triton_backend, device, shape):
    batch, seq = shape
    _, q, k, cos, sin = make_inputs(
        batch, seq, 4, 2, 6, torch.float32, device, fused=False, requires_grad=True
    )
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    q_out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_rejects_head_dim_above_cap(triton_backend, device):
    q = torch.zeros(1, 1, 1, 8194, device=device)
    cos = torch.zeros(1, 4097, device=device)
    with pytest.raises(ValueError, match="head_dim must be at most"):
        apply_rope(q, q, cos, cos)


# ---------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_opcheck(triton_backend, device, inverse, per_row):
    """Schema, fake implementation and AOT dispatch. The op carries no autograd: the one
    autograd function (``_RopeFunction``) calls it under torch.compile."""
    torch.manual_seed(4)
    _, q, k, cos, sin = make_inputs(2, 3, 4, 2, 6, torch.float32, device, per_row=per_row, fused=False)
    torch.library.opcheck(torch.ops.ease.apply_rope.default, (q, k, cos, sin), {"inverse": inverse})


# ---------------------------------------------------------------------------------------
# Argument errors (raised before dispatch, so the same on every backend)
# ---------------------------------------------------------------------------------------
def test_integer_q_is_rejected():
    k = torch.zeros(1, 2, 1, 4)
    cos = torch.zeros(2, 2)
    with pytest.raises(TypeError, match=r"^q must have a floating dtype"):
        apply_rope(torch.zeros(1, 2, 1, 4, dtype=torch.int64), k, cos, cos)


def test_odd_head_dim_is_rejected():
    x = torch.zeros(1, 2, 1, 5)
    cos = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"^head_dim .* must be even"):
        apply_rope(x, x, cos, cos)


@pytest.mark.parametrize("cos_shape", [(2, 3), (3, 2), (2, 1, 2), (1, 2, 2, 1)])
def test_cos_of_wrong_shape_is_rejected(cos_shape):
    x = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"^cos must have shape"):
        apply_rope(x, x, torch.zeros(cos_shape), torch.zeros(2, 2))

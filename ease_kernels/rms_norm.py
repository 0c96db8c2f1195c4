"""RMSNorm, optionally fused with the pre-norm residual add.

Reads top to bottom: the reference op (the definition) and the plain forward and
backward it implies, the Triton kernels, their launchers, the registration (custom ops
for ``torch.compile`` and the one autograd function), and the public function.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ease_kernels._launch import PROGRAMS_PER_SM, jit, persistent_programs, resident_registers, row_block, tl
from ease_kernels._validation import check_eps, check_float
from ease_kernels.dispatch import launch, use_triton


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y = (x32 * rsqrt(mean(x32 ** 2, -1) + eps) * weight32).to(x.dtype)``.

    ``x32`` is ``x`` upcast to float32 (float64 stays float64), so the statistics are
    accumulated in at least float32 whatever the input dtype. With ``residual``, the sum
    ``s = x + residual`` (in ``x.dtype``) is normalised instead and ``(y, s)`` returned.
    """
    if residual is not None:
        x = x + residual
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute_dtype)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute_dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, x)


def rms_norm_fwd_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :func:`rms_norm_reference` in plain PyTorch, keeping what the backward needs.

    Returns ``(y, rstd)``: ``y`` as :func:`rms_norm_reference` gives it, ``rstd`` of shape
    ``x.shape[:-1] + (1,)`` in float32 (float64 for float64 ``x``).
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute_dtype)
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return (x32 * rstd * weight.to(compute_dtype)).to(x.dtype), rstd


def rms_norm_bwd_reference(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of :func:`rms_norm_fwd_reference` (the math is written above the kernels).

    ``dx = rstd * (dy * w - xhat * mean(dy * w * xhat))`` in ``x``'s dtype and
    ``dweight = sum over rows of dy * xhat`` in ``rstd``'s dtype (float32 or float64, not
    rounded to the weight's: callers that sum it over chunks round once at the end).
    ``x`` and ``dy`` are ``[rows, n]``, ``rstd`` ``[rows, 1]``.
    """
    compute_dtype = rstd.dtype
    xhat = x.to(compute_dtype) * rstd
    dy = dy.to(compute_dtype)
    dy_w = dy * weight.to(compute_dtype)
    c = (dy_w * xhat).mean(-1, keepdim=True)
    return (rstd * (dy_w - xhat * c)).to(x.dtype), (dy * xhat).sum(0)


# ---------------------------------------------------------------------------------------
# Kernels
#
# Forward, per row of n columns (x is s = x + residual when a residual is given):
#     rstd = 1 / sqrt(mean(x ** 2) + eps)            (float32, saved for the backward)
#     xhat = x * rstd
#     y    = xhat * w
# Backward, given dy (and ds, the gradient flowing into the returned s):
#     dy_w = dy * w
#     c    = mean(dy_w * xhat)                         (one scalar per row)
#     dx   = rstd * (dy_w - xhat * c)  [+ ds]          (the gradient wrt x and wrt residual)
#     dw   = sum over rows of dy * xhat
# The term xhat * c is the gradient through rstd: d rstd / dx_j = -rstd ** 3 * x_j / n.
# Everything is computed in float32 and rounded once, on the store.
# ---------------------------------------------------------------------------------------
@jit
def _load_normalised_input(
    X,  # pointer to x[row, 0], the row's first element
    R,  # pointer to residual[row, 0] (read only when HAS_RESIDUAL)
    cols,  # column indices of this chunk
    mask,  # cols < n_cols
    HAS_RESIDUAL: tl.constexpr,
):
    """The chunk of the input that is normalised: ``x``, or ``s = x + residual`` rounded."""
    x = tl.load(X + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + cols, mask=mask, other=0.0)
        # PyTorch adds half-precision tensors in float32 and rounds once; doing the same
        # makes s, and everything normalised from it, match the reference's `x + residual`.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    return x


@jit
def _rms_norm_fwd_fused(
    X,  # input x [n_rows, n_cols], unit column stride
    R,  # residual, x's dtype, unit column stride (read only when HAS_RESIDUAL)
    S,  # output s = x + residual, contiguous, x's dtype (written only when HAS_RESIDUAL)
    Y,  # output y, contiguous, x's dtype
    W,  # weight [n_cols], any float dtype (upcast to float32)
    Rstd,  # output rstd [n_rows], float32
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    n_cols,  # hidden size n
    eps,  # added to the mean square
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per chunk; >= n_cols unless LOOP
    LOOP: tl.constexpr,  # n_cols > BLOCK: walk the row in chunks, in two passes
):
    """One program normalises one row. Grid: ``(n_rows,)``."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2 ** 31
    X += row * stride_x
    R += row * stride_r
    S += row * n_cols
    Y += row * n_cols
    if LOOP:
        # Pass 1: sum of squares (and s written once). Pass 2: normalise. s is recomputed
        # from x and residual in pass 2 (same rounding, so the same values) rather than
        # read back from S, so no pass depends on another's stores.
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = _load_normalised_input(X, R, cols, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(S + cols, x, mask=mask)
            x = x.to(tl.float32)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = _load_normalised_input(X, R, cols, mask, HAS_RESIDUAL).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        # The whole row fits one block: every tensor is read or written exactly once.
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = _load_normalised_input(X, R, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(S + cols, x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@jit
def _load_xhat_dy_w(
    X, DY, W,  # as in the backward kernel below
    row, stride_x, stride_dy, rstd,
    cols,  # column indices of this chunk
    mask,  # cols < n_cols
):
    """One chunk of a row for the looping backward, in float32: ``(xhat, dy, w)``."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return x * rstd, dy, w


@jit
def _rms_norm_bwd_dx_fused(
    DY,  # gradient wrt y [n_rows, n_cols], unit column stride
    DS,  # gradient wrt the returned s, unit column stride (read only when HAS_DS)
    X,  # the normalised input (s with a residual), unit column stride
    W,  # weight [n_cols], any float dtype
    Rstd,  # rstd [n_rows] from the forward, float32
    DX,  # output dx, contiguous, X's dtype
    DW_partial,  # output [n_programs, n_cols] float32: this program's share of dw
    stride_dy,  # elements between rows of DY
    stride_ds,  # elements between rows of DS
    stride_x,  # elements between rows of X
    n_rows,  # rows in all
    n_cols,  # hidden size n
    rows_per_program,  # rows each program walks
    HAS_DS: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per chunk; >= n_cols unless LOOP
    LOOP: tl.constexpr,  # n_cols > BLOCK: walk each row in chunks, in two passes
):
    """Program ``p`` owns rows ``[p * rows_per_program, (p + 1) * rows_per_program)`` and
    row ``p`` of ``DW_partial``, which ``_rms_norm_bwd_dw`` sums over programs: a
    deterministic reduction, without atomics. Grid: ``(n_programs,)``."""
    program = tl.program_id(0).to(tl.int64)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    DW_partial += program * n_cols
    if LOOP:
        # dw cannot stay in registers across rows: it is accumulated in this program's
        # row of DW_partial (zeroed by the launcher), which no other program touches.
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            dy_w_xhat = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                xhat, dy, w = _load_xhat_dy_w(X, DY, W, row, stride_x, stride_dy, rstd, cols, mask)
                dy_w_xhat += dy * w * xhat
            c = tl.sum(dy_w_xhat, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                xhat, dy, w = _load_xhat_dy_w(X, DY, W, row, stride_x, stride_dy, rstd, cols, mask)
                dx = rstd * (dy * w - xhat * c)
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(DW_partial + cols, mask=mask, other=0.0)
                tl.store(DW_partial + cols, dw + dy * xhat, mask=mask)
    else:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        # Two stages: the loads of the next row are issued (asynchronous copies into shared
        # memory) while this row is reduced, so a program never waits for DRAM between rows.
        for row in tl.range(row_start, row_end, num_stages=2):
            rstd = tl.load(Rstd + row)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd
            dy_w = dy * w
            c = tl.sum(dy_w * xhat, axis=0) / n_cols
            dx = rstd * (dy_w - xhat * c)
            if HAS_DS:
                dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_partial + cols, dw, mask=mask)


@jit
def _rms_norm_bwd_dw(
    DW_partial,  # [n_programs, n_cols] float32, one row per program of the dx kernel
    DW,  # output [n_cols]: the weight's dtype, or a float32 sum that is added to (ACCUMULATE)
    n_programs,  # rows of DW_partial
    n_cols,  # hidden size n
    ACCUMULATE: tl.constexpr,  # DW += sum instead of DW = sum
    BLOCK_P: tl.constexpr,  # rows of DW_partial per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    """``dw = sum over programs of DW_partial``, in float32, rounded once on the store: the
    sum and the cast in one launch. Program ``j`` owns columns ``[j * BLOCK_N, (j + 1) *
    BLOCK_N)`` and walks every row, always in the same order. Grid: ``(cdiv(n, BLOCK_N),)``."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_programs, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < n_programs)[:, None] & col_mask[None, :]
        acc += tl.load(DW_partial + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    dw = tl.sum(acc, axis=0)
    if ACCUMULATE:
        dw += tl.load(DW + cols, mask=col_mask, other=0.0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------
# Launchers: plain functions on tensors, usable (and tested) without autograd.
# ---------------------------------------------------------------------------------------
# Rows up to this many elements are held in registers whole (Llama hidden sizes up to
# 8192); longer rows are walked in chunks of this size, reading each input twice.
MAX_BLOCK = 8192

# The backward's persistent grid holds PROGRAMS_PER_SM (2) programs per SM up to 8 warps
# (hidden <= 4096) and 1 beyond, and caps the registers (maxnreg) so that they are
# resident together: 65536 / (2 x 256 threads) = 128 at 8 warps. One register over and
# half the grid waits for the other half, two waves for the time of one. The kernel
# needs ~120 at hidden 4096 (bench/kernel_report.py, Triton 3.9, no spills); at hidden
# 8192 (16 warps, the same 16 elements a thread) two programs would need <= 64 registers
# and spill, so one program per SM runs instead.
def _bwd_programs_per_sm(num_warps: int) -> int:
    return PROGRAMS_PER_SM if num_warps <= 8 else 1


def _as_rows(tensor: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """``tensor`` as ``[n_rows, n_cols]`` with unit column stride (copied only if needed).

    The kernels take a row stride, so a view whose rows are strided (a slice of a wider
    tensor) is used in place; anything else is made contiguous.
    """
    rows = tensor.reshape(n_rows, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    max_block: int = MAX_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the forward kernel.

    Args:
        x: ``[..., n]`` float16, bfloat16 or float32, any layout.
        weight: ``[n]``, any float dtype.
        eps: added to the mean square.
        residual: optional, ``x``'s shape and dtype; ``s = x + residual`` is normalised.
        max_block: the largest block; rows longer than it are walked in chunks.

    Returns:
        ``(y, s, rstd)``: ``y`` and ``s`` contiguous in ``x``'s shape and dtype (``s`` is
        None without ``residual``), ``rstd`` float32 of shape ``x.shape[:-1]``.
    """
    n_cols = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty_like(y)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if y.numel() > 0:
        x_rows = _as_rows(x, n_rows, n_cols)
        # Without a residual, R and S are never touched: any pointer will do.
        r_rows = x_rows if residual is None else _as_rows(residual, n_rows, n_cols)
        block, num_warps = row_block(n_cols, max_block=max_block, can_loop=True)
        _rms_norm_fwd_fused[(n_rows,)](
            x_rows, r_rows, y if s is None else s, y, weight.contiguous(), rstd,
            x_rows.stride(0), r_rows.stride(0), n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, LOOP=n_cols > block,
            num_warps=num_warps,
        )  # fmt: skip
    return y.view(x.shape), None if s is None else s.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor | None = None,
    *,
    max_block: int = MAX_BLOCK,
    dweight_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backward kernels: ``dx`` and per-program partial sums of ``dweight``, then
    their sum.

    Args:
        dy: gradient wrt ``y``, ``x``'s shape.
        x: the normalised input (``s`` when the forward had a residual).
        weight: ``[n]``.
        rstd: float32 ``x.shape[:-1]`` from :func:`rms_norm_fwd`.
        ds: optional gradient wrt ``s``, added to ``dx``.
        max_block: the largest block; rows longer than it are walked in chunks.
        dweight_out: optional float32 ``[n]`` that the weight's gradient is added to,
            unrounded, instead of being returned in a new tensor of ``weight``'s dtype (for
            callers that sum it over chunks, such as the fused exit-head loss).

    Returns:
        ``(dx, dweight)``: ``dx`` contiguous in ``x``'s shape and dtype (the gradient wrt
        both ``x`` and ``residual`` when there was one); ``dweight`` summed in float32 over
        the rows and rounded once to ``weight``'s dtype, or ``dweight_out`` itself.
    """
    n_cols = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if dweight_out is None:
        dweight = torch.empty(n_cols, dtype=weight.dtype, device=weight.device)
    elif dweight_out.dtype != torch.float32 or dweight_out.shape != (n_cols,) or not dweight_out.is_contiguous():
        raise ValueError(f"dweight_out must be a contiguous float32 [{n_cols}], got {dweight_out.dtype} "
                         f"{tuple(dweight_out.shape)}")  # fmt: skip
    else:
        dweight = dweight_out
    if n_cols == 0:
        return dx.view(x.shape), dweight
    if n_rows == 0:
        return dx.view(x.shape), dweight if dweight_out is not None else dweight.zero_()
    x_rows = _as_rows(x, n_rows, n_cols)
    dy_rows = _as_rows(dy, n_rows, n_cols)
    ds_rows = dy_rows if ds is None else _as_rows(ds, n_rows, n_cols)  # never read without ds
    block, num_warps = row_block(n_cols, max_block=max_block, can_loop=True)
    loop = n_cols > block
    per_sm = _bwd_programs_per_sm(num_warps)
    rows_per_program = -(-n_rows // persistent_programs(n_rows, x.device, per_sm))
    n_programs = -(-n_rows // rows_per_program)  # no program left without a row
    # The looping kernel adds into its row of the buffer, so it must start at zero; the
    # one-block kernel writes its row once.
    dw_partial = (torch.zeros if loop else torch.empty)(
        (n_programs, n_cols), dtype=torch.float32, device=x.device
    )
    _rms_norm_bwd_dx_fused[(n_programs,)](
        dy_rows, ds_rows, x_rows, weight.contiguous(), rstd.contiguous(), dx, dw_partial,
        dy_rows.stride(0), ds_rows.stride(0), x_rows.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DS=ds is not None, BLOCK=block, LOOP=loop, num_warps=num_warps,
        maxnreg=resident_registers(per_sm, num_warps),
    )  # fmt: skip
    # [8 programs' rows x 256 columns] per step: 8 KiB of float32 in flight per program,
    # and n / 256 programs (16 at hidden 4096) each reading n_programs x 1 KiB.
    block_n = min(256, block)
    _rms_norm_bwd_dw[(-(-n_cols // block_n),)](
        dw_partial, dweight, n_programs, n_cols,
        ACCUMULATE=dweight_out is not None, BLOCK_P=8, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return dx.view(x.shape), dweight


# ---------------------------------------------------------------------------------------
# Registration: one custom op per launcher (opaque to torch.compile, with a fake for
# tracing) and one autograd function, which reaches the launchers through
# dispatch.launch: directly in eager mode, through the custom ops under torch.compile.
# A custom op may not return None, so without a residual the forward op returns an
# empty s.
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("ease::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, s, rstd)`` of :func:`rms_norm_fwd`; ``s`` is empty without a residual."""
    y, s, rstd = rms_norm_fwd(x, weight, eps, residual)
    return y, x.new_empty(0) if s is None else s, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, residual):
    s = x.new_empty(0) if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), s, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ease::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, ds: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of :func:`rms_norm_bwd`."""
    return rms_norm_bwd(dy, x, weight, rstd, ds)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, ds):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


class _RMSNormFunction(torch.autograd.Function):
    """``y`` or ``(y, s)`` of :func:`rms_norm_fwd`, differentiable in ``x``, ``weight``, ``residual``."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        # An unused output's gradient arrives as None rather than a tensor of zeros the
        # size of x that the backward kernel would read (s, when only y is used).
        ctx.set_materialize_grads(False)
        y, s, rstd = launch(rms_norm_fwd, torch.ops.ease.rms_norm_fwd, x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)  # what was normalised
        return (y, s) if ctx.has_residual else y

    @staticmethod
    @once_differentiable  # the backward kernel has no backward: double backward raises
    def backward(ctx, dy, ds=None):
        normalised, weight, rstd = ctx.saved_tensors
        if dy is None:  # only s was used: s = x + residual hands ds to both, weight gets nothing
            return ds, None, None, ds
        dx, dweight = launch(rms_norm_bwd, torch.ops.ease.rms_norm_bwd, dy, normalised, weight, rstd, ds)
        # s = x + residual, so both receive the same gradient: dx, which includes ds.
        return dx, dweight, None, dx if ctx.has_residual else None


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Root-mean-square normalisation of the last dimension of ``x``.

    Args:
        x: ``[..., hidden]`` float16, bfloat16, float32 or float64.
        weight: ``[hidden]`` floating; may be float32 while ``x`` is half precision.
        eps: added to the mean square before the reciprocal square root.
        residual: optional tensor of ``x``'s shape. When given, ``s = x + residual`` is
            normalised and ``(y, s)`` returned (the pre-norm residual add, fused). A
            residual of another floating dtype (a float32 residual stream beside a bf16
            branch under autocast) promotes both, as ``x + residual`` would.

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, s)`` with ``residual`` (both in the
        promoted dtype).

    Raises:
        TypeError: a non-floating ``x``, ``weight`` or ``residual``.
        TypeError: ``eps`` not a real number (or a bool).
        ValueError: ``weight`` not of shape ``[x.shape[-1]]``, ``residual`` of another
            shape than ``x``, or ``eps`` negative, infinite or NaN.
    """
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden dimension)")
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match the last dimension of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            # Mixed precision (a bf16 branch output added to a float32 residual stream under
            # autocast): promote both, as ``x + residual`` would; the casts carry gradients back.
            common = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(common), residual.to(common)
    eps = check_eps(eps)
    if use_triton(x):
        return _RMSNormFunction.apply(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)

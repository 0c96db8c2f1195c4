"""Rotary position embedding (RoPE) applied to queries and keys, rotate-half convention.

The rotate-half convention is the one Hugging Face Llama checkpoints use: the head
dimension is split into halves ``x1 = x[..., :D/2]`` and ``x2 = x[..., D/2:]`` and pair
``i`` is ``(x1[i], x2[i])``, rotated by angle ``position * inv_freq[i]``.

Reads top to bottom: the reference (the definition), the Triton kernel, its launcher, the
registration (the ``ease::apply_rope`` custom op with its fake, and the one autograd
function), and the public function.
"""

from __future__ import annotations

import math

import torch

from ease_kernels._launch import jit, row_block, tl
from ease_kernels._validation import check_float, check_tensor
from ease_kernels.dispatch import launch, use_triton


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for ``i < head_dim // 2`` (float32).

    ``scaling`` (optional) is a Hugging Face ``rope_scaling`` dict; supported:
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` and ``{"rope_type": "default"}``.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq.float()
    if rope_type != "llama3":
        raise ValueError(f"scaling rope_type must be 'default' or 'llama3', got {rope_type!r}")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly (transformers' _compute_llama3_parameters).
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = old_context / low_freq_factor
    high_freq_wavelength = old_context / high_freq_factor
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    scaling: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``positions[..., None] * inv_freq`` in float32.

    Args:
        positions: integer positions ``[seq]`` or ``[batch, seq]``.
        head_dim: the (even) head dimension.
        theta: the RoPE base.
        scaling: optional Hugging Face ``rope_scaling`` dict (see :func:`rope_inv_freq`).

    Returns:
        ``(cos, sin)``, each ``positions.shape + (head_dim // 2,)``, float32, on
        ``positions.device``.
    """
    check_tensor("positions", positions)
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``[batch, seq, heads, head_dim]``) by ``cos``/``sin``.

    ``out1 = x1 * cos - x2 * sin`` and ``out2 = x2 * cos + x1 * sin`` computed in at least
    float32, returned in the input dtype. ``cos``/``sin`` are ``[seq, head_dim // 2]`` or
    ``[batch, seq, head_dim // 2]``.
    """

    def rotate(x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        c = cos.to(compute_dtype).unsqueeze(-2)  # (..., seq, 1, D/2): broadcast over heads
        s = sin.to(compute_dtype).unsqueeze(-2)
        x1, x2 = x.to(compute_dtype).chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------
# For token (b, t), head h and pair i < D/2, with c = cos[(b,) t, i] and s = sin[(b,) t, i]:
#
#     out1 = x1 * c - x2 * s            out = R(theta) x,  R(theta) = [[c, -s],
#     out2 = x2 * c + x1 * s                                          [s,  c]]
#
# R is orthogonal, so the backward is the inverse rotation, the same formula with s negated:
#
#     dx = R(theta)^T dout = R(-theta) dout:   dx1 = dout1 * c + dout2 * s
#                                              dx2 = dout2 * c - dout1 * s
#
# One kernel does both (INVERSE). One program owns one token (b, t): it loads that token's
# cos/sin once and rotates all Hq query heads and then all Hkv key heads with them, a tile
# of BLOCK_H heads at a time. Grid: (B * T,). The tile is as tall as the smaller group
# (8 heads for 32 query + 8 key/value heads: 4 tiles of q, 1 of k), not the larger: a
# 32-row tile for 8 key heads masks 24 rows, which cost instructions though they move no
# bytes (22.5 SASS instructions per key element on sm_90 against 5.6; bench/kernel_report.py).
@jit
def _rope_rotate_heads(
    X,  # first element of this token's heads in q or k (head_dim contiguous)
    Out,  # first element of this token's heads in the contiguous output
    stride_xh,  # elements between heads of X
    n_heads,  # Hq or Hkv
    half_dim,  # D / 2
    c,  # [BLOCK_HALF] float32 cos of this token (0 beyond half_dim)
    s,  # [BLOCK_HALF] float32 sin of this token, already negated for the inverse
    BLOCK_H: tl.constexpr,  # heads per tile
    BLOCK_HALF: tl.constexpr,  # power of two >= half_dim
):
    offs_i = tl.arange(0, BLOCK_HALF)
    for h_start in range(0, n_heads, BLOCK_H):
        offs_h = h_start + tl.arange(0, BLOCK_H)
        mask = (offs_h < n_heads)[:, None] & (offs_i < half_dim)[None, :]
        x1_ptrs = X + offs_h[:, None] * stride_xh + offs_i[None, :]
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + half_dim, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c[None, :] - x2 * s[None, :]
        out2 = x2 * c[None, :] + x1 * s[None, :]
        out1_ptrs = Out + offs_h[:, None] * (2 * half_dim) + offs_i[None, :]
        tl.store(out1_ptrs, out1.to(Out.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + half_dim, out2.to(Out.dtype.element_ty), mask=mask)


@jit
def _rope_fwd_bwd_kernel(
    Q,  # [B, T, Hq, D] queries (or their gradient), strided, head_dim contiguous
    K,  # [B, T, Hkv, D] keys (or their gradient), strided, head_dim contiguous
    Q_out,  # [B, T, Hq, D] contiguous, dtype of Q
    K_out,  # [B, T, Hkv, D] contiguous, dtype of K
    Cos,  # float32 [T, D/2] or [B, T, D/2], contiguous
    Sin,  # float32, same shape and strides as Cos
    seq_len,  # T, to split the program id into (b, t)
    n_q_heads,  # Hq
    n_kv_heads,  # Hkv
    half_dim,  # D / 2
    stride_qb, stride_qt, stride_qh,  # strides of Q over batch, seq, head
    stride_kb, stride_kt, stride_kh,  # strides of K over batch, seq, head
    stride_cb,  # Cos/Sin stride over batch: 0 when positions are shared by all rows
    stride_ct,  # Cos/Sin stride over seq
    INVERSE: tl.constexpr,  # rotate by -theta: the backward pass
    BLOCK_H: tl.constexpr,  # heads per tile
    BLOCK_HALF: tl.constexpr,  # power of two >= half_dim
):
    # int64 so that token * stride cannot overflow on large activations.
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < half_dim
    c = tl.load(Cos + b * stride_cb + t * stride_ct + offs_i, mask=mask_i, other=0.0)
    s = tl.load(Sin + b * stride_cb + t * stride_ct + offs_i, mask=mask_i, other=0.0)
    if INVERSE:
        s = -s
    head_dim = 2 * half_dim
    _rope_rotate_heads(Q + b * stride_qb + t * stride_qt, Q_out + token * n_q_heads * head_dim,
                       stride_qh, n_q_heads, half_dim, c, s, BLOCK_H, BLOCK_HALF)
    _rope_rotate_heads(K + b * stride_kb + t * stride_kt, K_out + token * n_kv_heads * head_dim,
                       stride_kh, n_kv_heads, half_dim, c, s, BLOCK_H, BLOCK_HALF)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------
# Largest tile (heads x pairs) one program rotates at once: x1, x2 and both outputs of a
# 2048-element tile stay in registers. Heads beyond the tile are looped over.
_MAX_TILE = 2048
# Hard cap on D/2: one head is never split across tiles, so it must fit one block.
_MAX_HALF_DIM = 4096


# Elements of a tile (of each half) per thread: 8, as a 2048-element tile on 8 warps.
_TILE_PER_THREAD = 8
# The shortest tile: with one key/value head (multi-query attention) a 1-row tile would
# walk the query heads one at a time; 4 rows mask 3 for k and keep q's loop short.
_MIN_TILE_HEADS = 4


def _rope_launch_config(half_dim: int, q_heads: int, kv_heads: int) -> tuple[int, int, int]:
    """``(BLOCK_HALF, BLOCK_H, num_warps)`` for ``D/2 = half_dim`` and the two head counts.

    ``BLOCK_H`` is the next power of two at or above the smaller head count (at least
    ``_MIN_TILE_HEADS`` unless both are smaller, at most ``_MAX_TILE`` elements);
    ``num_warps`` gives each thread ``_TILE_PER_THREAD`` elements of a tile.
    """
    if half_dim > _MAX_HALF_DIM:
        raise ValueError(
            f"head_dim must be at most {2 * _MAX_HALF_DIM} for the Triton RoPE kernel, got {2 * half_dim}"
        )
    block_half, _ = row_block(half_dim, max_block=_MAX_HALF_DIM)

    def power_of_two(heads: int) -> int:
        return 1 << (max(heads, 1) - 1).bit_length()

    heads = max(power_of_two(min(q_heads, kv_heads)), min(_MIN_TILE_HEADS, power_of_two(max(q_heads, kv_heads))))
    block_h = max(1, min(heads, _MAX_TILE // block_half))
    num_warps = min(8, max(1, block_h * block_half // (32 * _TILE_PER_THREAD)))
    return block_half, block_h, num_warps


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernel steps through head_dim with stride 1; any other layout of the other
    # dimensions (e.g. q sliced out of a fused qkv projection) is passed as strides.
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by ``cos``/``sin`` (by their inverse with ``inverse``) in one launch.

    Shapes are already validated by :func:`apply_rope`. Returns new contiguous tensors.
    """
    batch, seq, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if batch * seq * head_dim == 0:
        return q_out, k_out
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    # cos/sin are small ([(B,) T, D/2]): one contiguous float32 copy lets both share strides.
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    block_half, block_h, num_warps = _rope_launch_config(head_dim // 2, n_q_heads, n_kv_heads)
    _rope_fwd_bwd_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin,
        seq, n_q_heads, n_kv_heads, head_dim // 2,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        stride_cb, cos.stride(-2),
        INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return q_out, k_out


# ---------------------------------------------------------------------------------------
# Registration: the custom op (opaque to torch.compile, with a fake for tracing) and the
# one autograd function, which reaches the launcher through dispatch.launch: directly in
# eager mode, through the custom op under torch.compile.
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("ease::apply_rope", mutates_args=())
def _apply_rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R q, R k)``, or ``(R^T q, R^T k)`` with ``inverse``, as new contiguous tensors."""
    return _rope_launch(q, k, cos, sin, inverse)


@_apply_rope_op.register_fake
def _(q, k, cos, sin, inverse=False):
    return q.new_empty(q.shape), k.new_empty(k.shape)


class _RopeFunction(torch.autograd.Function):
    """``(R q, R k)`` (``R^T`` with ``inverse``), differentiable in ``q`` and ``k``.

    cos/sin get no gradient: they are functions of integer positions.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, inverse):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse
        return launch(_rope_launch, torch.ops.ease.apply_rope, q, k, cos, sin, inverse)

    @staticmethod
    def backward(ctx, grad_q_out, grad_k_out):
        # The gradient of a rotation is the opposite rotation: the same launcher with the
        # sine negated, called directly (not through another custom op or function, whose
        # host cost would be most of the backward's time). Only when a graph of the
        # backward is wanted (double backward, create_graph=True) does it go through this
        # function again, which records it.
        cos, sin = ctx.saved_tensors
        if grad_q_out is None and grad_k_out is None:
            return None, None, None, None, None
        # An unused output (None) is rotated as a tensor of zero heads: nothing is read.
        q_in = grad_q_out if grad_q_out is not None else grad_k_out[:, :, :0]
        k_in = grad_k_out if grad_k_out is not None else grad_q_out[:, :, :0]
        if torch.is_grad_enabled():
            grad_q, grad_k = _RopeFunction.apply(q_in, k_in, cos, sin, not ctx.inverse)
        else:
            grad_q, grad_k = launch(_rope_launch, torch.ops.ease.apply_rope, q_in, k_in, cos, sin, not ctx.inverse)
        return (
            grad_q if grad_q_out is not None else None,
            grad_k if grad_k_out is not None else None,
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding to queries and keys.

    Args:
        q: ``[batch, seq, q_heads, head_dim]``, floating.
        k: ``[batch, seq, kv_heads, head_dim]``, same dtype; ``kv_heads`` may differ from
            ``q_heads`` (grouped-query attention).
        cos, sin: ``[seq, head_dim // 2]`` (shared positions) or
            ``[batch, seq, head_dim // 2]`` (per-row positions), e.g. from
            :func:`rope_cos_sin`.

    Returns:
        ``(q_rotated, k_rotated)`` in the shapes and dtype of ``q`` and ``k`` (new tensors).
        Differentiable in ``q`` and ``k``; ``cos`` and ``sin`` receive no gradient on the
        Triton path (they are functions of integer positions).

    Raises:
        TypeError: non-floating inputs.
        ValueError: wrong ranks, an odd ``head_dim``, mismatched batch/seq/head_dim, or
            ``cos``/``sin`` shapes that do not fit.
    """
    for name, tensor in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, tensor)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [batch, seq, heads, head_dim], got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    batch, seq, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim (last dimension of q) must be even, got {head_dim}")
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"k must match q in batch, seq and head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    allowed = {(seq, head_dim // 2), (batch, seq, head_dim // 2)}
    for name, tensor in (("cos", cos), ("sin", sin)):
        if tuple(tensor.shape) not in allowed:
            raise ValueError(
                f"{name} must have shape ({seq}, {head_dim // 2}) or ({batch}, {seq}, {head_dim // 2}) "
                f"for q {tuple(q.shape)}, got {tuple(tensor.shape)}"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if use_triton(q):
        return _RopeFunction.apply(q, k, cos, sin, False)
    return apply_rope_reference(q, k, cos, sin)

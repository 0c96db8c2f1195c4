"""The exit head's loss over many layers, fused and chunked: deep supervision without L x the logits.

For each supervised layer ``l``, the loss is the weighted cross-entropy of the shared exit
head (final RMSNorm, then the output projection) applied to that layer's hidden state.
Computed plainly, a step holds the ``[tokens, vocab]`` logits of every supervised layer at
once (and, in the backward pass, their gradients): with 12 layers, 8k tokens and a 32k
vocabulary, gigabytes that grow with depth.

Here the tokens are walked in chunks. For one chunk of one layer: the RMSNorm and the
output projection (a matrix product) give the chunk's logits; one Triton pass per row
(online softmax) gives the loss, the argmax and, written over the logits, their gradient;
two matrix products and the RMSNorm backward give the gradients of the hidden state, the
norm weight and the head weight; the chunk is freed. The forward pass therefore computes
every gradient and the backward pass only scales them by the incoming gradient. Peak
memory: one chunk of logits, whatever the number of layers.

Reads top to bottom: the reference (the definition, plain PyTorch, every layer's logits
at once), the Triton kernel and its launcher, the chunked driver (it walks the chunks on
the kernels or, chunk by chunk, on plain PyTorch, so the memory saving holds on the CPU
too), the autograd function, and the public functions: :func:`exit_head_loss` for
training and :func:`exit_head_confidence`, the same fusion for the inference-time
confidence check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ease_kernels._launch import jit, row_block, tl
from ease_kernels._online_softmax import LOG2E, VOCAB_BLOCK, online_softmax_row
from ease_kernels._validation import check_criterion, check_eps, check_float, check_tensor, check_threshold, is_real
from ease_kernels.dispatch import use_triton
from ease_kernels.exit_confidence import ExitDecision, exit_confidence
from ease_kernels.rms_norm import (
    rms_norm,
    rms_norm_bwd,
    rms_norm_bwd_reference,
    rms_norm_fwd,
    rms_norm_fwd_reference,
    rms_norm_reference,
)

IGNORE_INDEX = -100
"""Default target value left out of the loss (PyTorch's ``cross_entropy`` default)."""


class ExitHeadLoss(NamedTuple):
    """Result of :func:`exit_head_loss`.

    Attributes:
        loss: ``sum_l w_l * CE_l``, a scalar (float32, float64 for float64 hidden states)
            that carries the gradient.
        layer_losses: ``[L]`` ``CE_l``, the token-mean cross-entropy of each layer
            (detached), in the loss's dtype.
        correct: ``[L]`` int64, per layer the number of non-ignored targets equal to the
            argmax of the logits (first index on ties), for top-1 accuracy.
    """

    loss: torch.Tensor
    layer_losses: torch.Tensor
    correct: torch.Tensor


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
def exit_head_loss_reference(
    hidden_states: Sequence[torch.Tensor],
    norm_weight: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    layer_weights: Sequence[float],
    eps: float,
    ignore_index: int = IGNORE_INDEX,
    *,
    chunk_size: int | None = None,
) -> ExitHeadLoss:
    """The definition of :func:`exit_head_loss`, plainly: every layer's logits at once.

    With ``h_l`` the hidden states of layer ``l``, ``t`` the targets and
    ``n = max(1, #{i : t_i != ignore_index})``::

        z_l  = rms_norm(h_l, norm_weight, eps) @ head_weight.T
        CE_l = sum_{i : t_i != ignore_index} (logsumexp(z_l[i]) - z_l[i, t_i]) / n
        loss = sum_{l : w_l > 0} w_l * CE_l

    The RMSNorm is :func:`~ease_kernels.rms_norm_reference`; the product is ``F.linear``'s
    (the promoted dtype, or autocast's); the cross-entropy runs in float32 (float64 for
    float64 logits). Arguments are those of :func:`exit_head_loss` and are not checked
    here; ``chunk_size`` is accepted for the same signature and ignored. It holds ``L``
    ``[N, V]`` logits (and their gradients): the memory :func:`exit_head_loss` saves.
    """
    flat_targets = targets.reshape(-1)
    tokens = (flat_targets != ignore_index).sum().clamp_min(1)
    loss, layer_losses, correct = 0.0, [], []
    for h, weight in zip(hidden_states, layer_weights):
        z = F.linear(rms_norm_reference(h, norm_weight, eps), head_weight).flatten(0, -2)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        ce = F.cross_entropy(z, flat_targets, ignore_index=ignore_index, reduction="sum") / tokens
        layer_losses.append(ce.detach())
        correct.append(((z.argmax(-1) == flat_targets) & (flat_targets != ignore_index)).sum())
        if weight > 0:
            loss = loss + weight * ce
    layer_losses = torch.stack(layer_losses)
    loss = loss if isinstance(loss, torch.Tensor) else torch.zeros((), dtype=layer_losses.dtype, device=z.device)
    return ExitHeadLoss(loss, layer_losses, torch.stack(correct))


def _cross_entropy_chunk_reference(
    logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, row by row: see :func:`cross_entropy_chunk`."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a copy only for half precision
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    prediction = z.max(dim=-1).indices
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(valid, lse - z.gather(1, safe_targets).squeeze(1), 0.0)
    if compute_grad:
        # In place: z (the logits themselves unless upcast) becomes softmax - onehot, scaled.
        z.sub_(lse.unsqueeze(1)).exp_()
        z.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=z.dtype))
        z.mul_(scale).masked_fill_(~valid.unsqueeze(1), 0.0)
        if z is not logits:
            logits.copy_(z)
    return loss, prediction


# ---------------------------------------------------------------------------------------
# Kernel
#
# One row of logits z (V entries) with target t, scale s = w_l / n:
#     lse     = log sum_j exp(z_j)            (online: running max m and sum of exp(z - m))
#     loss    = lse - z_t                     (0 when t == ignore_index)
#     dz_j    = s * (exp(z_j - lse) - [j == t])   (0 for every j when t == ignore_index)
#     pred    = argmax_j z_j                  (first index of the maximum, as torch.max)
# dz is d(s * loss)/dz. It is written over z in a second sweep: the logits buffer becomes
# the gradient buffer, so a chunk never needs a second [C, V] tensor.
# ---------------------------------------------------------------------------------------
@jit
def _cross_entropy_fwd_bwd_fused(
    Logits,  # [rows, vocab] fp16/bf16/fp32, rows at stride_row, unit column stride;
    # overwritten with dz when COMPUTE_GRAD
    Targets,  # [rows] int64 target ids (or ignore_index)
    Loss,  # [rows] float32 output: lse - z_t, 0 for ignored rows
    Prediction,  # [rows] int64 output: argmax of the row
    stride_row,  # elements between rows of Logits
    vocab,  # V, the row length
    ignore_index,  # target value of rows left out
    scale,  # multiplier of the gradient, w_l / n
    COMPUTE_GRAD: tl.constexpr,  # write dz over the logits (a second sweep)
    BLOCK_V: tl.constexpr,  # lanes per step of the vocabulary loop (power of two)
):
    """One program owns one row. Grid: ``(rows,)``.

    The log-sum-exp and argmax come from one online-softmax pass
    (``_online_softmax.online_softmax_row``, shared with the exit-confidence kernel); a
    second pass writes the gradient over the logits.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2 ** 31
    Logits += row * stride_row
    target = tl.load(Targets + row)
    valid = target != ignore_index
    m_max, total, prediction, _ = online_softmax_row(Logits, vocab, BLOCK_V, False)
    lse = m_max + tl.log(total)
    # Read before the gradient sweep overwrites it; an ignored row reads z_0, unused.
    z_target = tl.load(Logits + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - z_target, 0.0))
    tl.store(Prediction + row, prediction.to(tl.int64))
    if COMPUTE_GRAD:
        lanes = tl.arange(0, BLOCK_V)
        if valid:
            # dz = s * softmax everywhere, then the one-hot term at the target alone: no
            # per-element comparison with the target. exp(z - lse) = exp2(z * LOG2E - lse2),
            # one FFMA and one MUFU.EX2.
            lse2 = lse * LOG2E
            for start in range(0, vocab, BLOCK_V):
                offs = start + lanes
                mask = offs < vocab
                z = tl.load(Logits + offs, mask=mask, other=0.0).to(tl.float32)
                dz = scale * tl.math.exp2(z * LOG2E - lse2)
                tl.store(Logits + offs, dz.to(Logits.dtype.element_ty), mask=mask)
            # Another thread of this program stored dz_t above; after the barrier that store
            # is visible, so this one lands last.
            tl.debug_barrier()
            dz_target = scale * (tl.math.exp2(z_target * LOG2E - lse2) - 1.0)
            tl.store(Logits + target, dz_target.to(Logits.dtype.element_ty))
        else:
            # An ignored row gets zeros, whatever it holds (inf or NaN included).
            for start in range(0, vocab, BLOCK_V):
                offs = start + lanes
                tl.store(Logits + offs, tl.zeros([BLOCK_V], dtype=Logits.dtype.element_ty), mask=offs < vocab)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def cross_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on one chunk of logits.

    Args:
        logits: ``[rows, V]`` float16, bfloat16 or float32 with unit column stride;
            overwritten with ``scale * (softmax - onehot)`` (zero rows where ignored) when
            ``compute_grad``.
        targets: ``[rows]`` int64, ids in ``[0, V)`` or ``ignore_index`` (not checked here).
        scale: the gradient's multiplier.
        ignore_index: target value of rows left out.
        compute_grad: whether to write the gradient.

    Returns:
        ``(loss, prediction)``: ``[rows]`` float32 ``logsumexp - z_target`` (0 for ignored
        rows) and ``[rows]`` int64 argmax.
    """
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    prediction = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return loss, prediction
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")
    block_v, num_warps = row_block(vocab, max_block=VOCAB_BLOCK, can_loop=True)
    _cross_entropy_fwd_bwd_fused[(rows,)](
        logits, targets.contiguous(), loss, prediction,
        logits.stride(0), vocab, ignore_index, float(scale),
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return loss, prediction


# ---------------------------------------------------------------------------------------
# The chunked driver: each chunk on the kernels or on plain PyTorch, as use_triton says
# ---------------------------------------------------------------------------------------
# Without a chunk_size, a chunk's logits hold about as many elements as one layer's
# hidden states ([N, D]; Liger-Kernel's fused linear cross-entropy uses the same rule), so
# the loss never needs much more than the hidden states it reads. The floor keeps the
# matrix products large enough to run near full speed: on CUDA, the head-gradient update
# dhead += dz^T x of a C-row chunk reads and writes the float32 [V, D] gradient once for
# 2 C V D FLOP, an arithmetic intensity of about C / 4 FLOP/B, against an H100's ~265
# (796 TFLOP/s over 3 TB/s): 2048 rows make it compute-bound (131 MB of bf16 logits at
# V = 32000, still flat in the number of layers). Elsewhere 128.
_MIN_CHUNK_ROWS = {"cuda": 2048}
_MIN_CHUNK_ROWS_ELSEWHERE = 128


def _default_chunk_size(rows: int, dim: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: the power of two at or below ``rows * dim / vocab``, at least 2048 on
    CUDA and 128 elsewhere."""
    target = max(1, rows * dim // max(vocab, 1))
    return max(_MIN_CHUNK_ROWS.get(device.type, _MIN_CHUNK_ROWS_ELSEWHERE), 1 << (target.bit_length() - 1))


def _add_head_gradient(dhead: torch.Tensor, dz: torch.Tensor, x: torch.Tensor) -> None:
    """``dhead += dz.T @ x``, accumulated in ``dhead``'s dtype (float32 or float64).

    Half-precision ``dz`` and ``x`` on CUDA: one ``addmm`` that accumulates in float32 and
    writes ``dhead`` in place (``out_dtype``, torch >= 2.8), instead of a half-precision
    ``[V, D]`` product rounded first and added through a temporary (1.5x the bytes). The
    CPU has no such kernel (NotImplementedError): there the product is added.
    """
    if dz.dtype == dhead.dtype:
        dhead.addmm_(dz.T, x)
    elif dhead.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(dhead, dz.T, x, out_dtype=dhead.dtype, out=dhead)
    else:
        dhead.add_(dz.T @ x)


# torch.addmm's out_dtype keyword came with torch 2.8.
_ADDMM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _matmul_dtype(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(norm(hidden), head_weight)`` would compute in, autocast included."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, head_weight.dtype)


class _Gradients(NamedTuple):
    hidden: list[torch.Tensor | None]  # per layer, hidden's shape and dtype (None: not needed)
    norm_weight: torch.Tensor | None  # norm_weight's shape and dtype
    head_weight: torch.Tensor | None  # head_weight's shape and dtype


def _run_chunks(
    hidden: Sequence[torch.Tensor],
    norm_weight: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: Sequence[float],
    eps: float,
    ignore_index: int,
    chunk_size: int | None,
    tokens: int,
    need_hidden: Sequence[bool],
    need_norm: bool,
    need_head: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Gradients]:
    """Loss, per-layer losses, correct counts and every requested gradient, chunk by chunk.

    Each chunk asks :func:`use_triton` of its own input (the hidden chunk for the RMSNorm,
    the logits for the cross-entropy) whether to run the kernel or plain PyTorch.
    ``tokens`` is ``max(1, non-ignored targets)``. Gradients are those of ``loss`` itself
    (grad_output 1); a layer of weight 0 gets none.
    """
    dim, vocab = head_weight.shape[1], head_weight.shape[0]
    rows = targets.numel()
    device = head_weight.device
    target_rows = targets.reshape(rows)
    counted = target_rows != ignore_index
    loss_dtype = torch.promote_types(hidden[0].dtype, torch.float32)
    mm_dtype = _matmul_dtype(hidden[0], head_weight)
    chunk = min(chunk_size or _default_chunk_size(rows, dim, vocab, device), max(rows, 1))

    ce_sums = torch.zeros(len(hidden), dtype=loss_dtype, device=device)
    correct = torch.zeros(len(hidden), dtype=torch.int64, device=device)
    any_grad = any(need_hidden) or need_norm or need_head
    # Gradients of the weights are summed over chunks and layers in float32 (float64 for
    # float64 inputs) and rounded once at the end.
    dnorm = torch.zeros(dim, dtype=loss_dtype, device=device) if need_norm else None
    dhead = torch.zeros(vocab, dim, dtype=loss_dtype, device=device) if need_head else None
    dhidden: list[torch.Tensor | None] = []

    # The products run in mm_dtype, chosen above; autocast must not cast them again.
    with torch.autocast(device.type, enabled=False):
        w_mm = head_weight.to(mm_dtype)  # [V, D]; no copy unless autocast or mixed dtypes
        for layer, (h, weight) in enumerate(zip(hidden, weights)):
            grad = any_grad and weight > 0
            need_dx = grad and (need_hidden[layer] or need_norm)
            h_rows = h.reshape(rows, dim)
            dh_rows = torch.empty_like(h_rows) if grad and need_hidden[layer] else None
            scale = weight / tokens
            for start in range(0, rows, chunk):
                h_c = h_rows[start : start + chunk]  # [C, D]
                t_c = target_rows[start : start + chunk]
                norm_kernel = use_triton(h_c)
                if norm_kernel:
                    x_c, _, rstd = rms_norm_fwd(h_c, norm_weight, eps)
                else:
                    x_c, rstd = rms_norm_fwd_reference(h_c, norm_weight, eps)
                x_mm = x_c.to(mm_dtype)
                logits = x_mm @ w_mm.T  # [C, V]: the only vocabulary-sized tensor alive
                if use_triton(logits):
                    loss_c, prediction = cross_entropy_chunk(logits, t_c, scale, ignore_index, grad)
                else:
                    loss_c, prediction = _cross_entropy_chunk_reference(logits, t_c, scale, ignore_index, grad)
                ce_sums[layer] += loss_c.sum()
                correct[layer] += ((prediction == t_c) & counted[start : start + chunk]).sum()
                if grad:  # logits now holds dz = d(w_l * CE_l) / dz
                    if need_head:
                        _add_head_gradient(dhead, logits, x_mm)
                    if need_dx:
                        dx = logits @ w_mm  # [C, D], gradient wrt the normalised hidden state
                        if norm_kernel:
                            # The weight's gradient is added into dnorm in float32 by the
                            # kernel, never rounded to the weight's dtype per chunk.
                            dh_c, _ = rms_norm_bwd(dx, h_c, norm_weight, rstd, dweight_out=dnorm)
                        else:
                            dh_c, dnorm_c = rms_norm_bwd_reference(dx, h_c, norm_weight, rstd)
                            if dnorm is not None:
                                dnorm += dnorm_c
                        if dh_rows is not None:
                            dh_rows[start : start + chunk] = dh_c
                del logits  # free the chunk before the next one is allocated
            dhidden.append(None if dh_rows is None else dh_rows.view(h.shape))

    layer_losses = ce_sums / tokens
    weight_tensor = torch.tensor(list(weights), dtype=loss_dtype, device=device)
    # where, not a product: a zero-weight layer with a non-finite loss adds nothing.
    loss = torch.where(weight_tensor > 0, weight_tensor * layer_losses, 0.0).sum()
    gradients = _Gradients(
        dhidden,
        None if dnorm is None else dnorm.to(norm_weight.dtype),
        None if dhead is None else dhead.to(head_weight.dtype),
    )
    return loss, layer_losses, correct, gradients


# ---------------------------------------------------------------------------------------
# Autograd: the forward computes the gradients, the backward scales them.
# ---------------------------------------------------------------------------------------
class _ExitHeadLossFunction(torch.autograd.Function):
    """Inputs: ``(run, norm_weight, head_weight, *hidden)``; ``run`` is :func:`_run_chunks`
    with everything else bound. Outputs: ``(loss, layer_losses, correct)``."""

    @staticmethod
    def forward(ctx, run: Callable, norm_weight: torch.Tensor, head_weight: torch.Tensor, *hidden: torch.Tensor):
        needs = ctx.needs_input_grad
        loss, layer_losses, correct, gradients = run(
            hidden, norm_weight, head_weight, need_hidden=needs[3:], need_norm=needs[1], need_head=needs[2]
        )
        # Not save_for_backward: these are new tensors, not inputs or outputs, and the
        # backward hands them to autograd (in place), so they are kept exactly once.
        ctx.gradients = gradients
        ctx.mark_non_differentiable(layer_losses, correct)
        return loss, layer_losses, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_layer_losses, _grad_correct):
        gradients = ctx.gradients
        if gradients is None:
            raise RuntimeError(
                "exit_head_loss: backward ran a second time through the same loss; its gradients "
                "were computed in the forward pass and already handed out (compute the loss again)"
            )
        ctx.gradients = None
        # Scaled in place: copies would double the memory of the hidden-state gradients.
        for grad in (gradients.norm_weight, gradients.head_weight, *gradients.hidden):
            if grad is not None:
                grad.mul_(grad_loss)
        return None, gradients.norm_weight, gradients.head_weight, *gradients.hidden


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def _check_head(norm_weight: object, head_weight: object, eps: object) -> tuple[int, int]:
    """``(vocab, dim)`` of a valid exit head; raises naming the bad argument."""
    check_float("norm_weight", norm_weight)
    check_float("head_weight", head_weight)
    if head_weight.dim() != 2 or head_weight.shape[0] < 1 or head_weight.shape[1] < 1:
        raise ValueError(f"head_weight must be [vocab, hidden] with both >= 1, got {tuple(head_weight.shape)}")
    vocab, dim = head_weight.shape
    if norm_weight.shape != (dim,):
        raise ValueError(
            f"norm_weight must have shape ({dim},) to match head_weight {tuple(head_weight.shape)}, "
            f"got {tuple(norm_weight.shape)}"
        )
    if norm_weight.device != head_weight.device:
        raise ValueError(f"norm_weight is on {norm_weight.device} but head_weight is on {head_weight.device}")
    check_eps(eps)
    return vocab, dim


def _check_hidden(name: str, hidden: object, dim: int, device: torch.device) -> torch.Tensor:
    check_float(name, hidden)
    if hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(
            f"{name} must be [..., {dim}] to match the exit head's hidden size, got {tuple(hidden.shape)}"
        )
    if hidden.device != device:
        raise ValueError(f"{name} is on {hidden.device} but the exit head is on {device}")
    return hidden


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    return chunk_size


def _chunk_cross_entropy(
    hidden: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
    eps: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and correct count of one chunk, in differentiable plain ops."""
    z = F.linear(rms_norm(hidden, norm_weight, eps), head_weight)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    ce = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="sum")
    correct = ((z.detach().argmax(-1) == targets) & (targets != ignore_index)).sum()
    return ce, correct


def _exit_head_loss_traced(
    hidden: list[torch.Tensor], norm_weight: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
    weights: list[float], eps: float, ignore_index: int, chunk_size: int | None,
) -> ExitHeadLoss:
    """The fused loss as ``torch.compile`` traces it: chunks of plain ops, each checkpointed.

    The eager path computes every gradient in its forward pass, with host-side loops and
    counts a graph cannot hold. Here each chunk's logits are recomputed in the backward
    pass instead of kept (activation checkpointing), so memory stays one chunk of logits
    per layer in flight while the compiler sees one graph: no host sync, no range check
    (the eager call checks the targets; a compiled step trusts them, as the model's own
    input check does under compile).
    """
    from torch.utils.checkpoint import checkpoint

    dim = hidden[0].shape[-1]
    flat_targets = targets.reshape(-1).to(torch.int64)
    rows = flat_targets.shape[0]
    chunk = chunk_size or _default_chunk_size(rows, dim, head_weight.shape[0], hidden[0].device)
    tokens = (flat_targets != ignore_index).sum().clamp_min(1)
    loss, layer_losses, correct = None, [], []
    for h, weight in zip(hidden, weights):
        flat = h.reshape(rows, dim)
        ce_sum, right = None, None
        for start in range(0, rows, chunk):
            ce, count = checkpoint(
                _chunk_cross_entropy, flat[start : start + chunk], norm_weight, head_weight,
                flat_targets[start : start + chunk], eps, ignore_index, use_reentrant=False,
            )  # fmt: skip
            ce_sum = ce if ce_sum is None else ce_sum + ce
            right = count if right is None else right + count
        ce_mean = ce_sum / tokens
        layer_losses.append(ce_mean.detach())
        correct.append(right)
        if weight > 0:
            loss = weight * ce_mean if loss is None else loss + weight * ce_mean
    layer_losses = torch.stack(layer_losses)
    if loss is None:
        loss = torch.zeros((), dtype=layer_losses.dtype, device=layer_losses.device)
    return ExitHeadLoss(loss, layer_losses, torch.stack(correct))


def _exit_head_loss(
    hidden_states, norm_weight, head_weight, targets, layer_weights, eps, ignore_index, chunk_size
) -> ExitHeadLoss:
    """Validate, count the tokens, and run the chunks (through autograd when a gradient is wanted)."""
    vocab, dim = _check_head(norm_weight, head_weight, eps)
    if isinstance(hidden_states, torch.Tensor) or not isinstance(hidden_states, Sequence) or not hidden_states:
        raise TypeError(
            "hidden_states must be a non-empty list or tuple of tensors, one per supervised layer, "
            f"got {type(hidden_states).__name__}"
        )
    hidden = [_check_hidden(f"hidden_states[{i}]", h, dim, head_weight.device) for i, h in enumerate(hidden_states)]
    for i, h in enumerate(hidden[1:], start=1):
        if h.shape != hidden[0].shape or h.dtype != hidden[0].dtype:
            raise ValueError(
                f"hidden_states must share one shape and dtype: hidden_states[0] is "
                f"{tuple(hidden[0].shape)} {hidden[0].dtype}, hidden_states[{i}] is {tuple(h.shape)} {h.dtype}"
            )
    if isinstance(layer_weights, torch.Tensor):
        layer_weights = layer_weights.tolist()
    if not isinstance(layer_weights, Sequence) or isinstance(layer_weights, str):
        raise TypeError(
            "layer_weights must be a list or tuple of numbers aligned with hidden_states, "
            f"got {type(layer_weights).__name__}"
        )
    if len(layer_weights) != len(hidden):
        raise ValueError(
            f"layer_weights must have one weight per hidden state ({len(hidden)}), got {len(layer_weights)}"
        )
    for i, weight in enumerate(layer_weights):
        if not is_real(weight) or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"layer_weights[{i}] must be a finite number >= 0, got {weight!r}")
    weights = [float(w) for w in layer_weights]
    check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != hidden[0].shape[:-1]:
        raise ValueError(
            f"targets must have the hidden states' leading shape {tuple(hidden[0].shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    chunk_size = _check_chunk_size(chunk_size)

    if torch.compiler.is_compiling():
        return _exit_head_loss_traced(hidden, norm_weight, head_weight, targets, weights, float(eps), ignore_index, chunk_size)
    targets = targets.to(head_weight.device, torch.int64)
    counted = targets != ignore_index
    # One host sync reads both: checked here because an out-of-range id would read past a
    # row in the kernel (a device-side fault on CUDA), not raise.
    bad, tokens = torch.stack([(counted & ((targets < 0) | (targets >= vocab))).sum(), counted.sum()]).tolist()
    if bad:
        first = int(targets[counted & ((targets < 0) | (targets >= vocab))][0])
        raise ValueError(
            f"targets must be ids in [0, {vocab}) or ignore_index={ignore_index}, got {first} ({bad} such targets)"
        )
    tokens = max(tokens, 1)  # all ignored: loss 0 and zero gradients, not 0 / 0

    def run(hidden, norm_weight, head_weight, need_hidden, need_norm, need_head):
        return _run_chunks(
            hidden, norm_weight, head_weight, targets, weights, float(eps), ignore_index, chunk_size, tokens,
            need_hidden, need_norm, need_head,
        )  # fmt: skip

    tensors = [norm_weight, head_weight, *hidden]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ExitHeadLoss(*_ExitHeadLossFunction.apply(run, *tensors))
    loss, layer_losses, correct, _ = run(hidden, norm_weight, head_weight, [False] * len(hidden), False, False)
    return ExitHeadLoss(loss, layer_losses, correct)


def exit_head_loss(
    hidden_states: Sequence[torch.Tensor],
    norm_weight: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    layer_weights: Sequence[float],
    eps: float,
    ignore_index: int = IGNORE_INDEX,
    *,
    chunk_size: int | None = None,
) -> ExitHeadLoss:
    """Deep-supervision loss of the shared exit head, ``sum_l w_l * CE_l``, without L x the logits.

    For each supervised layer: the final RMSNorm, the output projection and the
    cross-entropy (mean over non-ignored targets), weighted and summed: the value of the
    plain computation ``sum_l w_l * F.cross_entropy(F.linear(rms_norm(h_l), W), t)``
    (definition: :func:`exit_head_loss_reference`). The tokens are walked in chunks: for
    each chunk the logits, the row losses and the logits' gradient come from one Triton
    pass (online softmax), the gradients of the hidden state and of both weights from
    matrix products, and the chunk is freed, so at most one chunk of logits exists at a
    time. The gradients are computed in the forward pass (when any input requires one and
    grad mode is on) and only scaled in the backward pass; that backward can run once.

    The Triton kernels run where :func:`~ease_kernels.use_triton` says so (per chunk, on the
    hidden chunk for the RMSNorm and on the logits for the cross-entropy); otherwise plain
    PyTorch walks the same chunks, so the memory saving holds on the CPU.

    Args:
        hidden_states: a list or tuple of ``L`` tensors, one per supervised layer, each
            ``[..., D]`` (``[B, T, D]`` from a model, or ``[N, D]``), all of one shape and
            floating dtype; their order is that of ``layer_weights`` (the trainer passes
            layers in ascending order).
        norm_weight: ``[D]``, the final RMSNorm's weight.
        head_weight: ``[V, D]``, the output projection's weight.
        targets: integer ``hidden_states[0].shape[:-1]``, ids in ``[0, V)`` or
            ``ignore_index``.
        layer_weights: ``L`` finite numbers ``>= 0`` aligned with ``hidden_states`` (a list,
            tuple or 1-D tensor). A layer of weight 0 adds no loss and gets no gradient
            (autograd receives None for it, a zero); its cross-entropy and correct count
            are still computed (leave it out to skip its logits altogether).
        eps: the RMSNorm's epsilon, ``>= 0``.
        ignore_index: target value left out of the losses and counts.
        chunk_size: tokens per chunk; default: the power of two at or below
            ``N * D / V``, so a chunk of logits is about the size of one layer's hidden
            states, and at least 2048 on CUDA (the head-gradient update is then
            compute-bound) or 128 elsewhere.

    Returns:
        :class:`ExitHeadLoss` ``(loss, layer_losses, correct)``: the scalar loss (float32,
        float64 for float64 inputs), ``[L]`` per-layer mean cross-entropies (detached)
        and ``[L]`` int64 counts of correct top-1 predictions. Targets all ignored give
        loss 0 and zero gradients. Matrix products run in the hidden states' dtype
        promoted with ``head_weight``'s, or in the autocast dtype under autocast.

    Raises:
        TypeError: ``hidden_states`` not a non-empty list or tuple, non-floating hidden
            states or weights, non-integer targets, ``layer_weights`` not a sequence.
        ValueError: naming the argument: hidden states of different shapes or dtypes, or
            whose last dimension is not ``D``; ``norm_weight`` not ``[D]``; ``head_weight``
            not 2-D; ``targets`` not of the hidden states' leading shape, or out of
            range; ``layer_weights`` of another length than ``hidden_states``, negative
            or non-finite; ``eps < 0``; ``chunk_size < 1``; tensors on different devices.
    """
    return _exit_head_loss(
        hidden_states, norm_weight, head_weight, targets, layer_weights, eps, ignore_index, chunk_size
    )


@torch.no_grad()
def exit_head_confidence(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    head_weight: torch.Tensor,
    eps: float,
    threshold: float | None = None,
    criterion: str = "max_prob",
    *,
    chunk_size: int | None = None,
) -> ExitDecision:
    """The exit head's confidence check, computed chunk by chunk without all the logits.

    For each chunk of tokens: :func:`~ease_kernels.rms_norm`, the output projection and
    :func:`~ease_kernels.exit_confidence` (each dispatched as usual), so the logits of
    at most one chunk exist at a time. The results equal
    ``exit_confidence(F.linear(rms_norm(hidden, norm_weight, eps), head_weight), threshold, criterion)``.
    Inference only: no gradient flows.

    Args:
        hidden: ``[..., D]`` floating hidden states of one layer.
        norm_weight: ``[D]``, the final RMSNorm's weight.
        head_weight: ``[V, D]``, the output projection's weight.
        eps: the RMSNorm's epsilon, ``>= 0``.
        threshold: exit when ``confidence >= threshold``; in (0, 1] or None.
        criterion: ``"max_prob"`` (top-1 softmax probability) or ``"margin"`` (top-1 minus
            top-2), as for :func:`~ease_kernels.exit_confidence`.
        chunk_size: tokens per chunk; default as for :func:`exit_head_loss`.

    Returns:
        :class:`~ease_kernels.ExitDecision` ``(confidence, prediction, exit)``, each of
        ``hidden.shape[:-1]``: float32, int64, bool (``exit`` None without a threshold).

    Raises:
        TypeError: non-floating tensors or a non-numeric threshold.
        ValueError: shapes that do not fit ``[..., D]``, ``[D]``, ``[V, D]``; a threshold
            outside (0, 1]; another criterion; ``eps < 0``; ``chunk_size < 1``; tensors on
            different devices.
    """
    vocab, dim = _check_head(norm_weight, head_weight, eps)
    _check_hidden("hidden", hidden, dim, head_weight.device)
    threshold = check_threshold(threshold)
    check_criterion(criterion)
    chunk_size = _check_chunk_size(chunk_size)
    leading = hidden.shape[:-1]
    rows = math.prod(leading)
    h_rows = hidden.reshape(rows, dim)
    confidence = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    prediction = torch.empty(rows, dtype=torch.int64, device=hidden.device)
    exit = torch.empty(rows, dtype=torch.bool, device=hidden.device)
    chunk = chunk_size or _default_chunk_size(rows, dim, vocab, hidden.device)
    mm_dtype = _matmul_dtype(hidden, head_weight)
    with torch.autocast(hidden.device.type, enabled=False):
        w_mm = head_weight.to(mm_dtype)
        for start in range(0, rows, chunk):
            x = rms_norm(h_rows[start : start + chunk], norm_weight, float(eps))
            decision = exit_confidence(x.to(mm_dtype) @ w_mm.T, threshold, criterion)
            confidence[start : start + chunk] = decision.confidence
            prediction[start : start + chunk] = decision.prediction
            if threshold is not None:
                exit[start : start + chunk] = decision.exit
    return ExitDecision(
        confidence.view(leading), prediction.view(leading), None if threshold is None else exit.view(leading)
    )

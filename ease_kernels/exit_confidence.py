"""The exit head's confidence check: top-1 softmax probability, prediction, exit decision.

Reads top to bottom: the reference (the definition), the one-pass Triton kernel, its
launcher, the ``torch.library`` registration (``ease::exit_confidence`` with its fake), and
the public function.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ease_kernels._launch import jit, row_block, tl
from ease_kernels._online_softmax import VOCAB_BLOCK, online_softmax_row
from ease_kernels._validation import check_float, check_threshold
from ease_kernels.dispatch import launch, use_triton


class ExitDecision(NamedTuple):
    """Result of :func:`exit_confidence`, each of the logits' leading shape.

    Attributes:
        confidence: top-1 softmax probability, float32.
        prediction: argmax over the vocabulary (first index on ties), int64.
        exit: ``confidence >= threshold`` (bool), or ``None`` without a threshold.
    """

    confidence: torch.Tensor
    prediction: torch.Tensor
    exit: torch.Tensor | None


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
def exit_confidence_reference(logits: torch.Tensor, threshold: float | None = None) -> ExitDecision:
    """``confidence = max(softmax(z))`` over the last dimension, in float32.

    ``prediction`` is ``argmax(z)`` (the first maximal index, taken on the logits, which
    softmax's rounding could tie), ``exit`` is ``confidence >= threshold``.
    """
    logits32 = logits.float()
    # Softmax, amax, argmax: 13 µs for one row of 1000 on the CPU against 39 µs for
    # max + logsumexp + exp (a decode step is bound by such per-op costs), and 10-20% less
    # at 2048 x 1000 and 256 x 32000.
    confidence = torch.softmax(logits32, dim=-1).amax(dim=-1)
    prediction = logits32.argmax(dim=-1)
    exit = None if threshold is None else confidence >= threshold
    return ExitDecision(confidence, prediction, exit)


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------
# confidence = 1 / sum_j exp(z_j - M), M = max_j z_j, from one online-softmax pass over the
# row (ease_kernels/_online_softmax.py, shared with the cross-entropy kernel). A row of only
# -inf has no softmax: it gets confidence NaN (as the reference does), prediction 0 and exit
# False. +inf or NaN logits give confidence NaN (exit False); their prediction is
# unspecified. One program owns one row. Grid: (rows,).
@jit
def _exit_confidence_fwd_kernel(
    Logits,  # [rows, vocab] rows at stride_row, vocab contiguous; fp16, bf16 or fp32
    Confidence,  # [rows] float32 output
    Prediction,  # [rows] int64 output
    Exit,  # [rows] bool output: confidence >= threshold
    stride_row,  # elements between consecutive rows of Logits
    vocab,  # V, the row length
    threshold,  # float; +inf when the caller wants no decision (exit all False)
    BLOCK_V: tl.constexpr,  # lanes per block (power of two); the loop covers all of V
):
    # int64 so that row * stride_row cannot overflow for large batches of large vocabularies.
    row = tl.program_id(0).to(tl.int64)
    _, total, prediction = online_softmax_row(Logits + row * stride_row, vocab, BLOCK_V)
    # total >= 1 whenever the row has a finite maximum; 0 means all -inf: NaN, not 1/0.
    confidence = 1.0 / tl.where(total > 0.0, total, float("nan"))
    tl.store(Confidence + row, confidence)
    tl.store(Prediction + row, prediction.to(tl.int64))
    tl.store(Exit + row, confidence >= threshold)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------
def _exit_confidence_launch(
    logits: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence, prediction and exit (all False without a threshold) of ``logits`` ``[..., V]``.

    Arguments are already validated by :func:`exit_confidence`.
    """
    leading, vocab = logits.shape[:-1], logits.shape[-1]
    confidence = torch.empty(leading, dtype=torch.float32, device=logits.device)
    prediction = torch.empty(leading, dtype=torch.int64, device=logits.device)
    exit = torch.empty(leading, dtype=torch.bool, device=logits.device)
    if confidence.numel() == 0:
        return confidence, prediction, exit
    # The kernel reads a row with stride 1 and steps between rows by one stride, so the
    # leading dimensions must flatten to one; reshape copies only when they do not.
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.reshape(-1, vocab)
    block_v, num_warps = row_block(vocab, max_block=VOCAB_BLOCK, can_loop=True)
    _exit_confidence_fwd_kernel[(rows.shape[0],)](
        rows, confidence, prediction, exit,
        rows.stride(0), vocab, math.inf if threshold is None else threshold,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return confidence, prediction, exit


# ---------------------------------------------------------------------------------------
# Registration: custom op and fake implementation (no autograd: a decision, not a loss)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("ease::exit_confidence", mutates_args=())
def _exit_confidence_op(
    logits: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(confidence, prediction, exit)``; ``exit`` is all False when ``threshold`` is None."""
    return _exit_confidence_launch(logits, threshold)


@_exit_confidence_op.register_fake
def _(logits, threshold):
    leading = logits.shape[:-1]
    return (
        logits.new_empty(leading, dtype=torch.float32),
        logits.new_empty(leading, dtype=torch.int64),
        logits.new_empty(leading, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def exit_confidence(logits: torch.Tensor, threshold: float | None = None) -> ExitDecision:
    """Top-1 softmax probability, argmax and exit decision of ``logits`` ``[..., vocab]``.

    Computed in one pass over the logits (online max and sum of exponentials) by the
    Triton kernel. Inference only: no gradient flows.

    Args:
        logits: ``[..., vocab]`` floating, ``vocab >= 1``.
        threshold: exit when ``confidence >= threshold``; in (0, 1] or None.

    Returns:
        :class:`ExitDecision` ``(confidence, prediction, exit)``. A row of only ``-inf``
        logits has no softmax: confidence NaN, prediction 0, exit False.

    Raises:
        TypeError: non-floating logits or a non-numeric threshold.
        ValueError: a threshold outside (0, 1], logits with no dimension or an empty
            vocabulary.
    """
    check_float("logits", logits)
    threshold = check_threshold(threshold)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")
    logits = logits.detach()  # a decision, not a loss (cheaper than a no_grad context per call)
    if use_triton(logits):
        confidence, prediction, exit = launch(
            _exit_confidence_launch, torch.ops.ease.exit_confidence, logits, threshold
        )
        return ExitDecision(confidence, prediction, None if threshold is None else exit)
    return exit_confidence_reference(logits, threshold)

"""The exit head's confidence check: a softmax confidence, prediction, exit decision.

Two criteria, from the same one pass over the logits: ``"max_prob"``, the top-1 softmax
probability p1 (BranchyNet), and ``"margin"``, p1 - p2, top-1 minus top-2 (CALM's softmax
difference, Schuster et al. 2022).

Reads top to bottom: the reference (the definition), the one-pass Triton kernel, its
launcher, the ``torch.library`` registration (``ease::exit_confidence`` with its fake), and
the public function.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ease_kernels._launch import jit, row_block, tl
from ease_kernels._online_softmax import LOG2E, VOCAB_BLOCK, online_softmax_row
from ease_kernels._validation import check_criterion, check_float, check_threshold
from ease_kernels.dispatch import launch, use_triton


class ExitDecision(NamedTuple):
    """Result of :func:`exit_confidence`, each of the logits' leading shape.

    Attributes:
        confidence: the criterion's score, float32: the top-1 softmax probability
            (``"max_prob"``) or top-1 minus top-2 (``"margin"``).
        prediction: argmax over the vocabulary (first index on ties), int64.
        exit: ``confidence >= threshold`` (bool), or ``None`` without a threshold.
    """

    confidence: torch.Tensor
    prediction: torch.Tensor
    exit: torch.Tensor | None


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
def exit_confidence_reference(
    logits: torch.Tensor, threshold: float | None = None, criterion: str = "max_prob"
) -> ExitDecision:
    """The criterion's score of ``p = softmax(z)`` over the last dimension, in float32.

    ``"max_prob"``: ``confidence = p1 = max(p)``. ``"margin"``: ``confidence = p1 - p2``,
    the two largest entries of ``p`` (``p1 == p2`` when the maximum is tied, so margin 0);
    a vocabulary of one has no second token: ``p2 = 0`` and the margin is ``p1 = 1``.
    ``prediction`` is ``argmax(z)`` (the first maximal index, taken on the logits, which
    softmax's rounding could tie), ``exit`` is ``confidence >= threshold``.
    """
    check_criterion(criterion)
    logits32 = logits.float()
    # Softmax, amax, argmax: 13 µs for one row of 1000 on the CPU against 39 µs for
    # max + logsumexp + exp (a decode step is bound by such per-op costs), and 10-20% less
    # at 2048 x 1000 and 256 x 32000.
    probs = torch.softmax(logits32, dim=-1)
    if criterion == "max_prob":
        confidence = probs.amax(dim=-1)
    else:
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        confidence = top[..., 0] - top[..., 1] if top.shape[-1] == 2 else top[..., 0]
    prediction = logits32.argmax(dim=-1)
    exit = None if threshold is None else confidence >= threshold
    return ExitDecision(confidence, prediction, exit)


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------
# With M = max_j z_j, Z2 the second-largest logit (M again on a tie) and
# sum = sum_j exp(z_j - M), from one online-softmax pass over the row
# (ease_kernels/_online_softmax.py, shared with the cross-entropy kernel):
#
#     max_prob:  confidence = p1      = exp(M - M) / sum                = 1 / sum
#     margin:    confidence = p1 - p2 = (exp(M - M) - exp(Z2 - M)) / sum = (1 - exp(Z2 - M)) / sum
#
# A tie gives exp(0) = 1, so margin exactly 0; fewer than two finite logits give Z2 = -inf,
# so margin = p1 (1 for a single finite logit). A row of only -inf has no softmax: it gets
# confidence NaN (as the reference does), prediction 0 and exit False. +inf or NaN logits
# give confidence NaN (exit False); their prediction is unspecified. One program owns one
# row. Grid: (rows,).
@jit
def _exit_confidence_fwd_kernel(
    Logits,  # [rows, vocab] rows at stride_row, vocab contiguous; fp16, bf16 or fp32
    Confidence,  # [rows] float32 output
    Prediction,  # [rows] int64 output
    Exit,  # [rows] bool output: confidence >= threshold
    stride_row,  # elements between consecutive rows of Logits
    vocab,  # V, the row length
    threshold,  # float; +inf when the caller wants no decision (exit all False)
    MARGIN: tl.constexpr,  # criterion "margin" (p1 - p2, tracks the top-2) instead of "max_prob"
    BLOCK_V: tl.constexpr,  # lanes per block (power of two); the loop covers all of V
):
    # int64 so that row * stride_row cannot overflow for large batches of large vocabularies.
    row = tl.program_id(0).to(tl.int64)
    m_max, total, prediction, second = online_softmax_row(Logits + row * stride_row, vocab, BLOCK_V, MARGIN)
    numerator = 1.0  # exp(M - M)
    if MARGIN:
        numerator = 1.0 - tl.math.exp2((second - m_max) * LOG2E)
    # total >= 1 whenever the row has a finite maximum; 0 means all -inf: NaN, not 1/0.
    confidence = numerator / tl.where(total > 0.0, total, float("nan"))
    tl.store(Confidence + row, confidence)
    tl.store(Prediction + row, prediction.to(tl.int64))
    tl.store(Exit + row, confidence >= threshold)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------
def _exit_confidence_launch(
    logits: torch.Tensor, threshold: float | None, criterion: str = "max_prob"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence (the criterion's), prediction and exit (all False without a threshold) of
    ``logits`` ``[..., V]``.

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
        MARGIN=criterion == "margin", BLOCK_V=block_v, num_warps=num_warps,
    )
    return confidence, prediction, exit


# ---------------------------------------------------------------------------------------
# Registration: custom op and fake implementation (no autograd: a decision, not a loss)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("ease::exit_confidence", mutates_args=())
def _exit_confidence_op(
    logits: torch.Tensor, threshold: float | None, criterion: str = "max_prob"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(confidence, prediction, exit)``; ``exit`` is all False when ``threshold`` is None."""
    return _exit_confidence_launch(logits, threshold, criterion)


@_exit_confidence_op.register_fake
def _(logits, threshold, criterion="max_prob"):
    leading = logits.shape[:-1]
    return (
        logits.new_empty(leading, dtype=torch.float32),
        logits.new_empty(leading, dtype=torch.int64),
        logits.new_empty(leading, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def exit_confidence(
    logits: torch.Tensor, threshold: float | None = None, criterion: str = "max_prob"
) -> ExitDecision:
    """Softmax confidence, argmax and exit decision of ``logits`` ``[..., vocab]``.

    Computed in one pass over the logits (online max, second-largest logit and sum of
    exponentials) by the Triton kernel. Inference only: no gradient flows.

    Args:
        logits: ``[..., vocab]`` floating, ``vocab >= 1``.
        threshold: exit when ``confidence >= threshold``; in (0, 1] or None.
        criterion: the confidence: ``"max_prob"``, the top-1 softmax probability p1, or
            ``"margin"``, ``p1 - p2`` with p2 the second-largest probability (0 on a tied
            maximum; a vocabulary of one has no second token, p2 = 0).

    Returns:
        :class:`ExitDecision` ``(confidence, prediction, exit)``. A row of only ``-inf``
        logits has no softmax: confidence NaN, prediction 0, exit False. A row with one
        finite logit has margin 1.

    Raises:
        TypeError: non-floating logits or a non-numeric threshold.
        ValueError: a threshold outside (0, 1], another criterion than those two, logits
            with no dimension or an empty vocabulary.
    """
    check_float("logits", logits)
    threshold = check_threshold(threshold)
    check_criterion(criterion)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")
    logits = logits.detach()  # a decision, not a loss (cheaper than a no_grad context per call)
    if use_triton(logits):
        confidence, prediction, exit = launch(
            _exit_confidence_launch, torch.ops.ease.exit_confidence, logits, threshold, criterion
        )
        return ExitDecision(confidence, prediction, None if threshold is None else exit)
    return exit_confidence_reference(logits, threshold, criterion)

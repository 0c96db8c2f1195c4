"""The online softmax that the exit-confidence and cross-entropy kernels share.

One pass over a row of logits gives what both need without a second read: the row's
maximum, the sum of ``exp(z - max)`` (so the log-sum-exp and the top-1 probability), and
the first index of the maximum. The kernels of :mod:`ease_kernels.exit_confidence` and
:mod:`ease_kernels.exit_head_loss` call :func:`online_softmax_row` from their own programs.
"""

from __future__ import annotations

from ease_kernels._launch import jit, tl

# Lanes per block of the vocabulary loop. 4096 float32 lanes of (m, s, a) stay in the
# registers of 8 warps; a longer row loops. Larger blocks would spill on the GPU.
VOCAB_BLOCK = 4096


# With M = max_j z_j, the top-1 softmax probability is
#
#     confidence = exp(M - M) / sum_j exp(z_j - M) = 1 / sum_j exp(z_j - M).
#
# One pass, online: lane l of the block sees z_l, z_{l+BLOCK_V}, ... and keeps its running
# max m_l and running sum s_l = sum exp(z - m_l), rescaled whenever m_l grows:
#
#     m_l' = max(m_l, z),   s_l' = s_l * exp(m_l - m_l') + exp(z - m_l'),
#
# and the index a_l of the first z that reached m_l (strict `>`, so later ties never move
# it). At the end the lanes are combined: M = max_l m_l, sum = sum_l s_l * exp(m_l - M),
# prediction = min { a_l : m_l = M }, the first index of the maximum, as torch.max gives.
#
# -inf logits: a lane that has seen only -inf keeps m_l = -inf and s_l = 0; exponents are
# taken against a finite stand-in for -inf so no inf - inf (NaN) is ever formed. A row of
# only -inf has no softmax: its sum is 0. +inf or NaN logits give a NaN sum.
@jit
def online_softmax_row(
    Row,  # pointer to one row of logits, unit stride; fp16, bf16 or fp32
    vocab,  # V, the row length
    BLOCK_V: tl.constexpr,  # lanes per block (power of two); the loop covers all of V
):
    """One pass over a row: ``(M, sum exp(z - M), first argmax)``, M the row's maximum.

    ``M`` is returned as its finite stand-in (0 for a row of only -inf), so that
    ``M + log(sum)`` is the log-sum-exp.
    """
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    a = lanes
    for start in range(0, vocab, BLOCK_V):
        offs = start + lanes
        z = tl.load(Row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        a = tl.where(z > m, offs, a)
        m_new = tl.maximum(m, z)
        # While m_new is -inf, s stays 0: exp(-inf - 0) = 0 for both terms.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - m_ref) + tl.exp(z - m_ref)
        m = m_new
    m_max = tl.max(m, axis=0)
    m_max_ref = tl.where(m_max > float("-inf"), m_max, 0.0)
    total = tl.sum(s * tl.exp(m - m_max_ref), axis=0)
    prediction = tl.min(tl.where(m == m_max, a, vocab), axis=0)
    return m_max_ref, total, prediction

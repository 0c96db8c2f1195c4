"""The online softmax that the exit-confidence and cross-entropy kernels share.

One pass over a row of logits gives what both need without a second read: the row's
maximum, the sum of ``exp(z - max)`` (so the log-sum-exp and the top-1 probability), the
first index of the maximum and, when asked, the row's second-largest logit (so the top-2
probability). The kernels of :mod:`ease_kernels.exit_confidence` and
:mod:`ease_kernels.exit_head_loss` call :func:`online_softmax_row` from their own programs.
"""

from __future__ import annotations

from ease_kernels._launch import constant, jit, tl

# Lanes per block of the vocabulary loop. 4096 float32 lanes of (m, s, a) stay in the
# registers of 8 warps; a longer row loops. Larger blocks would spill on the GPU.
VOCAB_BLOCK = 4096


# log2(e): exponentials are taken as exp2(x * LOG2E), which compiles to one multiply and
# one MUFU.EX2 with flush-to-zero (ex2.approx.ftz): tl.exp's non-ftz ex2 adds a compare and
# two predicated multiplies per call to handle results below 2**-126, which here are
# negligible beside the 1 every lane's sum holds.
LOG2E = constant(1.4426950408889634)
# The running maximum starts at the lowest finite float, not -inf: then z - m is never
# -inf - (-inf) = NaN, a lane that has seen only -inf keeps m = FLT_LOWEST and s = 0, and a
# row masked with finfo.min (as Hugging Face masks) is still a uniform softmax. (In the
# Triton interpreter, numpy warns of the overflow of |z - FLT_LOWEST| * LOG2E to inf, whose
# exp2 is the 0 intended.)
FLT_LOWEST = constant(-3.4028234663852886e38)


# With M = max_j z_j, the top-1 softmax probability is
#
#     confidence = exp(M - M) / sum_j exp(z_j - M) = 1 / sum_j exp(z_j - M).
#
# One pass, online: lane l of the block sees z_l, z_{l+BLOCK_V}, ... and keeps its running
# max m_l and running sum s_l = sum exp(z - m_l). One exponential per element suffices:
# with e = exp(-|z - m_l|),
#
#     z >  m_l:  s_l' = s_l * exp(m_l - z) + 1 = s_l * e + 1,   m_l' = z
#     z <= m_l:  s_l' = s_l + exp(z - m_l)     = s_l + e,
#
# where the two-exponential form, s * exp(m - m') + exp(z - m'), takes two. The lane also
# keeps a_l, the index of the first z that reached m_l (strict `>`, so later ties never move
# it). At the end the lanes are combined: M = max_l m_l, sum = sum_l s_l * exp(m_l - M),
# prediction = min { a_l : m_l = M }, the first index of the maximum, as torch.max gives.
#
# Non-finite logits: -inf adds exp(-inf) = 0 (with m starting at FLT_LOWEST, see above); a
# row of only -inf has no softmax: M = FLT_LOWEST, sum 0, prediction 0. +inf or NaN logits
# give a NaN sum (inf - inf, or NaN carried through s).
#
# Top-2 (TOP2): the second-largest logit Z2 of the row, counted with multiplicity (two
# equal maxima give Z2 = M), so that p2 = exp(Z2 - M) / sum. Lane l also keeps m2_l, the
# second largest of the values it has seen (-inf while it has seen fewer than two):
#
#     m2_l' = max(m2_l, min(z, m_l))
#
# (z > m_l: the old maximum becomes the second, m2_l <= m_l; z <= m_l: z competes with
# m2_l, and z == m_l, a tie, makes it m_l): two instructions, no select. Combined, Z2 is
# the largest of every lane's m2_l and of the lane maxima other than the one lane that
# holds the prediction (lanes hold distinct indices, a_l = l mod BLOCK_V): a maximum tied
# in another lane is kept. The placeholder m = FLT_LOWEST of a lane that has seen nothing
# finite is read as a value, so a row whose maximum is FLT_LOWEST itself (only finfo.min
# and -inf) is settled by its sum, which then counts the finfo.min entries exactly: Z2 =
# FLT_LOWEST when there are two or more, -inf when one.
@jit
def online_softmax_row(
    Row,  # pointer to one row of logits, unit stride; fp16, bf16 or fp32
    vocab,  # V, the row length
    BLOCK_V: tl.constexpr,  # lanes per block (power of two); the loop covers all of V
    TOP2: tl.constexpr,  # also track the second-largest logit (compiled away when False)
):
    """One pass over a row: ``(M, sum exp(z - M), first argmax, Z2)``, M the row's maximum.

    ``M + log(sum)`` is the log-sum-exp (``-inf`` for a row of only -inf, whose ``M`` is
    ``FLT_LOWEST`` and sum 0). ``Z2`` is the second-largest logit (``M`` again when the
    maximum is tied, ``-inf`` when the row has fewer than two finite logits) when ``TOP2``,
    else ``-inf`` (not tracked).
    """
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], FLT_LOWEST, tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    a = lanes
    m2 = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + lanes
        z = tl.load(Row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        if TOP2:
            m2 = tl.maximum(m2, tl.minimum(z, m))
        grows = z > m
        e = tl.math.exp2(-tl.abs(z - m) * LOG2E)
        s = tl.where(grows, s * e + 1.0, s + e)
        m = tl.where(grows, z, m)
        a = tl.where(grows, offs, a)
    m_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.math.exp2((m - m_max) * LOG2E), axis=0)
    prediction = tl.min(tl.where(m == m_max, a, vocab), axis=0)
    second = float("-inf")
    if TOP2:
        others = tl.max(tl.where(a == prediction, float("-inf"), m), axis=0)
        second = tl.maximum(tl.max(m2, axis=0), others)
        second = tl.where((m_max == FLT_LOWEST) & (total < 2.0), float("-inf"), second)
    return m_max, total, prediction, second

"""Tests of ease_kernels.exit_confidence: reference and one-pass Triton kernel against a
float64 truth, ties, thresholds, layouts, ``-inf``, the ``ease::exit_confidence`` custom op,
and argument errors.

Confidence errors are relative, element by element: ``max |c - truth| / truth`` (a
confidence can be as small as ``1 / vocab``). Predictions and exit decisions must be exact.
"""

import os

import pytest
import torch

import ease_kernels
from ease_kernels import exit_confidence, exit_confidence_reference
from ease_kernels._online_softmax import VOCAB_BLOCK as BLOCK  # the kernel's lanes per loop step

# Where the kernels can run: CUDA when present, the CPU only through the Triton interpreter
# (conftest turns it on when there is no GPU; without it Triton cannot touch CPU tensors).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
EPS32 = torch.finfo(torch.float32).eps

# The kernel's running maximum starts at the lowest finite float; in the Triton interpreter
# numpy warns when |z - FLT_LOWEST| * log2(e) overflows to inf, whose exp2 is the 0 intended.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")

# logits dtype -> largest relative confidence error. Loading any of these dtypes into float32
# is exact, so only the float32 arithmetic counts: exp (a few eps on GPUs, whose exp is an
# approximation) and the sum of V terms (each lane adds V / BLOCK of them, then a tree of
# log2(BLOCK) levels), whose roundings mostly cancel. Seen: under 1 eps in the interpreter.
TOLERANCE = {
    torch.float32: 16 * EPS32,  # float32 arithmetic only (see above)
    torch.bfloat16: 16 * EPS32,  # same: bfloat16 -> float32 is exact, so no input rounding
    torch.float16: 16 * EPS32,  # same: float16 -> float32 is exact, so no input rounding
}


def truth(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 confidence (largest softmax probability) and the first index of the maximum."""
    z = logits.double()
    confidence = torch.softmax(z, dim=-1).max(dim=-1).values
    is_max = z == z.max(dim=-1, keepdim=True).values
    index = torch.arange(z.shape[-1], device=z.device).expand_as(z)
    prediction = torch.where(is_max, index, z.shape[-1]).min(dim=-1).values
    return confidence, prediction


def rel_error(confidence: torch.Tensor, truth_confidence: torch.Tensor) -> float:
    if confidence.numel() == 0:
        return 0.0
    return ((confidence.double() - truth_confidence).abs() / truth_confidence).max().item()


def check_against_truth(logits: torch.Tensor, result, tol: float, threshold: float | None) -> float:
    """Assert shapes, dtypes, confidence within ``tol``, exact prediction and exit semantics."""
    leading = logits.shape[:-1]
    assert result.confidence.shape == leading and result.confidence.dtype == torch.float32
    assert result.prediction.shape == leading and result.prediction.dtype == torch.int64
    truth_confidence, truth_prediction = truth(logits)
    error = rel_error(result.confidence, truth_confidence)
    assert error <= tol, f"confidence relative error {error:.3g} > {tol:.3g}"
    mismatch = (result.prediction != truth_prediction).nonzero()
    if mismatch.numel():
        first = tuple(mismatch[0].tolist())
        raise AssertionError(
            f"prediction differs at {mismatch[:5].tolist()}: {result.prediction[first].item()} "
            f"vs first argmax {truth_prediction[first].item()}"
        )
    if threshold is None:
        assert result.exit is None
    else:
        assert result.exit.dtype == torch.bool and result.exit.shape == leading
        assert torch.equal(result.exit, result.confidence >= threshold)
    return error


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_reference_matches_float64_truth(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 1000)).to(dtype)
    check_against_truth(logits, exit_confidence_reference(logits, 0.2), TOLERANCE[dtype], 0.2)


# ---------------------------------------------------------------------------------------
# Triton kernel (through the public op)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
# 1 and 7: a single partial block; 1000: not a power of two; 3 blocks + a remainder: the
# online loop rescales across blocks.
@pytest.mark.parametrize("vocab", [1, 7, 1000, 3 * BLOCK + 123])
def test_kernel_matches_float64_truth(triton_backend, triton_path, device, dtype, vocab):
    torch.manual_seed(vocab)
    # Scale 3 spreads the confidences over (0, 1], so the threshold splits the rows.
    logits = (3 * torch.randn(6, vocab, device=device)).to(dtype)
    logits[0, -1] = 20.0  # a confident row whose maximum sits in the last (partial) block
    result = exit_confidence(logits, 0.3)
    error = check_against_truth(logits, result, TOLERANCE[dtype], 0.3)
    # One pass is no less accurate than the reference's two, beyond the tolerance.
    reference_error = rel_error(exit_confidence_reference(logits).confidence, truth(logits)[0])
    assert error <= reference_error + TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_vocab_262144(triton_backend, device):
    torch.manual_seed(1)
    logits = torch.randn(2, 262_144, device=device)
    logits[1, 200_000] = 30.0
    check_against_truth(logits, exit_confidence(logits, 0.5), TOLERANCE[torch.float32], 0.5)


# Positions of tied maxima in a row of 2 * BLOCK + 50 logits, each a different case of the
# online update (same lane) or the cross-lane combine.
TIE_SETS = [
    [5, 5 + BLOCK],  # same lane, later block
    [BLOCK + 9, 3],  # lower lane holds the lower index
    [BLOCK - 1, BLOCK + 2],  # higher lane holds the lower index
    [2 * BLOCK + 10, 2 * BLOCK + 49],  # both in the partial last block
    [2 * BLOCK + 1, BLOCK + 3, 7],  # three-way
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_kernel_ties_give_first_index(triton_backend, device, dtype):
    """Duplicated maxima in the same lane, in different lanes either way round, in the
    remainder block, three-way, and a constant row: the first index wins, as in torch.max."""
    vocab = 2 * BLOCK + 50
    tie_sets = TIE_SETS
    torch.manual_seed(2)
    logits = torch.randn(len(tie_sets) + 1, vocab, device=device).clamp(-3, 3)
    for row, indices in enumerate(tie_sets):
        logits[row, indices] = 5.0
    logits[-1] = 1.0  # constant row: every index ties, confidence 1 / vocab
    logits = logits.to(dtype)
    result = exit_confidence(logits)
    check_against_truth(logits, result, TOLERANCE[dtype], None)
    assert result.prediction.tolist() == [min(indices) for indices in tie_sets] + [0]
    assert torch.equal(result.prediction.cpu(), logits.cpu().float().max(dim=-1).indices)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_ties_in_small_vocab(triton_backend, device):
    logits = torch.tensor(
        [[1.0, 3.0, 0.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 9.0]], device=device
    )
    result = exit_confidence(logits)
    assert result.prediction.tolist() == [1, 0, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_threshold_semantics(triton_backend, triton_path, device):
    torch.manual_seed(3)
    logits = torch.randn(16, 300, device=device) * torch.linspace(0.5, 12, 16, device=device)[:, None]
    logits[0] = 0.0
    logits[0, 7] = 1000.0  # softmax exactly 1.0 in float32: exits even at threshold 1
    confidence = exit_confidence(logits).confidence
    assert confidence[0].item() == 1.0
    for threshold in (0.05, 0.5, 0.9, 1.0, confidence[5].item()):
        result = exit_confidence(logits, threshold)
        check_against_truth(logits, result, TOLERANCE[torch.float32], threshold)
        assert result.exit[0]
    # `>=`: a threshold equal to a row's confidence exits that row.
    assert exit_confidence(logits, confidence[5].item()).exit[5]
    assert exit_confidence(logits, None).exit is None
    assert exit_confidence(logits).exit is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout", ["row_stride", "strided_rows", "non_flattening", "vocab_stride_2", "vocab_transposed"]
)
def test_kernel_non_contiguous_logits(triton_backend, device, layout):
    torch.manual_seed(4)
    vocab = 517
    wide = torch.randn(4, 3, 2 * vocab + 5, device=device) * 4
    logits = {
        "row_stride": wide[..., :vocab],  # rows of a wider buffer: passed as a stride
        "strided_rows": wide[::2, :, :vocab],  # every other batch row: still one row stride
        "non_flattening": wide[..., :vocab].transpose(0, 1),  # leading dims copied by reshape
        "vocab_stride_2": wide[..., : 2 * vocab : 2],  # vocab not stride 1: made contiguous
        "vocab_transposed": wide[0, :, :vocab].t().contiguous().t(),  # vocab stride 3
    }[layout]
    assert not logits.is_contiguous()
    check_against_truth(logits, exit_confidence(logits, 0.4), TOLERANCE[torch.float32], 0.4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", [(), (4,), (2, 3)], ids=["rank1", "rank2", "rank3"])
def test_kernel_leading_shapes(triton_backend, device, leading):
    torch.manual_seed(5)
    logits = 3 * torch.randn(*leading, 33, device=device)
    check_against_truth(logits, exit_confidence(logits, 0.5), TOLERANCE[torch.float32], 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 11), (2, 0, 11)])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_kernel_empty_input(triton_backend, device, shape, threshold):
    result = exit_confidence(torch.empty(shape, device=device), threshold)
    assert result.confidence.shape == result.prediction.shape == shape[:-1]
    assert result.confidence.dtype == torch.float32 and result.prediction.dtype == torch.int64
    assert result.exit is None if threshold is None else result.exit.shape == shape[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_kernel_large_magnitude_logits(triton_backend, device, dtype, scale):
    """exp(z) overflows float32 beyond z = 88: only the online rescaling keeps the sum finite."""
    torch.manual_seed(6)
    logits = (scale * torch.randn(4, BLOCK + 300, device=device)).to(dtype)
    # Near-ties at large magnitude, in different blocks, so the rescaling carries real weight.
    logits[1, 10] = logits[1].max() if dtype != torch.float32 else logits[1].max() - 0.5
    logits[2] = logits[2] / scale  # values of order 1 beside ...
    logits[2, BLOCK + 5] = 60.0  # ... one of 60: its exp alone is 1e26
    check_against_truth(logits, exit_confidence(logits, 0.5), TOLERANCE[dtype], 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_minus_inf_logits(triton_backend, device):
    """Masked (-inf) entries contribute nothing; a row of only -inf has no softmax and gets
    confidence NaN (like the reference), prediction 0 (like torch.max) and exit False."""
    logits = torch.randn(3, BLOCK + 20, device=device)
    logits[0, ::2] = float("-inf")
    logits[1, : BLOCK + 10] = float("-inf")  # a whole block of -inf before any finite value
    logits[2] = float("-inf")
    result = exit_confidence(logits, 0.5)
    check_against_truth(logits[:2], exit_confidence(logits[:2], 0.5), TOLERANCE[torch.float32], 0.5)
    reference = exit_confidence_reference(logits, 0.5)
    assert torch.isnan(result.confidence[2]) and torch.isnan(reference.confidence[2])
    assert result.prediction[2].item() == reference.prediction[2].item() == 0
    assert not result.exit[2]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_rows_masked_with_the_lowest_float(triton_backend, device):
    """finfo.min (Hugging Face's mask value) is a number, not -inf: a row of it is a uniform
    softmax, and beside finite logits it adds exp(-huge) = 0."""
    vocab = BLOCK + 7
    logits = torch.randn(2, vocab, device=device)
    logits[0] = torch.finfo(torch.float32).min
    logits[1, 1::2] = torch.finfo(torch.float32).min
    check_against_truth(logits, exit_confidence(logits, 0.5), TOLERANCE[torch.float32], 0.5)
    assert exit_confidence(logits).prediction[0].item() == 0


# ---------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(triton_backend, device, threshold, dtype):
    torch.manual_seed(7)
    logits = torch.randn(2, 3, 37, device=device).to(dtype)
    torch.library.opcheck(torch.ops.ease.exit_confidence.default, (logits, threshold))


@pytest.mark.parametrize("device", DEVICES)
def test_op_without_threshold_exits_nothing(triton_backend, device):
    confidence, _, exit = torch.ops.ease.exit_confidence(torch.tensor([[0.0, 50.0]], device=device), None)
    assert confidence.item() == 1.0 and not exit.any()


# ---------------------------------------------------------------------------------------
# Argument errors (raised before dispatch, so the same on every backend)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_no_gradient_flows(backend_name):
    """A decision, not a loss: logits that require grad give outputs that do not."""
    if backend_name == "triton" and not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    logits = torch.randn(3, 50, device=DEVICES[-1], requires_grad=True)
    with ease_kernels.backend(backend_name):
        decision = exit_confidence(logits, 0.5)
    assert not decision.confidence.requires_grad and decision.confidence.grad_fn is None


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match=r"^logits must have a floating dtype"):
        exit_confidence(torch.zeros(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5])
def test_threshold_outside_unit_interval_is_rejected(threshold):
    with pytest.raises(ValueError, match=r"^threshold must be in \(0, 1\]"):
        exit_confidence(torch.zeros(2, 5), threshold)


@pytest.mark.parametrize("shape", [(), (3, 0)])
def test_logits_without_vocab_are_rejected(shape):
    with pytest.raises(ValueError, match=r"^logits must be \[\.\.\., vocab\]"):
        exit_confidence(torch.zeros(shape))


# ---------------------------------------------------------------------------------------
# Criterion "margin": p1 - p2, from the same one-pass kernel
# ---------------------------------------------------------------------------------------
# Margin errors are measured against p1, the row's top-1 probability, not against the
# margin: a near-tie's margin cancels to about 0 and could not be measured relative to
# itself. The kernel's (1 - exp(Z2 - M)) / sum and the reference's p1 - p2 are each the
# difference of two probabilities of at most p1, each a few float32 roundings off (exp, the
# sum as for max_prob, one subtraction), so their error is a few eps of p1.
MARGIN_TOLERANCE = {
    torch.float32: 16 * EPS32,  # float32 arithmetic only; seen: under 2 eps in the interpreter
    torch.bfloat16: 16 * EPS32,  # bfloat16 -> float32 is exact: no input rounding
    torch.float16: 16 * EPS32,  # float16 -> float32 is exact: no input rounding
}


def truth_margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(p1 - p2, p1)`` of softmax(logits); p2 = 0 for a vocabulary of one."""
    p = torch.softmax(logits.double(), dim=-1)
    if p.shape[-1] == 1:
        return p[..., 0], p[..., 0]
    top = p.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1], top[..., 0]


def margin_error(margin: torch.Tensor, logits: torch.Tensor) -> float:
    """``max |margin - truth| / p1`` (NaN when any margin is NaN)."""
    if margin.numel() == 0:
        return 0.0
    want, p1 = truth_margin(logits)
    return ((margin.double() - want).abs() / p1).max().item()


def check_margin(logits: torch.Tensor, result, tol: float, threshold: float | None) -> float:
    """Assert shapes, dtypes, margin within ``tol`` of p1, exact prediction and exit semantics."""
    leading = logits.shape[:-1]
    assert result.confidence.shape == leading and result.confidence.dtype == torch.float32
    assert result.prediction.shape == leading and result.prediction.dtype == torch.int64
    error = margin_error(result.confidence, logits)
    if not error <= tol:  # `not <=` also catches NaN
        want, p1 = truth_margin(logits)
        worst = ((result.confidence.double() - want).abs() / p1).flatten().nan_to_num(float("inf")).argmax().item()
        raise AssertionError(
            f"margin error {error:.3g} x p1 > {tol:.3g} at flat row {worst}: "
            f"got {result.confidence.flatten()[worst].item():.9g}, want {want.flatten()[worst].item():.9g}"
        )
    assert torch.equal(result.prediction.cpu(), truth(logits)[1].cpu()), "prediction is not the first argmax"
    if threshold is None:
        assert result.exit is None
    else:
        assert result.exit.dtype == torch.bool and result.exit.shape == leading
        assert torch.equal(result.exit, result.confidence >= threshold)
    return error


@pytest.mark.parametrize("dtype", list(MARGIN_TOLERANCE))
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 1001), (4, 1)])
def test_margin_reference_matches_float64_truth(dtype, shape):
    torch.manual_seed(10)
    logits = (3 * torch.randn(shape)).to(dtype)
    check_margin(logits, exit_confidence_reference(logits, 0.2, "margin"), MARGIN_TOLERANCE[dtype], 0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(MARGIN_TOLERANCE))
# (5, 123), (3, 7, 1001): one partial block, odd sizes, rank 2 and 3; (4, 1): no second
# token; 32000 = 7 full blocks + a short last one of 3328; 3 blocks + 123.
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 1001), (4, 1), (3, 32000), (4, 3 * BLOCK + 123)])
def test_margin_kernel_matches_float64_truth(triton_backend, triton_path, device, dtype, shape):
    vocab = shape[-1]
    torch.manual_seed(vocab + len(shape))
    # Scale 3 spreads the margins over [0, 1), so the threshold splits the rows (bfloat16 and
    # float16 rounding also make exact ties, whose margin is 0).
    logits = (3 * torch.randn(shape, device=device)).to(dtype)
    rows = logits.view(-1, vocab)
    if vocab > 1:
        rows[0, -1] = 20.0  # a confident row whose maximum sits in the last (partial) block
        rows[1, 0], rows[1, -1] = 12.0, 11.5  # top-2 in different lanes (and blocks)
    if vocab > BLOCK:
        rows[2, 3], rows[2, 3 + BLOCK] = 11.5, 12.0  # top-2 in one lane, the larger one later
    result = exit_confidence(logits, 0.3, "margin")
    error = check_margin(logits, result, MARGIN_TOLERANCE[dtype], 0.3)
    # One pass is no less accurate than the reference's softmax and top-2, beyond the tolerance.
    reference = exit_confidence_reference(logits, None, "margin")
    assert error <= margin_error(reference.confidence, logits) + MARGIN_TOLERANCE[dtype]
    # The same pass's prediction as max_prob's, and a margin never above the top-1 probability.
    max_prob = exit_confidence(logits)
    assert torch.equal(result.prediction, max_prob.prediction)
    assert (result.confidence <= max_prob.confidence).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(MARGIN_TOLERANCE))
def test_margin_of_a_tied_maximum_is_zero(triton_backend, device, dtype):
    """A second occurrence of the maximum is the second value: in the same lane (the online
    update), in other lanes either way round and in the partial block (the cross-lane
    combine), three-way, after the lane's maximum grew, and a constant row. A unique maximum
    beside a tied second keeps its margin."""
    vocab = 2 * BLOCK + 50
    tie_sets = TIE_SETS
    torch.manual_seed(11)
    logits = torch.randn(len(tie_sets) + 3, vocab, device=device).clamp(-3, 3)
    for row, indices in enumerate(tie_sets):
        logits[row, indices] = 5.0
    grew = len(tie_sets)
    logits[grew, [8, 8 + BLOCK]] = 4.0  # the lane's maximum is tied at 4 ...
    logits[grew, 8 + 2 * BLOCK] = 5.0  # ... then grows to 5, tied in another lane
    logits[grew, 20] = 5.0
    logits[grew + 1] = 1.0  # constant row: every index ties
    logits[grew + 2, [30, 40]] = 4.0  # a tied second below a unique maximum
    logits[grew + 2, 50] = 5.0
    logits = logits.to(dtype)
    result = exit_confidence(logits, 0.5, "margin")
    check_margin(logits, result, MARGIN_TOLERANCE[dtype], 0.5)
    assert result.confidence[: grew + 2].tolist() == [0.0] * (grew + 2)
    assert result.confidence[grew + 2] > 0 and not result.exit[: grew + 2].any()
    reference = exit_confidence_reference(logits, 0.5, "margin")
    assert reference.confidence[: grew + 2].tolist() == [0.0] * (grew + 2)


@pytest.mark.parametrize("device", DEVICES)
def test_margin_ties_in_small_vocab(triton_backend, device):
    logits = torch.tensor(
        [[1.0, 3.0, 0.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 9.0], [3.0, 1.0, 3.0, 3.0, 2.0]],
        device=device,
    )
    result = exit_confidence(logits, criterion="margin")
    assert result.prediction.tolist() == [1, 0, 4, 0]
    assert result.confidence[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    check_margin(logits, result, MARGIN_TOLERANCE[torch.float32], None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(MARGIN_TOLERANCE))
def test_margin_minus_inf_logits(triton_backend, device, dtype):
    """As for max_prob: -inf entries contribute nothing, a row of only -inf has no softmax
    (margin NaN, prediction 0, exit False). One finite logit: p2 = 0, margin exactly 1."""
    vocab = BLOCK + 20
    torch.manual_seed(12)
    logits = torch.randn(6, vocab, device=device)
    logits[0, ::2] = float("-inf")
    logits[1, : BLOCK + 10] = float("-inf")  # a whole block of -inf before any finite value
    logits[2] = float("-inf")
    logits[3] = float("-inf")
    logits[3, BLOCK + 15] = -7.0  # the one finite logit, in the partial block
    logits[4] = float("-inf")
    logits[4, 2] = 3.0  # the one finite logit, in the first block
    logits[5] = float("-inf")
    logits[5, [6, BLOCK + 6]] = 1.0  # two finite logits, tied, in one lane
    logits = logits.to(dtype)
    finite = [0, 1, 3, 4, 5]
    result = exit_confidence(logits, 0.5, "margin")
    check_margin(logits[finite], exit_confidence(logits[finite], 0.5, "margin"), MARGIN_TOLERANCE[dtype], 0.5)
    reference = exit_confidence_reference(logits, 0.5, "margin")
    assert torch.isnan(result.confidence[2]) and torch.isnan(reference.confidence[2])
    assert result.prediction[2].item() == reference.prediction[2].item() == 0
    assert not result.exit[2] and not reference.exit[2]
    assert result.confidence[[3, 4]].tolist() == reference.confidence[[3, 4]].tolist() == [1.0, 1.0]
    assert result.exit[[3, 4]].all() and result.confidence[5].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_margin_rows_of_the_lowest_float(triton_backend, device):
    """finfo.min is a number, not -inf, and also the kernel's starting maximum: one of them
    among -inf is a single finite logit (margin 1), two or more tie (margin 0)."""
    lowest = torch.finfo(torch.float32).min
    vocab = BLOCK + 7
    logits = torch.full((5, vocab), float("-inf"), device=device)
    logits[0] = lowest  # uniform softmax
    logits[1, BLOCK + 3] = lowest  # the one finite logit
    logits[2, [4, BLOCK + 4]] = lowest  # two, in one lane
    logits[3, [4, 9]] = lowest  # two, in two lanes
    logits[4] = torch.randn(vocab, device=device)
    logits[4, 1::2] = lowest  # beside finite logits: exp(-huge) = 0
    result = exit_confidence(logits, 0.5, "margin")
    assert result.confidence[:4].tolist() == [0.0, 1.0, 0.0, 0.0]
    # Rows 1-3's prediction is not checked: there the kernel cannot tell finfo.min from its
    # starting maximum and gives index 0 (for max_prob too), not the first finfo.min.
    check_margin(logits[[0, 4]], exit_confidence(logits[[0, 4]], 0.5, "margin"), MARGIN_TOLERANCE[torch.float32], 0.5)
    single = exit_confidence(torch.tensor([[lowest], [0.0]], device=device), None, "margin")
    assert single.confidence.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(MARGIN_TOLERANCE))
def test_margin_large_magnitude_logits(triton_backend, device, dtype):
    """exp(z) overflows float32 beyond z = 88: the top-2 is taken on the logits, the rescaled
    sum stays finite."""
    torch.manual_seed(13)
    logits = (1000.0 * torch.randn(3, BLOCK + 300, device=device)).to(dtype)
    big = logits[1].float().max()
    logits[1, 10] = big - 0.5 if dtype == torch.float32 else big  # a near or exact tie, other block
    logits[2] = logits[2] / 1000.0
    logits[2, BLOCK + 5] = 60.0
    check_margin(logits, exit_confidence(logits, 0.5, "margin"), MARGIN_TOLERANCE[dtype], 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_opcheck_margin(triton_backend, device, threshold):
    torch.manual_seed(14)
    logits = torch.randn(2, 3, 37, device=device)
    torch.library.opcheck(torch.ops.ease.exit_confidence.default, (logits, threshold, "margin"))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("criterion", ["entropy", "Margin", None, 1])
def test_unknown_criterion_is_rejected(backend_name, criterion):
    if backend_name == "triton" and not ease_kernels.triton_available():
        pytest.skip("Triton is not installed")
    match = rf"^criterion must be one of 'max_prob', 'margin', got {criterion!r}$"
    with ease_kernels.backend(backend_name):
        with pytest.raises(ValueError, match=match):
            exit_confidence(torch.zeros(2, 5, device=DEVICES[-1]), 0.5, criterion)
    with pytest.raises(ValueError, match=match):
        exit_confidence_reference(torch.zeros(2, 5), None, criterion)

"""Tests of :mod:`ease_kernels.exit_head_loss`: the fused, chunked deep-supervision loss and
the chunked inference-time confidence check.

Everything is measured against the plain computation written here from the definition,
``sum_l w_l * cross_entropy(linear(rmsnorm(h_l)), t)``, in float64 with float64 autograd
for the gradients, independently of the op's reference path and of its kernels.

Error metric, everywhere: ``max |out - truth| / max |truth|`` in float64 (absolute values,
so errors of either sign count), per output and per gradient, reported with where the
worst element is. Sizes are small and odd (vocab 37 and 100, hidden 16 and 24, 50 tokens
walked in chunks of 16, so the last chunk holds 2 tokens and the first is all ignored).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _parity import relative_error, worst
import ease_kernels
from ease_kernels import exit_head_confidence, exit_head_loss, exit_head_loss_reference

EPS = 1e-6
IGNORE = -100

# The cross-entropy kernel's running maximum starts at the lowest finite float; in the Triton
# interpreter numpy warns when |z - FLT_LOWEST| * log2(e) overflows to inf (exp2 of it is 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")

# dtype of the hidden states and weights -> (loss tolerance, gradient tolerance), in the
# metric above, for either path (reference or Triton).
TOLERANCES = {
    # Exact up to float64 rounding: the chunked sums run in another order than the plain
    # computation's (~1e-16 seen); 1e-12 leaves room and no room for a wrong formula.
    torch.float64: (1e-12, 1e-12),
    # Every step in float32 (24-bit significand): sums of <= 50 rows and products over
    # D <= 24 or V <= 100 terms, up to ~1e-6 seen; 10x margin.
    torch.float32: (1e-5, 1e-5),
    # bfloat16 (8-bit significand): the normalised hidden state, the logits, the logits'
    # gradient and the products' results are each rounded to bfloat16, up to 2**-8
    # relative (2**-7, and biased, where the Triton interpreter truncates its stores), so
    # a logit is off by ~2**-7 of the largest and a gradient by about three such roundings
    # in a row. Seen: loss <= 2e-3 (interpreter; 2e-4 rounded), gradients <= 1.5e-2;
    # the tolerances are 7x and 2x that.
    torch.bfloat16: (2**-6, 2**-5),
}


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Each test taking it runs twice: on the reference ops, and on the Triton kernels (the
    interpreter on the CPU)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
        yield "triton"
    else:
        with ease_kernels.backend("reference"):
            yield "reference"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def assert_close(name: str, out: torch.Tensor, truth: torch.Tensor, tol: float) -> None:
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, want {tuple(truth.shape)}"
    error = relative_error(out, truth)
    assert error <= tol, f"{name}: relative error {error:.3g} > {tol:.3g} ({worst(out, truth)})"


def make_inputs(layers=3, leading=(2, 25), dim=24, vocab=37, dtype=torch.float32, seed=0):
    """Hidden states, norm and head weights, and targets with ignored entries.

    The first 16 targets are all ignored (with chunks of 16 the first chunk is empty of
    tokens), and every 7th after them.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(*leading, dim, generator=gen).to(dtype).requires_grad_() for _ in range(layers)]
    norm_weight = (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype).requires_grad_()
    # Scaled so the logits spread over a few units, like a trained head's.
    head_weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, leading, generator=gen)
    flat = targets.view(-1)
    flat[:16] = IGNORE
    flat[16::7] = IGNORE
    return hidden, norm_weight, head_weight, targets


def plain_truth(hidden, norm_weight, head_weight, targets, weights, eps=EPS, ignore_index=IGNORE) -> dict:
    """The plain computation in float64: loss, per-layer losses and correct counts, and the
    gradients of every hidden state and both weights (float64 autograd)."""
    h64 = [h.detach().double().requires_grad_() for h in hidden]
    nw64 = norm_weight.detach().double().requires_grad_()
    w64 = head_weight.detach().double().requires_grad_()
    flat_targets = targets.reshape(-1)
    counted = flat_targets != ignore_index
    tokens = counted.sum().clamp_min(1)
    loss = torch.zeros((), dtype=torch.float64)
    layer_losses, correct = [], []
    for h, weight in zip(h64, weights):
        x = h / torch.sqrt(h.square().mean(-1, keepdim=True) + eps) * nw64
        logits = (x @ w64.T).reshape(-1, w64.shape[0])
        ce = F.cross_entropy(logits, flat_targets, ignore_index=ignore_index, reduction="sum") / tokens
        layer_losses.append(ce.detach())
        correct.append(int(((logits.argmax(-1) == flat_targets) & counted).sum()))
        if weight > 0:
            loss = loss + weight * ce
    grads = torch.autograd.grad(loss, [*h64, nw64, w64], allow_unused=True) if loss.requires_grad else None
    return {
        "loss": loss.detach(),
        "layer_losses": torch.stack(layer_losses),
        "correct": torch.tensor(correct),
        "hidden": None if grads is None else list(grads[: len(hidden)]),
        "norm_weight": None if grads is None else grads[-2],
        "head_weight": None if grads is None else grads[-1],
    }


def near_ties(hidden, norm_weight, head_weight, targets, margin: float) -> int:
    """Counted tokens, over all layers, whose two largest float64 logits are within ``margin``:
    the only ones whose argmax a half-precision computation may see differently."""
    count = 0
    counted = targets.reshape(-1) != IGNORE
    for h in hidden:
        h = h.detach().double()
        x = h / torch.sqrt(h.square().mean(-1, keepdim=True) + EPS) * norm_weight.detach().double()
        top2 = (x @ head_weight.detach().double().T).reshape(-1, head_weight.shape[0]).topk(2, dim=-1).values
        count += int(((top2[:, 0] - top2[:, 1] < margin) & counted).sum())
    return count


def run(fn, hidden, norm_weight, head_weight, targets, weights, **kwargs) -> dict:
    """``fn``'s outputs and the gradients of ``loss`` wrt every input (None where none)."""
    result = fn(hidden, norm_weight, head_weight, targets, weights, EPS, **kwargs)
    grads = torch.autograd.grad(result.loss, [*hidden, norm_weight, head_weight], allow_unused=True)
    return {
        "loss": result.loss.detach(),
        "layer_losses": result.layer_losses,
        "correct": result.correct,
        "hidden": list(grads[: len(hidden)]),
        "norm_weight": grads[-2],
        "head_weight": grads[-1],
    }


def check(result: dict, truth: dict, weights, dtype, label: str, correct_slack: int = 0) -> None:
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert result["loss"].dtype == torch.promote_types(dtype, torch.float32), label
    assert_close(f"{label} loss", result["loss"], truth["loss"], loss_tol)
    assert_close(f"{label} layer_losses", result["layer_losses"], truth["layer_losses"], loss_tol)
    assert result["layer_losses"].requires_grad is False
    difference = (result["correct"] - truth["correct"]).abs().sum().item()
    assert difference <= correct_slack, (
        f"{label} correct {result['correct'].tolist()}, want {truth['correct'].tolist()}"
    )
    for i, weight in enumerate(weights):
        if weight == 0:  # no loss, no gradient: autograd sees None
            assert result["hidden"][i] is None, f"{label} hidden[{i}] of weight 0 got a gradient"
        else:
            assert result["hidden"][i].dtype == dtype
            assert_close(f"{label} d hidden[{i}]", result["hidden"][i], truth["hidden"][i], grad_tol)
    assert_close(f"{label} d norm_weight", result["norm_weight"], truth["norm_weight"], grad_tol)
    assert_close(f"{label} d head_weight", result["head_weight"], truth["head_weight"], grad_tol)


# ---------------------------------------------------------------------------------------
# Loss and gradients against the plain computation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("leading", [(2, 25), (50,)], ids=["BT", "N"])
def test_reference_matches_plain_float64(leading) -> None:
    weights = [0.5, 0.0, 1.5]
    inputs = make_inputs(leading=leading, dtype=torch.float64)
    result = run(exit_head_loss_reference, *inputs, weights)
    check(result, plain_truth(*inputs, weights), weights, torch.float64, "reference")


@pytest.mark.parametrize("chunk_size", [16, 7, 50, 1000, None])
@pytest.mark.parametrize("leading", [(2, 25), (50,)], ids=["BT", "N"])
def test_chunks_on_plain_pytorch_match_plain_float64(reference_backend, chunk_size, leading) -> None:
    """The chunked driver without kernels (the CPU's road) is exact in float64 whatever the
    chunking: a first chunk of only ignored targets, a short last chunk, one chunk for all."""
    weights = [0.5, 0.0, 1.5]
    inputs = make_inputs(leading=leading, dtype=torch.float64)
    result = run(exit_head_loss, *inputs, weights, chunk_size=chunk_size)
    check(result, plain_truth(*inputs, weights), weights, torch.float64, f"chunked chunk={chunk_size}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab, dim", [(37, 24), (100, 16)])
def test_matches_plain(backend, dtype, vocab, dim) -> None:
    weights = [1.0, 0.0, 0.25]
    inputs = make_inputs(vocab=vocab, dim=dim, dtype=dtype, seed=vocab)
    result = run(exit_head_loss, *inputs, weights, chunk_size=16)
    slack = 0 if dtype == torch.float32 else near_ties(*inputs[:3], inputs[3], margin=0.1)
    check(result, plain_truth(*inputs, weights), weights, dtype, f"{backend} {dtype}", slack)


def test_bf16_with_many_chunks_head_gradient_against_float64(backend) -> None:
    """bfloat16 at the scale of the question's chunking: 32 chunks of 8 rows in each of 2 layers,
    the head gradient summed over all of them. Summed in float32 (on CUDA by addmm with
    out_dtype, elsewhere product then add), its error against float64 must stay that of a
    few bfloat16 roundings of each chunk's product (the table's 2**-5), not grow with the
    number of chunks as a bfloat16 accumulator would (~64 x 2**-9 here); the norm weight's
    gradient is summed in float32 unrounded across chunks too."""
    weights = [0.6, 0.4]
    inputs = make_inputs(layers=2, leading=(256,), dim=64, vocab=96, dtype=torch.bfloat16, seed=32)
    result = run(exit_head_loss, *inputs, weights, chunk_size=8)
    truth = plain_truth(*inputs, weights)
    _, grad_tol = TOLERANCES[torch.bfloat16]
    assert_close("d head_weight", result["head_weight"], truth["head_weight"], grad_tol)
    assert_close("d norm_weight", result["norm_weight"], truth["norm_weight"], grad_tol)
    for i in range(2):
        assert_close(f"d hidden[{i}]", result["hidden"][i], truth["hidden"][i], grad_tol)


def test_head_gradient_update_accumulates_in_the_accumulator_dtype() -> None:
    """On the CPU (no addmm with out_dtype there) a bfloat16 chunk's product is added to the
    float32 accumulator; a float32 chunk goes through addmm_ in place."""
    module = importlib.import_module("ease_kernels.exit_head_loss")
    dz, x = torch.randn(8, 5), torch.randn(8, 3)
    for dtype in (torch.float32, torch.bfloat16):
        dhead = torch.ones(5, 3)
        module._add_head_gradient(dhead, dz.to(dtype), x.to(dtype))
        want = 1 + dz.to(dtype).double().T @ x.to(dtype).double()
        assert_close(f"{dtype} update", dhead, want, 1e-6 if dtype == torch.float32 else 2**-7)
    assert module._default_chunk_size(8192, 2048, 32000, torch.device("cuda")) == 2048
    assert module._default_chunk_size(8192, 2048, 32000, torch.device("cpu")) == 512


def test_triton_loops_over_a_vocabulary_longer_than_one_block(triton_backend, monkeypatch) -> None:
    """V = 4100 > the kernel's 4096 lanes: the online softmax crosses a block boundary.
    The kernel, not the reference, computes every chunk (3 per layer: 8 + 8 + 4 tokens)."""
    module = importlib.import_module("ease_kernels.exit_head_loss")
    launches = []
    launcher = module.cross_entropy_chunk

    def counting(logits, *args):
        launches.append(tuple(logits.shape))
        return launcher(logits, *args)

    monkeypatch.setattr(module, "cross_entropy_chunk", counting)
    weights = [1.0, 2.0]
    inputs = make_inputs(layers=2, leading=(20,), dim=16, vocab=4100)
    inputs[3][:] = torch.tensor([4099, 4096, 5, IGNORE] * 5)  # targets on both sides of the boundary
    result = run(exit_head_loss, *inputs, weights, chunk_size=8)
    check(result, plain_truth(*inputs, weights), weights, torch.float32, "triton V=4100")
    assert launches == [(8, 4100), (8, 4100), (4, 4100)] * 2


def test_bf16_autocast_matches_plain(backend) -> None:
    """Under autocast the products run in bfloat16 (as F.linear's would) on float32 inputs."""
    weights = [0.7, 0.3]
    inputs = make_inputs(layers=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = run(exit_head_loss, *inputs, weights, chunk_size=16)
    slack = near_ties(*inputs[:3], inputs[3], margin=0.1)
    truth = plain_truth(*inputs, weights)
    loss_tol, grad_tol = TOLERANCES[torch.bfloat16]
    assert result["loss"].dtype == torch.float32
    assert_close("autocast loss", result["loss"], truth["loss"], loss_tol)
    assert result["hidden"][0].dtype == torch.float32
    for name in ("norm_weight", "head_weight"):
        assert_close(f"autocast d {name}", result[name], truth[name], grad_tol)
    for i in range(2):
        assert_close(f"autocast d hidden[{i}]", result["hidden"][i], truth["hidden"][i], grad_tol)
    assert (result["correct"] - truth["correct"]).abs().sum() <= slack
    # Not float32 in disguise: bfloat16 products are measurably less exact.
    assert relative_error(result["head_weight"], truth["head_weight"]) > TOLERANCES[torch.float32][1]


# ---------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------
def test_zero_weight_layer_adds_nothing_but_is_still_scored() -> None:
    hidden, norm_weight, head_weight, targets = make_inputs(dtype=torch.float64)
    with_zero = exit_head_loss(hidden, norm_weight, head_weight, targets, [0.5, 0.0, 1.5], EPS, chunk_size=16)
    without = exit_head_loss(
        [hidden[0], hidden[2]], norm_weight, head_weight, targets, [0.5, 1.5], EPS, chunk_size=16
    )
    assert torch.equal(with_zero.loss, without.loss)
    truth = plain_truth(hidden, norm_weight, head_weight, targets, [1.0, 1.0, 1.0])
    assert_close("zero-weight layer's CE", with_zero.layer_losses[1], truth["layer_losses"][1], 1e-12)
    assert int(with_zero.correct[1]) == int(truth["correct"][1])


def test_all_targets_ignored_give_zero_loss_and_zero_gradients(backend) -> None:
    hidden, norm_weight, head_weight, targets = make_inputs(layers=2)
    targets[:] = IGNORE
    result = run(exit_head_loss, hidden, norm_weight, head_weight, targets, [1.0, 1.0], chunk_size=16)
    assert result["loss"].item() == 0.0
    assert result["layer_losses"].tolist() == [0.0, 0.0]
    assert result["correct"].tolist() == [0, 0]
    for grad in (*result["hidden"], result["norm_weight"], result["head_weight"]):
        assert torch.count_nonzero(grad) == 0


def test_backward_scales_by_the_incoming_gradient_and_runs_once() -> None:
    hidden, norm_weight, head_weight, targets = make_inputs(layers=2, dtype=torch.float64)
    weights = [1.0, 0.5]
    truth = plain_truth(hidden, norm_weight, head_weight, targets, weights)
    result = exit_head_loss(hidden, norm_weight, head_weight, targets, weights, EPS, chunk_size=16)
    (3.0 * result.loss).backward(retain_graph=True)
    assert_close("3 x d head_weight", head_weight.grad, 3.0 * truth["head_weight"], 1e-12)
    assert_close("3 x d hidden[1]", hidden[1].grad, 3.0 * truth["hidden"][1], 1e-12)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        result.loss.backward()


def test_without_grad_no_gradient_is_computed() -> None:
    hidden, norm_weight, head_weight, targets = make_inputs(dtype=torch.float64)
    truth = plain_truth(hidden, norm_weight, head_weight, targets, [1.0, 1.0, 1.0])
    with torch.no_grad():
        result = exit_head_loss(hidden, norm_weight, head_weight, targets, [1.0, 1.0, 1.0], EPS)
    assert not result.loss.requires_grad
    assert_close("no-grad loss", result.loss, truth["loss"], 1e-12)
    assert result.correct.tolist() == truth["correct"].tolist()


class _LargestOutputs(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_reference_path_holds_one_chunk_of_logits_at_most() -> None:
    """Through forward and backward no tensor is larger than one chunk of logits (or the
    hidden states and head weight themselves), where the plain computation makes [N, V]."""
    layers, tokens, dim, vocab, chunk = 4, 512, 16, 1000, 64
    hidden, norm_weight, head_weight, targets = make_inputs(layers, (tokens,), dim, vocab)
    with ease_kernels.backend("reference"), _LargestOutputs() as spy:
        result = exit_head_loss(hidden, norm_weight, head_weight, targets, [1.0] * layers, EPS, chunk_size=chunk)
        result.loss.backward()
    assert spy.largest <= max(chunk * vocab, vocab * dim, tokens * dim), spy.largest
    with _LargestOutputs() as plain:
        plain_truth(hidden, norm_weight, head_weight, targets, [1.0] * layers)
    assert plain.largest >= tokens * vocab  # the spy sees what it should


# ---------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------
def _bad(case: str):
    hidden, norm_weight, head_weight, targets = make_inputs(layers=2)
    weights = [1.0, 1.0]
    kwargs = {}
    if case == "targets shape":
        targets = targets[:, :-1]
    elif case == "targets dtype":
        targets = targets.float()
    elif case == "targets range":
        targets = targets.clone()
        targets[1, 3] = 37
    elif case == "negative weight":
        weights = [1.0, -0.5]
    elif case == "nan weight":
        weights = [math.nan, 1.0]
    elif case == "weights length":
        weights = [1.0]
    elif case == "hidden sizes":
        hidden = [hidden[0], torch.randn(2, 25, 23)]
    elif case == "hidden shapes":
        hidden = [hidden[0], torch.randn(2, 24, 24)]
    elif case == "hidden tensor":
        hidden = hidden[0]
    elif case == "norm_weight":
        norm_weight = torch.ones(23)
    elif case == "head_weight":
        head_weight = torch.ones(37)
    elif case == "eps":
        kwargs["eps"] = -1.0
    elif case == "chunk_size":
        kwargs["chunk_size"] = 0
    eps = kwargs.pop("eps", EPS)
    return (hidden, norm_weight, head_weight, targets, weights, eps), kwargs


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("targets shape", ValueError, r"targets must have the hidden states' leading shape \(2, 25\), got \(2, 24\)"),
        ("targets dtype", TypeError, "targets must be an integer tensor"),
        ("targets range", ValueError, r"targets must be ids in \[0, 37\) or ignore_index=-100, got 37"),
        ("negative weight", ValueError, r"layer_weights\[1\] must be a finite number >= 0, got -0.5"),
        ("nan weight", ValueError, r"layer_weights\[0\] must be a finite number >= 0"),
        ("weights length", ValueError, r"layer_weights must have one weight per hidden state \(2\), got 1"),
        ("hidden sizes", ValueError, r"hidden_states\[1\] must be \[\.\.\., 24\]"),
        ("hidden shapes", ValueError, r"hidden_states must share one shape and dtype"),
        ("hidden tensor", TypeError, "hidden_states must be a non-empty list or tuple"),
        ("norm_weight", ValueError, r"norm_weight must have shape \(24,\)"),
        ("head_weight", ValueError, "head_weight must be \\[vocab, hidden\\]"),
        ("eps", ValueError, r"eps must be a finite real number >= 0, got -1.0"),
        ("chunk_size", ValueError, "chunk_size must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(case, error, match) -> None:
    args, kwargs = _bad(case)
    with pytest.raises(error, match=match):
        exit_head_loss(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Inference: the chunked confidence check
# ---------------------------------------------------------------------------------------
def plain_confidence(hidden, norm_weight, head_weight, threshold, criterion="max_prob"):
    x = ease_kernels.rms_norm_reference(hidden, norm_weight, EPS)
    return ease_kernels.exit_confidence_reference(x @ head_weight.T, threshold, criterion)


@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_exit_head_confidence_matches_the_plain_check(backend, threshold, criterion) -> None:
    (hidden, *_), norm_weight, head_weight, _ = make_inputs(layers=1)
    hidden, norm_weight, head_weight = hidden.detach(), norm_weight.detach(), head_weight.detach()
    decision = exit_head_confidence(hidden, norm_weight, head_weight, EPS, threshold, criterion, chunk_size=16)
    want = plain_confidence(hidden, norm_weight, head_weight, threshold, criterion)
    assert decision.confidence.shape == (2, 25) and decision.confidence.dtype == torch.float32
    # float32 throughout; the chunked product may sum in another order than the whole one.
    assert_close("confidence", decision.confidence, want.confidence, 1e-5)
    assert torch.equal(decision.prediction, want.prediction)
    if threshold is None:
        assert decision.exit is None
    else:
        assert torch.equal(decision.exit, want.exit)
        assert 0 < int(decision.exit.sum()) < 50  # the threshold splits the tokens


def test_exit_head_confidence_holds_one_chunk_of_logits_at_most() -> None:
    tokens, dim, vocab, chunk = 512, 16, 1000, 64
    (hidden, *_), norm_weight, head_weight, _ = make_inputs(1, (tokens,), dim, vocab)
    with ease_kernels.backend("reference"), _LargestOutputs() as spy:
        exit_head_confidence(hidden, norm_weight, head_weight, EPS, 0.5, chunk_size=chunk)
    assert spy.largest <= max(chunk * vocab, vocab * dim, tokens * dim), spy.largest


def test_exit_head_confidence_checks_its_arguments() -> None:
    (hidden, *_), norm_weight, head_weight, _ = make_inputs(layers=1)
    with pytest.raises(ValueError, match=r"hidden must be \[\.\.\., 24\]"):
        exit_head_confidence(hidden[..., :-1], norm_weight, head_weight, EPS)
    with pytest.raises(ValueError, match="threshold must be in"):
        exit_head_confidence(hidden, norm_weight, head_weight, EPS, 1.5)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        exit_head_confidence(hidden, norm_weight, head_weight, EPS, chunk_size=-1)
    with pytest.raises(ValueError, match=r"^criterion must be one of 'max_prob', 'margin', got 'entropy'"):
        exit_head_confidence(hidden, norm_weight, head_weight, EPS, criterion="entropy")


# ---------------------------------------------------------------------------------------
# Training: the fused loss follows the plain loss's curve
# ---------------------------------------------------------------------------------------
def test_training_with_the_fused_loss_follows_the_plain_loss_curve(tmp_path_factory) -> None:
    """Two identical deep-supervision models (same seed) trained 20 steps on the built-in
    corpus, one with the fused loss and one with the plain per-layer logits: the loss
    histories agree to 1e-4 relative (float32 on the CPU; the two sum in different orders,
    ~1e-7 per step, and 20 AdamW steps do not amplify that past ~1e-6)."""
    from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config
    from ease.data import load_data

    data = load_data(vocab_size=300, seq_len=16, batch_size=4, cache_dir=tmp_path_factory.mktemp("tokenizer"))
    batches = data.train_batches[:20]
    histories = {}
    for fused in (True, False):
        config = create_deep_supervision_config(3, fused_loss=fused, verbose=False)
        trainer = Trainer(config, data.vocab_size)  # seeds torch: same initial weights
        model = DeepSupervisionTransformer(data.vocab_size, dim=32, num_layers=3, max_seq_len=16)
        optimizer = trainer.create_optimizer(model, base_lr=3e-3)
        histories[fused] = [trainer.train_epoch(model, [batch], optimizer) for batch in batches]
    fused, plain = histories[True], histories[False]
    assert plain[-1] < plain[0] - 0.5  # it trains
    for step, (a, b) in enumerate(zip(fused, plain), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: fused {a:.6f}, plain {b:.6f}"


def test_cross_entropy_kernel_rows_against_float64(triton_backend) -> None:
    """The launcher on one chunk: the gradient (softmax everywhere, the one-hot term written
    at the target after a barrier) and the loss against float64 for targets in the first,
    a middle and the last (partial) block; an ignored row of NaN and inf gets zeros and
    loss 0; -inf logits in a valid row add nothing."""
    module = importlib.import_module("ease_kernels.exit_head_loss")
    vocab = 2 * 4096 + 9
    logits = 3 * torch.randn(5, vocab)
    logits[3, :: 3] = float("nan")
    logits[3, 1] = float("inf")
    logits[4, 100:5000] = float("-inf")
    targets = torch.tensor([0, 5000, vocab - 1, IGNORE, 7])
    z64 = logits.double()
    valid = targets != IGNORE
    lse = torch.logsumexp(z64[valid], dim=-1)
    want_loss = lse - z64[valid].gather(1, targets[valid, None]).squeeze(1)
    want_grad = torch.softmax(z64[valid], dim=-1)
    want_grad[torch.arange(int(valid.sum())), targets[valid]] -= 1
    want_grad *= 0.25
    loss, prediction = module.cross_entropy_chunk(logits, targets, 0.25, IGNORE, True)
    assert_close("loss", loss[valid], want_loss, 1e-5)
    assert loss[3].item() == 0.0
    assert_close("gradient", logits[valid], want_grad, 1e-5)  # float32: rounding of exp only
    assert torch.count_nonzero(logits[3]) == 0
    assert torch.equal(prediction[valid], z64[valid].argmax(-1))


# inf - inf in the NaN row is the point of that row.
test_cross_entropy_kernel_rows_against_float64 = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)(test_cross_entropy_kernel_rows_against_float64)

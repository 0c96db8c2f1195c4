"""A training step under ``torch.compile``: the model, the fused exit-head loss and the
layer-dropout decisions traced as one graph (``fullgraph=True``) on the CPU.

``aot_eager`` traces forward and backward through AOT autograd without generating code,
so it runs where Inductor's compiler may not; the kernels run their reference ops (the
Triton interpreter cannot run under compile). The compiled step must equal the eager one:
float32 sums in another order differ by about 1e-7 relative, so the loss is compared at
``rel=1e-6`` and every gradient at a relative error of ``1e-5`` of its largest entry.
"""

from __future__ import annotations

import pytest
import torch

import ease_kernels
from _builders import random_batches, tiny_model
from ease.training.layer_dropout import LayerDropout
from ease.training.loss import weighted_loss

VOCAB = 64
LAYERS = 3


@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "layer-dropout"])
def test_compiled_training_step_equals_eager_through_the_fused_loss(with_dropout: bool) -> None:
    model = tiny_model(vocab_size=VOCAB, num_layers=LAYERS, num_heads=2, max_seq_len=16, seed=0)
    (batch,) = random_batches(1, rows=3, columns=9, vocab_size=VOCAB)
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[0, :3] = -100  # ignored targets are left out of both
    weights = {1: 0.5, 2: 0.0, 3: 0.7}
    keep = LayerDropout(LAYERS, 0.5, "uniform", seed=2).keep(0, 3) if with_dropout else None

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss, per_layer, correct = fn(model, inputs, targets, weights, True, keep)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), per_layer, correct, grads

    with ease_kernels.backend("reference"):
        eager = step(weighted_loss)
        compiled = step(torch.compile(weighted_loss, backend="aot_eager", fullgraph=True))
    assert compiled[0].item() == pytest.approx(eager[0].item(), rel=1e-6)
    assert list(compiled[1]) == list(eager[1]) == [1, 3]  # zero-weight layers compute nothing
    for layer in (1, 3):
        assert compiled[1][layer].item() == pytest.approx(eager[1][layer].item(), rel=1e-6)
        assert int(compiled[2][layer]) == int(eager[2][layer])
    assert compiled[3].keys() == eager[3].keys()
    for name, grad in eager[3].items():
        error = (compiled[3][name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error < 1e-5, f"{name}: relative error {error.item():.2e}"

"""Tests of ease_kernels.hf_patch: ease kernels inside a Hugging Face Llama model.

The patched model must give the unpatched model's logits and gradients (through the
reference ops, and through the Triton kernels, run by the interpreter on the CPU),
generate the same tokens (KV cache, left padding: per-row positions), and ``unpatch``
must give back the very functions it replaced.

Errors are relative, ``max|out - truth| / max|truth|``, against the unpatched model run
in float64.
"""

import copy
import gc
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
import transformers.models.llama.modeling_llama as modeling_llama  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from _parity import assert_close_rel, relative_error  # noqa: E402
import ease_kernels  # noqa: E402
from ease_kernels import is_patched, patch_llama, unpatch  # noqa: E402

VOCAB = 128
# Where the Triton kernels can run: the CPU through the interpreter (conftest turns it on
# when there is no GPU), CUDA when present.
TRITON_DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
EPS32 = torch.finfo(torch.float32).eps
# Logits (and gradients) of the float32 model against the float64 truth: three blocks of
# float32 arithmetic, a few eps each; the unpatched model measures ~1e-6 on logits. The
# kernels round differently from PyTorch (fused multiply-adds, another summation order)
# but to the same float32 precision.
LOGITS_TOL = 40 * EPS32
# Gradients pass the same ops twice (forward and backward) and sum over batch and positions.
GRAD_TOL = 200 * EPS32


def llama(seed=0, tied=False, scaling=True):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32} if scaling else None,
    )
    return LlamaForCausalLM(config).eval()


def input_ids(batch=2, seq=23, seed=1):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))




def logits_and_grads(model, ids):
    """Logits and the gradient of every parameter of a simple loss on them."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def restores_global_rope():
    """Every test must leave transformers' apply_rotary_pos_emb as it found it."""
    original = modeling_llama.apply_rotary_pos_emb
    yield original
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb is original


@pytest.mark.parametrize(
    "backend, device, tied, scaling",
    [
        ("reference_backend", "cpu", False, True),
        ("reference_backend", "cpu", True, False),
        # The interpreter runs each program in Python: one variant, short sequences.
        *[("triton_backend", device, False, True) for device in TRITON_DEVICES],
    ],
    ids=["reference-untied-llama3", "reference-tied-default",
         *[f"triton-{device}-untied-llama3" for device in TRITON_DEVICES]],
)
def test_patched_logits_and_grads_match_unpatched(request, backend, device, tied, scaling):
    model = llama(tied=tied, scaling=scaling).to(device)
    ids = input_ids(seq=11).to(device)
    truth_logits, truth_grads = logits_and_grads(model.double(), ids)
    model.float()
    with ease_kernels.backend("reference"):
        hf_logits, _ = logits_and_grads(model, ids)
    assert relative_error(hf_logits, truth_logits) <= LOGITS_TOL

    patch_llama(model)
    assert is_patched(model) and modeling_llama.apply_rotary_pos_emb.__ease_kernels__
    request.getfixturevalue(backend)
    logits, grads = logits_and_grads(model, ids)
    assert_close_rel(logits, truth_logits, LOGITS_TOL, "logits")
    for name, grad in grads.items():
        assert_close_rel(grad, truth_grads[name], GRAD_TOL, f"grad of {name}")
    unpatch(model)


@pytest.mark.parametrize(
    "backend, device, new_tokens",
    [("reference_backend", "cpu", 12), *[("triton_backend", device, 4) for device in TRITON_DEVICES]],
)
def test_patched_generation_matches_unpatched(request, backend, device, new_tokens):
    model = llama().to(device)
    # Left padding: the two rows have different positions, so cos/sin come per row.
    ids = input_ids(batch=2, seq=7, seed=4)
    ids[0, :3] = 0
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    ids, mask = ids.to(device), mask.to(device)
    settings = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    expected = model.generate(ids, **settings)
    request.getfixturevalue(backend)
    patch_llama(model)
    try:
        assert model.generate(ids, **settings).tolist() == expected.tolist()
    finally:
        unpatch(model)


def test_bfloat16_model(reference_backend):
    model = llama()
    ids = input_ids()
    with torch.no_grad():
        truth = model.double()(ids).logits
        model.to(torch.bfloat16)
        hf_error = relative_error(model(ids).logits, truth)
        patch_llama(model)
        out = model(ids).logits
    unpatch(model)
    assert out.dtype == torch.bfloat16
    # ease rounds once after the weight product, transformers before it: both keep
    # bfloat16 precision, within a small factor of each other.
    assert relative_error(out, truth) <= max(2 * hf_error, 8 * torch.finfo(torch.bfloat16).eps)


def test_norm_keeps_transformers_output_dtype():
    # A float32 weight on bfloat16 input returns float32 in transformers (type promotion).
    model = llama()
    norm = model.model.norm
    x = torch.randn(3, 64).to(torch.bfloat16)
    expected = norm(x)
    patch_llama(model)
    try:
        out = norm(x)
    finally:
        unpatch(model)
    assert out.dtype == expected.dtype == torch.float32
    assert_close_rel(out, expected, torch.finfo(torch.bfloat16).eps, "norm")


def test_unpatch_restores_the_originals(restores_global_rope):
    model = llama()
    norms = [m for m in model.modules() if isinstance(m, modeling_llama.LlamaRMSNorm)]
    assert len(norms) == 2 * 3 + 1
    patch_llama(model)
    assert all("forward" in norm.__dict__ for norm in norms)
    assert modeling_llama.apply_rotary_pos_emb is not restores_global_rope
    assert patch_llama(model) is model  # patching twice changes nothing
    assert unpatch(model) is model
    assert not is_patched(model)
    assert all("forward" not in norm.__dict__ for norm in norms)
    assert all(norm.forward.__func__ is modeling_llama.LlamaRMSNorm.forward for norm in norms)
    assert modeling_llama.apply_rotary_pos_emb is restores_global_rope
    assert unpatch(model) is model  # unpatching an unpatched model changes nothing


def test_global_rope_swap_is_shared_until_the_last_model(restores_global_rope):
    first, second = llama(), llama(seed=1)
    patch_llama(first)
    patch_llama(second)
    unpatch(first)
    assert modeling_llama.apply_rotary_pos_emb is not restores_global_rope
    assert "forward" not in first.model.norm.__dict__ and "forward" in second.model.norm.__dict__
    unpatch(second)
    assert modeling_llama.apply_rotary_pos_emb is restores_global_rope


def test_dropped_patched_model_releases_the_swap(restores_global_rope):
    patch_llama(llama())  # never unpatched: the swap ends with the model
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb is restores_global_rope


def test_deep_copy_of_a_patched_model():
    model = patch_llama(llama())
    copied = copy.deepcopy(model)
    assert not is_patched(copied) and "forward" in copied.model.norm.__dict__
    assert copied.model.norm.forward.__self__ is copied.model.norm  # bound to the copy's own norm
    patch_llama(copied)
    unpatch(model)
    assert is_patched(copied) and modeling_llama.apply_rotary_pos_emb.__ease_kernels__
    unpatch(copied)
    assert "forward" not in copied.model.norm.__dict__


def test_rope_with_heads_in_dimension_2(restores_global_rope):
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)  # (B, T, H, D)
    freqs = torch.randn(2, 5, 8)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    model = patch_llama(llama())
    try:
        patched = modeling_llama.apply_rotary_pos_emb
        for got, want in zip(patched(q, k, cos, sin, unsqueeze_dim=2), restores_global_rope(q, k, cos, sin, 2)):
            assert_close_rel(got, want, 4 * EPS32, "unsqueeze_dim=2")
    finally:
        unpatch(model)


def test_rejects_models_without_llama_modules():
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        patch_llama(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_llama("model")

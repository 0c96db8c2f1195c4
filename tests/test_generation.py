"""Tests of ease.generation: KV cache, confident early exit, self-speculative decoding.

The models are tiny and random, with weights drawn wider than the default initialisation
(std 0.3) so that greedy outputs vary from token to token and exit-head confidences spread
between about 0.1 and 0.6: thresholds in that range make tokens exit at different layers.
"""

import functools

import numpy as np
import pytest
import torch

from _builders import tiny_model
import ease_kernels
from ease import DeepSupervisionTransformer, StandardTransformer, TrainingConfig
from ease.generation import GenerationOutput, KVCache, generate
from ease.generation.sampling import Sampler
from ease.exits import ExitRule
from ease.validation import ArgumentTypeError

VOCAB = 50
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2]]



def random_model(cls=DeepSupervisionTransformer, num_layers=4, seed=0, **kwargs):
    options = dict(max_seq_len=48, tie_embeddings=False, num_kv_heads=2) | kwargs
    return tiny_model(cls, VOCAB, 32, num_layers, seed=seed, weight_std=0.3, eval_mode=True, **options)


@torch.no_grad()
def full_forward_greedy(model, prompt, steps):
    """Greedy decoding by full forward passes over the growing sequence, no cache."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        logits = model(ids, exit_layers=[model.num_layers])[model.num_layers]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


@torch.no_grad()
def early_exit_reference(model, prompt, steps, threshold, min_exit_layer=1, score=None):
    """One row, one position at a time, from the definition, with per-layer key/value lists.

    The prompt runs at full depth; its last position and every generated position exit at
    the first layer ``l >= min_exit_layer`` (``l < L``) whose confidence reaches the
    threshold; a position that exits at ``l`` gets keys and values for layers ``j > l``
    from ``norm_j(h_l)`` through layer ``j``'s own projections. ``score(logits, hidden,
    previous, layer)`` is the exit criterion's score (default: the top-1 probability).
    """
    if score is None:
        score = lambda logits, hidden, previous, layer: ease_kernels.exit_confidence(logits).confidence  # noqa: E731
    num_layers = model.num_layers
    keys = [[] for _ in range(num_layers)]
    values = [[] for _ in range(num_layers)]
    sequence, exits = list(prompt), []

    def kv(block, hidden, position):
        cos, sin = model.rope_cos[position : position + 1], model.rope_sin[position : position + 1]
        return block.attention.project_qkv(block.attention_norm(hidden), cos, sin)

    for position in range(len(prompt) + steps - 1):
        x = model.embed(torch.tensor([[sequence[position]]]))
        decides = position >= len(prompt) - 1
        skipping = decides and position >= len(prompt)  # prompt positions always run every block
        choice = None
        for index, block in enumerate(model.layers):
            layer = index + 1
            if choice is not None and skipping:
                _, k, v = kv(block, hidden_at_exit, position)
                keys[index].append(k)
                values[index].append(v)
                continue
            before = x
            q, k, v = kv(block, x, position)
            keys[index].append(k)
            values[index].append(v)
            k_all, v_all = torch.cat(keys[index], 1), torch.cat(values[index], 1)
            mask = torch.ones(1, 1, 1, k_all.shape[1], dtype=torch.bool)
            h = x + block.attention.attend(q, k_all, v_all, mask)
            x = h + block.ffn(block.ffn_norm(h))
            if decides and choice is None and threshold is not None and min_exit_layer <= layer < num_layers:
                logits = model.exit_head(x[0, 0])
                if score(logits, x[0, 0], before[0, 0], layer) >= threshold:
                    choice = (int(logits.argmax()), layer)
                    hidden_at_exit = x
        if decides:
            if choice is None:
                choice = (int(model.exit_head(x[0, 0]).argmax()), num_layers)
            sequence.append(choice[0])
            exits.append(choice[1])
    return sequence[len(prompt) :], exits


# ---------------------------------------------------------------------------------------
# Full depth
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [StandardTransformer, DeepSupervisionTransformer])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_cached_greedy_equals_uncached_full_forward(cls, num_kv_heads):
    model = random_model(cls, num_kv_heads=num_kv_heads)
    for prompt in PROMPTS[:2]:
        out = model.generate(torch.tensor([prompt]), 12)
        assert out.new_tokens[0].tolist() == full_forward_greedy(model, prompt, 12)
        assert out.exit_layers.eq(model.num_layers).all()
        assert len(set(out.new_tokens[0].tolist())) > 2, "the test model should not just repeat a token"


def test_output_layout():
    model = random_model()
    out = model.generate([[1, 2, 3], [4]], 5)
    assert isinstance(out, GenerationOutput)
    assert out.tokens.shape == (2, 3 + 5) and out.new_tokens.shape == out.exit_layers.shape == (2, 5)
    assert out.prompt_lengths == [3, 1] and out.num_layers == 4
    assert out.tokens[0, :3].tolist() == [1, 2, 3]
    assert out.tokens[1, :3].tolist() == [0, 0, 4]  # left padding with pad_token_id
    assert torch.equal(out.tokens[:, 3:], out.new_tokens)
    assert [s.tolist() for s in out.sequences()] == [[1, 2, 3] + out.new_tokens[0].tolist(), [4] + out.new_tokens[1].tolist()]
    assert out.mean_exit_layer == 4.0
    # Full depth: every token after the first costs all four blocks.
    assert out.block_evaluations == 2 * 4 * 4
    out.new_tokens[0, 0] = 7  # ordinary tensors, not inference tensors


def test_zero_new_tokens_and_one_dimensional_prompt():
    model = random_model()
    out = model.generate(torch.tensor([1, 2, 3]), 0)
    assert out.tokens.tolist() == [[1, 2, 3]] and out.new_tokens.shape == (1, 0)
    assert out.mean_exit_layer != out.mean_exit_layer  # NaN: no token
    assert model.generate([1, 2, 3], 4).new_tokens.tolist() == model.generate(torch.tensor([[1, 2, 3]]), 4).new_tokens.tolist()


def test_prompt_and_generation_may_fill_max_seq_len():
    model = random_model(max_seq_len=16)
    prompt = list(range(10))
    out = model.generate([prompt], 6)
    assert out.new_tokens[0].tolist() == full_forward_greedy(model, prompt, 6)
    assert model.generate([prompt], 6, draft_layers=2, num_draft_tokens=5).new_tokens.tolist() == out.new_tokens.tolist()


def test_a_prompt_of_max_seq_len_tokens_still_gets_one_new_token():
    """The last new token is never fed back, so it needs no position: P + N - 1 <= max_seq_len."""
    model = random_model(max_seq_len=16)
    prompt = list(range(1, 17))
    assert model.generate([prompt], 1).new_tokens[0].tolist() == full_forward_greedy(model, prompt, 1)
    assert model.generate([prompt], 1, draft_layers=2).new_tokens[0].tolist() == full_forward_greedy(model, prompt, 1)
    out = model.generate([prompt], 1, routing_threshold=0.3)
    assert (out.new_tokens[0].tolist(), out.token_exit_layers[0].tolist()) == early_exit_reference(model, prompt, 1, 0.3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([prompt], 2)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([prompt + [1]], 1)


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 8])
def test_self_speculation_at_the_length_limit_stays_inside_the_rope_tables(num_draft_tokens):
    """Prompts of 10 tokens + 7 new in max_seq_len=16: a last draft would sit at position 16.

    CacheSlots refuses positions past max_seq_len, so reaching them fails the test; with 8
    draft tokens the first round already drafts up to the last new token.
    """
    model = random_model(max_seq_len=16)
    prompts = [list(range(3, 13)), [5, 9, 2], [7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]
    full = model.generate(prompts, 7)
    for row, prompt in enumerate(prompts):
        assert full.new_tokens[row].tolist() == full_forward_greedy(model, prompt, 7)
    for draft_threshold in (None, 0.3):
        spec = model.generate(prompts, 7, draft_layers=2, num_draft_tokens=num_draft_tokens,
                              draft_threshold=draft_threshold)
        assert torch.equal(spec.new_tokens, full.new_tokens)
        alone = model.generate([prompts[0]], 7, draft_layers=2, num_draft_tokens=num_draft_tokens,
                               draft_threshold=draft_threshold)
        assert torch.equal(alone.new_tokens[0], full.new_tokens[0])
    sampled = model.generate(prompts, 7, temperature=1.0, seed=0, draft_layers=2, num_draft_tokens=num_draft_tokens)
    assert sampled.new_tokens.shape == (3, 7)


def test_mode_is_restored_and_dropout_is_off():
    model = random_model(dropout=0.5).train()
    first = model.generate([PROMPTS[0]], 8).new_tokens
    assert model.training
    assert torch.equal(first, model.generate([PROMPTS[0]], 8).new_tokens)
    model.eval()
    assert first[0].tolist() == full_forward_greedy(model, PROMPTS[0], 8)


# ---------------------------------------------------------------------------------------
# Early exit
# ---------------------------------------------------------------------------------------
def test_threshold_none_is_full_depth():
    model = random_model()
    full = model.generate([PROMPTS[0]], 10)
    assert full.exit_layers.eq(4).all()
    assert full.new_tokens[0].tolist() == full_forward_greedy(model, PROMPTS[0], 10)


def test_unreachable_threshold_is_full_depth():
    model = random_model()
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (4, 30)))
    assert max(float(ease_kernels.exit_confidence(l).confidence.max()) for l in logits.values()) < 0.999
    for prompt in PROMPTS[:2]:
        out = model.generate([prompt], 10, routing_threshold=1.0)
        assert out.exit_layers.eq(4).all()
        assert out.new_tokens[0].tolist() == full_forward_greedy(model, prompt, 10)


@pytest.mark.parametrize("min_exit_layer", [1, 2, 3])
def test_tiny_threshold_exits_every_token_at_min_exit_layer(min_exit_layer):
    model = random_model()
    out = model.generate(PROMPTS, 8, routing_threshold=1e-9, min_exit_layer=min_exit_layer)
    assert out.exit_layers.eq(min_exit_layer).all()
    assert out.mean_exit_layer == min_exit_layer
    # Every token after the first runs exactly min_exit_layer blocks.
    assert out.block_evaluations == len(PROMPTS) * 7 * min_exit_layer
    for row, prompt in enumerate(PROMPTS):
        tokens, _ = early_exit_reference(model, prompt, 8, 1e-9, min_exit_layer)
        assert out.new_tokens[row].tolist() == tokens


def test_deeper_blocks_do_not_run_after_an_exit():
    model = random_model()
    ran = []

    def counting(method, number):
        def run(*args, **kwargs):
            ran.append(number)
            return method(*args, **kwargs)

        return run

    for number, block in enumerate(model.layers, start=1):
        block.forward = counting(block.forward, number)
    model.generate([PROMPTS[0]], 4, routing_threshold=1e-9)
    # The prompt runs every block once; the 3 later tokens run block 1 only.
    assert ran == [1, 2, 3, 4] + [1, 1, 1]


@pytest.mark.parametrize("threshold, min_exit_layer", [(0.2, 1), (0.3, 1), (0.25, 2)])
def test_early_exit_matches_the_uncached_definition(threshold, min_exit_layer):
    model = random_model()
    batch = model.generate(PROMPTS, 14, routing_threshold=threshold, min_exit_layer=min_exit_layer)
    seen_layers = set()
    for row, prompt in enumerate(PROMPTS):
        tokens, exits = early_exit_reference(model, prompt, 14, threshold, min_exit_layer)
        assert batch.new_tokens[row].tolist() == tokens, f"row {row}"
        assert batch.exit_layers[row].tolist() == exits, f"row {row}"
        seen_layers.update(exits)
    assert len(seen_layers) >= 3, f"tokens should exit at several layers, got {sorted(seen_layers)}"
    assert min(seen_layers) >= min_exit_layer
    assert batch.block_evaluations == int(batch.exit_layers[:, 1:].sum())


def test_state_propagation_fills_skipped_layers_from_the_exited_state():
    """After an exit at layer 1, layers 2..L hold K/V computed from h_1, written in the cache."""
    from ease.generation import CacheSlots
    from ease.generation.early_exit import StatePropagation

    model = random_model()
    cache = KVCache.for_model(model, 2, 8)
    hidden = torch.randn(2, 32)
    slots = CacheSlots.shared(model, 5, 1)
    with torch.no_grad():
        StatePropagation(model)(cache, hidden, 1, slots)
        for index in range(1, 4):
            block = model.layers[index]
            _, k, v = block.attention.project_qkv(block.attention_norm(hidden[:, None]), slots.cos, slots.sin)
            torch.testing.assert_close(cache.keys[index, :, 5], k[:, 0])
            torch.testing.assert_close(cache.values[index, :, 5], v[:, 0])
    assert cache.keys[0].abs().sum() == 0 and cache.keys[:, :, :5].abs().sum() == 0


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_state_propagation_fill_equals_one_call_per_exit_layer(per_row):
    """fill (every row of a step at once, rows exiting at different layers or not at all)
    writes what one __call__ per exit layer writes, and leaves the layers a row ran alone."""
    from ease.generation import CacheSlots
    from ease.generation.early_exit import StatePropagation

    model = random_model()
    propagate = StatePropagation(model)
    hidden = torch.randn(4, 32)
    layers = torch.tensor([1, 3, 4, 2])  # 4 = num_layers: row 2 did not exit
    if per_row:
        slots = CacheSlots.per_row(model, torch.tensor([[5], [3], [6], [4]]), None, 7)
    else:
        slots = CacheSlots.shared(model, 5, 1)
    expected, got = KVCache.for_model(model, 4, 8), KVCache.for_model(model, 4, 8)
    for cache in (expected, got):
        cache.keys.normal_(generator=torch.Generator().manual_seed(0))
        cache.values.normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in (1, 2, 3):
            rows = (layers == layer).nonzero().squeeze(1)
            propagate(expected, hidden[rows], layer, slots.select(rows))
        propagate.fill(got, hidden, layers, 1, slots)
    # One product over all rows instead of one per exit layer: equal up to the matmul's rounding.
    torch.testing.assert_close(got.keys, expected.keys)
    torch.testing.assert_close(got.values, expected.values)
    for row, layer in enumerate(layers.tolist()):  # the layers a row ran are left as they were
        assert torch.equal(got.keys[:layer, row], expected.keys[:layer, row])


def test_standard_transformer_can_exit_early_too():
    model = random_model(StandardTransformer)
    out = model.generate([PROMPTS[0]], 6, routing_threshold=0.3)
    tokens, exits = early_exit_reference(model, PROMPTS[0], 6, 0.3)
    assert out.new_tokens[0].tolist() == tokens and out.exit_layers[0].tolist() == exits


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"routing_threshold": 0.3},
        {"routing_threshold": 0.25, "min_exit_layer": 2},
        {"draft_layers": 1, "num_draft_tokens": 3},
        {"draft_layers": 2, "num_draft_tokens": 5},
        {"draft_layers": 2, "num_draft_tokens": 5, "draft_threshold": 0.3},
    ],
    ids=["full", "exit-0.3", "exit-0.25-min2", "spec-1x3", "spec-2x5", "spec-2x5-adaptive"],
)
def test_batch_equals_each_prompt_alone(options):
    model = random_model()
    batch = model.generate(PROMPTS, 12, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate([prompt], 12, **options)
        assert batch.new_tokens[row].tolist() == alone.new_tokens[0].tolist(), f"row {row}"
        assert batch.exit_layers[row].tolist() == alone.exit_layers[0].tolist(), f"row {row}"


@pytest.mark.parametrize(
    "options",
    [{"routing_threshold": 0.3}, {"draft_layers": 2, "num_draft_tokens": 3, "draft_threshold": 0.3}],
    ids=["exit", "spec"],
)
def test_batch_of_equal_length_prompts_equals_each_alone(options):
    """Rows sharing positions take the shared-slot paths (rows leaving or finishing apart)."""
    model = random_model()
    prompts = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3], [2, 3, 8, 4]])
    batch = model.generate(prompts, 12, **options)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 12, **options)
        assert torch.equal(batch.new_tokens[row], alone.new_tokens[0]), f"row {row}"
        assert torch.equal(batch.exit_layers[row], alone.exit_layers[0]), f"row {row}"
    assert len(set(batch.exit_layers.flatten().tolist())) > 1


def test_padded_tensor_with_attention_mask_equals_list_of_prompts():
    model = random_model()
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):  # left padding, as Hugging Face tokenizers give
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    a = model.generate(ids, 6, routing_threshold=0.3, attention_mask=mask)
    b = model.generate(PROMPTS, 6, routing_threshold=0.3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)


# ---------------------------------------------------------------------------------------
# Self-speculative decoding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [StandardTransformer, DeepSupervisionTransformer])
@pytest.mark.parametrize("draft_layers, num_draft_tokens", [(1, 1), (1, 4), (2, 3), (3, 2), (3, 8)])
def test_self_speculative_greedy_equals_full_depth_greedy(cls, draft_layers, num_draft_tokens):
    model = random_model(cls)
    full = model.generate(PROMPTS, 15)
    spec = model.generate(PROMPTS, 15, draft_layers=draft_layers, num_draft_tokens=num_draft_tokens)
    assert torch.equal(spec.new_tokens, full.new_tokens)
    assert set(spec.exit_layers.unique().tolist()) <= {draft_layers, model.num_layers}
    assert 0 <= spec.accepted_draft_tokens <= spec.draft_tokens
    assert int(spec.exit_layers.eq(draft_layers).sum()) == spec.accepted_draft_tokens
    assert spec.new_tokens[0].tolist() == full_forward_greedy(model, PROMPTS[0], 15)


@pytest.mark.parametrize("draft_threshold", [1e-9, 0.2, 0.3, 0.5, 1.0])
def test_adaptive_drafting_is_lossless(draft_threshold):
    model = random_model()
    full = model.generate(PROMPTS, 15)
    spec = model.generate(PROMPTS, 15, draft_layers=2, num_draft_tokens=6, draft_threshold=draft_threshold)
    assert torch.equal(spec.new_tokens, full.new_tokens)
    assert int(spec.exit_layers.eq(2).sum()) == spec.accepted_draft_tokens <= spec.draft_tokens
    fixed = model.generate(PROMPTS, 15, draft_layers=2, num_draft_tokens=6)
    if draft_threshold == 1e-9:  # every draft is confident enough: the same as fixed drafting
        assert spec.draft_tokens == fixed.draft_tokens
    elif draft_threshold == 1.0:  # no draft is: every round is one full-depth token
        assert spec.draft_tokens == 0 and spec.block_evaluations == len(PROMPTS) * 14 * 4
    else:
        assert 0 < spec.draft_tokens < fixed.draft_tokens


def test_self_speculative_accepts_drafts_of_a_draft_equal_to_the_model():
    """When the deeper blocks change nothing, the draft is the model: every draft is accepted."""
    model = random_model()
    with torch.no_grad():
        for block in model.layers[2:]:
            block.attention.out_proj.weight.zero_()
            block.ffn.down_proj.weight.zero_()
    # The first token comes from the prompt; then two rounds of 4 accepted drafts + 1.
    spec = model.generate([PROMPTS[0]], 11, draft_layers=2, num_draft_tokens=4)
    assert spec.draft_tokens == 8 and spec.accepted_draft_tokens == 8
    assert spec.new_tokens.tolist() == model.generate([PROMPTS[0]], 11).new_tokens.tolist()


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = random_model()
    a = model.generate(PROMPTS, 10, temperature=1.0, top_k=10, seed=3)
    b = model.generate(PROMPTS, 10, temperature=1.0, top_k=10, seed=3)
    c = model.generate(PROMPTS, 10, temperature=1.0, top_k=10, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = model.generate(PROMPTS, 10)
    for options in ({}, {"draft_layers": 2}, {"draft_layers": 2, "draft_threshold": 0.3}):
        assert torch.equal(model.generate(PROMPTS, 10, temperature=0.7, top_k=1, seed=0, **options).tokens, greedy.tokens)
    exit_greedy = model.generate(PROMPTS, 10, routing_threshold=0.3)
    exit_top1 = model.generate(PROMPTS, 10, routing_threshold=0.3, temperature=2.0, top_k=1, seed=0)
    assert torch.equal(exit_top1.tokens, exit_greedy.tokens)
    assert torch.equal(exit_top1.exit_layers, exit_greedy.exit_layers)


def test_speculative_sampling_keeps_the_full_model_distribution():
    """The first token out of one verification is distributed as the full model's p.

    200,000 independent rows of one draft step: the token is the draft when accepted,
    else the resampled one. Each probability is estimated with standard error at most
    sqrt(0.25 / 200000) ~ 0.0011, so 0.006 is over five standard errors.
    """
    torch.manual_seed(0)
    vocab, rows = 6, 200_000
    draft_logits = torch.randn(vocab) * 1.5
    full_logits = torch.randn(2, vocab) * 1.5
    sampler = Sampler(1.0, None, torch.Generator().manual_seed(1))
    q = draft_logits.softmax(-1)
    drafted = torch.multinomial(q, rows, replacement=True, generator=torch.Generator().manual_seed(2))[:, None]
    accepted, next_token = sampler.verify(
        drafted, draft_logits.expand(rows, 1, vocab), full_logits.expand(rows, 2, vocab)
    )
    first = torch.where(accepted > 0, drafted[:, 0], next_token)
    observed = torch.bincount(first, minlength=vocab).double() / rows
    torch.testing.assert_close(observed, full_logits[0].softmax(-1).double(), atol=0.006, rtol=0)
    expected_acceptance = torch.minimum(q, full_logits[0].softmax(-1)).sum()
    assert abs(float(accepted.double().mean()) - float(expected_acceptance)) < 0.006
    # Rows that stopped drafting before this draft (usable = 0) take p's own token.
    usable = torch.arange(rows) % 2
    accepted, next_token = sampler.verify(
        drafted, draft_logits.expand(rows, 1, vocab), full_logits.expand(rows, 2, vocab), usable
    )
    assert accepted[usable == 0].eq(0).all()
    first = torch.where(accepted > 0, drafted[:, 0], next_token)
    for part in (usable == 0, usable == 1):
        observed = torch.bincount(first[part], minlength=vocab).double() / int(part.sum())
        torch.testing.assert_close(observed, full_logits[0].softmax(-1).double(), atol=0.009, rtol=0)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match="routing_threshold"):
        random_model().generate([[1, 2]], 3, routing_threshold=threshold)


def test_bad_input_errors():
    model = random_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([list(range(10))], 8)  # 10 + 8 - 1 positions: one too many
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\)"):
        model.generate([[1, 50]], 2)
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.generate(torch.tensor([[-1, 2]]), 2)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(torch.zeros(1, 3), 2)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate("hello", 2)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="no prompt"):
        model.generate([], 2)
    with pytest.raises(TypeError, match="routing_threshold"):
        model.generate([[1]], 2, routing_threshold="0.5")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1]], -1)
    with pytest.raises(ValueError, match="min_exit_layer"):
        model.generate([[1]], 2, routing_threshold=0.5, min_exit_layer=0)
    with pytest.raises(ValueError, match="min_exit_layer"):
        model.generate([[1]], 2, min_exit_layer=5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([[1]], 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="draft_layers"):
        model.generate([[1]], 2, draft_layers=4)
    with pytest.raises(ValueError, match="exclude each other"):
        model.generate([[1]], 2, draft_layers=2, routing_threshold=0.5)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        model.generate([[1]], 2, draft_layers=2, num_draft_tokens=0)
    with pytest.raises(ValueError, match="draft_threshold"):
        model.generate([[1]], 2, draft_layers=2, draft_threshold=0.0)
    with pytest.raises(ValueError, match="draft_threshold needs draft_layers"):
        model.generate([[1]], 2, draft_threshold=0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.ones(2, 3, dtype=torch.long), 2, attention_mask=torch.ones(2, 4))


def test_numpy_scalars_are_accepted_like_python_numbers():
    model = random_model()
    cases = [
        ({"routing_threshold": 0.25, "min_exit_layer": 2},
         {"routing_threshold": np.float64(0.25), "min_exit_layer": np.int32(2)}),
        ({"draft_layers": 2, "num_draft_tokens": 3, "draft_threshold": 0.3},
         {"draft_layers": np.int64(2), "num_draft_tokens": np.int16(3), "draft_threshold": np.float64(0.3)}),
        ({"temperature": 1.0, "top_k": 10, "seed": 3, "pad_token_id": 7},
         {"temperature": np.float32(1.0), "top_k": np.int64(10), "seed": np.uint32(3), "pad_token_id": np.int8(7)}),
    ]
    for python, numpy in cases:
        a = model.generate(PROMPTS, 6, **python)
        b = model.generate(PROMPTS, np.int64(6), **numpy)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_exit_layers, b.token_exit_layers)
    ids = [[np.int64(t) for t in PROMPTS[0]]]  # a prompt of numpy ids
    assert torch.equal(model.generate(ids, 4).tokens, model.generate([PROMPTS[0]], 4).tokens)


@pytest.mark.parametrize(
    "name, value",
    [("max_new_tokens", True), ("routing_threshold", True), ("min_exit_layer", True), ("temperature", False),
     ("top_k", True), ("draft_layers", True), ("num_draft_tokens", True), ("draft_threshold", True),
     ("seed", True), ("pad_token_id", False)],
)
def test_bools_are_refused(name, value):
    """A bool is never a number: each is an ArgumentTypeError (a TypeError and a ValueError)."""
    options = {"max_new_tokens": 3}
    if name in ("num_draft_tokens", "draft_threshold"):
        options["draft_layers"] = 2
    options[name] = value
    with pytest.raises(ArgumentTypeError, match=name) as error:
        generate(random_model(), [[1, 2]], **options)
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)


def test_bad_arguments_get_the_messages_of_the_other_entry_points():
    model = random_model()

    def message(call):
        with pytest.raises(ValueError) as error:
            call()
        return str(error.value)

    assert message(lambda: model.generate([[1]], 2, routing_threshold=1.5)) == message(
        lambda: TrainingConfig(routing_threshold=1.5)
    )
    assert message(lambda: model.generate([[1]], 2, routing_threshold="0.5")) == message(
        lambda: TrainingConfig(routing_threshold="0.5")
    )
    assert message(lambda: model.generate([[1]], 2, min_exit_layer=0)) == message(
        lambda: TrainingConfig(min_exit_layer=0)
    )
    assert message(lambda: model.generate([[1]], 2, min_exit_layer=5)) == message(
        lambda: ExitRule.for_model(model, None, 5)
    )
    assert message(lambda: model.generate([[1]], 2, seed=-1)) == message(lambda: TrainingConfig(seed=-1))


def test_cache_and_slots_are_usable_as_exported():
    """A caller can hold a KVCache and run the blocks over it with public CacheSlots."""
    from ease import CacheSlots, KVCache as ExportedCache

    model = random_model()
    prompt = torch.tensor([PROMPTS[2]])
    cache = ExportedCache.for_model(model, 1, 12)
    assert cache.max_len == 12 and cache.keys.shape == (4, 1, 12, 2, model.config.head_dim)

    def run(ids, slots):
        x = model.embed(ids)
        for layer, block in enumerate(model.layers, start=1):
            x = block(x, slots.cos, slots.sin, functools.partial(cache.update, layer, slots),
                      slots.attn_mask, slots.is_causal)
        return model.exit_head(x[:, -1])

    with torch.no_grad():
        sequence = prompt
        logits = run(prompt, CacheSlots.shared(model, 0, prompt.shape[1]))
        for _ in range(4):  # greedy, one fed-back token per step
            token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], 1)
            logits = run(token, CacheSlots.shared(model, sequence.shape[1] - 1, 1))
    expected = model.generate(prompt, 5).new_tokens
    assert torch.equal(torch.cat([sequence[:, prompt.shape[1]:], logits.argmax(-1, keepdim=True)], 1), expected)
    with pytest.raises(ValueError, match="max_seq_len"):
        CacheSlots.shared(model, 40, 9)  # positions 40..48 of a model with max_seq_len=48


def test_module_function_equals_method():
    model = random_model()
    a = generate(model, PROMPTS, 5, routing_threshold=0.3)
    b = model.generate(PROMPTS, 5, routing_threshold=0.3)
    assert torch.equal(a.tokens, b.tokens)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
def test_generation_with_triton_kernels_matches_reference(triton_backend):
    """The kernels (interpreter on the CPU) drive the same decisions as the reference ops."""
    model = random_model(num_layers=3)
    prompts = [[3, 1, 4], [1, 5]]
    with ease_kernels.backend("reference"):
        expected = [model.generate(prompts, 5, routing_threshold=0.3), model.generate(prompts, 5, draft_layers=1)]
    got = [model.generate(prompts, 5, routing_threshold=0.3), model.generate(prompts, 5, draft_layers=1)]
    for e, g in zip(expected, got):
        assert torch.equal(e.tokens, g.tokens) and torch.equal(e.exit_layers, g.exit_layers)


# ---------------------------------------------------------------------------------------
# Exit criteria
# ---------------------------------------------------------------------------------------
def test_exit_criterion_defaults_to_the_stored_one_and_is_checked():
    from ease.models import ExitSettings

    model = random_model()
    explicit = model.generate(PROMPTS, 8, routing_threshold=0.1, exit_criterion="margin")
    assert not torch.equal(explicit.exit_layers, model.generate(PROMPTS, 8, routing_threshold=0.1).exit_layers)
    model.exit_settings = ExitSettings(exit_criterion="margin")
    stored = model.generate(PROMPTS, 8, routing_threshold=0.1)
    assert torch.equal(stored.tokens, explicit.tokens) and torch.equal(stored.exit_layers, explicit.exit_layers)
    with pytest.raises(ValueError, match="exit_criterion must be one of"):
        model.generate(PROMPTS, 2, routing_threshold=0.5, exit_criterion="entropy")
    with pytest.raises(ValueError, match="needs the model's exit classifier"):
        model.generate(PROMPTS, 2, routing_threshold=0.5, exit_criterion="classifier")


# ---------------------------------------------------------------------------------------
# Batched early exit: the whole batch rides through a block while any row is active
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compact_fraction", [0.0, 0.5, 1.0], ids=["never-gather", "gather-half", "always-gather"])
@pytest.mark.parametrize("criterion, threshold", [("max_prob", 0.25), ("margin", 0.1), ("saturation", 0.9)])
def test_batched_early_exit_matches_the_definition_however_rows_are_gathered(
    monkeypatch, compact_fraction, criterion, threshold
):
    """Rows that exited ride along (never-gather), are dropped at once (always-gather) or
    once few are left; their skipped layers' cache must still come from state propagation."""
    import torch.nn.functional as F
    from ease.generation import early_exit

    monkeypatch.setattr(early_exit, "COMPACT_FRACTION", {"cpu": compact_fraction})
    model = random_model()
    scores = {
        "max_prob": lambda logits, hidden, previous, layer: ease_kernels.exit_confidence(logits).confidence,
        "margin": lambda logits, hidden, previous, layer: ease_kernels.exit_confidence(logits, criterion="margin").confidence,
        "saturation": lambda logits, hidden, previous, layer: F.cosine_similarity(hidden, previous, dim=-1),
    }
    prompts = PROMPTS + [[7, 7, 1], [4, 4, 4, 4, 2, 1]]
    out = model.generate(prompts, 12, routing_threshold=threshold, exit_criterion=criterion)
    for row, prompt in enumerate(prompts):
        tokens, exits = early_exit_reference(model, prompt, 12, threshold, score=scores[criterion])
        assert out.new_tokens[row].tolist() == tokens, f"row {row}"
        assert out.exit_layers[row].tolist() == exits, f"row {row}"
    assert len(set(out.exit_layers.flatten().tolist())) >= 3
    assert out.block_evaluations == int(out.exit_layers[:, 1:].sum())
    equal = torch.tensor([[3, 1, 4], [5, 9, 2], [6, 5, 3]])  # rows sharing positions: the shared-slot path
    shared = model.generate(equal, 12, routing_threshold=threshold, exit_criterion=criterion)
    for row in range(3):
        alone = model.generate(equal[row : row + 1], 12, routing_threshold=threshold, exit_criterion=criterion)
        assert torch.equal(shared.new_tokens[row], alone.new_tokens[0]) and torch.equal(shared.exit_layers[row], alone.exit_layers[0])


# ---------------------------------------------------------------------------------------
# Adaptive self-speculation: the draft depth chosen per round
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_layers", ["auto", [1, 3], [2]])
@pytest.mark.parametrize("draft_threshold", [None, 0.3])
def test_auto_draft_depth_is_lossless(draft_layers, draft_threshold):
    model = random_model(num_layers=6)
    prompts = PROMPTS + [[7, 7, 1]]
    full = model.generate(prompts, 20)
    spec = model.generate(prompts, 20, draft_layers=draft_layers, num_draft_tokens=4, draft_threshold=draft_threshold)
    assert torch.equal(spec.new_tokens, full.new_tokens)
    depths = {1, 2, 3} if draft_layers == "auto" else set(draft_layers)
    assert set(spec.exit_layers.unique().tolist()) <= depths | {6}
    assert int((spec.exit_layers < 6).sum()) == spec.accepted_draft_tokens <= spec.draft_tokens
    for row, prompt in enumerate(prompts[:2]):
        alone = model.generate([prompt], 20, draft_layers=draft_layers, draft_threshold=draft_threshold)
        assert torch.equal(alone.new_tokens[0], full.new_tokens[row])
    if draft_layers == [2]:  # one candidate: the same rounds as the fixed depth
        fixed = model.generate(prompts, 20, draft_layers=2, num_draft_tokens=4, draft_threshold=draft_threshold)
        assert torch.equal(spec.exit_layers, fixed.exit_layers) and spec.draft_tokens == fixed.draft_tokens


def test_draft_depth_tries_each_candidate_then_keeps_the_most_tokens_per_compute():
    from ease.generation.speculative import DraftDepth, auto_draft_depths

    assert auto_draft_depths(12) == (2, 3, 4, 6) and auto_draft_depths(4) == (1, 2) and auto_draft_depths(2) == (1,)
    chooser = DraftDepth((2, 4), num_layers=12, position_cost=1.0, trials=1)
    assert chooser.round_cost(2, rows=1, drafted=3) == 12 * 4  # c = 1: (position, block) pairs
    assert chooser.choose() == 2
    chooser.record(2, rows=1, drafted=3, tokens=2)  # 2 tokens for 48
    assert chooser.choose() == 4
    chooser.record(4, rows=1, drafted=3, tokens=4)  # 4 tokens for 48
    assert chooser.choose() == 4 and chooser.efficiency() == {2: 2 / 48, 4: 4 / 48}
    cheap = DraftDepth((2,), num_layers=12, position_cost=0.0)
    assert cheap.round_cost(2, rows=8, drafted=3) == 2 * 4 + 10  # draft calls in turn, one verification call


def test_bad_draft_layers_are_named():
    model = random_model()
    for bad in ("deep", [], [0, 2], [4]):
        with pytest.raises(ValueError, match="draft_layers"):
            model.generate([[1, 2]], 3, draft_layers=bad)

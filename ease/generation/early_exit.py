"""Decoding one token per row per step: full depth, or confident early exit with state propagation.

The prompt always runs at full depth (:func:`prefill`). Its first new token, and each
later one, answers at the layer :class:`ease.exits.ExitRule` picks: the first layer
``l`` (``min_exit_layer <= l < num_layers``) whose exit-head confidence reaches the
threshold, else the last (CALM, Schuster et al. 2022). A row that exits at ``l`` takes
its token from layer ``l``; the deeper blocks never run for it. Later tokens still attend
to this position in every layer, so the keys and values of the skipped layers ``j > l``
are filled from the exited hidden state ``h_l`` (:class:`StatePropagation`)::

    k_j = RoPE(W_k^j · norm_j(h_l)),    v_j = W_v^j · norm_j(h_l),

which costs one matrix product for all skipped layers together (no attention, no
feed-forward). Rows of a batch exit independently; deeper blocks run only on the rows
still active, each attending to its own cache row. With no threshold the same loop is
plain full-depth decoding.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import ease_kernels
from ease.exits import ExitRule
from ease_kernels.dispatch import use_triton
from ease.generation.cache import CacheSlots, KVCache
from ease.generation.sampling import Sampler

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder

__all__ = ["StatePropagation", "early_exit_step", "first_token", "generate_early_exit", "prefill", "run_blocks"]


def run_blocks(
    model: EarlyExitDecoder, x: torch.Tensor, slots: CacheSlots, cache: KVCache, first: int, last: int
) -> torch.Tensor:
    """Layers ``first + 1 .. last`` (blocks ``first..last-1``, 0-based) on ``x``
    ``(n, T, dim)`` at ``slots``, through the cache."""
    for index in range(first, last):
        x = model.layers[index](
            x, slots.cos, slots.sin, functools.partial(cache.update, index + 1, slots),
            slots.attn_mask, slots.is_causal,
        )
    return x


def prefill(
    model: EarlyExitDecoder, prompts: list[torch.Tensor], cache: KVCache, every_layer: bool,
    with_embedding: bool = False,
) -> list[torch.Tensor]:
    """Run the (right-padded) prompts at full depth, filling the cache.

    Returns the hidden state ``(B, dim)`` at each row's last prompt position after every
    block (``every_layer``) or after the last block only; ``with_embedding`` puts the
    embedding's state (before block 1) first.
    """
    lengths = [len(p) for p in prompts]
    batch, width = len(prompts), max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long, device=model.device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    rows = torch.arange(batch, device=model.device)
    last = torch.tensor(lengths, device=model.device) - 1
    slots = CacheSlots.shared(model, 0, width)
    x = model.embed(ids)  # (B, P, dim); padding after a prompt is never attended to
    states = [x[rows, last]] if with_embedding else []
    for index in range(model.num_layers):
        x = run_blocks(model, x, slots, cache, index, index + 1)
        if every_layer or index == model.num_layers - 1:
            states.append(x[rows, last])
    return states


class StatePropagation:
    """Keys and values of the skipped layers, computed from an exited hidden state.

    ``norm_j(h) = (h * rstd(h)) * w_j``: the reciprocal RMS is the same for every layer and
    only the scale ``w_j`` differs, so it is folded into layer ``j``'s key/value projection
    (:attr:`~ease.modules.Attention.key_value_weight`) once per call, and the K/V of all
    skipped layers come from one matrix product.
    """

    def __init__(self, model: EarlyExitDecoder) -> None:
        config = model.config
        self.weight = torch.stack(
            [block.attention.key_value_weight * block.attention_norm.weight for block in model.layers]
        )  # (L, 2 * kv_heads * head_dim, dim): rows [k; v] of each layer, scaled by its norm weight
        self.ones = torch.ones(config.dim, dtype=self.weight.dtype, device=self.weight.device)
        self.eps = model.layers[0].attention_norm.eps
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim

    def __call__(self, cache: KVCache, hidden: torch.Tensor, layer: int, slots: CacheSlots) -> None:
        """Fill layers ``layer+1..L`` (1-based) of the cache at ``slots`` (``T = 1``) from
        ``hidden`` ``(n, dim)``, the state after block ``layer``."""
        skipped = self.num_layers - layer
        if skipped == 0:
            return
        n = hidden.shape[0]
        normed = ease_kernels.rms_norm(hidden, self.ones, self.eps)
        kv = F.linear(normed, self.weight[layer:].flatten(0, 1))  # (n, skipped * 2 * kv_heads * head_dim)
        kv = kv.view(n, skipped, 2, self.num_kv_heads, self.head_dim)
        # All skipped layers' heads as the heads of one token, so one RoPE call rotates them;
        # apply_rope also rotates a query, given here as one head of the keys and discarded.
        k = kv[:, :, 0].reshape(n, 1, skipped * self.num_kv_heads, self.head_dim)
        _, k = ease_kernels.apply_rope(k[:, :, :1], k, slots.cos, slots.sin)
        k = k.view(n, skipped, self.num_kv_heads, self.head_dim).transpose(0, 1)
        cache.store_after(layer, slots, k, kv[:, :, 1].transpose(0, 1))

    def fill(self, cache: KVCache, hidden: torch.Tensor, layers: torch.Tensor, first: int, slots: CacheSlots) -> None:
        """Fill the skipped layers of every row of a step in one call: row ``i`` exited at
        ``layers[i]`` (``num_layers``: it did not exit, nothing is written for it) with the
        state ``hidden[i]``; ``first`` is the smallest of ``layers``.

        One product for all rows and all layers after ``first``; the entries a row did run
        (layers up to its own exit) are written back unchanged, so one masked store covers
        rows that exited at different layers. The values written equal :meth:`__call__`'s
        per exit layer up to the product's rounding (a product over another number of rows,
        as batching rows already is)."""
        skipped = self.num_layers - first
        if skipped <= 0:
            return
        n = hidden.shape[0]
        normed = ease_kernels.rms_norm(hidden, self.ones, self.eps)
        kv = F.linear(normed, self.weight[first:].flatten(0, 1)).view(n, skipped, 2, self.num_kv_heads, self.head_dim)
        k = kv[:, :, 0].reshape(n, 1, skipped * self.num_kv_heads, self.head_dim)
        _, k = ease_kernels.apply_rope(k[:, :, :1], k, slots.cos, slots.sin)
        k = k.view(n, skipped, self.num_kv_heads, self.head_dim).transpose(0, 1)
        # Cache index j (0-based) holds layer j + 1, skipped by a row that exited at e iff j >= e.
        skip = torch.arange(first, self.num_layers, device=layers.device)[:, None] >= layers  # (skipped, n)
        cache.store_after_where(first, slots, k, kv[:, :, 1].transpose(0, 1), skip)


def first_token(
    model: EarlyExitDecoder, states: list[torch.Tensor], rule: ExitRule, sampler: Sampler
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and exit layer ``(B,)`` after the prompt, by ``rule`` on the prompt's last states.

    ``states`` holds the state after every block when ``rule`` exits early, else after the
    last block only (see :func:`prefill`); a rule that reads hidden states
    (:attr:`ExitRule.needs_hidden`) also gets the embedding's state first.
    """
    final_logits = model.exit_head(states[-1])  # (B, V)
    if not rule.exits_early:
        layers = torch.full((final_logits.shape[0],), rule.num_layers, dtype=torch.long, device=final_logits.device)
        return sampler.pick(final_logits), layers
    checked = rule.checked_layers
    offset = 1 if rule.needs_hidden else 0  # states[offset + l - 1] is the state after layer l
    logits = model.exit_head(torch.stack(states[offset + checked.start - 1 : offset + checked.stop - 1]))  # (m, B, V)
    exits = torch.stack(
        [
            rule.decide(logits[i], layer, states[offset + layer - 1], states[offset + layer - 2] if offset else None).exit
            for i, layer in enumerate(checked)
        ]
    )  # (m, B)
    layers = rule.first_exit(exits)  # (B,)
    exited = layers < rule.num_layers
    rows = torch.arange(logits.shape[1], device=logits.device)
    chosen = torch.where(exited[:, None], logits[torch.where(exited, layers - checked.start, 0), rows], final_logits)
    return sampler.pick(chosen), layers


# The fraction of a batch's rows still active at or below which the batch is gathered to
# those rows for its remaining blocks (see early_exit_step), per device type. On the CPU
# (12 layers, dim 128, batch 8, one thread) a block on 8 rows took 211 us, on 4 gathered rows
# 188 us (their cache reads copied), on 2 164 us, on 1 144 us: gathering pays at once. On
# 2026-12-01 (a shared, loaded machine, one layer per call, greedy max_prob 0.1) a block on 8
# rows took 738 us, on 5 gathered rows 591, on 3 509, on 1 398; never gathering (0.0) was
# 0.81x always gathering at max_prob 0.1. Against that, each checked layer costs an exit head
# (8 rows 159 us, 3 rows 94) plus the criterion (~60 us), and a step ends early only when
# every row exits: on that model it never did at batch 8, so there early exit cannot beat
# full depth (bench/NOTES.md, 2026-12-02). On a GPU a block on 8 rows costs what it costs on
# 3, and the gather's copies do not pay until few rows are left; 0.25 there is a guess, not a
# measurement.
COMPACT_FRACTION = {"cpu": 1.0}
COMPACT_FRACTION_DEFAULT = 0.25


def early_exit_step(
    model: EarlyExitDecoder,
    tokens: torch.Tensor,
    slots: CacheSlots,
    cache: KVCache,
    rule: ExitRule,
    sampler: Sampler,
    propagate: StatePropagation | None,
    compact_fraction: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Feed ``tokens`` ``(B,)`` at ``slots``; return the next tokens, their exit layers and
    the number of block evaluations spent.

    The whole batch runs through a block while any of its rows is active (still without
    an exit): a product on ``B`` rows costs about what it costs on fewer, and reading the
    cache of a subset of rows would copy it. Rows that exited ride along (their outputs
    are discarded); their cache entries of the skipped layers are written by state
    propagation when the step ends, over whatever the ride-along wrote. The exit rule is
    read on the active rows only. Once at most ``compact_fraction * B`` rows are active
    the batch is gathered to them for the remaining blocks; the step ends as soon as no
    row is active (default: :data:`COMPACT_FRACTION` of the device). The result equals
    running each row alone.

    Greedy decoding of more than one row takes :func:`_greedy_early_exit_step`, the same decisions with a few
    batch-wide operations per layer instead of index lists, one state propagation call and
    one exit-head call per step (at batch 8 on the CPU, per step, the index bookkeeping and
    one propagation call per exit layer had cost more than the blocks the exits saved).
    Sampling keeps this general path, whose random draws (one per group of rows leaving at
    a layer) the outputs depend on.

    ``block_evaluations`` counts the blocks each row needed (its exit layer), not the
    ride-along rows. ``propagate`` fills the skipped layers of an exited row; it may be
    None only when ``rule`` never exits early.
    """
    num_layers = model.num_layers
    batch = tokens.shape[0]
    x = model.embed(tokens)[:, None]  # (B, 1, dim)
    if not rule.exits_early:
        x = run_blocks(model, x, slots, cache, 0, num_layers)
        return sampler.pick(model.exit_head(x[:, 0])), torch.full_like(tokens, num_layers), batch * num_layers
    if compact_fraction is None:
        compact_fraction = COMPACT_FRACTION.get(tokens.device.type, COMPACT_FRACTION_DEFAULT)
    if sampler.greedy and batch > 1:  # one row: the general path has no more ops to save
        return _greedy_early_exit_step(model, x, slots, cache, rule, propagate, int(compact_fraction * batch))
    next_tokens = torch.empty_like(tokens)
    exit_layers = torch.full_like(tokens, num_layers)
    active_rows = None  # (n,) batch rows without an exit yet; None: all of them
    active_in_x = None  # (n,) where they sit in x's rows; None: x holds the active rows only, in order
    active = batch
    compact_at = int(compact_fraction * batch)
    x_slots = slots  # the slots of x's rows
    exited = []  # (layer, hidden (m, dim), batch rows (m,) or None for all): propagated at the end
    spent = 0
    for index in range(num_layers):
        before = x
        x = run_blocks(model, x, x_slots, cache, index, index + 1)
        spent += active
        layer = index + 1
        if not rule.checks(layer):
            continue
        hidden = x[:, 0] if active_in_x is None else x[active_in_x, 0]  # (n, dim), the active rows
        if rule.needs_hidden:
            # Saturation and the classifier decide from hidden states: the exit head's
            # logits are computed for the rows that leave only.
            previous = before[:, 0] if active_in_x is None else before[active_in_x, 0]
            decision = rule.decide(None, layer, hidden, previous)
            logits = None
        else:
            logits = model.exit_head(hidden)  # (n, V)
            decision = rule.decide(logits, layer)
        exits = decision.exit
        leaving_count = int(exits.sum())  # the step's one host synchronisation per layer
        if leaving_count == 0:
            continue
        if leaving_count == active:
            leaving, leaving_hidden = None, hidden
            leaving_logits, prediction = logits, decision.prediction
        else:
            leaving = exits.nonzero().squeeze(1)
            leaving_hidden = hidden[leaving]
            leaving_logits = None if logits is None else logits[leaving]
            prediction = None if logits is None else decision.prediction[leaving]
        token = sampler.pick(model.exit_head(leaving_hidden) if logits is None else leaving_logits, prediction)
        rows = active_rows if leaving is None else (leaving if active_rows is None else active_rows[leaving])
        if rows is None:
            next_tokens, exit_layers = token, exit_layers.fill_(layer)
        else:
            next_tokens[rows] = token
            exit_layers[rows] = layer
        exited.append((layer, leaving_hidden, rows))
        active -= leaving_count
        if active == 0:
            break
        staying = (~exits).nonzero().squeeze(1)
        active_rows = staying if active_rows is None else active_rows[staying]
        active_in_x = staying if active_in_x is None else active_in_x[staying]
        if active <= compact_at:
            x, x_slots, active_in_x = x[active_in_x], slots.select(active_rows), None
    else:
        hidden = x[:, 0] if active_in_x is None else x[active_in_x, 0]
        token = sampler.pick(model.exit_head(hidden))
        if active_rows is None:
            next_tokens = token
        else:
            next_tokens[active_rows] = token
    for layer, hidden, rows in exited:
        propagate(cache, hidden, layer, slots if rows is None else slots.select(rows))
    return next_tokens, exit_layers, spent


def _greedy_early_exit_step(
    model: EarlyExitDecoder,
    x: torch.Tensor,
    slots: CacheSlots,
    cache: KVCache,
    rule: ExitRule,
    propagate: StatePropagation,
    compact_at: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`early_exit_step` for greedy decoding, with few operations per layer.

    Exited rows ride along on the batch's own cache rows (no copies) and the decisions are
    kept as masks over the batch (no index lists): per checked layer, the exit head and the
    criterion on every row of the call; where rows leave, ``torch.where`` keeps each row's
    exit layer, the state it answers from and its token (the argmax of that layer's logits;
    for ``saturation`` and ``classifier``, one exit-head call on the kept states at the
    step's end). One state propagation call at the step's end fills every exited row's
    skipped layers. Once at most ``compact_at`` rows are active the call is gathered to them
    (their cache reads are then copies). The decisions are the general path's (the same
    ops on the same rows' states); the tests check the tokens against each row run alone.
    """
    num_layers = model.num_layers
    batch = x.shape[0]
    active = batch
    by_logits = not rule.needs_hidden  # the token is known at the exit check already
    alive = None  # (n,) bool over x's rows: not exited yet; None: all of them
    state = None  # [exit layer (n,), answering state (n, dim), token (n,) or None] of x's rows
    rows = None  # (n,) the batch rows of x's rows once gathered; None: x holds every row
    kept = None  # the same three, batch-wide, once x is gathered
    x_slots = slots
    first = num_layers  # the earliest exit layer of the step
    spent = 0
    for index in range(num_layers):
        before = x
        x = run_blocks(model, x, x_slots, cache, index, index + 1)
        spent += active
        layer = index + 1
        if not rule.checks(layer):
            continue
        hidden = x[:, 0]
        if rule.needs_hidden:
            exits = rule.decide(None, layer, hidden, before[:, 0]).exit
        else:
            logits = model.exit_head(hidden)
            if rule.criterion == "max_prob" and not use_triton(logits):
                # The reference's ops for the decision alone (its checks and argmax skipped).
                exits = torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= rule.threshold
            else:
                exits = rule.decide(logits, layer).exit
        if alive is not None:
            exits = exits & alive
        leaving = int(exits.sum())  # the step's one host synchronisation per layer
        if leaving == 0:
            continue
        first = min(first, layer)
        token = logits.argmax(-1) if by_logits else None
        if state is None:
            state = [torch.where(exits, layer, num_layers), hidden, token]
        else:
            state[0] = torch.where(exits, layer, state[0])
            state[1] = torch.where(exits[:, None], hidden, state[1])
            if by_logits:
                state[2] = torch.where(exits, token, state[2])
        alive = ~exits if alive is None else alive & ~exits
        active -= leaving
        if active == 0:
            break
        if active <= compact_at and active < x.shape[0]:
            kept = _keep(kept, rows, state)
            keep = alive.nonzero().squeeze(1)
            rows = keep if rows is None else rows[keep]
            x, x_slots = x[keep], slots.select(rows)
            alive, state = None, None
    else:
        hidden = x[:, 0]
        token = model.exit_head(hidden).argmax(-1) if by_logits else None
        if state is None:
            state = [torch.full((x.shape[0],), num_layers, dtype=torch.long, device=x.device), hidden, token]
        else:
            state[1] = torch.where(alive[:, None], hidden, state[1])
            if by_logits:
                state[2] = torch.where(alive, token, state[2])
    exit_layers, answer, tokens = _keep(kept, rows, state)
    if first < num_layers:
        propagate.fill(cache, answer, exit_layers, first, slots)
    if tokens is None:  # saturation, classifier: one exit-head call for every row's token
        tokens = model.exit_head(answer).argmax(-1)
    return tokens, exit_layers, spent


def _keep(kept: list | None, rows: torch.Tensor | None, state: list) -> list:
    """The batch-wide ``[exit layer, answering state, token]`` with those of x's rows
    (the batch rows ``rows``; None: every row) put in."""
    if rows is None:
        return state
    return [None if k is None else k.index_copy(0, rows, v) for k, v in zip(kept, state)]

def generate_early_exit(
    model: EarlyExitDecoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    rule: ExitRule,
    sampler: Sampler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Full depth (``rule`` never exits early) or confident early exit, one token per row per step.

    Returns ``(new_tokens, exit_layers, stats)``: ``(B, max_new_tokens)`` each, and
    ``{"block_evaluations": ...}``. ``max_new_tokens >= 1``.
    """
    device = model.device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    # The last new token is never fed back: the steps feed positions up to longest + N - 2.
    cache = KVCache.for_model(model, batch, longest + max_new_tokens - 1)
    new_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    exit_layers = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    states = prefill(model, prompts, cache, every_layer=rule.exits_early, with_embedding=rule.exits_early and rule.needs_hidden)
    new_tokens[:, 0], exit_layers[:, 0] = first_token(model, states, rule, sampler)
    propagate = StatePropagation(model) if rule.exits_early else None
    same_length = len(set(lengths)) == 1
    first_positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    spent = 0
    for step in range(1, max_new_tokens):
        # The token generated at step - 1 sits at position length + step - 1 of its row.
        if same_length:
            slots = CacheSlots.shared(model, longest + step - 1, 1)
        else:
            slots = CacheSlots.per_row(model, first_positions + (step - 1), None, longest + step)
        new_tokens[:, step], exit_layers[:, step], blocks = early_exit_step(
            model, new_tokens[:, step - 1], slots, cache, rule, sampler, propagate
        )
        spent += blocks
    return new_tokens, exit_layers, {"block_evaluations": spent}

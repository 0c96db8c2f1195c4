"""Autoregressive generation that skips layers: KV cache, confident early exit, self-speculation.

Three ways to produce each new token, all over one preallocated :class:`KVCache`:

- **Full depth** (``routing_threshold=None``): every block runs for every token.
- **Confident early exit** (CALM, Schuster et al. 2022): after block ``l``
  (``min_exit_layer <= l < num_layers``) the shared exit head scores the token and
  :func:`ease_kernels.exit_confidence` decides, per row, whether its top-1 probability
  reaches ``routing_threshold``. A row that exits takes its token from layer ``l``; the
  deeper blocks never run for it. Later tokens still attend to this position in every
  layer, so the keys and values of the skipped layers ``j > l`` are filled from the exited
  hidden state ``h_l`` (state propagation)::

      k_j = RoPE(W_k^j · norm_j(h_l)),    v_j = W_v^j · norm_j(h_l),

  which costs one matrix product for all skipped layers together (no attention, no
  feed-forward). Rows of a batch exit independently; deeper blocks run only on the rows
  still active, each attending to its own cache row.
- **Self-speculative decoding** (LayerSkip, Elhoushi et al. 2024): the first
  ``draft_layers = E`` blocks and the exit head draft ``num_draft_tokens = k`` tokens one by
  one; the full model then verifies them in one pass that takes the drafts' layer-``E``
  hidden states and runs only blocks ``E+1..L`` on them (the draft already wrote the cache
  of blocks ``1..E``). The longest prefix the full model agrees with is kept, plus the full
  model's own next token. With greedy decoding the output equals full-depth greedy
  decoding token for token; with sampling, speculative sampling's accept/resample rule
  (Leviathan et al. 2023) keeps the full model's distribution. Rows of a batch accept
  different numbers of tokens and move on at their own positions. Optionally
  (``draft_threshold``) a row stops drafting at its first draft whose exit confidence is
  below a threshold, so few draft blocks are spent on tokens the full model would reject.

Prompts of different lengths share a batch: row ``b``'s position ``t`` lives in cache slot
``t`` of row ``b``; each row reads only its own first ``position + 1`` slots (a boolean
mask when rows are at different positions), so slots past a row's end never matter.
The prompt itself always runs at full depth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

import ease_kernels

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder

__all__ = ["GenerationOutput", "KVCache", "generate"]


# ---------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        tokens: ``(B, P + N)`` int64: each row's prompt, left-padded with ``pad_token_id``
            to the longest prompt ``P``, followed by its ``N`` new tokens.
        new_tokens: ``(B, N)`` int64, the generated tokens.
        exit_layers: ``(B, N)`` int64, the layer (1..``num_layers``) whose exit head gave
            each new token: ``num_layers`` at full depth; under self-speculation the draft
            depth ``E`` for an accepted draft token and ``num_layers`` for the token the
            full model supplied.
        prompt_lengths: the length of each row's prompt.
        num_layers: the model's depth ``L``.
        block_evaluations: (token position, block) pairs run after the prompt: the
            compute that decoding spent, in units of one block on one token. Full-depth
            decoding spends ``L`` per token after the first.
        draft_tokens: tokens drafted (self-speculation; 0 otherwise).
        accepted_draft_tokens: drafted tokens the full model accepted.
    """

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    exit_layers: torch.Tensor
    prompt_lengths: list[int]
    num_layers: int
    block_evaluations: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def mean_exit_layer(self) -> float:
        """Mean of :attr:`exit_layers` over every new token (NaN when there are none)."""
        if self.exit_layers.numel() == 0:
            return math.nan
        return float(self.exit_layers.double().mean())

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (NaN when nothing was drafted)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else math.nan

    def sequences(self) -> list[torch.Tensor]:
        """Each row's prompt and new tokens, without padding: a list of 1-D int64 tensors."""
        width = self.tokens.shape[1]
        new = self.new_tokens.shape[1]
        return [self.tokens[b, width - new - length :] for b, length in enumerate(self.prompt_lengths)]


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------
@dataclass
class _Slots:
    """The positions one forward call processes, and how attention reads the cache for them.

    Either every row shares the positions ``start .. start + T - 1`` (``positions`` is
    None) or each row has its own ``positions`` ``(n, T)``.

    Attributes:
        rows: ``(n,)`` cache rows of the ``n`` rows in the call; None: all rows, in order.
        positions: ``(n, T)`` per-row positions, or None when shared.
        start: the first shared position (unused with ``positions``).
        kv_len: keys read per row: the largest position + 1.
        cos, sin: RoPE tables, ``(T, D/2)`` shared or ``(n, T, D/2)`` per row.
        attn_mask: boolean, True = attend, ``(T, kv_len)`` or ``(n, 1, T, kv_len)``; None
            when the causal rule or no mask at all is exact.
        is_causal: with no mask: top-left causal (a prompt from position 0) or none (one
            query that may see all ``kv_len`` keys).
    """

    rows: torch.Tensor | None
    positions: torch.Tensor | None
    start: int
    kv_len: int
    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool

    @classmethod
    def shared(cls, model: EarlyExitDecoder, start: int, length: int, rows: torch.Tensor | None = None) -> _Slots:
        """All rows at positions ``start .. start + length - 1``."""
        end = start + length
        mask = None
        if length > 1 and start > 0:
            # Queries at start..end-1 over keys 0..end-1: causal aligned at the bottom right,
            # which SDPA's is_causal (top-left) does not give.
            keys = torch.arange(end, device=model.device)
            mask = keys <= torch.arange(start, end, device=model.device)[:, None]  # (T, S)
        return cls(
            rows, None, start, end, model.rope_cos[start:end], model.rope_sin[start:end], mask, start == 0
        )

    @classmethod
    def per_row(
        cls, model: EarlyExitDecoder, positions: torch.Tensor, rows: torch.Tensor | None, kv_len: int
    ) -> _Slots:
        """Row ``i`` (cache row ``rows[i]``; row ``i`` itself when ``rows`` is None) at
        ``positions[i]``; ``kv_len`` = max position + 1."""
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys <= positions[..., None]).unsqueeze(1)  # (n, 1, T, S)
        return cls(rows, positions, 0, kv_len, model.rope_cos[positions], model.rope_sin[positions], mask, False)

    def select(self, index: torch.Tensor) -> _Slots:
        """The same positions for the rows ``index`` (into this call's rows) only."""
        rows = index if self.rows is None else self.rows[index]
        if self.positions is None:
            return _Slots(rows, None, self.start, self.kv_len, self.cos, self.sin, self.attn_mask, self.is_causal)
        return _Slots(
            rows, self.positions[index], 0, self.kv_len, self.cos[index], self.sin[index],
            self.attn_mask[index], False,
        )


class KVCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Slot ``s`` of row ``b`` holds position ``s`` of sequence ``b``. A slot past a row's
    current position may hold stale values (padding of a shorter prompt, a rejected draft);
    attention never reads it, because each query sees only the slots up to its own position.

    Attributes:
        keys, values: ``(num_layers, batch, max_len, num_kv_heads, head_dim)``; keys are
            stored after RoPE.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model: EarlyExitDecoder, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for ``model``, in its dtype and on its device."""
        config = model.config
        return cls(
            config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim,
            model.embed.weight.dtype, model.device,
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def update(
        self, index: int, slots: _Slots, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``, ``v`` ``(n, T, kv_heads, head_dim)`` of layer ``index`` (0-based)
        at ``slots``; return the keys and values those rows may read, ``(n, kv_len, kv_heads,
        head_dim)`` (views when ``slots`` covers all rows, copies of the rows otherwise)."""
        keys, values = self.keys[index], self.values[index]
        if slots.positions is None:
            end = slots.start + k.shape[1]
            if slots.rows is None:
                keys[:, slots.start : end] = k
                values[:, slots.start : end] = v
                return keys[:, : slots.kv_len], values[:, : slots.kv_len]
            keys[:, slots.start : end].index_copy_(0, slots.rows, k)
            values[:, slots.start : end].index_copy_(0, slots.rows, v)
        else:
            where = (self._row_index(slots, k.shape[0])[:, None], slots.positions)
            keys.index_put_(where, k)
            values.index_put_(where, v)
            if slots.rows is None:
                return keys[:, : slots.kv_len], values[:, : slots.kv_len]
        return (
            keys[:, : slots.kv_len].index_select(0, slots.rows),
            values[:, : slots.kv_len].index_select(0, slots.rows),
        )

    def store_from_layer(self, first: int, slots: _Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``(num_layers - first, n, kv_heads, head_dim)`` in layers
        ``first..`` (0-based) at one position per row (``slots`` with ``T = 1``)."""
        if slots.positions is None:
            rows, position = slice(None) if slots.rows is None else slots.rows, slots.start
        else:
            # Two index tensors pair up row by row (a slice beside one would cross them).
            rows, position = self._row_index(slots, k.shape[1]), slots.positions[:, 0]
        self.keys[first:, rows, position] = k
        self.values[first:, rows, position] = v

    @staticmethod
    def _row_index(slots: _Slots, n: int) -> torch.Tensor:
        """The cache rows of ``slots`` as an index tensor: ``0..n-1`` when it covers all rows."""
        return torch.arange(n, device=slots.positions.device) if slots.rows is None else slots.rows


# ---------------------------------------------------------------------------------------
# Pieces of a decoding step
# ---------------------------------------------------------------------------------------
def _run_blocks(
    model: EarlyExitDecoder, x: torch.Tensor, slots: _Slots, cache: KVCache, first: int, last: int
) -> torch.Tensor:
    """Blocks ``first..last-1`` (0-based) on ``x`` ``(n, T, dim)`` at ``slots``, through the cache."""
    for index in range(first, last):
        x = model.layers[index](
            x, slots.cos, slots.sin, functools.partial(cache.update, index, slots), slots.attn_mask, slots.is_causal
        )
    return x


class _StatePropagation:
    """Keys and values of the skipped layers, computed from an exited hidden state.

    ``norm_j(h) = (h * rstd(h)) * w_j``: the reciprocal RMS is the same for every layer and
    only the scale ``w_j`` differs, so it is folded into layer ``j``'s key/value projection
    once per call, and the K/V of all skipped layers come from one matrix product.
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

    def __call__(self, cache: KVCache, hidden: torch.Tensor, layer: int, slots: _Slots) -> None:
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
        cache.store_from_layer(layer, slots, k, kv[:, :, 1].transpose(0, 1))


class _Sampler:
    """Greedy (``temperature == 0``) or temperature / top-k sampling from logits."""

    def __init__(self, temperature: float, top_k: int | None, generator: torch.Generator | None) -> None:
        self.greedy = temperature == 0
        self.temperature = temperature
        self.top_k = top_k
        self.generator = generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling distribution ``(..., V)`` in float32: softmax of ``logits / T`` over the top k."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return logits.softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` ``(n, V)``."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def pick(self, logits: torch.Tensor, prediction: torch.Tensor | None = None) -> torch.Tensor:
        """Next token per row of ``logits`` ``(n, V)``; ``prediction`` is the argmax when known."""
        if self.greedy:
            return logits.argmax(-1) if prediction is None else prediction
        return self.draw(self.probs(logits))

    def verify(
        self,
        drafted: torch.Tensor,
        draft_logits: torch.Tensor | None,
        full_logits: torch.Tensor,
        usable: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accepted draft count per row and the full model's next token after them.

        Args:
            drafted: ``(n, k)`` draft tokens (``k`` may be 0).
            draft_logits: ``(n, k, V)`` the logits each draft token was drawn from (only
                read when sampling).
            full_logits: ``(n, k + 1, V)`` the full model's logits at the draft's positions
                (row ``i`` predicts the token after drafted token ``i - 1``).
            usable: ``(n,)`` how many leading drafts of each row may be accepted (a row
                that stopped drafting early); default all ``k``. A draft past it counts as
                never drafted: the full model picks that token on its own.

        Returns:
            ``(accepted (n,), next_token (n,))``.
        """
        k = drafted.shape[1]
        if self.greedy:
            target = full_logits.argmax(-1)  # (n, k + 1)
            accepted = (drafted == target[:, :k]).long().cumprod(1).sum(1)
            if usable is not None:
                accepted = torch.minimum(accepted, usable)
            return accepted, target.gather(1, accepted[:, None]).squeeze(1)
        # Speculative sampling: accept draft token d with probability min(1, p(d) / q(d));
        # at the first rejection draw from max(p - q, 0), renormalised; where no draft is
        # left, draw from p. The result is distributed exactly as sampling from p.
        p = self.probs(full_logits)  # (n, k + 1, V)
        q = self.probs(draft_logits)  # (n, k, V)
        p_draft = p[:, :k].gather(-1, drafted[..., None]).squeeze(-1)
        q_draft = q.gather(-1, drafted[..., None]).squeeze(-1)
        u = torch.rand(drafted.shape, generator=self.generator, device=drafted.device)
        accepted = (u * q_draft < p_draft).long().cumprod(1).sum(1)
        if usable is None:
            usable = torch.full_like(accepted, k)
        rejected = accepted < usable  # else every usable draft was accepted
        accepted = torch.minimum(accepted, usable)
        rows = torch.arange(drafted.shape[0], device=drafted.device)
        p_next = p[rows, accepted]
        q_next = F.pad(q, (0, 0, 0, 1))[rows, accepted] * rejected[:, None]  # no draft: q = 0
        residual = (p_next - q_next).clamp_min(0)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_next)
        return accepted, self.draw(residual)


# ---------------------------------------------------------------------------------------
# Decoding loops
# ---------------------------------------------------------------------------------------
def _prefill(
    model: EarlyExitDecoder, prompts: list[torch.Tensor], cache: KVCache, every_layer: bool
) -> list[torch.Tensor]:
    """Run the (right-padded) prompts at full depth, filling the cache.

    Returns the hidden state ``(B, dim)`` at each row's last prompt position after every
    block (``every_layer``) or after the last block only.
    """
    lengths = [len(p) for p in prompts]
    batch, width = len(prompts), max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long, device=model.device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    rows = torch.arange(batch, device=model.device)
    last = torch.tensor(lengths, device=model.device) - 1
    slots = _Slots.shared(model, 0, width)
    x = model.embed(ids)  # (B, P, dim); padding after a prompt is never attended to
    states = []
    for index in range(model.num_layers):
        x = _run_blocks(model, x, slots, cache, index, index + 1)
        if every_layer or index == model.num_layers - 1:
            states.append(x[rows, last])
    return states


def _first_token(
    model: EarlyExitDecoder,
    states: list[torch.Tensor],
    threshold: float | None,
    min_exit_layer: int,
    sampler: _Sampler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and exit layer after the prompt, by the early-exit rule on the prompt's states."""
    num_layers = model.num_layers
    final_logits = model.exit_head(states[-1])  # (B, V)
    layers = torch.full((final_logits.shape[0],), num_layers, dtype=torch.long, device=final_logits.device)
    if threshold is None or min_exit_layer >= num_layers:
        return sampler.pick(final_logits), layers
    logits = model.exit_head(torch.stack(states[min_exit_layer - 1 : num_layers - 1]))  # (m, B, V)
    exits = ease_kernels.exit_confidence(logits, threshold).exit  # (m, B)
    any_exit = exits.any(0)
    first = exits.to(torch.uint8).argmax(0)  # the first exiting layer (argmax takes the first max)
    rows = torch.arange(logits.shape[1], device=logits.device)
    chosen = torch.where(any_exit[:, None], logits[first, rows], final_logits)
    layers = torch.where(any_exit, first + min_exit_layer, layers)
    return sampler.pick(chosen), layers


def _early_exit_step(
    model: EarlyExitDecoder,
    tokens: torch.Tensor,
    slots: _Slots,
    cache: KVCache,
    threshold: float | None,
    min_exit_layer: int,
    sampler: _Sampler,
    propagate: _StatePropagation | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Feed ``tokens`` ``(B,)`` at ``slots``; return the next tokens, their exit layers and
    the number of block evaluations spent."""
    num_layers = model.num_layers
    batch = tokens.shape[0]
    next_tokens = torch.empty_like(tokens)
    exit_layers = torch.full_like(tokens, num_layers)
    check_from = num_layers if threshold is None else min_exit_layer
    active = None  # (n,) batch rows still running; None: all of them
    spent = 0
    x = model.embed(tokens)[:, None]  # (B, 1, dim)
    for index in range(num_layers):
        x = _run_blocks(model, x, slots, cache, index, index + 1)
        spent += x.shape[0]
        layer = index + 1
        if layer < check_from or layer == num_layers:
            continue
        logits = model.exit_head(x[:, 0])  # (n, V)
        decision = ease_kernels.exit_confidence(logits, threshold)
        exits = decision.exit
        leaving_count = int(exits.sum())  # the step's one host synchronisation per layer
        if leaving_count == 0:
            continue
        if leaving_count == exits.shape[0]:
            propagate(cache, x[:, 0], layer, slots)
            token = sampler.pick(logits, decision.prediction)
            if active is None:
                return token, exit_layers.fill_(layer), spent
            next_tokens[active] = token
            exit_layers[active] = layer
            return next_tokens, exit_layers, spent
        if active is None:
            active = torch.arange(batch, device=tokens.device)
        leaving = exits.nonzero().squeeze(1)
        propagate(cache, x[leaving, 0], layer, slots.select(leaving))
        rows = active[leaving]
        next_tokens[rows] = sampler.pick(logits[leaving], decision.prediction[leaving])
        exit_layers[rows] = layer
        staying = (~exits).nonzero().squeeze(1)
        x, active, slots = x[staying], active[staying], slots.select(staying)
    token = sampler.pick(model.exit_head(x[:, 0]))
    if active is None:
        return token, exit_layers, spent
    next_tokens[active] = token
    return next_tokens, exit_layers, spent


def _generate_early_exit(
    model: EarlyExitDecoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    threshold: float | None,
    min_exit_layer: int,
    sampler: _Sampler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Full depth (``threshold`` None) or confident early exit, one token per row per step."""
    device = model.device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    cache = KVCache.for_model(model, batch, longest + max_new_tokens)
    new_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    exit_layers = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    states = _prefill(model, prompts, cache, every_layer=threshold is not None)
    new_tokens[:, 0], exit_layers[:, 0] = _first_token(model, states, threshold, min_exit_layer, sampler)
    propagate = _StatePropagation(model) if threshold is not None else None
    same_length = len(set(lengths)) == 1
    first_positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    spent = 0
    for step in range(1, max_new_tokens):
        # The token generated at step - 1 sits at position length + step - 1 of its row.
        if same_length:
            slots = _Slots.shared(model, longest + step - 1, 1)
        else:
            slots = _Slots.per_row(model, first_positions + (step - 1), None, longest + step)
        new_tokens[:, step], exit_layers[:, step], blocks = _early_exit_step(
            model, new_tokens[:, step - 1], slots, cache, threshold, min_exit_layer, sampler, propagate
        )
        spent += blocks
    return new_tokens, exit_layers, {"block_evaluations": spent}


def _generate_speculative(
    model: EarlyExitDecoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    draft_layers: int,
    num_draft_tokens: int,
    draft_threshold: float | None,
    sampler: _Sampler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Self-speculative decoding: draft with blocks ``1..E``, verify with ``E+1..L``.

    A round feeds the last token and then each draft through blocks ``1..E`` (writing their
    cache), drafting up to ``k`` tokens; with ``draft_threshold``, a row stops drafting at
    the first draft whose exit confidence is below it (that draft is dropped). The
    verification runs blocks ``E+1..L`` on the layer-``E`` states of the fed positions,
    accepts each row's longest agreeing prefix and appends the full model's next token.
    """
    device = model.device
    num_layers = model.num_layers
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = KVCache.for_model(model, batch, max(lengths) + max_new_tokens)
    # Room for the tokens of a last round that overshoots max_new_tokens; cut at the end.
    new_tokens = torch.empty(batch, max_new_tokens + num_draft_tokens + 1, dtype=torch.long, device=device)
    exit_layers = torch.full_like(new_tokens, num_layers)
    (state,) = _prefill(model, prompts, cache, every_layer=False)
    new_tokens[:, 0] = sampler.pick(model.exit_head(state))
    generated = [1] * batch
    position = list(lengths)  # where each row's last generated token goes: prompt + generated - 1
    last = new_tokens[:, 0].clone()
    stats = {"block_evaluations": 0, "draft_tokens": 0, "accepted_draft_tokens": 0}
    active = [b for b in range(batch) if generated[b] < max_new_tokens]
    while active:
        # No row may draft past its last new token: positions stay below max_seq_len.
        k = min(num_draft_tokens, min(max_new_tokens - generated[b] for b in active))
        n = len(active)
        rows = None if n == batch else torch.tensor(active, device=device)
        starts = [position[b] for b in active]
        shared = len(set(starts)) == 1
        if not shared:
            first = torch.tensor(starts, device=device)[:, None]  # (n, 1)
        token = last if rows is None else last[rows]
        states, drafts, draft_logits = [], [], []
        usable = None  # (n,) drafts each row may use, when some row stopped early
        for i in range(k + 1):
            if shared:
                slots = _Slots.shared(model, starts[0] + i, 1, rows)
            else:
                slots = _Slots.per_row(model, first + i, rows, max(starts) + i + 1)
            x = _run_blocks(model, model.embed(token)[:, None], slots, cache, 0, draft_layers)
            states.append(x)
            if i == k:
                break  # the last draft only needs its layer-E state, for the verification
            logits = model.exit_head(x[:, 0])
            if draft_threshold is None:
                token = sampler.pick(logits)
            else:
                decision = ease_kernels.exit_confidence(logits, draft_threshold)
                token = sampler.pick(logits, decision.prediction)
                unsure = ~decision.exit
                if n == 1:
                    if bool(unsure):
                        break
                elif bool(unsure.any()):
                    if usable is None:
                        usable = torch.full((n,), k, dtype=torch.long, device=device)
                    usable = torch.where(unsure & (usable == k), i, usable)
                    if bool((usable < k).all()):
                        break
            drafts.append(token)
            draft_logits.append(logits)
        drafted_count = len(drafts)
        if shared:
            slots = _Slots.shared(model, starts[0], drafted_count + 1, rows)
        else:
            positions = first + torch.arange(drafted_count + 1, device=device)
            slots = _Slots.per_row(model, positions, rows, max(starts) + drafted_count + 1)
        hidden = _run_blocks(model, torch.cat(states, 1), slots, cache, draft_layers, num_layers)
        if drafts:
            drafted = torch.stack(drafts, 1)  # (n, drafted_count)
            logits_q = None if sampler.greedy else torch.stack(draft_logits, 1)
        else:
            drafted = torch.empty(n, 0, dtype=torch.long, device=device)
            logits_q = None if sampler.greedy else hidden.new_empty(n, 0, model.vocab_size)
        if usable is not None:
            usable = usable.clamp_max(drafted_count)
        accepted, next_token = sampler.verify(drafted, logits_q, model.exit_head(hidden), usable)
        stats["block_evaluations"] += n * (drafted_count + 1) * num_layers
        stats["draft_tokens"] += n * drafted_count if usable is None else int(usable.sum())
        for i, (b, count) in enumerate(zip(active, accepted.tolist())):
            g = generated[b]
            new_tokens[b, g : g + count] = drafted[i, :count]
            new_tokens[b, g + count] = next_token[i]
            exit_layers[b, g : g + count] = draft_layers
            generated[b] += count + 1
            position[b] += count + 1
            stats["accepted_draft_tokens"] += count
        if rows is None:
            last = next_token
        else:
            last[rows] = next_token
        active = [b for b in active if generated[b] < max_new_tokens]
    return new_tokens[:, :max_new_tokens], exit_layers[:, :max_new_tokens], stats


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompts(model: EarlyExitDecoder, input_ids: Any, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The prompts as a list of 1-D int64 tensors on the model's device, checked."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = list(input_ids)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                    f"got {tuple(getattr(attention_mask, 'shape', ()))}"
                )
            rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a [batch, seq] input_ids tensor, not a list of prompts")
        if input_ids and all(_is_int(t) for t in input_ids):
            input_ids = [input_ids]  # one prompt given as a list of ids
        rows = []
        for prompt in input_ids:
            row = torch.as_tensor(prompt)
            if row.numel() == 0:
                raise ValueError("every prompt in input_ids needs at least one token")
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
                raise ValueError(f"each prompt in input_ids must be a 1-D sequence of integer ids, got {prompt!r}")
            rows.append(row)
    else:
        raise TypeError(f"input_ids must be a tensor or a list of prompts, got {type(input_ids).__name__}")
    if not rows:
        raise ValueError("input_ids holds no prompt")
    if any(row.numel() == 0 for row in rows):
        raise ValueError("every prompt in input_ids needs at least one token")
    rows = [row.to(device=model.device, dtype=torch.long) for row in rows]
    every = torch.cat(rows)
    low, high = int(every.min()), int(every.max())
    if low < 0 or high >= model.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {model.vocab_size}), got ids in [{low}, {high}]")
    return rows


def _check_arguments(
    model: EarlyExitDecoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    routing_threshold: float | None,
    temperature: float,
    top_k: int | None,
    min_exit_layer: int,
    draft_layers: int | None,
    num_draft_tokens: int,
    draft_threshold: float | None,
) -> None:
    num_layers = model.num_layers
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is longer than "
            f"the model's max_seq_len={model.config.max_seq_len}"
        )
    if routing_threshold is not None:
        if isinstance(routing_threshold, bool) or not isinstance(routing_threshold, (int, float)):
            raise TypeError(f"routing_threshold must be a float in (0, 1] or None, got {routing_threshold!r}")
        if not 0.0 < routing_threshold <= 1.0:
            raise ValueError(f"routing_threshold must be in (0, 1] or None, got {routing_threshold}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        0.0 <= temperature < math.inf
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if not _is_int(min_exit_layer) or not 1 <= min_exit_layer <= num_layers:
        raise ValueError(f"min_exit_layer must be an integer in 1..{num_layers}, got {min_exit_layer!r}")
    if draft_layers is not None:
        if routing_threshold is not None:
            raise ValueError("routing_threshold and draft_layers exclude each other: pick early exit or self-speculation")
        if not _is_int(draft_layers) or not 1 <= draft_layers < num_layers:
            raise ValueError(f"draft_layers must be an integer in 1..{num_layers - 1}, got {draft_layers!r}")
        if not _is_int(num_draft_tokens) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    if draft_threshold is not None:
        if draft_layers is None:
            raise ValueError("draft_threshold needs draft_layers (it stops self-speculative drafting)")
        if isinstance(draft_threshold, bool) or not isinstance(draft_threshold, (int, float)) or not (
            0.0 < draft_threshold <= 1.0
        ):
            raise ValueError(f"draft_threshold must be in (0, 1] or None, got {draft_threshold!r}")


class _eval_mode:
    """Evaluation mode (no dropout) inside the block; the previous mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def generate(
    model: EarlyExitDecoder,
    input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor] | Sequence[int],
    max_new_tokens: int,
    routing_threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    *,
    min_exit_layer: int = 1,
    draft_layers: int | None = None,
    num_draft_tokens: int = 4,
    draft_threshold: float | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens after each prompt, with a preallocated KV cache.

    Args:
        model: a :class:`~ease.models.StandardTransformer` or
            :class:`~ease.models.DeepSupervisionTransformer` (run in eval mode; its mode is
            restored afterwards).
        input_ids: the prompts: a ``(B, T)`` (or ``(T,)``) integer tensor, optionally with
            ``attention_mask``, or a list of prompts of any lengths (lists of ids or 1-D
            tensors). Every prompt needs at least one token.
        max_new_tokens: tokens to generate per prompt (``>= 0``); the longest prompt plus
            this must fit in ``max_seq_len``.
        routing_threshold: None for full depth; else a number in (0, 1]: a token exits
            after the first block ``l >= min_exit_layer`` whose exit-head top-1 probability
            reaches it (confident early exit with state propagation, see the module notes).
        temperature: 0 for greedy decoding; else the sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens only (with ``temperature > 0``).
        min_exit_layer: no token exits before this layer (1-based).
        draft_layers: self-speculative decoding with the first ``draft_layers`` blocks as
            the draft model (``1 <= E < num_layers``); excludes ``routing_threshold``.
        num_draft_tokens: the most tokens drafted per verification (self-speculation).
        draft_threshold: stop drafting a row at the first draft whose exit confidence is
            below this (in (0, 1]); its verification comes sooner and wastes fewer draft
            blocks on tokens the full model would reject. None: always draft
            ``num_draft_tokens``. Lossless either way.
        attention_mask: ``(B, T)``, nonzero at the real tokens of ``input_ids`` (left or
            right padding).
        seed: seeds a new ``torch.Generator`` for sampling (ignored with ``generator``).
        generator: the generator sampling draws from.
        pad_token_id: fills the left padding of :attr:`GenerationOutput.tokens`.

    Returns:
        :class:`GenerationOutput`.

    Raises:
        TypeError: ``input_ids`` is not integer, or ``routing_threshold`` not a number.
        ValueError: ``routing_threshold`` outside (0, 1]; a prompt plus ``max_new_tokens``
            longer than ``max_seq_len``; token ids outside ``[0, vocab_size)``; an empty
            prompt; a bad ``max_new_tokens``, ``temperature``, ``top_k``,
            ``min_exit_layer``, ``draft_layers`` or ``num_draft_tokens``.
    """
    prompts = _prompts(model, input_ids, attention_mask)
    _check_arguments(
        model, prompts, max_new_tokens, routing_threshold, temperature, top_k,
        min_exit_layer, draft_layers, num_draft_tokens, draft_threshold,
    )
    if generator is None and seed is not None and temperature > 0:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = _Sampler(float(temperature), top_k, generator)
    threshold = None if routing_threshold is None else float(routing_threshold)
    device = model.device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    stats: dict[str, int] = {}
    with torch.inference_mode(), _eval_mode(model):
        if max_new_tokens == 0:
            new_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
            exit_layers = torch.empty(batch, 0, dtype=torch.long, device=device)
        elif draft_layers is not None:
            new_tokens, exit_layers, stats = _generate_speculative(
                model, prompts, max_new_tokens, draft_layers, num_draft_tokens, draft_threshold, sampler
            )
        else:
            new_tokens, exit_layers, stats = _generate_early_exit(
                model, prompts, max_new_tokens, threshold, min_exit_layer, sampler
            )
    # Clones made outside inference mode: the caller may edit them in place.
    new_tokens, exit_layers = new_tokens.clone(), exit_layers.clone()
    longest = max(lengths)
    tokens = torch.full((batch, longest + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = prompt
    tokens[:, longest:] = new_tokens
    return GenerationOutput(
        tokens=tokens,
        new_tokens=new_tokens,
        exit_layers=exit_layers,
        prompt_lengths=lengths,
        num_layers=model.num_layers,
        **stats,
    )

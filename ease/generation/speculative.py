"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024): the model's first layers draft.

The first ``draft_layers = E`` blocks and the exit head draft ``num_draft_tokens = k``
tokens one by one; the full model then verifies them in one pass that takes the drafts'
layer-``E`` hidden states and runs only blocks ``E+1..L`` on them (the draft already wrote
the cache of blocks ``1..E``). The longest prefix the full model agrees with is kept, plus
the full model's own next token. With greedy decoding the output equals full-depth greedy
decoding token for token; with sampling, speculative sampling's accept/resample rule
(:meth:`~ease.generation.sampling.Sampler.verify`) keeps the full model's distribution.
Rows of a batch accept different numbers of tokens and move on at their own positions.
Optionally (``draft_threshold``) a row stops drafting at its first draft whose exit
confidence is below a threshold, so few draft blocks are spent on tokens the full model
would reject. That stop reads :func:`ease_kernels.exit_confidence` at the one draft layer
directly: it decides whether to keep drafting, not which layer answers a token, so it is
not the exit rule of :class:`ease.exits.ExitRule`.

With ``draft_layers="auto"`` (DEL-style, Zarch et al. 2025) the depth is chosen per round
by :class:`DraftDepth` from the rounds run so far: each candidate depth is tried, then the
one that has produced the most tokens per unit of compute is used (see
:meth:`DraftDepth.round_cost` for the cost model). Every depth is lossless, so the choice
changes the speed only, never the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import ease_kernels
from ease.generation.cache import CacheSlots, KVCache
from ease.generation.early_exit import prefill, run_blocks
from ease.generation.sampling import Sampler

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder

__all__ = ["DraftDepth", "auto_draft_depths", "generate_speculative"]


def auto_draft_depths(num_layers: int) -> tuple[int, ...]:
    """The candidate draft depths of ``draft_layers="auto"``: about 1/6, 1/4, 1/3 and 1/2
    of the layers, each in ``1..num_layers - 1`` (``(2, 3, 4, 6)`` for 12 layers)."""
    depths = {min(max(1, round(num_layers * f)), num_layers - 1) for f in (1 / 6, 1 / 4, 1 / 3, 1 / 2)}
    return tuple(sorted(depths))


class DraftDepth:
    """Chooses each round's draft depth from the tokens and compute of earlier rounds.

    Per candidate depth ``E`` it keeps the tokens produced (accepted drafts plus the full
    model's own token, summed over rows) and the compute spent, in the units of
    :meth:`round_cost`. Each candidate is first run for ``trials`` rounds, in increasing
    order; after that :meth:`choose` takes the depth with the most tokens per unit of
    compute so far (ties: the shallower). The choice is deterministic: it depends on the
    tokens, never on timings.

    Args:
        depths: the candidate depths, each in ``1..num_layers - 1``.
        num_layers: the model's depth ``L``.
        position_cost: ``c``, what each extra token position of one block call costs,
            relative to a call on one position (see :meth:`round_cost`). The default 0.1
            is the CPU's: a block on one position took 132 us, on 8 positions 211 us
            (12 layers, dim 128, one thread), about 0.09 per extra position.
        trials: rounds each candidate is run for before the choice starts.
    """

    def __init__(self, depths: tuple[int, ...], num_layers: int, position_cost: float = 0.1, trials: int = 2) -> None:
        self.depths = tuple(depths)
        self.num_layers = num_layers
        self.position_cost = position_cost
        self.trials = trials
        self.rounds = dict.fromkeys(self.depths, 0)
        self.tokens = dict.fromkeys(self.depths, 0)
        self.cost = dict.fromkeys(self.depths, 0.0)

    def call_cost(self, positions: int) -> float:
        """One block called on ``positions`` token positions: ``1 + c * (positions - 1)``."""
        return 1.0 + self.position_cost * (positions - 1)

    def round_cost(self, depth: int, rows: int, drafted: int) -> float:
        """The compute of one round: ``rows`` rows drafting ``drafted`` tokens at ``depth``.

        The draft feeds ``drafted + 1`` positions one after the other through ``E`` blocks,
        each call on ``rows`` positions; the verification runs the other ``L - E`` blocks
        once, on ``rows * (drafted + 1)`` positions::

            cost = E (d + 1) (1 + c (n - 1)) + (L - E) (1 + c (n (d + 1) - 1))

        With ``c = 1`` this is the count of (position, block) pairs
        (``block_evaluations``); with ``c`` small, the cost of a block call barely grows
        with the positions it processes (a small model, or a GPU), and verifying many
        drafts in one pass is cheap. The exit heads are not counted.
        """
        feeds = drafted + 1
        return depth * feeds * self.call_cost(rows) + (self.num_layers - depth) * self.call_cost(rows * feeds)

    def choose(self) -> int:
        """The depth of the next round."""
        for depth in self.depths:
            if self.rounds[depth] < self.trials:
                return depth
        return max(self.depths, key=lambda d: (self.tokens[d] / self.cost[d], -d))

    def record(self, depth: int, rows: int, drafted: int, tokens: int) -> None:
        """A round at ``depth`` of ``rows`` rows drafted ``drafted`` tokens and produced ``tokens``."""
        self.rounds[depth] += 1
        self.tokens[depth] += tokens
        self.cost[depth] += self.round_cost(depth, rows, drafted)

    def efficiency(self) -> dict[int, float]:
        """Tokens per unit of compute of every depth run so far."""
        return {d: self.tokens[d] / self.cost[d] for d in self.depths if self.rounds[d]}


def generate_speculative(
    model: EarlyExitDecoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    draft_layers: int | DraftDepth,
    num_draft_tokens: int,
    draft_threshold: float | None,
    sampler: Sampler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Self-speculative decoding: draft with blocks ``1..E``, verify with ``E+1..L``.

    ``draft_layers`` is the depth ``E``, or a :class:`DraftDepth` that picks it per round.

    A round feeds the last token and then each draft through blocks ``1..E`` (writing their
    cache), drafting up to ``k`` tokens; with ``draft_threshold``, a row stops drafting at
    the first draft whose exit confidence is below it (that draft is dropped). The
    verification runs blocks ``E+1..L`` on the layer-``E`` states of the fed positions,
    accepts each row's longest agreeing prefix and appends the full model's next token.

    Returns ``(new_tokens, exit_layers, stats)``: ``(B, max_new_tokens)`` each, and the
    counts ``block_evaluations``, ``draft_tokens``, ``accepted_draft_tokens``.
    ``max_new_tokens >= 1``.
    """
    device = model.device
    num_layers = model.num_layers
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    max_seq_len = model.config.max_seq_len
    # A round feeds positions up to a row's prompt + max_new_tokens - 1 (the last draft, for
    # the verification's bonus token), but never past the RoPE tables (see k below).
    cache = KVCache.for_model(model, batch, min(max(lengths) + max_new_tokens, max_seq_len))
    # Room for the tokens of a last round that overshoots max_new_tokens; cut at the end.
    new_tokens = torch.empty(batch, max_new_tokens + num_draft_tokens + 1, dtype=torch.long, device=device)
    exit_layers = torch.full_like(new_tokens, num_layers)
    (state,) = prefill(model, prompts, cache, every_layer=False)
    new_tokens[:, 0] = sampler.pick(model.exit_head(state))
    generated = [1] * batch
    position = list(lengths)  # where each row's last generated token goes: prompt + generated - 1
    last = new_tokens[:, 0].clone()
    stats = {"block_evaluations": 0, "draft_tokens": 0, "accepted_draft_tokens": 0}
    chooser = draft_layers if isinstance(draft_layers, DraftDepth) else None
    active = [b for b in range(batch) if generated[b] < max_new_tokens]
    while active:
        if chooser is not None:
            draft_layers = chooser.choose()
        # No row drafts past its last new token, nor feeds a position past max_seq_len - 1.
        # A round feeds positions start .. start + k. The second bound binds only for a row
        # whose last new token would sit at position max_seq_len (prompt + max_new_tokens - 1
        # = max_seq_len): its last round drafts one token fewer, and the full model supplies
        # the token that draft would have been (the last new token is never fed back).
        k = min(
            num_draft_tokens,
            min(max_new_tokens - generated[b] for b in active),
            min(max_seq_len - 1 - position[b] for b in active),
        )
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
                slots = CacheSlots.shared(model, starts[0] + i, 1, rows)
            else:
                slots = CacheSlots.per_row(model, first + i, rows, max(starts) + i + 1)
            x = run_blocks(model, model.embed(token)[:, None], slots, cache, 0, draft_layers)
            states.append(x)
            if i == k:
                break  # the last draft only needs its layer-E state, for the verification
            logits = model.exit_head(x[:, 0])
            if draft_threshold is None:
                token = sampler.pick(logits)
            else:
                # Not an exit: the draft is verified by the full model either way. Only the
                # draft depth is read, so this is the confidence test alone, not ExitRule.
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
            slots = CacheSlots.shared(model, starts[0], drafted_count + 1, rows)
        else:
            positions = first + torch.arange(drafted_count + 1, device=device)
            slots = CacheSlots.per_row(model, positions, rows, max(starts) + drafted_count + 1)
        hidden = run_blocks(model, torch.cat(states, 1), slots, cache, draft_layers, num_layers)
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
        # Every row's accepted drafts and the full model's token, in one store per tensor:
        # row i writes drafted_count + 1 slots from its generated count on; the slots past
        # its accepted count + 1 get the bonus token again and are overwritten by the next
        # round (which starts there), or lie past max_new_tokens.
        counts = accepted.tolist()
        steps = torch.arange(drafted_count + 1, device=device)
        within = steps < accepted[:, None]  # (n, drafted_count + 1): an accepted draft
        values = torch.where(within, torch.nn.functional.pad(drafted, (0, 1)), next_token[:, None])
        where = torch.tensor([generated[b] for b in active], device=device)[:, None] + steps
        if rows is None:
            new_tokens.scatter_(1, where, values)
            exit_layers.scatter_(1, where, torch.where(within, draft_layers, num_layers))
        else:
            new_tokens[rows[:, None], where] = values
            exit_layers[rows[:, None], where] = torch.where(within, draft_layers, num_layers)
        for b, count in zip(active, counts):
            generated[b] += count + 1
            position[b] += count + 1
        stats["accepted_draft_tokens"] += sum(counts)
        if chooser is not None:
            chooser.record(draft_layers, n, drafted_count, int(accepted.sum()) + n)
        if rows is None:
            last = next_token
        else:
            last[rows] = next_token
        active = [b for b in active if generated[b] < max_new_tokens]
    return new_tokens[:, :max_new_tokens], exit_layers[:, :max_new_tokens], stats

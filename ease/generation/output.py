"""What :func:`ease.generation.generate` returns: the tokens, where each one exited, what it cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GenerationOutput"]


@dataclass
class GenerationOutput:
    """What :func:`~ease.generation.generate` returns.

    Attributes:
        tokens: ``(B, P + N)`` int64: each row's prompt, left-padded with ``pad_token_id``
            to the longest prompt ``P``, followed by its ``N`` new tokens.
        new_tokens: ``(B, N)`` int64, the generated tokens.
        token_exit_layers: ``(B, N)`` int64, the layer (1..``num_layers``) whose exit head
            gave each new token: ``num_layers`` at full depth; under self-speculation the
            draft depth ``E`` for an accepted draft token and ``num_layers`` for the token
            the full model supplied. (Not to be confused with ``forward(exit_layers=...)``,
            the layers a forward pass computes; :attr:`exit_layers` is an alias kept for
            older code.)
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
    token_exit_layers: torch.Tensor
    prompt_lengths: list[int]
    num_layers: int
    block_evaluations: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def exit_layers(self) -> torch.Tensor:
        """Alias of :attr:`token_exit_layers` (the layer each new token exited at)."""
        return self.token_exit_layers

    @property
    def mean_exit_layer(self) -> float:
        """Mean of :attr:`token_exit_layers` over every new token (NaN when there are none)."""
        if self.token_exit_layers.numel() == 0:
            return math.nan
        return float(self.token_exit_layers.double().mean())

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (NaN when nothing was drafted)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else math.nan

    def sequences(self) -> list[torch.Tensor]:
        """Each row's prompt and new tokens, without padding: a list of 1-D int64 tensors."""
        width = self.tokens.shape[1]
        new = self.new_tokens.shape[1]
        return [self.tokens[b, width - new - length :] for b, length in enumerate(self.prompt_lengths)]

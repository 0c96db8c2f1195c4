"""How a token is chosen from logits: greedy or temperature / top-k sampling, and the
speculative verification rule that keeps the full model's distribution (Leviathan et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Sampler"]


class Sampler:
    """Greedy (``temperature == 0``) or temperature / top-k sampling from logits.

    Args:
        temperature: 0 for greedy, else the softmax temperature (checked by the caller).
        top_k: sample among the ``top_k`` most likely tokens only; None: all of them.
        generator: the generator every draw takes its randomness from.
    """

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

"""The shared exit head: the final RMSNorm and the output projection, and what is read from them.

Every layer of an EASE decoder answers through this one head. It is the only place
that knows the head's parameters, so the logits of evaluation and generation, the
training loss (plain or fused) and the exit confidence all come from the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import ease_kernels
from ease.data import IGNORE_INDEX
from ease.modules.rms_norm import RMSNorm


def token_sum_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over non-ignored targets; logits ``(..., V)`` upcast to float32."""
    # float32 because log-softmax over a large vocabulary in bf16 loses ~2 digits.
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class ExitHead(nn.Module):
    """``logits = proj(norm(h))``, shared by every layer.

    Args:
        dim: model width.
        vocab_size: number of tokens.
        norm_eps: the RMSNorm's epsilon.

    Attributes:
        norm: the final :class:`~ease.modules.RMSNorm`.
        proj: the output projection, ``nn.Linear(dim, vocab_size, bias=False)`` (its weight
            may be tied to the token embedding by the model).
    """

    def __init__(self, dim: int, vocab_size: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` hidden states -> ``(..., vocab_size)`` logits."""
        return self.proj(self.norm(hidden))

    def confidence(self, hidden: torch.Tensor, threshold: float | None = None) -> ease_kernels.ExitDecision:
        """Top-1 softmax probability, prediction and exit decision of ``hidden``'s logits.

        One fused pass over the logits (:func:`ease_kernels.exit_confidence`).
        """
        return ease_kernels.exit_confidence(self(hidden), threshold)

    def loss(
        self,
        hidden: Mapping[int, torch.Tensor],
        targets: torch.Tensor,
        weights: Mapping[int, float],
        fused: bool,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The weighted loss ``sum_l w_l * CE_l`` of the layers in ``hidden``.

        ``CE_l`` is the mean cross-entropy over non-ignored targets of layer ``l``'s logits
        (float32); a batch whose targets are all ignored gives 0 and zero gradients.

        Args:
            hidden: ``{layer: (B, T, dim)}`` hidden states of the layers to supervise, in
                ascending layer order.
            targets: ``(B, T)`` int64 ids in ``[0, vocab_size)`` or ``IGNORE_INDEX``.
            weights: ``{layer: w_l}`` for every layer in ``hidden``.
            fused: walk the tokens in chunks with :func:`ease_kernels.exit_head_loss`, so
                that one chunk of logits exists instead of every layer's (same value and
                gradients); otherwise the plain per-layer logits.

        Returns:
            ``(loss, per_layer, correct)``: a scalar with a graph; ``{layer: CE_l}``
            detached; ``{layer: correct top-1 predictions}`` as int64 scalars.
        """
        layers = list(hidden)
        if fused:
            result = ease_kernels.exit_head_loss(
                [hidden[layer] for layer in layers],
                self.norm.weight,
                self.proj.weight,
                targets,
                [weights[layer] for layer in layers],
                self.norm.eps,
                ignore_index=IGNORE_INDEX,
            )
            per_layer = {layer: result.layer_losses[i] for i, layer in enumerate(layers)}
            return result.loss, per_layer, {layer: result.correct[i] for i, layer in enumerate(layers)}
        counted = targets != IGNORE_INDEX
        # clamp: a batch whose targets are all ignored gives loss 0 (and zero gradient), not 0/0.
        tokens = counted.sum().clamp_min(1)
        loss = None
        per_layer, correct = {}, {}
        for layer in layers:
            logits = self(hidden[layer])
            ce = token_sum_cross_entropy(logits, targets) / tokens
            per_layer[layer] = ce.detach()
            correct[layer] = ((logits.detach().argmax(-1) == targets) & counted).sum()
            loss = weights[layer] * ce if loss is None else loss + weights[layer] * ce
        return loss, per_layer, correct

    def extra_repr(self) -> str:
        return f"dim={self.proj.in_features}, vocab_size={self.proj.out_features}"

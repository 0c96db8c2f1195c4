"""RMSNorm module on top of :func:`ease_kernels.rms_norm`."""

from __future__ import annotations

import torch
from torch import nn

import ease_kernels


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel scale.

    ``forward(x)`` returns the normalised ``x``; ``forward(x, residual=r)`` returns
    ``(norm(x + r), x + r)``, the pre-norm residual add fused into the same kernel.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ease_kernels.rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

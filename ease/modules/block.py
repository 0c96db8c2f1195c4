"""Pre-norm transformer block: attention and SwiGLU, each behind an RMSNorm and a residual."""

from __future__ import annotations

import torch
from torch import nn

from ease.modules.attention import Attention
from ease.modules.feed_forward import SwiGLU
from ease.modules.rms_norm import RMSNorm


class TransformerBlock(nn.Module):
    """``h = x + attn(norm1(x)); out = h + ffn(norm2(h))``.

    The second residual add is fused into ``norm2`` (``ease_kernels.rms_norm`` with
    ``residual=``), so the sum ``h`` is read and written once.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        ffn_dim: int,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, num_heads, num_kv_heads, dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, ffn_dim, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` -> ``(B, T, dim)``."""
        attn_out = self.residual_dropout(self.attention(self.attention_norm(x), cos, sin))
        normed, h = self.ffn_norm(attn_out, residual=x)
        return h + self.ffn(normed)

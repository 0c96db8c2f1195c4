"""Pre-norm transformer block: attention and SwiGLU, each behind an RMSNorm and a residual."""

from __future__ import annotations

from collections.abc import Callable

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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` -> ``(B, T, dim)``, with or without a key/value cache.

        Args:
            x: hidden states; with ``cache_kv``, of the new positions only.
            cos, sin: RoPE tables of those positions, ``(T, head_dim // 2)`` or
                ``(B, T, head_dim // 2)``.
            cache_kv: None for a plain causal pass over ``x``. For decoding: called once
                with the new keys and values ``(B, T, kv_heads, head_dim)``; stores them
                and returns every key and value the new positions may attend to,
                ``(B, S, kv_heads, head_dim)``.
            attn_mask, is_causal: as for :meth:`Attention.attend`, over those keys.
        """
        q, k, v = self.attention.project_qkv(self.attention_norm(x), cos, sin)
        if cache_kv is not None:
            k, v = cache_kv(k, v)
        attn_out = self.attention.attend(q, k, v, attn_mask, is_causal)
        if self.training:  # dropout is the identity in eval; decoding steps skip the call
            attn_out = self.residual_dropout(attn_out)
        normed, h = self.ffn_norm(attn_out, residual=x)
        return h + self.ffn(normed)

"""Causal multi-head self-attention with RoPE and grouped-query attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ease_kernels


class Attention(nn.Module):
    """Causal self-attention: fused QKV projection, RoPE, SDPA, output projection.

    Args:
        dim: model width.
        num_heads: query heads; ``dim`` must divide by it and ``dim // num_heads`` be even.
        num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
        dropout: attention-probability dropout in training.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    @property
    def key_value_weight(self) -> torch.Tensor:
        """The rows of the fused projection that give the keys and values, ``(2 * kv_heads * head_dim, dim)``.

        Keys first, then values, each head after head: what state propagation multiplies
        an exited hidden state by to fill the cache of the layers it skipped.
        """
        return self.qkv_proj.weight[self.num_heads * self.head_dim :]

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys rotated by RoPE, and values, each ``(B, T, heads, head_dim)``."""
        batch, seq, _ = x.shape
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = ease_kernels.apply_rope(q, k, cos, sin)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """SDPA over ``(B, T, heads, head_dim)`` inputs, then the output projection.

        Causal unless ``attn_mask`` (boolean, True = attend, broadcastable to
        ``(B, heads, Tq, Tk)``) is given. ``is_causal=False`` without a mask lets every
        query see every key: a one-token decode step over a cache sliced to the keys it
        may see needs no mask.
        """
        batch, seq = q.shape[:2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, nh, T, hd)
            k.transpose(1, 2),  # (B, nkv, S, hd)
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` -> ``(B, T, dim)``, causal; ``cos``/``sin`` as for apply_rope."""
        return self.attend(*self.project_qkv(x, cos, sin))

"""The key/value cache of generation, and the slots one forward call reads and writes in it.

Slot ``s`` of cache row ``b`` holds position ``s`` of sequence ``b``, in every layer. A
:class:`CacheSlots` names the positions one call processes (shared by its rows, or one
set per row), which cache rows they belong to, and how attention reads the cache for
them; :meth:`KVCache.update` stores a block's new keys and values at those slots and
returns what the block may attend to. Both are public: a caller can hold a cache and run
:class:`~ease.modules.TransformerBlock` s over it::

    cache = KVCache.for_model(model, batch_size=1, max_len=16)
    slots = CacheSlots.shared(model, start=0, length=5)          # a 5-token prompt
    x = model.embed(ids)                                           # (1, 5, dim)
    for layer, block in enumerate(model.layers, start=1):
        x = block(x, slots.cos, slots.sin,
                  functools.partial(cache.update, layer, slots), slots.attn_mask, slots.is_causal)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder

__all__ = ["CacheSlots", "KVCache"]


@dataclass
class CacheSlots:
    """The positions one forward call processes, and how attention reads the cache for them.

    Either every row of the call shares the positions ``start .. start + T - 1``
    (``positions`` is None; build with :meth:`shared`) or each row has its own
    ``positions`` ``(n, T)`` (build with :meth:`per_row`). A query at position ``t`` reads
    the slots ``0..t`` of its own cache row and nothing else, so slots past a row's end
    (a shorter prompt's padding, a rejected draft) never matter.

    Attributes:
        rows: ``(n,)`` int64, the cache rows of the call's ``n`` rows; None: every cache
            row, in order.
        positions: ``(n, T)`` int64 per-row positions, or None when shared.
        start: the first shared position (unused with ``positions``).
        kv_len: the slots read per row: the largest position + 1.
        cos, sin: the RoPE tables of the positions, ``(T, head_dim / 2)`` shared or
            ``(n, T, head_dim / 2)`` per row.
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
    def shared(
        cls, model: EarlyExitDecoder, start: int, length: int, rows: torch.Tensor | None = None
    ) -> CacheSlots:
        """All rows (or the cache rows ``rows``) at positions ``start .. start + length - 1``.

        Raises:
            ValueError: the positions run past the model's ``max_seq_len`` (its RoPE tables).
        """
        end = start + length
        if end > model.config.max_seq_len:
            raise ValueError(
                f"positions {start}..{end - 1} run past the model's max_seq_len={model.config.max_seq_len}"
            )
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
    ) -> CacheSlots:
        """Row ``i`` (cache row ``rows[i]``; row ``i`` itself when ``rows`` is None) at
        ``positions[i]`` ``(n, T)``; ``kv_len`` is the largest position + 1 (given, so that
        building the slots needs no device synchronisation).

        Raises:
            ValueError: ``kv_len`` exceeds the model's ``max_seq_len``.
        """
        if kv_len > model.config.max_seq_len:
            raise ValueError(f"kv_len={kv_len} runs past the model's max_seq_len={model.config.max_seq_len}")
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys <= positions[..., None]).unsqueeze(1)  # (n, 1, T, S)
        return cls(rows, positions, 0, kv_len, model.rope_cos[positions], model.rope_sin[positions], mask, False)

    def select(self, index: torch.Tensor) -> CacheSlots:
        """The same positions for the rows ``index`` (into this call's rows) only."""
        rows = index if self.rows is None else self.rows[index]
        if self.positions is None:
            return CacheSlots(rows, None, self.start, self.kv_len, self.cos, self.sin, self.attn_mask, self.is_causal)
        return CacheSlots(
            rows, self.positions[index], 0, self.kv_len, self.cos[index], self.sin[index],
            self.attn_mask[index], False,
        )

    def row_index(self, n: int) -> torch.Tensor:
        """The cache rows of these slots as an index tensor: ``0..n-1`` when they cover all rows."""
        if self.rows is not None:
            return self.rows
        device = self.positions.device if self.positions is not None else self.cos.device
        return torch.arange(n, device=device)


class KVCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Slot ``s`` of row ``b`` holds position ``s`` of sequence ``b``. A slot past a row's
    current position may hold stale values (padding of a shorter prompt, a rejected draft);
    attention never reads it, because each query sees only the slots up to its own position.

    Args:
        num_layers, batch_size, max_len, num_kv_heads, head_dim: the cache's shape.
        dtype, device: of the stored keys and values.

    Attributes:
        keys, values: ``(num_layers, batch_size, max_len, num_kv_heads, head_dim)``; keys
            are stored after RoPE. Index ``layer - 1`` holds layer ``layer``.
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
        """The slots per row."""
        return self.keys.shape[2]

    def update(
        self, layer: int, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s (1-based) new keys and values at ``slots``; return what
        those rows may read.

        Args:
            layer: 1..num_layers.
            slots: the positions and rows of ``k`` and ``v``.
            k, v: ``(n, T, num_kv_heads, head_dim)``, keys after RoPE.

        Returns:
            ``(keys, values)``, each ``(n, kv_len, num_kv_heads, head_dim)``: views when
            ``slots`` covers every cache row, copies of its rows otherwise.
        """
        keys, values = self.keys[layer - 1], self.values[layer - 1]
        if slots.positions is None:
            end = slots.start + k.shape[1]
            if slots.rows is None:
                keys[:, slots.start : end] = k
                values[:, slots.start : end] = v
                return keys[:, : slots.kv_len], values[:, : slots.kv_len]
            keys[:, slots.start : end].index_copy_(0, slots.rows, k)
            values[:, slots.start : end].index_copy_(0, slots.rows, v)
        else:
            where = (slots.row_index(k.shape[0])[:, None], slots.positions)
            keys.index_put_(where, k)
            values.index_put_(where, v)
            if slots.rows is None:
                return keys[:, : slots.kv_len], values[:, : slots.kv_len]
        return (
            keys[:, : slots.kv_len].index_select(0, slots.rows),
            values[:, : slots.kv_len].index_select(0, slots.rows),
        )

    def store_after(self, layer: int, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys and values of every layer after ``layer`` (1-based: layers
        ``layer + 1 .. num_layers``) at one position per row.

        Args:
            layer: 0..num_layers - 1.
            slots: one position per row (``T = 1``).
            k, v: ``(num_layers - layer, n, num_kv_heads, head_dim)``, keys after RoPE.
        """
        if slots.positions is None:
            rows, position = slice(None) if slots.rows is None else slots.rows, slots.start
        else:
            # Two index tensors pair up row by row (a slice beside one would cross them).
            rows, position = slots.row_index(k.shape[1]), slots.positions[:, 0]
        self.keys[layer:, rows, position] = k
        self.values[layer:, rows, position] = v

    def store_after_where(
        self, layer: int, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor, where: torch.Tensor
    ) -> None:
        """:meth:`store_after` only where ``where`` ``(num_layers - layer, n)`` is True; the
        other entries keep what the cache holds."""
        mask = where[:, :, None, None]
        if slots.positions is None and slots.rows is None:
            keys, values = self.keys[layer:, :, slots.start], self.values[layer:, :, slots.start]  # views
            keys.copy_(torch.where(mask, k, keys))
            values.copy_(torch.where(mask, v, values))
            return
        if slots.positions is None:
            rows, position = slots.rows, slots.start
        else:
            rows, position = slots.row_index(k.shape[1]), slots.positions[:, 0]
        self.keys[layer:, rows, position] = torch.where(mask, k, self.keys[layer:, rows, position])
        self.values[layer:, rows, position] = torch.where(mask, v, self.values[layer:, rows, position])

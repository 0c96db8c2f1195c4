"""A global batch as one rank runs it: checked, this rank's rows, cut into micro-batches."""

from __future__ import annotations

import torch

from ease.data import Batch, split_batch
from ease.data import IGNORE_INDEX
from ease.training import distributed as dist_utils
from ease.training.distributed import DistributedContext
from ease.training.loss import check_targets

# One micro-batch: (inputs, targets, non-ignored target count, layer-dropout decisions or None).
Shard = tuple[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"]


def _split_rows(tensor: torch.Tensor, pieces: int, fill: object) -> list[torch.Tensor]:
    # As shard_rows does: an empty slice becomes one row of ``fill``.
    parts = list(tensor.tensor_split(pieces))
    return [part if part.shape[0] else torch.full((1, *tensor.shape[1:]), fill, dtype=tensor.dtype) for part in parts]


def prepare_shards(
    batch: Batch,
    vocab_size: int,
    device: torch.device,
    context: DistributedContext,
    pieces: int = 1,
    presharded: bool = False,
    global_count: bool = True,
    keep: torch.Tensor | None = None,
) -> tuple[list[Shard], int]:
    """This rank's rows of a global batch, cut into ``pieces`` micro-batches on ``device``.

    The batch is split and checked where it lies (usually the CPU), whole, on every rank
    (so all ranks raise together), then moved to ``device``. Without a
    ``DistributedSampler`` (``presharded=False``) every rank holds the whole global batch
    and takes its contiguous slice of rows (:func:`ease.training.distributed.shard_rows`).

    Args:
        keep: per-row layer-dropout decisions ``(rows, num_layers)`` of the batch as given
            (the global batch, or this rank's rows when presharded); they follow their rows
            into the micro-batches, padded with True where shard_rows pads a row.

    Returns:
        ``(shards, global_tokens)``: ``shards`` a list of ``(inputs, targets, tokens, keep)``
        (``keep`` None without layer dropout); ``global_tokens`` the non-ignored targets
        of the step over all ranks (counted locally, or all-reduced for a
        ``DistributedSampler``'s batches when ``global_count``; else this rank's count).
    """
    inputs, targets = split_batch(batch)
    check_targets(targets, vocab_size)
    global_tokens = None
    if context.enabled and not presharded:
        global_tokens = int((targets != IGNORE_INDEX).sum())
        inputs, targets = dist_utils.shard_rows(inputs, targets, context.world_size, IGNORE_INDEX)[context.rank]
        if keep is not None:
            keep = _split_rows(keep, context.world_size, True)[context.rank]
    if pieces > 1:
        pieces_ = dist_utils.shard_rows(inputs, targets, pieces, IGNORE_INDEX)
        keeps = _split_rows(keep, pieces, True) if keep is not None else [None] * pieces
    else:
        pieces_, keeps = [(inputs, targets)], [keep]
    shards = [
        (
            piece_inputs.to(device, non_blocking=True),
            piece_targets.to(device, dtype=torch.long, non_blocking=True),
            int((piece_targets != IGNORE_INDEX).sum()),
            None if piece_keep is None else piece_keep.to(device, non_blocking=True),
        )
        for (piece_inputs, piece_targets), piece_keep in zip(pieces_, keeps)
    ]
    if global_tokens is None:
        global_tokens = sum(shard[2] for shard in shards)
        if context.enabled and global_count:
            global_tokens = int(dist_utils.all_reduce_sum(torch.tensor([global_tokens]), context)[0])
    return shards, global_tokens

"""A global batch as one rank runs it: checked, this rank's rows, cut into micro-batches."""

from __future__ import annotations

import torch

from ease.data import Batch, split_batch
from ease.data import IGNORE_INDEX
from ease.training import distributed as dist_utils
from ease.training.distributed import DistributedContext
from ease.training.loss import check_targets

# One micro-batch: (inputs, targets, non-ignored target count).
Shard = tuple[torch.Tensor, torch.Tensor, int]


def prepare_shards(
    batch: Batch,
    vocab_size: int,
    device: torch.device,
    context: DistributedContext,
    pieces: int = 1,
    presharded: bool = False,
    global_count: bool = True,
) -> tuple[list[Shard], int]:
    """This rank's rows of a global batch, cut into ``pieces`` micro-batches on ``device``.

    The batch is split and checked where it lies (usually the CPU), whole, on every rank
    (so all ranks raise together), then moved to ``device``. Without a
    ``DistributedSampler`` (``presharded=False``) every rank holds the whole global batch
    and takes its contiguous slice of rows (:func:`ease.training.distributed.shard_rows`).

    Returns:
        ``(shards, global_tokens)``: ``shards`` a list of ``(inputs, targets, tokens)``;
        ``global_tokens`` the non-ignored targets of the step over all ranks (counted
        locally, or all-reduced for a ``DistributedSampler``'s batches when
        ``global_count``; else this rank's count).
    """
    inputs, targets = split_batch(batch)
    check_targets(targets, vocab_size)
    global_tokens = None
    if context.enabled and not presharded:
        global_tokens = int((targets != IGNORE_INDEX).sum())
        inputs, targets = dist_utils.shard_rows(inputs, targets, context.world_size, IGNORE_INDEX)[context.rank]
    pieces_ = dist_utils.shard_rows(inputs, targets, pieces, IGNORE_INDEX) if pieces > 1 else [(inputs, targets)]
    shards = [
        (
            piece_inputs.to(device, non_blocking=True),
            piece_targets.to(device, dtype=torch.long, non_blocking=True),
            int((piece_targets != IGNORE_INDEX).sum()),
        )
        for piece_inputs, piece_targets in pieces_
    ]
    if global_tokens is None:
        global_tokens = sum(shard[2] for shard in shards)
        if context.enabled and global_count:
            global_tokens = int(dist_utils.all_reduce_sum(torch.tensor([global_tokens]), context)[0])
    return shards, global_tokens

"""The tiny models and random batches the tests build, in one place.

Each test module used to carry its own copy of these; they differ only in their
arguments, which every call site states.
"""

from __future__ import annotations

import torch

from ease import DeepSupervisionTransformer, EarlyExitDecoder


def tiny_model(
    cls: type[EarlyExitDecoder] = DeepSupervisionTransformer,
    vocab_size: int = 50,
    dim: int = 32,
    num_layers: int = 3,
    seed: int | None = None,
    weight_std: float | None = None,
    eval_mode: bool = False,
    **kwargs,
) -> EarlyExitDecoder:
    """A small decoder.

    Args:
        cls: the model class.
        vocab_size, dim, num_layers: its size; ``**kwargs`` any other constructor option.
        seed: seeds torch before the model is built (None: the RNG as it is).
        weight_std: redraw every weight but the norm scales from N(0, std): wide random
            weights (0.3) spread the exit confidences over about 0.1..0.6, where early
            exit has decisions to make; None keeps the model's own initialisation.
        eval_mode: return the model in eval mode.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(vocab_size, dim, num_layers, **kwargs)
    if weight_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.endswith("norm.weight"):
                    param.normal_(0.0, weight_std)
    return model.eval() if eval_mode else model


def random_batches(
    count: int, rows: int = 4, columns: int = 13, vocab_size: int = 50, seed: int = 0
) -> list[torch.Tensor]:
    """``count`` batches of uniformly random token ids, ``[rows, columns]`` (``T + 1 = columns``)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (rows, columns), generator=generator) for _ in range(count)]

"""Measuring generation: outputs per setting, interleaved timing, agreement with full depth.

Shared by the depth suite (:mod:`ease.depth_suite`) and the benchmarks in ``bench/``: a
speed-up is always a ratio against full depth timed in the same process, the settings
interleaved repeat by repeat so that a slow spell of a shared machine hits every one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ease.generation.output import GenerationOutput
    from ease.models import EarlyExitDecoder

__all__ = ["decision_agreement", "generate_all", "time_interleaved"]


def generate_all(
    model: EarlyExitDecoder, prompts: Sequence[Sequence[int]], batch_size: int, new_tokens: int, options: dict
) -> list[GenerationOutput]:
    """``model.generate`` on every prompt, ``batch_size`` prompts per call; the outputs, in prompt order."""
    return [
        model.generate([list(p) for p in prompts[i : i + batch_size]], new_tokens, **options)
        for i in range(0, len(prompts), batch_size)
    ]


@torch.no_grad()
def decision_agreement(model: EarlyExitDecoder, prompts: Sequence[Sequence[int]], new: torch.Tensor) -> float:
    """Fraction of generated tokens equal to full depth's greedy choice after the same prefix.

    ``new`` is ``(len(prompts), N)``: row ``i`` was generated after ``prompts[i]``. Each
    row is run once, teacher-forced, at full depth: a token agrees when it is the argmax
    of the last layer's logits at its position.
    """
    num_layers = model.num_layers
    agree = total = 0
    for prompt, tokens in zip(prompts, new):
        ids = torch.tensor([list(prompt) + tokens.tolist()], device=model.device)
        logits = model(ids[:, :-1], exit_layers=[num_layers])[num_layers][0, len(prompt) - 1 :]
        agree += int((logits.argmax(-1) == tokens).sum())
        total += tokens.numel()
    return agree / total


def time_interleaved(cases: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Wall seconds of each case over ``repeats`` rounds, the cases run in turn within a round.

    Returns one list of ``repeats`` timings per case (report their median).
    """
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, case in enumerate(cases):
            start = time.perf_counter()
            case()
            times[i].append(time.perf_counter() - start)
    return times


"""The public :func:`generate`: its arguments checked once, the decoding loop picked, the output built."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ease.exits import ExitRule
from ease.generation.early_exit import generate_early_exit
from ease.generation.output import GenerationOutput
from ease.generation.sampling import Sampler
from ease.generation.speculative import DraftDepth, auto_draft_depths, generate_speculative
from ease.models import UNSET, ExitSettings
from ease.validation import ArgumentTypeError, check_int, check_real, check_threshold, is_int

if TYPE_CHECKING:
    from ease.models import EarlyExitDecoder

__all__ = ["UNSET", "check_prompts", "exit_arguments", "generate"]


def check_prompts(model: EarlyExitDecoder, input_ids: Any, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The prompts of :func:`generate` as a list of 1-D int64 tensors on the model's device.

    Raises:
        TypeError: ``input_ids`` is neither a tensor nor a list of prompts, or holds no
            integers.
        ValueError: no prompt, an empty prompt, a bad shape or ``attention_mask``, or ids
            outside ``[0, vocab_size)``.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = list(input_ids)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                    f"got {tuple(getattr(attention_mask, 'shape', ()))}"
                )
            rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a [batch, seq] input_ids tensor, not a list of prompts")
        if input_ids and all(is_int(t) for t in input_ids):
            input_ids = [input_ids]  # one prompt given as a list of ids
        rows = []
        for prompt in input_ids:
            row = torch.as_tensor(prompt)
            if row.numel() == 0:
                raise ValueError("every prompt in input_ids needs at least one token")
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
                raise ValueError(f"each prompt in input_ids must be a 1-D sequence of integer ids, got {prompt!r}")
            rows.append(row)
    else:
        raise TypeError(f"input_ids must be a tensor or a list of prompts, got {type(input_ids).__name__}")
    if not rows:
        raise ValueError("input_ids holds no prompt")
    if any(row.numel() == 0 for row in rows):
        raise ValueError("every prompt in input_ids needs at least one token")
    rows = [row.to(device=model.device, dtype=torch.long) for row in rows]
    every = torch.cat(rows)
    low, high = int(every.min()), int(every.max())
    if low < 0 or high >= model.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {model.vocab_size}), got ids in [{low}, {high}]")
    return rows


def check_length(model: EarlyExitDecoder, prompts: list[torch.Tensor], max_new_tokens: int) -> None:
    """Refuse prompts and ``max_new_tokens`` that need more positions than ``max_seq_len``.

    The prompt's positions are fed, and each new token but the last is fed back at the
    next position: the longest prompt ``P`` needs ``P + max_new_tokens - 1`` positions (at
    least ``P``). The last new token needs none, so a prompt of exactly ``max_seq_len``
    tokens may still get one.
    """
    longest = max(len(p) for p in prompts)
    needed = longest + max(max_new_tokens - 1, 0)
    if needed > model.config.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens with max_new_tokens={max_new_tokens} needs {needed} positions "
            f"(the last new token is never fed back), more than the model's max_seq_len={model.config.max_seq_len}"
        )


def exit_arguments(model: EarlyExitDecoder, routing_threshold: Any, min_exit_layer: Any, draft_layers: Any) -> tuple:
    """``(routing_threshold, min_exit_layer, draft_layers)`` with the unset ones from ``model.exit_settings``.

    The stored decoding mode applies only when neither ``routing_threshold`` nor
    ``draft_layers`` is given: then the stored threshold (early exit) if there is one,
    else the stored draft depth (self-speculation), else full depth. Giving either one,
    ``None`` included, picks the mode outright and the other stored default is not used:
    ``routing_threshold=None`` runs at full depth whatever the model carries.
    ``min_exit_layer`` unset is the stored one (1 by default). Values are not checked here.
    """
    settings = getattr(model, "exit_settings", None) or ExitSettings()
    if routing_threshold is UNSET and draft_layers is UNSET:
        routing_threshold = settings.routing_threshold
        draft_layers = settings.draft_layers if routing_threshold is None else None
    else:
        routing_threshold = None if routing_threshold is UNSET else routing_threshold
        draft_layers = None if draft_layers is UNSET else draft_layers
    if min_exit_layer is UNSET:
        min_exit_layer = settings.min_exit_layer
    return routing_threshold, min_exit_layer, draft_layers


def check_draft_layers(draft_layers: Any, num_layers: int) -> int | DraftDepth:
    """A draft depth in ``1..num_layers - 1``, or a :class:`DraftDepth` over ``"auto"``'s
    candidates or a list of depths.

    Raises:
        ValueError: a depth out of range, an empty list, or another string than ``"auto"``.
    """
    if isinstance(draft_layers, str):
        if draft_layers != "auto":
            raise ValueError(f"draft_layers must be an integer, 'auto' or a list of integers, got {draft_layers!r}")
        if num_layers < 2:
            raise ValueError("draft_layers='auto' needs num_layers >= 2")
        return DraftDepth(auto_draft_depths(num_layers), num_layers)
    if isinstance(draft_layers, Sequence):
        if not draft_layers:
            raise ValueError("draft_layers must list at least one depth")
        depths = sorted({check_int("draft_layers", d, 1, num_layers - 1) for d in draft_layers})
        return DraftDepth(tuple(depths), num_layers)
    return check_int("draft_layers", draft_layers, 1, num_layers - 1)


class _eval_mode:
    """Evaluation mode (no dropout) inside the block; the previous mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def generate(
    model: EarlyExitDecoder,
    input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor] | Sequence[int],
    max_new_tokens: int,
    routing_threshold: float | None = UNSET,
    temperature: float = 0.0,
    top_k: int | None = None,
    *,
    min_exit_layer: int = UNSET,
    draft_layers: int | str | Sequence[int] | None = UNSET,
    num_draft_tokens: int = 4,
    draft_threshold: float | None = None,
    exit_criterion: str = UNSET,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens after each prompt, with a preallocated KV cache.

    Full depth (no ``routing_threshold``, no ``draft_layers``), confident early exit
    (``routing_threshold``; :mod:`ease.generation.early_exit`) or self-speculative
    decoding (``draft_layers``; :mod:`ease.generation.speculative`). The prompt always
    runs at full depth. Integer and real arguments may be Python or NumPy scalars; a bool
    is never a number. Every argument is checked by :mod:`ease.validation`, so a value
    gets the same verdict and message here as at the other entry points.

    ``routing_threshold`` is honoured on any model, a
    :class:`~ease.models.StandardTransformer` (``trains_every_layer`` False) included:
    generation is an inference tool, and a model may carry exits trained elsewhere (one
    converted from Hugging Face and fine-tuned with deep supervision outside this package,
    say), so an explicit threshold is obeyed, not second-guessed. ``Trainer.evaluate``
    differs on purpose: it reports no early-exit figures for a model this trainer trained
    on its final layer only, because that model's intermediate exits were never trained
    by it.

    Defaults from the model: ``routing_threshold``, ``min_exit_layer`` and
    ``draft_layers`` left unset are taken from ``model.exit_settings`` (an
    :class:`~ease.models.ExitSettings`, saved and loaded with the model; empty on a new
    model, which then runs at full depth with ``min_exit_layer=1`` as before). The stored
    mode (early exit if a threshold is stored, else self-speculation if a draft depth is)
    applies only when neither ``routing_threshold`` nor ``draft_layers`` is passed;
    passing either, ``None`` included, decides the mode, so ``routing_threshold=None``
    always means full depth, and an explicit argument always wins
    (:func:`exit_arguments`).

    Args:
        model: a :class:`~ease.models.StandardTransformer` or
            :class:`~ease.models.DeepSupervisionTransformer` (run in eval mode; its mode is
            restored afterwards).
        input_ids: the prompts: a ``(B, T)`` (or ``(T,)``) integer tensor, optionally with
            ``attention_mask``, or a list of prompts of any lengths (lists of ids or 1-D
            tensors). Every prompt needs at least one token.
        max_new_tokens: tokens to generate per prompt (``>= 0``). The longest prompt ``P``
            must satisfy ``P + max_new_tokens - 1 <= max_seq_len`` (and ``P <= max_seq_len``):
            the last new token is never fed back, so it needs no position of its own.
        routing_threshold: None for full depth (unset: the model's stored default); else
            a number in (0, 1]: a token exits
            after the first block ``l >= min_exit_layer`` whose exit-head top-1 probability
            reaches it (:class:`ease.exits.ExitRule`), with state propagation filling the
            skipped layers' cache.
        temperature: 0 for greedy decoding; else the sampling temperature (finite, > 0).
        top_k: sample among the ``top_k`` most likely tokens only (``>= 1``; with
            ``temperature > 0``); None: all tokens.
        min_exit_layer: no token exits before this layer (1..``num_layers``; unset: the
            stored default, 1 unless the model's settings say otherwise).
        draft_layers: self-speculative decoding with the first ``draft_layers`` blocks as
            the draft model (``1 <= E < num_layers``); excludes ``routing_threshold``.
            Unset: the stored draft depth when no threshold applies (see above).
            ``"auto"`` or a list of depths: the depth is chosen per round among these
            candidates (``"auto"``: about 1/6, 1/4, 1/3 and 1/2 of the layers), each tried
            first, then the one with the most tokens per unit of compute so far
            (:class:`~ease.generation.speculative.DraftDepth`, whose docstring gives the
            cost model); lossless like any fixed depth.
        num_draft_tokens: the most tokens drafted per verification (``>= 1``).
        draft_threshold: stop drafting a row at the first draft whose exit confidence is
            below this (in (0, 1]; needs ``draft_layers``); its verification comes sooner
            and wastes fewer draft blocks on tokens the full model would reject. None:
            always draft ``num_draft_tokens``. Lossless either way.
        exit_criterion: the score ``routing_threshold`` is compared with, one of
            :data:`ease.exits.EXIT_CRITERIA`: ``"max_prob"`` (the exit head's top-1
            probability), ``"margin"`` (top-1 minus top-2), ``"saturation"`` (cosine of
            the layer's state with the previous one's; no head is run to decide) or
            ``"classifier"`` (the model's trained :class:`~ease.exit_classifier.ExitClassifier`).
            Unset: ``model.exit_settings.exit_criterion`` (``"max_prob"`` on a new model).
        attention_mask: ``(B, T)``, nonzero at the real tokens of ``input_ids`` (left or
            right padding).
        seed: seeds a new ``torch.Generator`` for sampling (an integer in ``[0, 2**32)``;
            ignored with ``generator`` or greedy decoding).
        generator: the ``torch.Generator`` sampling draws from.
        pad_token_id: an integer that fills the left padding of
            :attr:`GenerationOutput.tokens`.

    Returns:
        :class:`GenerationOutput`.

    Raises:
        TypeError: ``input_ids`` is not integer; an argument of the wrong type (an
            :class:`~ease.validation.ArgumentTypeError`, which is a ``ValueError`` too),
            e.g. a string ``routing_threshold`` or a bool ``max_new_tokens``.
        ValueError: ``routing_threshold`` or ``draft_threshold`` outside (0, 1]; prompts
            and ``max_new_tokens`` that need more than ``max_seq_len`` positions; token ids
            outside ``[0, vocab_size)``; an empty prompt; ``max_new_tokens``,
            ``temperature``, ``top_k``, ``min_exit_layer``, ``draft_layers``,
            ``num_draft_tokens`` or ``seed`` out of range; ``routing_threshold`` with
            ``draft_layers``, or ``draft_threshold`` without it; an unknown
            ``exit_criterion``, or ``"classifier"`` on a model without an exit classifier.
    """
    routing_threshold, min_exit_layer, draft_layers = exit_arguments(model, routing_threshold, min_exit_layer, draft_layers)
    prompts = check_prompts(model, input_ids, attention_mask)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    check_length(model, prompts, max_new_tokens)
    if exit_criterion is UNSET:
        exit_criterion = (getattr(model, "exit_settings", None) or ExitSettings()).exit_criterion
    rule = ExitRule.for_model(model, routing_threshold, min_exit_layer, exit_criterion)
    temperature = check_real("temperature", temperature, 0.0)
    top_k = None if top_k is None else check_int("top_k", top_k, 1, expected="an integer >= 1 or None")
    num_layers = model.num_layers
    if draft_layers is not None:
        if rule.threshold is not None:
            raise ValueError("routing_threshold and draft_layers exclude each other: pick early exit or self-speculation")
        draft_layers = check_draft_layers(draft_layers, num_layers)
    num_draft_tokens = check_int("num_draft_tokens", num_draft_tokens, 1)
    draft_threshold = check_threshold("draft_threshold", draft_threshold)
    if draft_threshold is not None and draft_layers is None:
        raise ValueError("draft_threshold needs draft_layers (it stops self-speculative drafting)")
    if seed is not None:
        seed = check_int("seed", seed, 0, 2**32 - 1, expected="an integer in [0, 2**32)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    pad_token_id = check_int("pad_token_id", pad_token_id)

    if generator is None and seed is not None and temperature > 0:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = Sampler(temperature, top_k, generator)
    device = model.device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    stats: dict[str, int] = {}
    with torch.inference_mode(), _eval_mode(model):
        if max_new_tokens == 0:
            new_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
            exit_layers = torch.empty(batch, 0, dtype=torch.long, device=device)
        elif draft_layers is not None:
            new_tokens, exit_layers, stats = generate_speculative(
                model, prompts, max_new_tokens, draft_layers, num_draft_tokens, draft_threshold, sampler
            )
        else:
            new_tokens, exit_layers, stats = generate_early_exit(model, prompts, max_new_tokens, rule, sampler)
    # Clones made outside inference mode: the caller may edit them in place.
    new_tokens, exit_layers = new_tokens.clone(), exit_layers.clone()
    longest = max(lengths)
    tokens = torch.full((batch, longest + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = prompt
    tokens[:, longest:] = new_tokens
    return GenerationOutput(
        tokens=tokens,
        new_tokens=new_tokens,
        token_exit_layers=exit_layers,
        prompt_lengths=lengths,
        num_layers=num_layers,
        **stats,
    )

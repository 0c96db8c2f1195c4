"""Text, tokenizer and batches: everything an experiment needs before the model.

The default corpus is the English documentation that ships with every CPython
(``pydoc_data.topics``), so nothing is ever downloaded. A user's own UTF-8 text
file works the same way. The pipeline is::

    text --train_tokenizer--> byte-level BPE (cached as JSON)
         --encode--> 1-D LongTensor of ids
         --split_tokens--> train ids | val ids (contiguous: the tail is validation)
         --make_batches--> list of [B, T+1] LongTensors
         --split_batch--> inputs [B, T], targets [B, T]

``load_data`` runs it in one call and returns a ``DataBundle``; ``unigram_baseline``
gives the loss a model has to beat; ``set_seed`` is the one place every RNG is seeded.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ease._io import atomic_write_text

__all__ = [
    "DataBundle",
    "END_OF_TEXT",
    "decode",
    "default_cache_dir",
    "encode",
    "load_data",
    "load_default_text",
    "load_text",
    "make_batches",
    "set_seed",
    "split_batch",
    "split_tokens",
    "tokenizer_cache_path",
    "train_tokenizer",
    "unigram_baseline",
]

IGNORE_INDEX = -100
"""Target value that is left out of losses, accuracies and token counts."""

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A batch as the trainer takes it: ``[B, T + 1]`` ids, or an ``(inputs, targets)`` pair of ``[B, T]``."""

END_OF_TEXT = "<|endoftext|>"
"""The one special token; it takes id 0, before the 256 byte tokens."""

# Part of every cache key: bump it when the way the tokenizer is built changes
# (pre-tokenizer, trainer options, special tokens), so old cache files are not reused.
_TOKENIZER_FORMAT_VERSION = 1

# Byte-level BPE starts from all 256 bytes plus the special token; a smaller vocabulary
# could not encode arbitrary text.
_MIN_VOCAB_SIZE = 256 + 1


# --------------------------------------------------------------------------- text


def load_default_text() -> str:
    """Return the built-in corpus: CPython's own English documentation topics.

    ``pydoc_data.topics.topics`` (the text behind ``help("if")`` and friends) ships with
    every CPython, so the default corpus needs no download. Topics are joined in sorted
    key order, separated by blank lines, so the text is the same on every run of a given
    Python version (about 465k characters on 3.12).

    Raises:
        RuntimeError: if this Python was built without ``pydoc_data`` (some minimal
            distributions strip it); pass a text file to ``load_text`` instead.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - depends on the Python build
        raise RuntimeError(
            "the default corpus needs the standard module pydoc_data.topics, which this "
            "Python does not have; pass the path of a UTF-8 text file instead"
        ) from exc
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def load_text(path: str | os.PathLike[str] | None = None) -> str:
    """Return the text of a UTF-8 file, or the built-in corpus when ``path`` is None.

    The file is read as is (no newline translation); a leading byte-order mark is dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not valid UTF-8, or holds nothing but whitespace.
    """
    if path is None:
        return load_default_text()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"text file not found: {str(path)!r}", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"expected a text file, got a directory: {str(path)!r}", str(path))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8: {exc}") from exc
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty (or only whitespace)")
    return text


# ---------------------------------------------------------------------- tokenizer


def default_cache_dir() -> Path:
    """Return the tokenizer cache directory: ``$EASE_CACHE_DIR``, else ``~/.cache/ease``."""
    env = os.environ.get("EASE_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/ease").expanduser()


def _cache_key(text: str, vocab_size: int) -> str:
    """Hash of everything that determines the trained vocabulary."""
    digest = hashlib.sha256()
    digest.update(f"ease-bpe-v{_TOKENIZER_FORMAT_VERSION}\0vocab={vocab_size}\0".encode())
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:20]


def _train_bpe(text: str | Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text``, one string or a list of documents (no caching)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False so that decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # min_frequency=0: keep merging until vocab_size is reached, even on small texts.
        min_frequency=0,
        special_tokens=[END_OF_TEXT],
        # All 256 bytes are in the vocabulary whether or not the text uses them, so any
        # later text (a user's prompt) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Whole strings, not lines: the pre-tokenizer then sees each text exactly as encode() will,
    # so the merges are learnt on the same words that are later encoded.
    texts = [text] if isinstance(text, str) else list(text)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _check_vocab_size(vocab_size: object) -> None:
    """Raise unless ``vocab_size`` is an int of at least 257."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT}), got {vocab_size}"
        )


def _warn_if_vocab_short(tokenizer: Tokenizer, vocab_size: int, what: str, stacklevel: int) -> None:
    """Warn when the training text was too small to supply ``vocab_size`` tokens."""
    if tokenizer.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the {what} only supports {tokenizer.get_vocab_size()} tokens, fewer than "
            f"vocab_size={vocab_size}; use tokenizer.get_vocab_size() as the model's vocabulary",
            stacklevel=stacklevel,
        )


def tokenizer_cache_path(text: str, vocab_size: int, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the JSON file ``train_tokenizer`` uses for this ``(text, vocab_size)``.

    The name holds ``vocab_size`` and a hash of the text, the size and a format version, so
    a different text or size is a different file.
    """
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return directory / f"bpe-v{_TOKENIZER_FORMAT_VERSION}-{vocab_size}-{_cache_key(text, vocab_size)}.json"


def train_tokenizer(
    text: str, vocab_size: int = 1000, cache_dir: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """Return a byte-level BPE tokenizer for ``text``, trained once and then cached.

    The tokenizer splits text with the GPT-2 byte-level pre-tokenizer, starts from all 256
    bytes plus the special token ``<|endoftext|>`` (id 0), and learns merges until it has
    ``vocab_size`` tokens. Decoding restores the text exactly. Training is deterministic:
    the same text and size give the same vocabulary in any cache directory.

    The trained tokenizer is saved as JSON under ``cache_dir`` (default:
    ``$EASE_CACHE_DIR`` or ``~/.cache/ease``; see ``tokenizer_cache_path``), written
    atomically so concurrent runs never read a partial file; later calls with the same
    text and size load that file instead of training.

    Args:
        text: training text; must hold something other than whitespace.
        vocab_size: number of tokens wanted, at least 257 (256 bytes + 1 special token).
            A text too small to supply that many merges yields fewer tokens, with a warning;
            use ``tokenizer.get_vocab_size()`` for the real size.
        cache_dir: directory for the JSON cache; created if missing.

    Raises:
        TypeError: ``text`` is not a str, or ``vocab_size`` is not an int.
        ValueError: ``vocab_size`` < 257, or ``text`` is empty.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty (or only whitespace); cannot train a tokenizer on it")
    _check_vocab_size(vocab_size)

    path = tokenizer_cache_path(text, vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer.from_file(str(path))

    tokenizer = _train_bpe(text, vocab_size)
    _warn_if_vocab_short(tokenizer, vocab_size, "text", stacklevel=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tokenizer.to_str())
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Encode ``text`` to token ids: a 1-D ``torch.long`` tensor of length ``num_tokens``.

    No special tokens are added. ``<|endoftext|>`` written literally in the text is encoded
    as the special token (id 0).
    """
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)


def decode(tokenizer: Tokenizer, ids: torch.Tensor | Sequence[int]) -> str:
    """Decode a 1-D sequence of token ids (tensor or list) back to text.

    Special tokens are kept, so ``decode(tok, encode(tok, text)) == text`` for any text.

    Raises:
        ValueError: ``ids`` is a tensor that is not 1-D.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------ batches


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_id_stream(ids: torch.Tensor | Sequence[int], name: str = "ids") -> torch.Tensor:
    """Return ``ids`` as a 1-D long tensor, or raise naming the argument."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:  # torch.as_tensor([]) is float32; an empty list is still ids
            ids = ids.long()
    if not _is_integer_dtype(ids.dtype):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D token stream, got shape {tuple(ids.shape)}")
    return ids.long()


def split_tokens(
    ids: torch.Tensor | Sequence[int], val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into contiguous training and validation parts.

    The last ``round(len(ids) * val_fraction)`` tokens are validation; the rest, in
    order, is training. A contiguous split (rather than a random one) keeps text that the
    model trains on out of the validation windows. Both parts are views of ``ids``.

    Args:
        ids: 1-D integer tensor (or list) of token ids, shape ``[N]``.
        val_fraction: fraction of the stream held out, strictly between 0 and 1.

    Returns:
        ``(train_ids, val_ids)``, 1-D long tensors of shapes ``[N - n_val]`` and ``[n_val]``.

    Raises:
        TypeError: ``ids`` is not integer.
        ValueError: ``ids`` is not 1-D, ``val_fraction`` is outside (0, 1), or either part
            would be empty.
    """
    ids = _as_id_stream(ids)
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    num_val = int(round(ids.numel() * val_fraction))
    num_train = ids.numel() - num_val
    if num_val < 1 or num_train < 1:
        raise ValueError(
            f"a stream of {ids.numel()} tokens is too short to split with val_fraction={val_fraction}: "
            f"it gives {num_train} training and {num_val} validation tokens"
        )
    return ids[:num_train], ids[num_train:]


def make_batches(
    ids: torch.Tensor | Sequence[int],
    batch_size: int,
    seq_len: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = True,
) -> list[torch.Tensor]:
    """Cut a token stream into batches of windows of ``seq_len + 1`` tokens.

    Window ``i`` is ``ids[i*seq_len : i*seq_len + seq_len + 1]``: windows step by
    ``seq_len`` and share one token with the next, so each window's inputs
    (``[:-1]``) are disjoint from every other window's, and every token but the first is
    a target exactly once. A stream of ``N`` tokens gives ``(N - 1) // seq_len`` windows;
    the tail that does not fill a window is dropped.

    Args:
        ids: 1-D integer tensor (or list) of token ids, shape ``[N]``.
        batch_size: windows per batch, ``B >= 1``.
        seq_len: input length ``T >= 1``.
        shuffle: permute the windows (not the tokens within them) before batching.
        seed: seed of the ``torch.Generator`` used for the permutation, so the order is
            the same on every run and independent of the global RNG.
        drop_last: drop a final batch with fewer than ``batch_size`` windows. When False
            that batch is kept, shape ``[r, T + 1]`` with ``r < B``.

    Returns:
        A list of ``torch.long`` tensors of shape ``[B, T + 1]``, each a new tensor (not a
        view of ``ids``). Split one with ``split_batch``.

    Raises:
        TypeError: ``ids`` is not integer, or ``batch_size``/``seq_len`` is not an int.
        ValueError: ``ids`` is not 1-D; ``batch_size`` or ``seq_len`` < 1; the stream is too
            short for one window, or (with ``drop_last``) for one full batch.
    """
    ids = _as_id_stream(ids)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    num_windows = (ids.numel() - 1) // seq_len
    if num_windows < 1:
        raise ValueError(
            f"ids has {ids.numel()} tokens, too short for one window of seq_len + 1 = {seq_len + 1} tokens"
        )
    if drop_last and num_windows < batch_size:
        raise ValueError(
            f"ids gives only {num_windows} windows of seq_len={seq_len}, fewer than batch_size={batch_size}; "
            "lower batch_size or seq_len, or pass drop_last=False"
        )

    # unfold gives a [num_windows, seq_len + 1] strided view with step seq_len: no copy of
    # the stream is made until index_select gathers each batch.
    windows = ids.unfold(0, seq_len + 1, seq_len)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_windows, generator=generator)
    else:
        order = torch.arange(num_windows)

    batches = []
    for start in range(0, num_windows, batch_size):
        index = order[start : start + batch_size]
        if drop_last and index.numel() < batch_size:
            break
        # index_select copies, so batches never alias the stream or each other.
        batches.append(windows.index_select(0, index))
    return batches


def split_batch(batch: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(inputs, targets)``, each ``[B, T]``, from a batch in either form.

    Args:
        batch: a ``[B, T + 1]`` integer tensor (as ``make_batches`` gives), where
            ``inputs = batch[:, :-1]`` and ``targets = batch[:, 1:]`` (the next token at
            every position); or an ``(inputs, targets)`` pair of integer tensors of the
            same shape ``[B, T]``, returned as is.

    Returns:
        ``(inputs, targets)``, integer tensors of shape ``[B, T]`` (views for the tensor
        form).

    Raises:
        TypeError: ``batch`` is neither a tensor nor a pair of tensors, or holds a
            non-integer dtype.
        ValueError: ``batch`` has the wrong rank, no row, a tensor batch has fewer than 2
            columns, a pair has no position, or the pair's shapes differ.
    """
    if isinstance(batch, torch.Tensor):
        if not _is_integer_dtype(batch.dtype):
            raise TypeError(f"batch must hold integer token ids, got dtype {batch.dtype}")
        if batch.dim() != 2:
            raise ValueError(f"batch must have shape [B, T + 1], got {tuple(batch.shape)}")
        if batch.shape[1] < 2:
            raise ValueError(f"batch needs at least 2 columns (T + 1 >= 2), got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            raise ValueError(f"batch must have at least one row, got shape {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]

    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        for name, tensor in (("inputs", inputs), ("targets", targets)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"batch {name} must be a tensor, got {type(tensor).__name__}")
            if not _is_integer_dtype(tensor.dtype):
                raise TypeError(f"batch {name} must hold integer token ids, got dtype {tensor.dtype}")
            if tensor.dim() != 2:
                raise ValueError(f"batch {name} must have shape [B, T], got {tuple(tensor.shape)}")
        if inputs.shape != targets.shape:
            raise ValueError(
                f"batch inputs and targets must have the same shape, got {tuple(inputs.shape)} "
                f"and {tuple(targets.shape)}"
            )
        if inputs.numel() == 0:
            raise ValueError(
                f"batch inputs must have at least one row and one position, got shape {tuple(inputs.shape)}"
            )
        return inputs, targets

    raise TypeError(
        "batch must be a [B, T + 1] tensor or an (inputs, targets) pair of [B, T] tensors, "
        f"got {type(batch).__name__}"
    )


# ------------------------------------------------------------------- one call


@dataclass
class DataBundle:
    """Everything ``load_data`` prepares.

    Attributes:
        tokenizer: the byte-level BPE tokenizer (``tokenizers.Tokenizer``).
        train_batches: list of ``[B, T + 1]`` long tensors, windows shuffled with the seed.
        val_batches: list of ``[B, T + 1]`` long tensors in stream order; the last may have
            fewer rows so that every validation window is evaluated.
        vocab_size: the tokenizer's real vocabulary size (the model's ``vocab_size``);
            equal to the requested size unless the text was too small to reach it.
        train_ids: the 1-D long training token stream.
        val_ids: the 1-D long validation token stream.
    """

    tokenizer: Tokenizer
    train_batches: list[torch.Tensor]
    val_batches: list[torch.Tensor]
    vocab_size: int
    train_ids: torch.Tensor
    val_ids: torch.Tensor

    @property
    def train_tokens(self) -> int:
        """Number of tokens in the training stream."""
        return int(self.train_ids.numel())

    @property
    def val_tokens(self) -> int:
        """Number of tokens in the validation stream."""
        return int(self.val_ids.numel())


def load_data(
    path: str | os.PathLike[str] | None = None,
    vocab_size: int = 1000,
    seq_len: int = 64,
    batch_size: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DataBundle:
    """Load text, tokenize it and batch it: the one call experiments make.

    Steps: ``load_text(path)`` (the built-in corpus when ``path`` is None) ->
    ``train_tokenizer`` (cached) -> ``encode`` -> ``split_tokens`` (the last
    ``val_fraction`` is validation) -> ``make_batches``: training windows shuffled with
    ``seed`` and the incomplete last batch dropped; validation windows in order with the
    last batch kept.

    Raises:
        FileNotFoundError, ValueError: from ``load_text``, ``train_tokenizer``,
            ``split_tokens`` or ``make_batches`` (e.g. a text too short for one batch).
    """
    text = load_text(path)
    tokenizer = train_tokenizer(text, vocab_size=vocab_size, cache_dir=cache_dir)
    ids = encode(tokenizer, text)
    train_ids, val_ids = split_tokens(ids, val_fraction=val_fraction)
    train_batches = make_batches(train_ids, batch_size, seq_len, shuffle=True, seed=seed, drop_last=True)
    val_batches = make_batches(val_ids, batch_size, seq_len, shuffle=False, drop_last=False)
    return DataBundle(
        tokenizer=tokenizer,
        train_batches=train_batches,
        val_batches=val_batches,
        vocab_size=tokenizer.get_vocab_size(),
        train_ids=train_ids,
        val_ids=val_ids,
    )


# ----------------------------------------------------------------- baselines, seeds


def unigram_baseline(
    train_ids: torch.Tensor | Sequence[int],
    val_ids: torch.Tensor | Sequence[int],
    vocab_size: int,
) -> dict[str, float]:
    """Score the context-free model that predicts the training unigram distribution.

    ``p(v) = (count_train(v) + 1) / (N_train + vocab_size)`` (add-one smoothing, so tokens
    unseen in training still get a finite loss). On the validation tokens:

    - ``loss`` = mean of ``-ln p(token)`` (nats per token),
    - ``ppl`` = ``exp(loss)``,
    - ``accuracy`` = fraction of validation tokens equal to the most frequent training
      token (the lowest id among ties).

    A model that learnt anything from context must beat this; a uniform guess would give
    ``loss = ln(vocab_size)``.

    Args:
        train_ids, val_ids: 1-D integer tensors (or lists) of ids in ``[0, vocab_size)``;
            both non-empty.
        vocab_size: size of the vocabulary the distribution is over.

    Returns:
        ``{"loss": float, "ppl": float, "accuracy": float}``, computed in float64.

    Raises:
        TypeError: ids are not integer.
        ValueError: ids are not 1-D, are empty, or fall outside ``[0, vocab_size)``;
            ``vocab_size`` < 1.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    train_ids = _as_id_stream(train_ids, "train_ids")
    val_ids = _as_id_stream(val_ids, "val_ids")
    for name, ids in (("train_ids", train_ids), ("val_ids", val_ids)):
        if ids.numel() == 0:
            raise ValueError(f"{name} is empty")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got values in [{low}, {high}]")

    counts = torch.bincount(train_ids, minlength=vocab_size).double()
    log_probs = torch.log(counts + 1.0) - np.log(train_ids.numel() + vocab_size)
    loss = float(-log_probs[val_ids].mean())
    most_frequent = int(torch.argmax(counts))  # argmax returns the first maximum: lowest id
    accuracy = float((val_ids == most_frequent).double().mean())
    return {"loss": loss, "ppl": float(np.exp(loss)), "accuracy": accuracy}


def set_seed(seed: int) -> None:
    """Seed every random number generator the framework uses, in one call.

    Seeds Python's ``random``, NumPy's global RNG and torch on the CPU and every CUDA
    device (``torch.manual_seed`` covers CUDA; the explicit call documents it and is a
    no-op without CUDA). Generators created elsewhere with their own seed (such as
    ``make_batches``'s shuffle) are unaffected.

    Raises:
        TypeError: ``seed`` is not an int.
        ValueError: ``seed`` is outside ``[0, 2**32)`` (the range NumPy accepts).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)

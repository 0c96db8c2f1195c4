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

A second, larger built-in corpus, ``load_data(corpus="stdlib")``, is the Python source of
CPython's own standard library (about 11 MB, 3M tokens with an 8192-token BPE on 3.11),
also present on every CPython. It is tokenized once and cached (``load_stdlib_corpus``)::

    stdlib .py files --byte-level BPE trained on the files--> tokenizer (cached with the corpus)
         --encode each file, + <|endoftext|>--> ids.npy (uint16, memory-mapped) + file offsets
         --split by file (is_validation_file)--> train ids | val ids
         --make_batches--> as above
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import sys
import sysconfig
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from ease._io import atomic_path, atomic_write_text
from ease.validation import check_int, check_real

__all__ = [
    "CORPORA",
    "DataBundle",
    "END_OF_TEXT",
    "STDLIB_VAL_FRACTION",
    "STDLIB_VOCAB_SIZE",
    "TokenizedCorpus",
    "decode",
    "default_cache_dir",
    "encode",
    "is_validation_file",
    "list_stdlib_files",
    "load_data",
    "load_default_text",
    "load_stdlib_corpus",
    "load_text",
    "make_batches",
    "set_seed",
    "split_batch",
    "split_tokens",
    "stdlib_cache_path",
    "stdlib_root",
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
    check_int(
        "vocab_size", vocab_size, _MIN_VOCAB_SIZE,
        expected=f"an integer of at least {_MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT})",
    )  # fmt: skip


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
    batch_size = check_int("batch_size", batch_size, 1)
    seq_len = check_int("seq_len", seq_len, 1)

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


# ------------------------------------------------------------ the stdlib corpus


CORPORA = ("docs", "stdlib")
"""Names of the built-in corpora ``load_data(corpus=...)`` takes.

- ``"docs"`` (the default): CPython's English documentation topics (``load_default_text``),
  about 465k characters; split at the token level (the tail is validation).
- ``"stdlib"``: the ``.py`` files of CPython's standard library (``list_stdlib_files``),
  about 11 MB; tokenized once and cached (``load_stdlib_corpus``), split by file
  (``is_validation_file``).
"""

STDLIB_VOCAB_SIZE = 8192
"""Default vocabulary of the stdlib corpus's BPE (ids then fit in uint16)."""

STDLIB_VAL_FRACTION = 0.05
"""Default fraction of the stdlib corpus's files held out for validation."""

# Folders left out wherever they appear in a path: test suites (their data folders hold
# files that are not valid Python on purpose, e.g. lib2to3/tests/data), installed
# third-party packages, and byte-code caches.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Top-level entries of the stdlib left out: pydoc_data is the "docs" corpus itself (one big
# dict of strings), kept out so the two corpora do not overlap; config-3.X-<platform>
# holds build artefacts (python-config.py); _sysconfigdata_*.py is the build's configuration,
# which differs between two builds of the same version.
_EXCLUDED_TOP_DIRS = frozenset({"pydoc_data"})
_EXCLUDED_TOP_DIR_PREFIXES = ("config-",)
_EXCLUDED_TOP_FILE_PREFIXES = ("_sysconfigdata",)

# Part of the stdlib cache key: bump it when the file selection, the tokenizer or the
# layout of the cached files changes, so old caches are not reused.
_STDLIB_FORMAT_VERSION = 1


def stdlib_root() -> Path:
    """Return the folder of this Python's standard library: ``sysconfig.get_paths()["stdlib"]``."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Return the files of the stdlib corpus: relative POSIX paths, sorted.

    Every non-empty ``*.py`` file under ``root`` (default: ``stdlib_root()``) except:

    - those under a folder named ``test``, ``tests``, ``idle_test``, ``site-packages`` or
      ``__pycache__`` at any depth (CPython's test suites, including ``lib2to3/tests``
      whose data files are deliberately broken Python, and installed packages);
    - the top-level ``pydoc_data`` folder: it is the ``"docs"`` corpus, stored as one
      Python dict of strings, so the two corpora do not overlap;
    - top-level ``config-*`` folders (build artefacts) and ``_sysconfigdata*.py`` (the
      build's configuration, which differs between two builds of one version);
    - hidden files and folders (a leading ``.``); symbolic links to folders are not
      followed (links to files are read through).

    Raises:
        NotADirectoryError: ``root`` is not a directory (the message names it).
        ValueError: no file is left.
    """
    root = stdlib_root() if root is None else Path(root).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"stdlib corpus root is not a directory: {str(root)!r}", str(root))
    files = []
    for folder, dirs, names in os.walk(root):
        relative = Path(folder).relative_to(root)
        top = relative == Path(".")
        # Pruning in place keeps os.walk out of excluded trees (site-packages can be large).
        dirs[:] = [
            d
            for d in dirs
            if d not in _EXCLUDED_DIRS
            and not d.startswith(".")
            and not (top and (d in _EXCLUDED_TOP_DIRS or d.startswith(_EXCLUDED_TOP_DIR_PREFIXES)))
        ]
        for name in names:
            if not name.endswith(".py") or name.startswith("."):
                continue
            if top and name.startswith(_EXCLUDED_TOP_FILE_PREFIXES):
                continue
            full = os.path.join(folder, name)
            # Not a file (a broken link) or empty (many __init__.py): nothing to learn from.
            if not os.path.isfile(full) or os.path.getsize(full) == 0:
                continue
            files.append((relative / name).as_posix())
    if not files:
        raise ValueError(f"no .py files for the stdlib corpus under {str(root)!r}")
    return sorted(files)


def is_validation_file(path: str, val_fraction: float = STDLIB_VAL_FRACTION) -> bool:
    """Whether the file at relative POSIX ``path`` belongs to the validation split.

    The rule: the first 8 bytes of ``sha256("ease-split\\0" + path)``, read as a fraction of
    ``2**64``, fall below ``val_fraction``. It depends on the path alone, so the split is the
    same on every run and machine, a file never moves when others are added or removed, and
    about ``val_fraction`` of the files (not of the tokens) are held out. Whole files go to
    one side, so no validation text was seen in training.
    """
    digest = hashlib.sha256(f"ease-split\0{path}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _check_val_fraction(val_fraction: object) -> None:
    check_real("val_fraction", val_fraction, 0.0, 1.0, above=True, below=True, expected="strictly between 0 and 1")


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus of documents (files), tokenized: what ``load_stdlib_corpus`` returns.

    Document ``i`` is ``ids[offsets[i] : offsets[i + 1]]``: the ids of file ``files[i]``
    followed by one ``<|endoftext|>`` (id 0), so any run of documents put together is
    joined by that token and the model learns where a file ends.

    Attributes:
        tokenizer: the byte-level BPE tokenizer the ids were made with.
        ids: 1-D token ids of every document, shape ``[N]``; ``uint16`` when the
            vocabulary fits (up to 65536 tokens), else ``uint32``. Read-only, memory-mapped
            from the cache (``numpy.load(..., mmap_mode="r")``).
        offsets: 1-D ``int64`` array of ``len(files) + 1`` document boundaries, from 0 to ``N``.
        files: relative POSIX paths of the documents, sorted.
    """

    tokenizer: Tokenizer
    ids: np.ndarray
    offsets: np.ndarray
    files: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        """Number of tokens in the corpus, ``<|endoftext|>`` separators included."""
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        """Return the ids of document ``index`` (a view of ``ids``), ending with ``<|endoftext|>``."""
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def split(
        self, val_fraction: float = STDLIB_VAL_FRACTION
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[str, ...]]:
        """Split by file with ``is_validation_file``: whole files go to one side.

        Each side is its files' documents in path order, so consecutive files are joined by
        ``<|endoftext|>``.

        Returns:
            ``(train_ids, val_ids, train_files, val_files)``: two 1-D ``torch.long`` tensors
            (copies, not views of the memory map) and the relative paths on each side.

        Raises:
            ValueError: ``val_fraction`` is outside (0, 1), or one side gets no file.
        """
        _check_val_fraction(val_fraction)
        in_val = [is_validation_file(path, val_fraction) for path in self.files]
        train_index = [i for i, held_out in enumerate(in_val) if not held_out]
        val_index = [i for i, held_out in enumerate(in_val) if held_out]
        if not train_index or not val_index:
            raise ValueError(
                f"val_fraction={val_fraction} puts {len(val_index)} of the {len(self.files)} files in validation "
                f"and {len(train_index)} in training; both sides need a file: change val_fraction"
            )

        def gather(index: list[int]) -> torch.Tensor:
            parts = np.concatenate([self.document(i) for i in index])
            return torch.from_numpy(parts.astype(np.int64))

        return (
            gather(train_index),
            gather(val_index),
            tuple(self.files[i] for i in train_index),
            tuple(self.files[i] for i in val_index),
        )


def _stdlib_fingerprint(root: Path, files: Sequence[str], vocab_size: int) -> str:
    """Cheap hash of what the cached corpus depends on (stat only, no file read)."""
    digest = hashlib.sha256()
    digest.update(
        f"ease-stdlib-v{_STDLIB_FORMAT_VERSION}\0bpe-v{_TOKENIZER_FORMAT_VERSION}\0vocab={vocab_size}\0"
        f"python={sys.version}\0".encode()
    )
    for path in files:
        info = (root / path).stat()
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0".encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:20]


def stdlib_cache_path(
    vocab_size: int = STDLIB_VOCAB_SIZE,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the folder ``load_stdlib_corpus`` caches this corpus in.

    The name holds ``vocab_size`` and a fingerprint of the sorted relative paths, sizes and
    modification times of ``list_stdlib_files(root)``, the Python version (``sys.version``)
    and a format version: another Python, an edited file or another size is another folder.
    It holds ``tokenizer.json``, ``ids.npy`` and ``index.json`` (files and offsets, written
    last: the folder is complete when it exists).
    """
    _check_vocab_size(vocab_size)
    root = stdlib_root() if root is None else Path(root).expanduser()
    files = list_stdlib_files(root)
    return _stdlib_cache_folder(root, files, vocab_size, cache_dir)


def _stdlib_cache_folder(
    root: Path, files: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike[str] | None
) -> Path:
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return directory / f"stdlib-v{_STDLIB_FORMAT_VERSION}-{vocab_size}-{_stdlib_fingerprint(root, files, vocab_size)}"


def _id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest array dtype that holds every id below ``vocab_size``: uint16 or uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _read_source(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"stdlib corpus file {str(path)!r} is not valid UTF-8: {exc}") from exc


def _build_stdlib_corpus(root: Path, files: Sequence[str], vocab_size: int, folder: Path, progress: bool) -> None:
    """Train the BPE, encode every file and write the cache folder (index.json last)."""
    start = time.perf_counter()
    texts = [_read_source(root / path) for path in files]
    megabytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts) / 1e6
    if progress:
        print(
            f"ease: building the stdlib corpus once ({len(files)} files, {megabytes:.1f} MB under {root}); "
            f"training a {vocab_size}-token BPE, cached in {folder}",
            file=sys.stderr,
            flush=True,
        )

    tokenizer_path = folder / "tokenizer.json"
    if tokenizer_path.is_file():  # a build interrupted after training: keep the tokenizer
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        tokenizer = _train_bpe(texts, vocab_size)
        _warn_if_vocab_short(tokenizer, vocab_size, "stdlib corpus", stacklevel=4)
        atomic_write_text(tokenizer_path, tokenizer.to_str())
    dtype = _id_dtype(tokenizer.get_vocab_size())
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)

    # encode_batch parallelises over files; chunks keep the progress bar moving.
    chunk = 64
    pieces, lengths = [], []
    with tqdm(total=len(texts), desc="ease: encoding", unit="file", disable=not progress, leave=False) as bar:
        for first in range(0, len(texts), chunk):
            for encoding in tokenizer.encode_batch(texts[first : first + chunk], add_special_tokens=False):
                document = np.asarray(encoding.ids + [end_of_text], dtype=dtype)
                pieces.append(document)
                lengths.append(document.size)
            bar.update(min(chunk, len(texts) - first))
    ids = np.concatenate(pieces)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    with atomic_path(folder / "ids.npy") as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.save(path) would append ".npy"
            np.save(handle, ids)
            handle.flush()
            os.fsync(handle.fileno())
    index = {
        "format": _STDLIB_FORMAT_VERSION,
        "python": sys.version,
        "root": str(root),
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": np.dtype(dtype).name,
        "num_tokens": int(offsets[-1]),
        "files": list(files),
        "offsets": offsets.tolist(),
    }
    atomic_write_text(folder / "index.json", json.dumps(index))
    if progress:
        print(
            f"ease: stdlib corpus cached: {int(offsets[-1]):,} tokens in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def load_stdlib_corpus(
    vocab_size: int = STDLIB_VOCAB_SIZE,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TokenizedCorpus:
    """Return the standard library's Python source, tokenized: built once, then memory-mapped.

    The first call for a given Python and ``vocab_size`` reads ``list_stdlib_files(root)``,
    trains a byte-level BPE on the files (each file one training text, as ``train_tokenizer``
    does for one text), encodes each file followed by ``<|endoftext|>``, and writes the cache
    folder (``stdlib_cache_path``) atomically, file by file; this takes some seconds to a
    minute and says so on stderr. Later calls only list and stat the files, load the
    tokenizer and memory-map the ids (well under a second).

    Args:
        vocab_size: BPE vocabulary wanted, at least 257 (default 8192).
        root: the standard library folder (default: ``stdlib_root()``); tests point it at a
            small folder.
        cache_dir: where the cache folder goes (default: ``$EASE_CACHE_DIR`` or
            ``~/.cache/ease``).
        progress: print what the one-off build is doing on stderr.

    Raises:
        TypeError, ValueError: a bad ``vocab_size``; a corpus file that is not UTF-8.
        NotADirectoryError, ValueError: from ``list_stdlib_files``.
    """
    _check_vocab_size(vocab_size)
    root = stdlib_root() if root is None else Path(root).expanduser()
    files = list_stdlib_files(root)
    folder = _stdlib_cache_folder(root, files, vocab_size, cache_dir)
    index_path = folder / "index.json"
    if not index_path.is_file():
        _build_stdlib_corpus(root, files, vocab_size, folder, progress)
    index = json.loads(index_path.read_text(encoding="utf-8"))
    ids = np.load(folder / "ids.npy", mmap_mode="r")
    offsets = np.asarray(index["offsets"], dtype=np.int64)
    if ids.ndim != 1 or ids.size != offsets[-1] or len(index["files"]) + 1 != offsets.size:
        raise ValueError(
            f"stdlib corpus cache {str(folder)!r} is inconsistent (ids of shape {ids.shape}, "
            f"{offsets.size} offsets ending at {offsets[-1]}); delete the folder to rebuild it"
        )
    return TokenizedCorpus(
        tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
        ids=ids,
        offsets=offsets,
        files=tuple(index["files"]),
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
        train_files: for a corpus split by file (``corpus="stdlib"``), the relative paths
            of the training files, in stream order; empty otherwise.
        val_files: likewise for validation.
    """

    tokenizer: Tokenizer
    train_batches: list[torch.Tensor]
    val_batches: list[torch.Tensor]
    vocab_size: int
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()

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
    vocab_size: int | None = None,
    seq_len: int = 64,
    batch_size: int = 32,
    val_fraction: float | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    corpus: str | None = None,
) -> DataBundle:
    """Load text, tokenize it and batch it: the one call experiments make.

    The text is a user's file (``path``) or a built-in corpus (``corpus``, one of
    ``CORPORA``); with neither, the ``"docs"`` corpus.

    - A file or ``"docs"``: ``load_text(path)`` -> ``train_tokenizer`` (cached) ->
      ``encode`` -> ``split_tokens`` (the last ``val_fraction`` of the tokens, default
      0.1, is validation).
    - ``"stdlib"``: ``load_stdlib_corpus`` (built once, then memory-mapped) ->
      ``TokenizedCorpus.split``: whole files go to validation by a hash of their path
      (``is_validation_file``; ``val_fraction``, default 0.05, is a fraction of the files);
      files are joined by ``<|endoftext|>``.

    Then ``make_batches``: training windows shuffled with ``seed`` and the incomplete last
    batch dropped; validation windows in order with the last batch kept.

    Args:
        path: a UTF-8 text file; leave None to use ``corpus``.
        vocab_size: BPE vocabulary; default 1000 for a file or ``"docs"``, 8192 for
            ``"stdlib"``.
        seq_len, batch_size: window length ``T`` and windows per batch ``B``.
        val_fraction: held-out fraction (of tokens, or of files for ``"stdlib"``).
        seed: seed of the training-window shuffle.
        cache_dir: tokenizer and corpus cache (default ``$EASE_CACHE_DIR`` or ``~/.cache/ease``).
        corpus: a built-in corpus name, ``"docs"`` (default) or ``"stdlib"``.

    Raises:
        TypeError: ``corpus`` is not a str.
        ValueError: ``corpus`` is not in ``CORPORA``, or both ``path`` and ``corpus`` are given.
        FileNotFoundError, ValueError: from ``load_text``, ``train_tokenizer``,
            ``split_tokens``, ``load_stdlib_corpus`` or ``make_batches`` (e.g. a text too
            short for one batch).
    """
    if corpus is not None:
        if not isinstance(corpus, str):
            raise TypeError(
                f"corpus must be a str, one of {', '.join(map(repr, CORPORA))}; got {type(corpus).__name__}"
            )
        if corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(map(repr, CORPORA))}, got {corpus!r}")
        if path is not None:
            raise ValueError(
                f"pass either path (a text file) or corpus (a built-in corpus), not both: got path={str(path)!r} "
                f"and corpus={corpus!r}"
            )

    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    if corpus == "stdlib":
        tokenized = load_stdlib_corpus(
            vocab_size=STDLIB_VOCAB_SIZE if vocab_size is None else vocab_size, cache_dir=cache_dir
        )
        tokenizer = tokenized.tokenizer
        train_ids, val_ids, train_files, val_files = tokenized.split(
            STDLIB_VAL_FRACTION if val_fraction is None else val_fraction
        )
    else:
        text = load_text(path)
        tokenizer = train_tokenizer(text, vocab_size=1000 if vocab_size is None else vocab_size, cache_dir=cache_dir)
        ids = encode(tokenizer, text)
        train_ids, val_ids = split_tokens(ids, val_fraction=0.1 if val_fraction is None else val_fraction)
    train_batches = make_batches(train_ids, batch_size, seq_len, shuffle=True, seed=seed, drop_last=True)
    val_batches = make_batches(val_ids, batch_size, seq_len, shuffle=False, drop_last=False)
    return DataBundle(
        tokenizer=tokenizer,
        train_batches=train_batches,
        val_batches=val_batches,
        vocab_size=tokenizer.get_vocab_size(),
        train_ids=train_ids,
        val_ids=val_ids,
        train_files=train_files,
        val_files=val_files,
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
    vocab_size = check_int("vocab_size", vocab_size, 1, expected="a positive integer")
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
    seed = check_int("seed", seed, 0, 2**32 - 1, expected="an integer in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)

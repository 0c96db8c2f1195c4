"""Tests for ease.data: corpus, tokenizer cache, batching, baselines and seeding."""

import math
import os
import random

import numpy as np
import pytest
import torch

from ease import data

VOCAB = 1000

# A small text with repeated words (so BPE has merges to learn), non-ASCII characters
# (multi-byte UTF-8, which the byte-level round trip must restore) and odd whitespace.
SMALL_TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 20
    + "Ünïcödé — naïve café, 東京, emoji 🙂.\n\n\tTabs  and   spaces\r\nend"
)


@pytest.fixture(scope="module")
def default_text():
    return data.load_default_text()


@pytest.fixture(scope="module")
def default_tokenizer(default_text, tmp_path_factory):
    """The tokenizer on the full default corpus, trained once for the module."""
    return data.train_tokenizer(default_text, VOCAB, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def default_ids(default_tokenizer, default_text):
    return data.encode(default_tokenizer, default_text)


# ------------------------------------------------------------------------- text


def test_default_text_is_the_pydoc_topics_in_sorted_order(default_text):
    from pydoc_data.topics import topics

    assert len(default_text) > 100_000
    assert default_text == data.load_default_text()  # deterministic
    keys = sorted(topics)
    first, last = topics[keys[0]].strip("\n"), topics[keys[-1]].strip("\n")
    assert default_text.startswith(first)
    assert default_text.endswith(last)


def test_load_text_none_is_the_default_corpus(default_text):
    assert data.load_text(None) == default_text
    assert data.load_text() == default_text


def test_load_text_reads_a_user_file_exactly(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(SMALL_TEXT.encode("utf-8"))
    assert data.load_text(path) == SMALL_TEXT
    assert data.load_text(str(path)) == SMALL_TEXT  # str paths too; \r\n kept as written


def test_load_text_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "no_such_file.txt"
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        data.load_text(missing)


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_load_text_empty_file_raises(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="empty"):
        data.load_text(path)


def test_load_text_rejects_invalid_utf8_and_directories(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_text(path)
    with pytest.raises(IsADirectoryError):
        data.load_text(tmp_path)


# -------------------------------------------------------------------- tokenizer


def test_round_trip_on_the_default_corpus(default_tokenizer, default_text, default_ids):
    assert default_ids.dtype == torch.long and default_ids.dim() == 1
    # BPE must compress: well under one token per character.
    assert default_ids.numel() < len(default_text) / 2
    assert data.decode(default_tokenizer, default_ids) == default_text


def test_round_trip_on_unseen_text(default_tokenizer):
    # Byte-level: characters never seen in training still encode and decode exactly,
    # and a literal special token survives decoding.
    text = SMALL_TEXT + " " + data.END_OF_TEXT + " Ωmega ∑"
    ids = data.encode(default_tokenizer, text)
    assert data.decode(default_tokenizer, ids) == text
    assert data.decode(default_tokenizer, ids.tolist()) == text


def test_vocab_size_respected(default_tokenizer):
    assert default_tokenizer.get_vocab_size() == VOCAB
    assert default_tokenizer.token_to_id(data.END_OF_TEXT) == 0


def test_vocab_size_respected_for_another_size(tmp_path):
    tokenizer = data.train_tokenizer(SMALL_TEXT * 3, 300, cache_dir=tmp_path)
    assert tokenizer.get_vocab_size() == 300
    ids = data.encode(tokenizer, SMALL_TEXT)
    assert int(ids.max()) < 300


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_vocab_size_too_small_raises(tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(SMALL_TEXT, vocab_size, cache_dir=tmp_path)


def test_train_tokenizer_rejects_empty_text(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        data.train_tokenizer("   ", 300, cache_dir=tmp_path)


def test_cache_hit_loads_the_file_without_training(tmp_path, monkeypatch):
    first = data.train_tokenizer(SMALL_TEXT, 300, cache_dir=tmp_path)
    path = data.tokenizer_cache_path(SMALL_TEXT, 300, tmp_path)
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("train_tokenizer retrained despite a cached file")

    monkeypatch.setattr(data, "_train_bpe", no_training)
    second = data.train_tokenizer(SMALL_TEXT, 300, cache_dir=tmp_path)
    assert second.to_str() == first.to_str()
    assert path.stat().st_mtime_ns == mtime


def test_cache_key_changes_with_text_and_size(tmp_path):
    data.train_tokenizer(SMALL_TEXT, 300, cache_dir=tmp_path)
    data.train_tokenizer(SMALL_TEXT, 301, cache_dir=tmp_path)
    data.train_tokenizer(SMALL_TEXT + "!", 300, cache_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 3
    assert data.tokenizer_cache_path(SMALL_TEXT, 300, tmp_path) != data.tokenizer_cache_path(
        SMALL_TEXT + "!", 300, tmp_path
    )


def test_cache_dir_defaults_to_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("EASE_CACHE_DIR", str(tmp_path / "env_cache"))
    assert data.default_cache_dir() == tmp_path / "env_cache"
    data.train_tokenizer(SMALL_TEXT, 300)
    assert data.tokenizer_cache_path(SMALL_TEXT, 300).is_file()
    assert data.tokenizer_cache_path(SMALL_TEXT, 300).parent == tmp_path / "env_cache"


def test_training_is_deterministic_across_cache_dirs(default_tokenizer, default_text, tmp_path):
    again = data.train_tokenizer(default_text, VOCAB, cache_dir=tmp_path)
    assert again.get_vocab() == default_tokenizer.get_vocab()
    sample = default_text[:20_000]
    assert torch.equal(data.encode(again, sample), data.encode(default_tokenizer, sample))


# ----------------------------------------------------------------------- splits


def test_split_tokens_is_contiguous_tail():
    ids = torch.arange(100)
    train, val = data.split_tokens(ids, val_fraction=0.1)
    assert torch.equal(train, torch.arange(90))
    assert torch.equal(val, torch.arange(90, 100))
    train, val = data.split_tokens(list(range(10)), val_fraction=0.25)  # round(2.5) = 2
    assert train.numel() + val.numel() == 10 and val.tolist() == list(range(10 - val.numel(), 10))


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_tokens_rejects_bad_fraction(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_tokens(torch.arange(100), val_fraction)


def test_split_tokens_rejects_too_short_and_bad_streams():
    with pytest.raises(ValueError, match="too short"):
        data.split_tokens(torch.arange(3), 0.1)  # round(0.3) = 0 validation tokens
    with pytest.raises(ValueError, match="1-D"):
        data.split_tokens(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        data.split_tokens(torch.zeros(10))


# ---------------------------------------------------------------------- batches


def test_make_batches_shapes_and_windows_match_the_stream():
    ids = torch.arange(1000) * 7  # distinct values, not equal to their positions
    seq_len, batch_size = 10, 4
    batches = data.make_batches(ids, batch_size, seq_len)
    num_windows = (1000 - 1) // seq_len  # 99
    assert len(batches) == num_windows // batch_size  # 24; drop_last drops 3 windows
    for b, batch in enumerate(batches):
        assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == torch.long
        inputs, targets = data.split_batch(batch)
        for row in range(batch_size):
            i = b * batch_size + row  # window index, in order when not shuffled
            assert torch.equal(batch[row], ids[i * seq_len : i * seq_len + seq_len + 1])
            # Targets are the inputs' next tokens in the stream.
            assert torch.equal(targets[row], ids[i * seq_len + 1 : i * seq_len + seq_len + 1])
            assert torch.equal(inputs[row], ids[i * seq_len : i * seq_len + seq_len])


def test_make_batches_input_spans_are_distinct_and_non_overlapping():
    ids = torch.arange(503)
    seq_len = 8
    batches = data.make_batches(ids, 5, seq_len, shuffle=True, seed=3, drop_last=False)
    inputs = torch.cat([data.split_batch(b)[0] for b in batches])
    num_windows = (503 - 1) // seq_len
    assert inputs.shape == (num_windows, seq_len)
    # Every window's inputs are a contiguous span starting at a multiple of seq_len, and
    # together they cover positions 0 .. num_windows * seq_len - 1 exactly once.
    assert torch.equal(inputs - inputs[:, :1], torch.arange(seq_len).expand_as(inputs))
    assert torch.equal(inputs.flatten().sort().values, torch.arange(num_windows * seq_len))
    assert len(batches[-1]) == num_windows % 5 or num_windows % 5 == 0


def test_make_batches_drop_last_false_keeps_the_remainder():
    batches = data.make_batches(torch.arange(101), 3, 10, drop_last=False)  # 10 windows
    assert [b.shape[0] for b in batches] == [3, 3, 3, 1]
    assert data.make_batches(torch.arange(101), 3, 10, drop_last=True)[-1].shape[0] == 3


def test_make_batches_returns_copies_not_views():
    ids = torch.arange(50)
    batch = data.make_batches(ids, 2, 5)[0]
    batch.zero_()
    assert torch.equal(ids, torch.arange(50))


def test_make_batches_shuffle_is_seeded():
    ids = torch.arange(4001)
    def order(seed):
        batches = data.make_batches(ids, 4, 10, shuffle=True, seed=seed)
        return [int(b[r, 0]) // 10 for b in batches for r in range(b.shape[0])]

    torch.manual_seed(123)  # the global RNG must not matter
    first = order(0)
    torch.manual_seed(456)
    assert order(0) == first
    assert order(1) != first
    assert first != sorted(first)  # shuffled
    assert sorted(first) == list(range(400))  # a permutation of all windows
    unshuffled = data.make_batches(ids, 4, 10)
    assert [int(b[r, 0]) // 10 for b in unshuffled for r in range(4)] == list(range(400))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0, "seq_len": 4}, "batch_size"),
        ({"batch_size": 2, "seq_len": 0}, "seq_len"),
        ({"batch_size": 2, "seq_len": 20}, "seq_len"),  # 20 tokens: no window of 21
        ({"batch_size": 5, "seq_len": 4}, "batch_size"),  # 4 windows < 5
    ],
)
def test_make_batches_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        data.make_batches(torch.arange(20), **kwargs)


def test_make_batches_rejects_non_integer_ids():
    with pytest.raises(TypeError, match="integer"):
        data.make_batches(torch.rand(100), 2, 4)


# ------------------------------------------------------------------ split_batch


def test_split_batch_tensor_form():
    batch = torch.arange(12).reshape(2, 6)
    inputs, targets = data.split_batch(batch)
    assert inputs.shape == targets.shape == (2, 5)
    assert torch.equal(inputs, batch[:, :-1])
    assert torch.equal(targets, batch[:, 1:])
    assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_split_batch_pair_form_is_returned_as_is():
    inputs, targets = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.int32)
    out_inputs, out_targets = data.split_batch((inputs, targets))
    assert out_inputs is inputs and out_targets is targets
    out_inputs, out_targets = data.split_batch([inputs, targets])
    assert out_inputs is inputs and out_targets is targets


@pytest.mark.parametrize(
    ("batch", "error"),
    [
        (torch.zeros(2, 5), TypeError),  # float
        (torch.zeros(2, 5, dtype=torch.bool), TypeError),
        (torch.zeros(10, dtype=torch.long), ValueError),  # rank 1
        (torch.zeros(2, 3, 4, dtype=torch.long), ValueError),  # rank 3
        (torch.zeros(2, 1, dtype=torch.long), ValueError),  # T + 1 = 1: no target
        ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), ValueError),
        ((torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long)), TypeError),
        ((torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long)), ValueError),
        ((torch.zeros(2, 5, dtype=torch.long), [1, 2]), TypeError),
        ([[1, 2, 3]], TypeError),
        ("tokens", TypeError),
    ],
)
def test_split_batch_errors_name_batch(batch, error):
    with pytest.raises(error, match="batch"):
        data.split_batch(batch)


# -------------------------------------------------------------------- load_data


def test_load_data_on_a_user_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SMALL_TEXT * 5, encoding="utf-8")
    bundle = data.load_data(path, vocab_size=300, seq_len=8, batch_size=4, cache_dir=tmp_path / "c")
    assert bundle.vocab_size == bundle.tokenizer.get_vocab_size() == 300
    ids = data.encode(bundle.tokenizer, SMALL_TEXT * 5)
    assert bundle.train_tokens + bundle.val_tokens == ids.numel()
    assert torch.equal(torch.cat([bundle.train_ids, bundle.val_ids]), ids)
    assert bundle.train_batches and bundle.val_batches
    assert all(b.shape == (4, 9) for b in bundle.train_batches)
    assert all(b.shape[1] == 9 and b.shape[0] <= 4 for b in bundle.val_batches)
    # Validation keeps every window, in stream order.
    val_windows = torch.cat(bundle.val_batches)
    assert val_windows.shape[0] == (bundle.val_tokens - 1) // 8
    assert torch.equal(val_windows[0], bundle.val_ids[:9])
    # Same seed, same training order; another seed, another order.
    again = data.load_data(path, vocab_size=300, seq_len=8, batch_size=4, seed=0, cache_dir=tmp_path / "c")
    other = data.load_data(path, vocab_size=300, seq_len=8, batch_size=4, seed=1, cache_dir=tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(bundle.train_batches, again.train_batches))
    assert not all(torch.equal(a, b) for a, b in zip(bundle.train_batches, other.train_batches))


def test_load_data_default_corpus(tmp_path_factory, default_ids):
    # The whole pipeline with the defaults, into a fresh cache dir (training takes < 1 s).
    bundle = data.load_data(cache_dir=tmp_path_factory.mktemp("bundle_cache"))
    assert bundle.vocab_size == VOCAB
    assert bundle.train_tokens + bundle.val_tokens == default_ids.numel()
    assert bundle.val_tokens == round(0.1 * default_ids.numel())
    assert all(b.shape == (32, 65) for b in bundle.train_batches)
    assert len(bundle.train_batches) == ((bundle.train_tokens - 1) // 64) // 32


# ------------------------------------------------------------ unigram baseline


def test_unigram_baseline_by_hand():
    # Train [0, 0, 1], vocab 3: counts + 1 = [3, 2, 1] over 3 + 3 = 6.
    result = data.unigram_baseline(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), 3)
    p0, p1 = 3 / 6, 2 / 6
    expected_loss = -(math.log(p0) + math.log(p1)) / 2
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert result["ppl"] == pytest.approx(math.exp(expected_loss), rel=1e-12)
    assert result["accuracy"] == pytest.approx(0.5)  # most frequent train token is 0


def test_unigram_baseline_unseen_token_and_ties():
    # Token 2 never appears in training: add-one gives it 1 / (4 + 3); tie 0/1 -> id 0.
    result = data.unigram_baseline([0, 1, 0, 1], [2, 1, 1], 3)
    expected_loss = -(math.log(1 / 7) + 2 * math.log(3 / 7)) / 3
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert result["accuracy"] == 0.0


def test_unigram_baseline_beats_uniform_on_the_corpus(default_ids):
    train, val = data.split_tokens(default_ids)
    result = data.unigram_baseline(train, val, VOCAB)
    assert result["loss"] < math.log(VOCAB)
    assert 0.0 < result["accuracy"] < 0.5


def test_unigram_baseline_errors():
    with pytest.raises(ValueError, match="val_ids"):
        data.unigram_baseline([0, 1], [3], 3)
    with pytest.raises(ValueError, match="train_ids"):
        data.unigram_baseline([], [0], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        data.unigram_baseline([0], [0], 0)


# --------------------------------------------------------------------- set_seed


def test_set_seed_repeats_every_rng():
    def draw():
        return random.random(), np.random.rand(3).tolist(), torch.randn(3).tolist()

    data.set_seed(1234)
    first = draw()
    data.set_seed(1234)
    assert draw() == first
    data.set_seed(1235)
    second = draw()
    assert all(a != b for a, b in zip(first, second))


def test_set_seed_rejects_bad_seeds():
    with pytest.raises(ValueError, match="seed"):
        data.set_seed(-1)
    with pytest.raises(TypeError, match="seed"):
        data.set_seed(1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_set_seed_repeats_cuda():
    data.set_seed(7)
    first = torch.randn(4, device="cuda").cpu()
    data.set_seed(7)
    assert torch.equal(torch.randn(4, device="cuda").cpu(), first)


def test_no_cache_written_outside_the_given_dir(tmp_path, monkeypatch):
    # Guard for the other tests: with cache_dir given, the default location is untouched.
    home_cache = tmp_path / "home_cache"
    monkeypatch.setenv("EASE_CACHE_DIR", str(home_cache))
    data.train_tokenizer(SMALL_TEXT, 300, cache_dir=tmp_path / "explicit")
    assert not home_cache.exists()
    assert os.listdir(tmp_path / "explicit")


# ---------------------------------------------------------------- stdlib corpus

# A small stand-in for the standard library: the real one (11 MB, an 8192-token BPE) is
# too slow to build inside the suite, so the corpus builder is pointed at this folder.
_SOURCE = '''"""Module {i}."""


def add_{i}(a, b):
    """Return a + b."""
    return a + b  # café {i}


class Thing{i}:
    def __init__(self, value):
        self.value = value * {i}
'''
KEPT = ["a.py", "deep/test_thing.py", "pkg/inner/pydoc_data/x.py"] + [f"pkg/mod_{i}.py" for i in range(8)]
EXCLUDED = [
    "pkg/__init__.py",  # empty
    "test/test_a.py",
    "pkg/tests/t.py",
    "lib2to3/tests/data/bad.py",
    "idlelib/idle_test/x.py",
    "site-packages/foo.py",
    "pkg/__pycache__/mod_0.py",
    "pydoc_data/topics.py",
    "_sysconfigdata__linux_x86_64-linux-gnu.py",
    "config-3.11-x86_64-linux-gnu/python-config.py",
    ".hidden/x.py",
    "pkg/.y.py",
    "notes.txt",
]
# With val_fraction=0.3, is_validation_file sends exactly these to validation.
VAL_AT_0_3 = ["pkg/inner/pydoc_data/x.py", "pkg/mod_6.py", "pkg/mod_7.py"]


@pytest.fixture
def stdlib_dir(tmp_path):
    root = tmp_path / "lib"
    for i, rel in enumerate(KEPT + EXCLUDED):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("" if rel == "pkg/__init__.py" else _SOURCE.format(i=i), encoding="utf-8")
    return root


def _source_of(root, rel):
    return (root / rel).read_text(encoding="utf-8")


def test_list_stdlib_files_excludes_tests_caches_and_build_files(stdlib_dir):
    assert data.list_stdlib_files(stdlib_dir) == sorted(KEPT)


def test_list_stdlib_files_on_this_python_has_no_test_folder():
    files = data.list_stdlib_files()
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(files)
    excluded = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not [f for f in files if excluded & set(f.split("/")[:-1])]
    assert not [f for f in files if f.startswith(("pydoc_data/", "_sysconfigdata"))]
    assert files == sorted(files)


def test_list_stdlib_files_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match="no_such_dir"):
        data.list_stdlib_files(tmp_path / "no_such_dir")
    (tmp_path / "only.txt").write_text("not python")
    with pytest.raises(ValueError, match="no .py files"):
        data.list_stdlib_files(tmp_path)


def test_is_validation_file_is_deterministic_and_near_the_fraction():
    names = [f"pkg{i % 7}/module_{i}.py" for i in range(4000)]
    at_5 = {n for n in names if data.is_validation_file(n, 0.05)}
    assert at_5 == {n for n in names if data.is_validation_file(n, 0.05)}
    assert 0.04 < len(at_5) / len(names) < 0.06  # binomial sd 0.0034 at n=4000
    # A larger fraction only adds files: a file never leaves validation as it grows.
    assert at_5 < {n for n in names if data.is_validation_file(n, 0.2)}
    assert [n for n in KEPT if data.is_validation_file(n, 0.3)] == VAL_AT_0_3


def test_stdlib_corpus_memmap_dtype_and_boundaries(stdlib_dir, tmp_path):
    corpus = data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=tmp_path / "c", progress=False)
    assert corpus.files == tuple(sorted(KEPT))
    assert corpus.tokenizer.get_vocab_size() == 300
    assert isinstance(corpus.ids, np.memmap) and corpus.ids.dtype == np.uint16
    assert not corpus.ids.flags.writeable
    assert corpus.offsets.dtype == np.int64 and corpus.offsets.shape == (len(KEPT) + 1,)
    assert corpus.offsets[0] == 0 and corpus.offsets[-1] == corpus.ids.size == corpus.num_tokens
    for i, rel in enumerate(corpus.files):
        document = corpus.document(i)
        # Each file is followed by exactly one <|endoftext|> (id 0) and decodes to itself.
        assert document[-1] == 0 and (document[:-1] != 0).all()
        assert data.decode(corpus.tokenizer, document[:-1].tolist()) == _source_of(stdlib_dir, rel)


def test_id_dtype_widens_past_uint16():
    assert data._id_dtype(2**16) == np.uint16
    assert data._id_dtype(2**16 + 1) == np.uint32


def test_stdlib_corpus_cache_is_reused_without_training(stdlib_dir, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "c"
    first = data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=cache)
    assert "building the stdlib corpus" in capsys.readouterr().err  # the one-off build says so
    folder = data.stdlib_cache_path(300, root=stdlib_dir, cache_dir=cache)
    assert sorted(p.name for p in folder.iterdir()) == ["ids.npy", "index.json", "tokenizer.json"]  # no temp file
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the stdlib corpus was rebuilt despite its cache")

    monkeypatch.setattr(data, "_train_bpe", no_training)
    monkeypatch.setattr(data, "_build_stdlib_corpus", no_training)
    second = data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=cache)
    assert capsys.readouterr().err == ""
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.offsets, second.offsets)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_stdlib_cache_key_follows_files_vocab_and_python(stdlib_dir, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    base = data.stdlib_cache_path(300, root=stdlib_dir, cache_dir=cache)
    assert base.parent == cache
    assert data.stdlib_cache_path(300, root=stdlib_dir, cache_dir=cache) == base
    assert data.stdlib_cache_path(301, root=stdlib_dir, cache_dir=cache) != base
    monkeypatch.setattr(data.sys, "version", "3.99.0 (another build)")
    assert data.stdlib_cache_path(300, root=stdlib_dir, cache_dir=cache) != base
    monkeypatch.undo()
    with open(stdlib_dir / "a.py", "a", encoding="utf-8") as handle:
        handle.write("# edited\n")
    assert data.stdlib_cache_path(300, root=stdlib_dir, cache_dir=cache) != base
    monkeypatch.setenv("EASE_CACHE_DIR", str(tmp_path / "env"))
    assert data.stdlib_cache_path(300, root=stdlib_dir).parent == tmp_path / "env"


def test_stdlib_split_is_by_whole_file_and_deterministic(stdlib_dir, tmp_path):
    corpus = data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=tmp_path / "c", progress=False)
    train_ids, val_ids, train_files, val_files = corpus.split(0.3)
    assert list(val_files) == VAL_AT_0_3
    assert sorted(train_files + val_files) == sorted(KEPT) and not set(train_files) & set(val_files)
    documents = {rel: torch.from_numpy(corpus.document(i).astype(np.int64)) for i, rel in enumerate(corpus.files)}
    assert train_ids.dtype == val_ids.dtype == torch.long
    assert torch.equal(train_ids, torch.cat([documents[f] for f in train_files]))
    assert torch.equal(val_ids, torch.cat([documents[f] for f in val_files]))
    again = corpus.split(0.3)
    assert torch.equal(again[0], train_ids) and torch.equal(again[1], val_ids)


@pytest.mark.parametrize("val_fraction, error", [(0.0, "strictly between"), (1e-9, "both sides need a file")])
def test_stdlib_split_errors(stdlib_dir, tmp_path, val_fraction, error):
    corpus = data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=error):
        corpus.split(val_fraction)


def test_stdlib_corpus_names_a_file_that_is_not_utf8(stdlib_dir, tmp_path):
    (stdlib_dir / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.py"):
        data.load_stdlib_corpus(vocab_size=300, root=stdlib_dir, cache_dir=tmp_path / "c", progress=False)


def test_load_data_stdlib_corpus(stdlib_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "stdlib_root", lambda: stdlib_dir)
    bundle = data.load_data(
        corpus="stdlib", vocab_size=300, seq_len=8, batch_size=2, val_fraction=0.3, cache_dir=tmp_path / "c"
    )
    corpus = data.load_stdlib_corpus(vocab_size=300, cache_dir=tmp_path / "c")
    assert bundle.vocab_size == 300
    assert list(bundle.val_files) == VAL_AT_0_3
    assert bundle.train_tokens + bundle.val_tokens == corpus.num_tokens
    assert all(b.shape == (2, 9) for b in bundle.train_batches)
    assert len(bundle.train_batches) == ((bundle.train_tokens - 1) // 8) // 2
    assert torch.equal(torch.cat(bundle.val_batches)[0], bundle.val_ids[:9])


def test_load_data_stdlib_defaults_are_8192_tokens_and_5_percent(stdlib_dir, tmp_path, monkeypatch):
    # The defaults are checked by what load_data asks for; building 8192 tokens here is too slow.
    seen = {}
    real_load = data.load_stdlib_corpus

    def small_corpus(vocab_size, cache_dir):
        seen["vocab_size"] = vocab_size
        return real_load(300, root=stdlib_dir, cache_dir=cache_dir, progress=False)

    def split_at_0_3(self, val_fraction):
        seen["val_fraction"] = val_fraction
        return real_split(self, 0.3)

    real_split = data.TokenizedCorpus.split
    monkeypatch.setattr(data, "load_stdlib_corpus", small_corpus)
    monkeypatch.setattr(data.TokenizedCorpus, "split", split_at_0_3)
    data.load_data(corpus="stdlib", seq_len=8, batch_size=2, cache_dir=tmp_path / "c")
    assert seen == {"vocab_size": 8192, "val_fraction": 0.05}


def test_load_data_corpus_docs_is_the_default(tmp_path_factory):
    cache = tmp_path_factory.mktemp("docs_cache")
    default = data.load_data(vocab_size=300, cache_dir=cache)
    named = data.load_data(vocab_size=300, corpus="docs", cache_dir=cache)
    assert torch.equal(named.train_ids, default.train_ids) and torch.equal(named.val_ids, default.val_ids)
    assert named.train_files == named.val_files == ()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"corpus": "wiki"}, ValueError, r"corpus must be one of 'docs', 'stdlib', got 'wiki'"),
        ({"corpus": 3}, TypeError, r"corpus must be a str, one of 'docs', 'stdlib'"),
        ({"path": "x.txt", "corpus": "stdlib"}, ValueError, r"either path .* or corpus"),
    ],
)
def test_load_data_rejects_a_bad_corpus(kwargs, error, match):
    with pytest.raises(error, match=match):
        data.load_data(**kwargs)

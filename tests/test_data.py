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

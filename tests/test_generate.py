"""Tests of the ``python -m ease.cli.generate`` command (ease.cli.generate)."""

import json
import subprocess
import sys

import pytest
import torch

from ease import DeepSupervisionTransformer
from ease.data import train_tokenizer
from ease.cli.generate import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40


@pytest.fixture
def saved_model(tmp_path):
    """A tiny model with a byte-level BPE tokenizer saved beside it, as the experiments save them."""
    tokenizer = train_tokenizer(TEXT, vocab_size=280, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(tokenizer.get_vocab_size(), 32, 3, max_seq_len=64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))
    return tmp_path / "model", model, tokenizer


def test_prints_text_and_mean_exit_layer(saved_model, capsys):
    directory, model, tokenizer = saved_model
    assert main(["--model", str(directory), "--prompt", "The quick", "--threshold", "0.9",
                 "--max-new-tokens", "6", "--show-exits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    prompt_ids = tokenizer.encode("The quick").ids
    expected = model.generate([prompt_ids], 6, routing_threshold=0.9)
    assert lines[0] == tokenizer.decode(expected.sequences()[0].tolist(), skip_special_tokens=False)
    assert lines[0].startswith("The quick")
    assert len([line for line in lines if line.startswith("  layer")]) == 6
    assert lines[-1].startswith(f"mean exit layer: {expected.mean_exit_layer:.2f} of 3 (6 tokens")


def test_json_output_with_ids_and_self_speculation(saved_model, capsys):
    directory, model, _ = saved_model
    assert main(["--model", str(directory), "--prompt-ids", "5, 6 7", "--draft-layers", "1",
                 "--max-new-tokens", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_ids"] == [5, 6, 7]
    assert report["new_ids"] == model.generate([[5, 6, 7]], 5).new_tokens[0].tolist()
    assert 0.0 <= report["acceptance_rate"] <= 1.0 and report["num_layers"] == 3


def _not_json(constant):
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.parametrize(
    "flags, key",
    [(["--max-new-tokens", "0"], "mean_exit_layer"),
     (["--max-new-tokens", "1", "--draft-layers", "1"], "acceptance_rate")],
    ids=["no-tokens", "nothing-drafted"],
)
def test_json_output_is_json_when_a_mean_is_undefined(saved_model, capsys, flags, key):
    """No new token has no mean exit layer, no draft no acceptance rate: null, not NaN."""
    directory, _, _ = saved_model
    assert main(["--model", str(directory), "--prompt-ids", "5 6", "--json", *flags]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=_not_json)
    assert report[key] is None


def test_clear_errors(saved_model, tmp_path, capsys):
    directory, _, _ = saved_model
    assert main(["--model", str(directory), "--prompt", "The", "--threshold", "1.5"]) == 2
    assert "routing_threshold" in capsys.readouterr().err
    assert main(["--model", str(directory), "--prompt-ids", "1 2", "--max-new-tokens", "100"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    assert main(["--model", str(directory), "--prompt-ids", "1 9999"]) == 2
    assert "input_ids" in capsys.readouterr().err
    (directory / "tokenizer.json").unlink()
    assert main(["--model", str(directory), "--prompt", "The"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_runs_as_a_module(saved_model):
    directory, _, _ = saved_model
    done = subprocess.run(
        [sys.executable, "-m", "ease.cli.generate", "--model", str(directory), "--prompt", "Pack my",
         "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Pack my") and "mean exit layer: 3.00 of 3" in done.stdout

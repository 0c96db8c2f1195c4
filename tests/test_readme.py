"""The README's code that a new user runs first: it must run as written.

The load -> encode -> generate -> decode block is executed against a tiny model saved,
as the README's training block saves it, to runs/my-model (in a temporary folder).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import torch

from ease import DeepSupervisionTransformer
from ease.cli.generate import main as generate_main
from ease.data import train_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = "The with statement wraps a block. The for statement loops. " * 40


def block_after(marker: str) -> str:
    """The fenced code block that follows ``<!-- readme-test: marker -->`` in the README."""
    match = re.search(rf"<!-- readme-test: {marker} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"no block marked {marker} in README.md"
    return match.group(1)


def save_like_the_readme(root: Path):
    tokenizer = train_tokenizer(TEXT, vocab_size=280, cache_dir=root / "cache")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(tokenizer.get_vocab_size(), dim=32, num_layers=3)
    model.save_pretrained(root / "runs" / "my-model", tokenizer=tokenizer)
    return model, tokenizer


def test_load_encode_generate_decode_block_runs(tmp_path, monkeypatch):
    model, tokenizer = save_like_the_readme(tmp_path)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block_after("load-generate"), "README.md", "exec"), {})
    text, exit_line = printed.getvalue().splitlines()
    ids = tokenizer.encode("The with statement").ids
    expected = model.generate([ids], max_new_tokens=20, routing_threshold=0.5)
    assert text == tokenizer.decode(expected.tokens[0].tolist()) and text.startswith("The with statement")
    assert exit_line.startswith("mean exit layer ") and exit_line.endswith(" of 3")


def test_the_generate_command_in_the_readme_runs(tmp_path, monkeypatch, capsys):
    save_like_the_readme(tmp_path)
    monkeypatch.chdir(tmp_path)
    command = re.search(r"`(ease-generate --model runs/my-model [^`]*)`", README.read_text()).group(1)
    assert generate_main(shlex.split(command)[1:] + ["--max-new-tokens", "200"]) == 0
    assert capsys.readouterr().out.startswith("The with statement")


def test_draft_layers_in_the_readme_fit_its_three_layer_models():
    # Self-speculation needs 1 <= draft_layers < num_layers; the README's models have 3 layers.
    for value in re.findall(r"draft_layers=(\d+)", README.read_text()):
        assert 1 <= int(value) < 3, f"draft_layers={value} in README.md does not fit a 3-layer model"

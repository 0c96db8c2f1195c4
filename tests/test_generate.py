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


# -- exit settings: saved with the model, the defaults of generate ------------------------
from ease import load_model  # noqa: E402
from ease.generation.api import exit_arguments  # noqa: E402
from ease.models import UNSET, ExitSettings  # noqa: E402


def wide_model(seed=0):
    """Wide random weights spread the exit confidences, so thresholds make decisions."""
    torch.manual_seed(seed)
    model = DeepSupervisionTransformer(64, 32, 3, max_seq_len=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return model.eval()


SETTINGS = ExitSettings(
    routing_threshold=0.3, min_exit_layer=2, draft_layers=1,
    calibration={"threshold": 0.3, "max_accuracy_drop": 0.01, "num_tokens": 120, "full_depth_accuracy": 0.25},
)  # fmt: skip


def test_exit_settings_travel_through_save_pretrained(tmp_path):
    model = wide_model()
    model.exit_settings = SETTINGS
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["early_exit"] == SETTINGS.to_dict()
    assert saved["early_exit"]["exit_criterion"] == "max_prob"
    loaded = load_model(tmp_path / "m")
    assert loaded.exit_settings == SETTINGS
    # A model never given settings saves empty ones and generates at full depth.
    assert load_model(tmp_path / "m").exit_settings.routing_threshold == 0.3
    wide_model().save_pretrained(tmp_path / "plain")
    assert load_model(tmp_path / "plain").exit_settings == ExitSettings()


def test_folders_saved_before_exit_settings_load_with_none(tmp_path):
    wide_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    payload = json.loads(path.read_text())
    del payload["early_exit"]
    path.write_text(json.dumps(payload))
    assert load_model(tmp_path / "m").exit_settings == ExitSettings()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"routing_threshold": 1.5}, "early_exit: routing_threshold must be in \\(0, 1\\]"),
        ({"min_exit_layer": 4}, "early_exit: min_exit_layer must be an integer in 1..3"),
        ({"draft_layers": 3}, "early_exit: draft_layers must be an integer in 1..2"),
        ({"exit_criterion": ""}, "early_exit: exit_criterion must be a non-empty string"),
        ({"speed": 1}, "early_exit: unknown key\\(s\\) \\['speed'\\]"),
        ({"calibration": {"num_tokens": -1}}, "calibration\\['num_tokens'\\] must be an integer >= 0"),
    ],
)
def test_bad_saved_exit_settings_are_refused_naming_the_file_and_key(tmp_path, change, message):
    wide_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    payload = json.loads(path.read_text())
    payload["early_exit"].update(change)
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as caught:
        load_model(tmp_path / "m")
    assert str(path) in str(caught.value)


def test_exit_settings_are_checked_against_the_model():
    model = wide_model()
    with pytest.raises(ValueError, match="draft_layers must be an integer in 1..2"):
        model.exit_settings = ExitSettings(draft_layers=3)
    with pytest.raises(TypeError, match="exit_settings must be an ExitSettings"):
        model.exit_settings = {"routing_threshold": 0.5}
    with pytest.raises(ValueError, match="routing_threshold must be in"):
        ExitSettings(routing_threshold=0)
    assert ExitSettings(routing_threshold=np_float(0.5)).routing_threshold == 0.5


def np_float(value):
    import numpy as np

    return np.float32(value)


def test_generate_takes_unset_arguments_from_the_exit_settings():
    model = wide_model()
    prompt = [[3, 17, 40, 5, 9]]
    early = model.generate(prompt, 12, routing_threshold=0.3, min_exit_layer=2)
    full = model.generate(prompt, 12, routing_threshold=None)
    assert early.token_exit_layers.min() >= 2 and (early.token_exit_layers < 3).any()  # decisions were made
    model.exit_settings = ExitSettings(routing_threshold=0.3, min_exit_layer=2, draft_layers=1)
    stored = model.generate(prompt, 12)
    assert torch.equal(stored.tokens, early.tokens) and torch.equal(stored.token_exit_layers, early.token_exit_layers)
    # Explicit arguments win; routing_threshold=None turns early exit off (and the stored draft depth too).
    off = model.generate(prompt, 12, routing_threshold=None)
    assert torch.equal(off.token_exit_layers, full.token_exit_layers) and off.draft_tokens == 0
    assert torch.equal(model.generate(prompt, 12, routing_threshold=0.3, min_exit_layer=1).tokens,
                       ease_generate(wide_model(), prompt, 12, routing_threshold=0.3).tokens)
    spec = model.generate(prompt, 12, draft_layers=1)  # explicit draft: the stored threshold is not used
    assert spec.draft_tokens > 0 and torch.equal(spec.tokens, full.tokens)
    # The stored draft depth applies when no threshold is stored.
    model.exit_settings = ExitSettings(draft_layers=2)
    stored_spec = model.generate(prompt, 12)
    assert stored_spec.draft_tokens > 0 and torch.equal(stored_spec.tokens, full.tokens)
    model.exit_settings = ExitSettings()
    assert torch.equal(model.generate(prompt, 12).token_exit_layers, full.token_exit_layers)


def ease_generate(model, *args, **kwargs):
    from ease.generation import generate

    return generate(model, *args, **kwargs)


def test_exit_arguments_rules():
    model = wide_model()
    model.exit_settings = ExitSettings(routing_threshold=0.4, min_exit_layer=2, draft_layers=1)
    assert exit_arguments(model, UNSET, UNSET, UNSET) == (0.4, 2, None)
    assert exit_arguments(model, None, UNSET, UNSET) == (None, 2, None)
    assert exit_arguments(model, UNSET, 1, 2) == (None, 1, 2)
    assert exit_arguments(model, 0.9, UNSET, UNSET) == (0.9, 2, None)
    assert repr(UNSET) == "UNSET"


def test_cli_uses_the_saved_settings_and_full_depth_turns_them_off(tmp_path, capsys):
    tokenizer = train_tokenizer(TEXT, vocab_size=280, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(tokenizer.get_vocab_size(), 32, 3, max_seq_len=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    model.exit_settings = ExitSettings(routing_threshold=0.05)
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    ids = tokenizer.encode("The quick").ids
    assert main(["--model", str(tmp_path / "m"), "--prompt", "The quick", "--max-new-tokens", "8", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["exit_layers"] == model.generate([ids], 8, routing_threshold=0.05).token_exit_layers[0].tolist()
    assert min(stored["exit_layers"]) < 3  # the saved threshold did make tokens exit
    assert main(["--model", str(tmp_path / "m"), "--prompt", "The quick", "--max-new-tokens", "8", "--json",
                 "--full-depth"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_layers"] == [3] * 8
    assert main(["--model", str(tmp_path / "m"), "--prompt-ids", "1 2", "--full-depth", "--threshold", "0.5"]) == 2
    assert "--full-depth excludes" in capsys.readouterr().err

"""Tests of ease.models: shapes, layer selection, causality, validation, persistence."""

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from _builders import tiny_model
import ease_kernels
from conftest import KERNEL_DEVICE
from ease import DeepSupervisionTransformer, ModelConfig, StandardTransformer, load_model


def tiny(cls=DeepSupervisionTransformer, **kwargs):
    return tiny_model(cls, **(dict(vocab_size=97, max_seq_len=24) | kwargs), seed=0)


def test_default_exit_layers_differ_by_class():
    ids = torch.randint(0, 97, (2, 10))
    assert sorted(tiny()(ids)) == [1, 2, 3]
    assert sorted(tiny(StandardTransformer)(ids)) == [3]


def test_requested_layers_only_and_shapes():
    model = tiny()
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    out = model(torch.randint(0, 97, (2, 10)), exit_layers=[3, 1])
    assert sorted(out) == [1, 3] and len(calls) == 2
    assert all(logits.shape == (2, 10, 97) for logits in out.values())


def test_blocks_deeper_than_requested_are_not_run():
    model = tiny()
    ran = []
    for number, block in enumerate(model.layers, start=1):
        block.register_forward_hook(lambda *args, n=number: ran.append(n))
    model(torch.randint(0, 97, (1, 5)), exit_layers=[2])
    assert ran == [1, 2]


def test_intermediate_logits_equal_exit_head_of_hidden_state():
    model = tiny()
    ids = torch.randint(0, 97, (2, 7))
    states = model.hidden_states(ids, [2])
    torch.testing.assert_close(model(ids, [2])[2], model.lm_head(model.norm(states[2])))


def test_causal_prefix_invariance():
    """Logits at position t must not depend on tokens after t."""
    model = tiny(num_kv_heads=2)  # grouped-query attention: 4 query heads, 2 kv heads
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    a, b = model(ids)[3], model(changed)[3]
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_tied_and_untied_embeddings():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 97 * 32


@pytest.mark.parametrize("cls", [StandardTransformer, DeepSupervisionTransformer])
@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, cls, tie):
    model = tiny(cls, tie_embeddings=tie, num_kv_heads=2, dropout=0.1).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (load_model(tmp_path / "m"), cls.from_pretrained(tmp_path / "m")):
        loaded.eval()
        assert type(loaded) is cls and loaded.config == model.config
        assert (loaded.lm_head.weight is loaded.embed.weight) == tie
        ids = torch.randint(0, 97, (2, 9))
        for layer in range(1, 4):
            assert torch.equal(loaded(ids, [layer])[layer], model(ids, [layer])[layer])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    tiny().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_class": "Nope", "config": {}}')
    with pytest.raises(ValueError, match="model_class"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(dim=30, num_heads=4), "num_heads"),
        (dict(dim=36, num_heads=4), "head_dim"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_heads=2.0), "num_heads must be an integer"),
        (dict(tie_embeddings="no"), "tie_embeddings must be True or False"),
        (dict(rope_scaling={"rope_type": "llama3"}), r"rope_scaling.*'factor'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 0}), r"rope_scaling\['factor'\]"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling.*'yarn'"),
        (dict(rope_scaling=[8.0]), "rope_scaling must be"),
    ],
)
def test_config_errors(kwargs, match):
    base = dict(vocab_size=97, dim=32, num_layers=3)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**base)


def test_valid_rope_scaling_is_kept_as_given():
    scaling = {"rope_type": "llama3", "factor": 8.0}
    assert ModelConfig(vocab_size=97, dim=32, num_layers=3, rope_scaling=scaling).rope_scaling == scaling
    assert ModelConfig(vocab_size=97, dim=32, num_layers=3, rope_scaling={"rope_type": "default"}).rope_scaling


# -- what a saved model refuses ------------------------------------------------------------------
def flip_a_weight_byte(path):
    """Invert one byte in the tensor data of a safetensors file (past its JSON header)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path)
    flip_a_weight_byte(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors")) + ".*checksum"):
        load_model(tmp_path)


def test_a_save_interrupted_between_the_two_files_is_never_loaded(tmp_path, monkeypatch):
    """Killed after the new weights are in place but before the new config is: the folder
    must not load as the new weights under the old config (here: the old dropout)."""
    tiny(dropout=0.0).save_pretrained(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies before writing config.json

    monkeypatch.setattr("ease.models.atomic_write_text", killed)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        DeepSupervisionTransformer(97, 32, 3, max_seq_len=24, dropout=0.1).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json"):
        load_model(tmp_path)
    tiny().save_pretrained(tmp_path)  # saving again repairs it
    assert torch.equal(load_model(tmp_path).embed.weight, tiny().embed.weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_naming_the_tensor(tmp_path, dtype):
    tiny().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["layers.1.ffn_norm.weight"] = state["layers.1.ffn_norm.weight"].to(dtype)
    save_file(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_config(tmp_path, lambda c: c.update(weights_sha256=digest))  # crafted: the checksum fits
    with pytest.raises(ValueError, match=rf"'layers\.1\.ffn_norm\.weight' has dtype {str(dtype).removeprefix('torch.')}"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["config"].pop("vocab_size"), r"config\.vocab_size is missing"),
        (lambda c: c["config"].update(num_heads=0), "num_heads must be"),
        (lambda c: c["config"].update(bogus=1), r"unknown field.*'bogus'"),
        (lambda c: c.update(config=[1, 2]), "'config' must be a dict"),
        (lambda c: c.update(weights_sha256=5), "weights_sha256 must be"),
    ],
    ids=["missing-vocab", "bad-value", "unknown-field", "config-list", "checksum-type"],
)
def test_a_bad_config_is_refused_naming_the_file_and_key(tmp_path, change, match):
    tiny().save_pretrained(tmp_path)
    edit_config(tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ".*" + match):
        load_model(tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '"a string"'])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, text):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):
        load_model(tmp_path)


def test_missing_weights_are_named(tmp_path):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.full((1, 4), 97))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exit_layers"):
        model(torch.zeros(1, 4, dtype=torch.long), exit_layers=[4])
    with pytest.raises(ValueError, match="exit_layers"):
        model(torch.zeros(1, 4, dtype=torch.long), exit_layers=[])


def test_model_gradients_match_between_triton_and_reference(triton_backend):
    """End to end: a model calling all three ops, kernels (interpreter) against reference."""
    model = tiny(num_kv_heads=2, dim=48, num_heads=4, vocab_size=61).to(KERNEL_DEVICE)
    ids = torch.randint(0, 61, (2, 9), device=KERNEL_DEVICE)

    def run(backend_name):
        model.zero_grad()
        with ease_kernels.backend(backend_name):
            out = model(ids)
            loss = sum(torch.nn.functional.cross_entropy(o.flatten(0, 1), ids.flatten()) for o in out.values())
            loss.backward()
            confidence = ease_kernels.exit_confidence(out[3].detach(), 0.5)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads, confidence

    out_t, grads_t, conf_t = run("triton")
    out_r, grads_r, conf_r = run("reference")
    for layer in out_r:
        torch.testing.assert_close(out_t[layer], out_r[layer], rtol=1e-4, atol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-6, msg=name)
    torch.testing.assert_close(conf_t.confidence, conf_r.confidence, rtol=1e-5, atol=1e-7)
    assert torch.equal(conf_t.prediction, conf_r.prediction)

"""Tests of ease.hf_llama: Hugging Face Llama checkpoints in and out of EASE.

Every model is a randomly initialised small ``LlamaForCausalLM`` built from a config
here (nothing is downloaded): 3 layers, hidden 64, 4 query heads sharing 2 key/value
heads (GQA), vocab 128, untied and tied embeddings, with and without Llama 3 RoPE
scaling.

Errors are relative, ``max|out - truth| / max|truth|``, against the Hugging Face model
run in float64 on the same weights.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from _parity import assert_close_rel, relative_error  # noqa: E402
import ease_kernels  # noqa: E402
from ease import DeepSupervisionTransformer, StandardTransformer, from_hf_llama, to_hf_llama  # noqa: E402
from ease.hf_llama import model_kwargs_from_hf_config  # noqa: E402

VOCAB = 128
LAYERS = 3
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the test's positions (< 64) reach the scaled band.
    "original_max_position_embeddings": 32,
}
# Largest relative error of float32 logits against the float64 Hugging Face truth. Three
# blocks of float32 matmuls (sums of <= 96 products), softmax and RMSNorm each add a few
# eps (1.2e-7) of relative error, and the two models' RoPE tables may differ in the last
# bit of inv_freq (ease derives it in float64, transformers in float32). Both models
# measure 5e-7 to 9e-7 here; 40 eps leaves room for other BLAS orderings.
FLOAT32_TOL = 40 * torch.finfo(torch.float32).eps

VARIANTS = [
    pytest.param(tied, scaling, id=f"{'tied' if tied else 'untied'}-{'llama3' if scaling else 'default'}")
    for tied in (False, True)
    for scaling in (None, LLAMA3_SCALING)
]


def llama_config(tied=False, scaling=None, **overrides):
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        # A wider init than the default 0.02 spreads the logits, so that greedy choices are
        # not decided by rounding.
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if scaling is not None:
        settings["rope_scaling"] = dict(scaling)
    settings.update(overrides)
    return LlamaConfig(**settings)


def hf_llama(tied=False, scaling=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tied, scaling, **overrides)).eval()


def input_ids(batch=2, seq=37, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


    return error


@torch.no_grad()
def hf_exit_logits(hf, ids):
    """``{layer: logits}`` of the Hugging Face model's hidden state after each layer,
    through its final norm and head (the exits EASE adds), and its own logits."""
    out = hf(ids, output_hidden_states=True)
    # hidden_states[0] is the embedding output, hidden_states[l] the output of layer l.
    exits = {layer: hf.lm_head(hf.model.norm(out.hidden_states[layer])) for layer in range(1, LAYERS)}
    exits[LAYERS] = out.logits
    return exits


# ---------------------------------------------------------------------------------------
# Hugging Face -> EASE
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied, scaling", VARIANTS)
def test_converted_logits_match_hugging_face(tied, scaling):
    hf = hf_llama(tied, scaling)
    ids = input_ids()
    truth = hf_exit_logits(hf.double(), ids)
    hf32 = hf_exit_logits(hf.float(), ids)
    model = from_hf_llama(hf)
    assert isinstance(model, DeepSupervisionTransformer)
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert model.config.num_kv_heads == 2 and model.config.norm_eps == 1e-5
    assert model.config.rope_theta == 5000.0
    with torch.no_grad():
        out = model(ids)
    assert sorted(out) == list(range(1, LAYERS + 1))
    for layer in out:
        reference_error = relative_error(hf32[layer], truth[layer])
        assert reference_error <= FLOAT32_TOL
        assert_close_rel(out[layer], truth[layer], FLOAT32_TOL, f"layer {layer} logits")


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_rope_inv_freq_matches_transformers(scaling):
    hf = hf_llama(scaling=scaling)
    model = from_hf_llama(hf)
    ours = ease_kernels.rope_inv_freq(model.config.head_dim, model.config.rope_theta, model.config.rope_scaling)
    theirs = hf.model.rotary_emb.inv_freq
    # transformers computes in float32, ease in float64 rounded once: 1 ulp apart at most.
    assert_close_rel(ours, theirs, 2 * torch.finfo(torch.float32).eps, "inv_freq")
    assert hf.model.rotary_emb.attention_scaling == 1.0  # no cos/sin scaling to carry over


def test_llama31_rope_scaling_matches_transformers():
    # The published Llama 3.1 RoPE: head_dim 128, theta 500000, factor 8 over 8192 positions.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(LLAMA3_SCALING, original_max_position_embeddings=8192)
    config = llama_config(scaling=scaling, hidden_size=512, num_attention_heads=4, num_key_value_heads=1,
                          rope_theta=500000.0, max_position_embeddings=131072)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config)
    kwargs = model_kwargs_from_hf_config(config.to_dict())
    ours = ease_kernels.rope_inv_freq(128, kwargs["rope_theta"], kwargs["rope_scaling"])
    assert attention_factor == 1.0
    assert_close_rel(ours, theirs, 2 * torch.finfo(torch.float32).eps, "Llama 3.1 inv_freq")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [False, True], ids=["one-file", "sharded"])
def test_directory_checkpoint_matches_in_memory(tmp_path, tied, shard):
    hf = hf_llama(tied, LLAMA3_SCALING)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ids = input_ids()
    from_dir, from_memory = from_hf_llama(tmp_path), from_hf_llama(hf)
    for name, tensor in from_memory.state_dict().items():
        assert torch.equal(from_dir.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(from_dir(ids)[LAYERS], from_memory(ids)[LAYERS])


def test_transformers_4_config_form(tmp_path):
    # transformers 4.x wrote rope_theta and rope_scaling at the top level, not rope_parameters.
    hf = hf_llama(scaling=LLAMA3_SCALING)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = parameters
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = from_hf_llama(tmp_path)
    assert model.config.rope_theta == 5000.0
    assert model.config.rope_scaling == LLAMA3_SCALING
    ids = input_ids()
    with torch.no_grad():
        assert_close_rel(model(ids)[LAYERS], hf(ids).logits, FLOAT32_TOL, "logits")


def test_model_class_dtype_device_and_length():
    hf = hf_llama()
    assert type(from_hf_llama(hf, "standard")) is StandardTransformer
    assert type(from_hf_llama(hf, StandardTransformer)) is StandardTransformer
    assert type(from_hf_llama(hf, "DeepSupervisionTransformer")) is DeepSupervisionTransformer
    with pytest.raises(ValueError, match="model_class"):
        from_hf_llama(hf, "early_exit")
    model = from_hf_llama(hf, dtype=torch.bfloat16, device="cpu", max_seq_len=48)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.max_seq_len == 48 and model.rope_cos.shape == (48, 8)
    assert not model.training
    # The converted model trains: every parameter is a leaf that gets a gradient, and its
    # own copy, so that training leaves the Hugging Face model as it was.
    model = from_hf_llama(hf).train()
    sum(logits.float().square().mean() for logits in model(input_ids()).values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    hf_storage = {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    assert not hf_storage & {p.untyped_storage().data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("tied, scaling", [VARIANTS[0], VARIANTS[3]])
def test_greedy_generation_matches_hugging_face(tied, scaling):
    from ease.generation import generate

    hf = hf_llama(tied, scaling)
    model = from_hf_llama(hf, "standard")
    new_tokens = 24
    # Two prompts of different lengths, left-padded for transformers.
    prompts = [input_ids(batch=1, seq=7, seed=3)[0], input_ids(batch=1, seq=4, seed=5)[0]]
    padded = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, 7 - len(prompt):] = prompt
        mask[row, 7 - len(prompt):] = 1
    expected = hf.generate(
        padded, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )
    # ease's generate (KV cache, per-row positions) ...
    out = generate(model, prompts, max_new_tokens=new_tokens)
    assert out.new_tokens.tolist() == expected[:, 7:].tolist()
    # ... and plain full-depth recomputation, one prompt.
    ids = prompts[0][None]
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids)[LAYERS][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids[0].tolist() == expected[0].tolist()


# ---------------------------------------------------------------------------------------
# EASE -> Hugging Face
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied, scaling", VARIANTS)
def test_export_loads_in_transformers(tmp_path, tied, scaling):
    hf = hf_llama(tied, scaling)
    model = from_hf_llama(hf)
    to_hf_llama(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings == tied
    assert reloaded.config.num_key_value_heads == 2 and reloaded.config.rms_norm_eps == 1e-5
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    # And back again: the same EASE weights.
    again = from_hf_llama(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "rope_scaling",
    # ease's own defaults (low 1, high 4) must be written out: transformers requires them.
    [None, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}],
    ids=["default", "llama3-partial"],
)
def test_export_of_native_ease_model(tmp_path, rope_scaling):
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(
        VOCAB, 64, LAYERS, num_heads=4, num_kv_heads=2, ffn_dim=96, max_seq_len=64, tie_embeddings=True,
        rope_scaling=rope_scaling,
    ).eval()
    to_hf_llama(model, tmp_path, extra_config={"eos_token_id": 5})
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.eos_token_id == 5
    ids = input_ids()
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, model(ids)[LAYERS], FLOAT32_TOL, "logits")


def test_export_dtype(tmp_path):
    to_hf_llama(from_hf_llama(hf_llama()), tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(TypeError, match="EarlyExitDecoder"):
        to_hf_llama(torch.nn.Linear(2, 2), tmp_path)


# ---------------------------------------------------------------------------------------
# Errors name what is wrong
# ---------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    """An untied checkpoint directory and a function rewriting its tensors or config."""
    hf_llama().save_pretrained(tmp_path)

    def edit(tensors=None, config=None):
        if tensors is not None:
            state = load_file(tmp_path / "model.safetensors")
            tensors(state)
            save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        if config is not None:
            settings = json.loads((tmp_path / "config.json").read_text())
            config(settings)
            (tmp_path / "config.json").write_text(json.dumps(settings))
        return tmp_path

    return edit


def test_missing_tensor_is_named(checkpoint):
    path = checkpoint(tensors=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        from_hf_llama(path)


def test_missing_untied_head_is_named(checkpoint):
    path = checkpoint(tensors=lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head\.weight'"):
        from_hf_llama(path)


def test_wrong_shape_is_named(checkpoint):
    def shrink(state):
        state["model.layers.2.self_attn.k_proj.weight"] = state["model.layers.2.self_attn.k_proj.weight"][:16]

    path = checkpoint(tensors=shrink)
    message = r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"
    with pytest.raises(ValueError, match=message):
        from_hf_llama(path)


def test_unexpected_tensor_is_named(checkpoint):
    path = checkpoint(tensors=lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        from_hf_llama(path)


def test_unsupported_architecture_is_named(checkpoint):
    def mistral(config):
        config["architectures"] = ["MistralForCausalLM"]
        config["model_type"] = "mistral"

    with pytest.raises(ValueError, match="unsupported architecture MistralForCausalLM"):
        from_hf_llama(checkpoint(config=mistral))


def test_unsupported_model_type_is_named(checkpoint):
    path = checkpoint(config=lambda c: c.pop("architectures") and c.update(model_type="qwen2"))
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2'"):
        from_hf_llama(path)


def test_unsupported_in_memory_architecture_is_named():
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="unsupported architecture MistralForCausalLM"):
        from_hf_llama(transformers.MistralForCausalLM(config))
    with pytest.raises(TypeError, match="LlamaForCausalLM or a directory"):
        from_hf_llama(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(attention_bias=True), "attention_bias=True is not supported"),
        (lambda c: c.update(mlp_bias=True), "mlp_bias=True is not supported"),
        (lambda c: c.update(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (lambda c: c.update(head_dim=32), "head_dim=32 differs"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported RoPE type 'yarn'"),
        (lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "needs 'low_freq_factor'"),
        (lambda c: c.pop("num_hidden_layers"), "no 'num_hidden_layers'"),
    ],
    ids=["attention-bias", "mlp-bias", "activation", "head-dim", "rope-type", "llama3-fields", "missing-field"],
)
def test_unsupported_config_is_named(checkpoint, change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_llama(checkpoint(config=change))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be an integer >= 1, got 0"),
        (lambda c: c.update(num_key_value_heads=0), "num_key_value_heads must be an integer >= 1, got 0"),
        (lambda c: c.update(max_position_embeddings=0), "max_position_embeddings must be an integer >= 1, got 0"),
        (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings must be True or False, got 'false'"),
        (lambda c: c.update(hidden_size=64.5), "hidden_size must be an integer >= 1, got 64.5"),
        (lambda c: c.update(vocab_size=-1), "vocab_size must be an integer >= 1, got -1"),
    ],
    ids=["zero-heads", "zero-kv-heads", "zero-positions", "string-tie", "float-width", "negative-vocab"],
)
def test_bad_config_values_are_refused_naming_the_key(checkpoint, change, message):
    """Each was accepted or failed far away: ZeroDivisionError, a silent num_heads or 2048,
    tie_word_embeddings "false" read as True, 64.5 truncated to 64."""
    with pytest.raises(ValueError, match=re.escape(message)):
        from_hf_llama(checkpoint(config=change))


def test_absent_optional_fields_take_the_llama_defaults():
    config = llama_config().to_dict()
    for key in ("num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        config.pop(key)
    kwargs = model_kwargs_from_hf_config(config)
    assert (kwargs["num_kv_heads"], kwargs["max_seq_len"], kwargs["tie_embeddings"]) == (4, 2048, False)
    config["num_key_value_heads"] = None  # written as null: the same as absent
    assert model_kwargs_from_hf_config(config)["num_kv_heads"] == 4


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_tensors_are_refused_naming_the_tensor(checkpoint, dtype):
    def cast(state):
        state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"].to(dtype)

    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"'model\.layers\.0\.mlp\.down_proj\.weight' has dtype {name}"):
        from_hf_llama(checkpoint(tensors=cast))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shards_outside_the_model_folder_are_refused(tmp_path, where):
    folder = tmp_path / "model"
    hf_llama().save_pretrained(folder)
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    shard = "../outside.safetensors" if where == "parent" else str(outside)
    names = load_file(outside).keys()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {name: shard for name in names}}))
    with pytest.raises(ValueError, match=re.escape(f"{index} names shard {shard!r}") + ".*outside"):
        from_hf_llama(folder)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files.*pytorch_model\.bin"):
        from_hf_llama(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        from_hf_llama(tmp_path)


def test_importing_ease_does_not_import_transformers():
    code = "import sys, ease, ease_kernels; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- exit settings travel through the export; transformers' own self-speculation ----------
from ease.models import ExitSettings  # noqa: E402

EXPORT_SETTINGS = ExitSettings(
    routing_threshold=0.4, min_exit_layer=2, draft_layers=1,
    calibration={"threshold": 0.4, "max_accuracy_drop": 0.02, "num_tokens": 64, "full_depth_accuracy": 0.3},
)  # fmt: skip


def wide_ease_model(seed=0):
    """Wide random weights (std 0.3): greedy choices are not decided by rounding."""
    torch.manual_seed(seed)
    model = DeepSupervisionTransformer(VOCAB, 32, 3, max_seq_len=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return model.eval()


def test_exit_settings_travel_through_to_hf_llama(tmp_path):
    model = wide_ease_model()
    model.exit_settings = EXPORT_SETTINGS
    to_hf_llama(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["ease_early_exit"] == EXPORT_SETTINGS.to_dict()
    assert json.loads((tmp_path / "generation_config.json").read_text())["assistant_early_exit"] == 1
    assert from_hf_llama(tmp_path).exit_settings == EXPORT_SETTINGS
    hf = LlamaForCausalLM.from_pretrained(tmp_path)
    assert hf.generation_config.assistant_early_exit == 1
    assert from_hf_llama(hf).exit_settings == EXPORT_SETTINGS  # in memory, through config.to_dict()
    # Exported again without a draft depth: the old one is taken out of generation_config.json.
    model.exit_settings = ExitSettings(routing_threshold=0.4)
    to_hf_llama(model, tmp_path)
    assert "assistant_early_exit" not in json.loads((tmp_path / "generation_config.json").read_text())
    assert from_hf_llama(tmp_path).exit_settings == ExitSettings(routing_threshold=0.4)


def test_bad_exported_exit_settings_are_named(tmp_path):
    to_hf_llama(wide_ease_model(), tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["ease_early_exit"]["draft_layers"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ease_early_exit: draft_layers must be an integer in 1..2"):
        from_hf_llama(tmp_path)


@pytest.mark.parametrize("draft_layers", [1, 2])
def test_transformers_assistant_early_exit_matches_ease_self_speculation(tmp_path, draft_layers, monkeypatch):
    """HF's LayerSkip-style drafts run the first E layers, then model.norm and lm_head: ease's
    exit head. Verification is lossless, so its greedy tokens are full-depth greedy's either way."""
    from transformers.generation import candidate_generator

    model = wide_ease_model()
    model.exit_settings = ExitSettings(draft_layers=draft_layers)
    to_hf_llama(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    drafted = []
    original = candidate_generator.EarlyExitCandidateGenerator.get_candidates

    def counting(self, *args, **kwargs):
        drafted.append(self.assistant_early_exit)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(candidate_generator.EarlyExitCandidateGenerator, "get_candidates", counting)
    prompt = torch.tensor([[5, 9, 11, 2, 40, 33]])
    new = 24
    full = model.generate(prompt, new, routing_threshold=None).tokens
    spec = model.generate(prompt, new, draft_layers=draft_layers)
    assert torch.equal(spec.tokens, full) and spec.draft_tokens > 0
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=new, do_sample=False, assistant_early_exit=draft_layers)
        stored = hf.generate(prompt, max_new_tokens=new, do_sample=False)  # from generation_config.json
    assert drafted and set(drafted) == {draft_layers}
    assert hf_tokens.tolist() == full.tolist() == stored.tolist()

"""L3TTrainer: transformers.Trainer with layer_weights, layer_lr_scales, layer dropout and curricula.

A tiny random LlamaForCausalLM (hidden 32, 3 layers, vocab 64) and local random batches;
nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from ease import Trainer, TrainingConfig, from_hf_llama  # noqa: E402
from ease.integrations.transformers import L3TTrainer, decoder_parts  # noqa: E402

VOCAB, LAYERS, SEQ = 64, 3, 17
WEIGHTS = {1: 0.5, 2: 0.2, 3: 0.3}
SCALES = {1: 1.0, 2: 0.5, 3: 0.1}


def tiny_llama(seed=0, tied=False):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norm scales away from 1: RMSNorm with unit scale is idempotent,
        for name, param in model.named_parameters():  # which would hide a doubly applied final norm
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


class Rows(torch.utils.data.Dataset):
    """Random token rows as causal-LM examples: labels are the inputs (shifted inside)."""

    def __init__(self, count=16, seed=0):
        generator = torch.Generator().manual_seed(seed)
        # A learnable pattern (each token followed by its successor) so a few steps reduce the loss.
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        self.rows = (start + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


def arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2,
        max_steps=6, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, weight_decay=0.1, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def l3t_trainer(tmp_path, model=None, **options):
    model = tiny_llama() if model is None else model
    args_overrides = options.pop("args", {})
    options.setdefault("layer_weights", WEIGHTS)
    return L3TTrainer(model=model, args=arguments(tmp_path, **args_overrides), train_dataset=Rows(), **options)


def batch(rows=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=generator)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_at_step_0_equals_ease_trainer_on_the_converted_model(tmp_path, fused, tied):
    hf = tiny_llama(tied=tied)
    trainer = l3t_trainer(tmp_path, hf, fused_loss=fused)
    ids = batch()
    hf.train()
    loss = trainer.compute_loss(hf, {"input_ids": ids, "labels": ids.clone()})
    ease_model = from_hf_llama(hf)
    ease_trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS, fused_loss=fused), vocab_size=VOCAB)
    expected, per_layer = ease_trainer.compute_loss(ease_model, ids[:, :-1], ids[:, 1:])
    # The same float32 math on the same weights; only the order of a few sums differs.
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0), (loss.item(), expected.item())
    assert loss.requires_grad


def test_last_layer_is_taken_before_the_final_norm(tmp_path):
    """HF's last hidden state is already normed; the exit must see the pre-norm one."""
    hf = tiny_llama()
    trainer = l3t_trainer(tmp_path, hf, layer_weights={3: 1.0})
    ids = batch()
    loss = trainer.compute_loss(hf.eval(), {"input_ids": ids, "labels": ids.clone()})
    # With only the last layer, the loss is Hugging Face's own causal-LM loss.
    with torch.no_grad():
        reference = hf(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, reference, rtol=1e-5), (loss.item(), reference.item())
    with torch.no_grad():  # and differs from normalising the normed state twice
        out = hf(input_ids=ids, output_hidden_states=True)
        twice = hf.lm_head(hf.model.norm(out.hidden_states[LAYERS]))[:, :-1]
        wrong = torch.nn.functional.cross_entropy(twice.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs(wrong.item() - loss.item()) > 1e-3


def test_a_few_steps_reduce_the_loss_and_log_every_layer(tmp_path):
    hf = tiny_llama()
    trainer = l3t_trainer(tmp_path, hf, layer_lr_scales=SCALES)
    ids = Rows().rows[:8]
    hf.eval()
    with torch.no_grad():
        before = trainer.compute_loss(hf, {"input_ids": ids, "labels": ids.clone()}).item()
    trainer.train()
    hf.eval()
    with torch.no_grad():
        after = trainer.compute_loss(hf, {"input_ids": ids, "labels": ids.clone()}).item()
    assert after < before - 0.05, (before, after)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(f"loss_layer{layer}" in entry for entry in logged for layer in (1, 2, 3))
    assert all(math.isfinite(entry["loss"]) for entry in logged)


def test_parameter_groups_have_the_configured_ratios_and_hf_weight_decay(tmp_path):
    hf = tiny_llama()
    trainer = l3t_trainer(tmp_path, hf, layer_lr_scales=SCALES)
    optimizer = trainer.create_optimizer()
    base = trainer.args.learning_rate
    names = {id(p): n for n, p in hf.named_parameters()}
    decayed = set(trainer.get_decay_parameter_names(hf))
    seen = set()
    for group in optimizer.param_groups:
        scale = 1.0 if group["layer"] is None else SCALES[group["layer"]]
        assert group["lr"] == pytest.approx(base * scale)
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            assert (group["layer"] is None) == (not name.startswith("model.layers."))
            if group["layer"] is not None:
                assert name.startswith(f"model.layers.{group['layer'] - 1}.")
            assert group["weight_decay"] == (0.1 if name in decayed else 0.0), name
    assert seen == {n for n, p in hf.named_parameters() if p.requires_grad}
    # The schedule scales every group alike: the ratios hold after warmup and decay too.
    trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(3):
        optimizer.step()
        trainer.lr_scheduler.step()
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["layer3"] / rates["layer1"] == pytest.approx(0.1)
    assert rates["layer2"] / rates["rest"] == pytest.approx(0.5)


def test_layer_dropout_passes_dropped_rows_through_unchanged(tmp_path):
    hf = tiny_llama()
    trainer = l3t_trainer(tmp_path, hf, layer_dropout=0.5, layer_dropout_shape="uniform")
    ids = batch(8)
    keep = trainer._dropout.keep(0, 8)
    assert not keep.all(0).any() and keep.any(0).all()  # every layer drops some rows and keeps some
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, o: captured.append((a[0], o))) for layer in hf.model.layers]
    hf.train()
    try:
        trainer.compute_loss(hf, {"input_ids": ids, "labels": ids.clone()})
    finally:
        for hook in hooks:
            hook.remove()
    for index, (x, out) in enumerate(captured):
        dropped = ~keep[:, index]
        assert torch.equal(out[dropped], x[dropped])
        assert not torch.equal(out[~dropped], x[~dropped])


def test_curriculum_zeroes_weights_by_global_step(tmp_path):
    trainer = l3t_trainer(tmp_path, exit_curriculum="rotational", curriculum_period=2)
    assert trainer.step_weights(0) == {1: 0.5, 2: 0.0, 3: 0.3}
    assert trainer.step_weights(1) == {1: 0.0, 2: 0.2, 3: 0.3}
    trainer.train()  # runs through the curriculum's steps
    gradual = l3t_trainer(tmp_path, exit_curriculum="gradual")
    gradual.state.max_steps = 4
    assert gradual.step_weights(0) == {1: 0.0, 2: 0.0, 3: 0.3}
    assert gradual.step_weights(4) == WEIGHTS


def test_bad_options_and_layouts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layer_weights has layer 4"):
        l3t_trainer(tmp_path, layer_weights={4: 1.0})
    with pytest.raises(ValueError, match="layer_lr_scales"):
        l3t_trainer(tmp_path, layer_lr_scales={1: 0.0})
    with pytest.raises(ValueError, match="layout"):
        decoder_parts(torch.nn.Linear(2, 2))
    trainer = l3t_trainer(tmp_path)
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, {"input_ids": batch()})

"""Tests of the training recipe: learning-rate schedules, step and token budgets, layer
dropout, exit curricula, depth loss weights and the metrics log (ease.training.schedule,
layer_dropout, curriculum, metrics and their use by the Trainer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _builders import random_batches, tiny_model
import ease_kernels
from ease import DeepSupervisionTransformer, Trainer, TrainingConfig
from ease.training.curriculum import ExitCurriculum, depth_loss_weights
from ease.training.layer_dropout import LayerDropout
from ease.training.schedule import LRSchedule

VOCAB = 40
LAYERS = 4


def tiny(**kwargs) -> DeepSupervisionTransformer:
    return tiny_model(vocab_size=VOCAB, dim=16, num_layers=LAYERS, num_heads=2, max_seq_len=32, **kwargs)


def batches(n: int, rows: int = 4, seq: int = 9, seed: int = 0) -> list[torch.Tensor]:
    return random_batches(n, rows=rows, columns=seq, vocab_size=VOCAB, seed=seed)


def config(**kwargs) -> TrainingConfig:
    base = dict(layer_weights=depth_loss_weights(LAYERS), layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.25}, verbose=False)
    return TrainingConfig(**(base | kwargs))


# -- learning-rate schedule ---------------------------------------------------------------------
def test_schedule_values_at_chosen_steps() -> None:
    warm = LRSchedule("constant", warmup_steps=3)
    assert [warm.factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = LRSchedule("linear", warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    assert linear.factor(0) == 1.0 and linear.factor(10) == pytest.approx(0.1) and linear.factor(20) == pytest.approx(0.1)
    assert linear.factor(5) == pytest.approx(0.1 + 0.9 * 0.5)
    cosine = LRSchedule("cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.0)
    assert cosine.factor(1) == pytest.approx(2 / 3)
    assert cosine.factor(2) == 1.0
    assert cosine.factor(7) == pytest.approx(0.5)  # half way through the decay
    assert cosine.factor(12) == pytest.approx(0.0, abs=1e-12)
    assert LRSchedule().is_identity and not warm.is_identity


def test_schedule_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"lr_schedule='cosine' decays .* needs the number of steps"):
        LRSchedule("cosine")
    with pytest.raises(ValueError, match=r"lr_schedule must be one of constant, linear, cosine, got 'step'"):
        TrainingConfig(lr_schedule="step")
    with pytest.raises(ValueError, match=r"min_lr_ratio must be"):
        TrainingConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1 or None, got 0"):
        TrainingConfig(max_steps=0)


def test_schedule_multiplies_every_group_so_layer_ratios_hold() -> None:
    trainer = Trainer(config(lr_schedule="cosine", warmup_steps=2, max_steps=8, min_lr_ratio=0.1), VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 1e-2)
    peaks = [group["lr"] for group in optimizer.param_groups]
    schedule = LRSchedule("cosine", 2, 8, 0.1)
    for step, batch in enumerate(batches(6)):
        trainer.train_epoch(model, [batch], optimizer)
        factor = schedule.factor(step)
        for group, peak in zip(optimizer.param_groups, peaks):
            assert group["lr"] == pytest.approx(peak * factor, rel=1e-12)
    layer1 = next(g for g in optimizer.param_groups if g["name"] == "layer1")["lr"]
    layer3 = next(g for g in optimizer.param_groups if g["name"] == "layer3")["lr"]
    assert layer3 / layer1 == pytest.approx(0.25)


def test_default_schedule_leaves_the_learning_rate_alone() -> None:
    trainer = Trainer(config(), VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 1e-3)
    before = [group["lr"] for group in optimizer.param_groups]
    trainer.train_epoch(model, batches(2), optimizer)
    assert [group["lr"] for group in optimizer.param_groups] == before


# -- budgets, early stopping by evaluations, exact resume ---------------------------------------
class Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def run_budget(tmp_path: Path, kill_at_step: int | None = None) -> tuple[dict, object]:
    recipe = dict(
        lr_schedule="cosine", warmup_steps=2, max_steps=9, eval_every=3, layer_dropout=0.3,
        exit_curriculum="rotational", checkpoint_dir=str(tmp_path), resume=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tiny()
    trainer = Trainer(config(**recipe), VOCAB)
    optimizer = trainer.create_optimizer(model, 3e-3)
    if kill_at_step is not None:
        write = trainer.write_checkpoint

        def write_then_die(*args, **kwargs):
            path = write(*args, **kwargs)
            if trainer.progress.step == kill_at_step:
                raise Killed
            return path

        trainer.write_checkpoint = write_then_die  # type: ignore[method-assign]
    # 4 batches an epoch: evaluations at steps 3, 6, 9 fall inside epochs 1, 2 and 3.
    result = trainer.train_with_early_stopping(model, batches(4), batches(1, seed=1), optimizer, max_epochs=10, patience=5)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_step_budget_counts_evaluations_and_resumes_mid_epoch_bit_for_bit(tmp_path: Path) -> None:
    straight, result = run_budget(tmp_path / "straight")
    assert result.steps_run == 9 and [h["step"] for h in result.history] == [3, 6, 9]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_val_loss == best["val_loss"] and result.best_step == best["step"]

    # Killed after the checkpoint of step 6 (in the middle of epoch 2), then resumed.
    with pytest.raises(Killed):
        run_budget(tmp_path / "resumed", kill_at_step=6)
    resumed, again = run_budget(tmp_path / "resumed")
    assert again.steps_run == 9 and [h["step"] for h in again.history] == [3, 6, 9]
    assert [h["val_loss"] for h in again.history] == [h["val_loss"] for h in result.history]
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_patience_counts_evaluations(tmp_path: Path) -> None:
    trainer = Trainer(config(max_steps=50, eval_every=1), VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 3e-3)
    objectives = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])
    real = trainer.evaluate

    def scripted(*args, **kwargs):
        figures = real(*args, **kwargs)
        figures["objective"] = next(objectives)
        return figures

    trainer.evaluate = scripted  # type: ignore[method-assign]
    result = trainer.train_with_early_stopping(model, batches(10), batches(1), optimizer, max_epochs=5, patience=2)
    assert [h["val_loss"] for h in result.history] == [3.0, 2.0, 2.5, 2.6]
    assert result.stopped_early and result.best_step == 2 and result.steps_run == 4


def test_token_budget_stops_at_the_first_step_that_reaches_it() -> None:
    trainer = Trainer(config(max_tokens=100), VOCAB)  # a batch holds 4 * 8 = 32 target tokens
    model = tiny()
    optimizer = trainer.create_optimizer(model, 3e-3)
    result = trainer.train_with_early_stopping(model, batches(10), batches(1), optimizer, max_epochs=5)
    assert result.steps_run == 4 and trainer.tokens_seen == 128
    assert [h["step"] for h in result.history] == [4]


# -- layer dropout -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["uniform", "linear", "exponential"])
def test_layer_dropout_per_row_statistics(shape: str) -> None:
    dropout = LayerDropout(num_layers=5, max_probability=0.4, shape=shape, seed=3)
    probabilities = dropout.probabilities()
    assert probabilities[-1] == pytest.approx(0.4)
    assert probabilities == sorted(probabilities)  # rises with depth
    if shape != "uniform":
        assert probabilities[0] == 0.0
    keep = torch.stack([dropout.keep(step, 64) for step in range(100)])  # (100, 64, 5)
    skipped = 1 - keep.double().mean((0, 1))
    # 6400 rows per layer: a binomial standard deviation of at most 0.0062; 5 sigma.
    assert skipped.tolist() == pytest.approx(probabilities, abs=0.031)
    # Rows of one step differ: the decisions are per row, not per batch.
    assert not (keep[:, :, -1] == keep[:, :1, -1]).all()


def test_layer_dropout_is_deterministic_and_fresh_each_step() -> None:
    dropout = LayerDropout(num_layers=4, max_probability=0.5, shape="uniform", seed=7)
    assert torch.equal(dropout.keep(5, 16), LayerDropout(4, 0.5, "uniform", seed=7).keep(5, 16))
    assert not torch.equal(dropout.keep(5, 16), dropout.keep(6, 16))
    assert not torch.equal(dropout.keep(5, 16), LayerDropout(4, 0.5, "uniform", seed=8).keep(5, 16))


def test_layer_dropout_skips_rows_in_training_only() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    ids = torch.randint(0, VOCAB, (3, 6))
    keep = torch.ones(3, LAYERS, dtype=torch.bool)
    keep[1, 2] = False  # row 1 skips block 3
    with torch.no_grad():
        full = model.hidden_states(ids, [4])[4]
        dropped = model.hidden_states(ids, [2, 4], keep)
        manual = model.layers[3](dropped[2], model.rope_cos[:6], model.rope_sin[:6])  # block 4 on block 2's output
    assert torch.equal(dropped[4][[0, 2]], full[[0, 2]])
    torch.testing.assert_close(dropped[4][1], manual[1], rtol=0, atol=0)
    # Evaluation never drops: two evaluations of a layer-dropout config agree exactly.
    trainer = Trainer(config(layer_dropout=0.6, layer_dropout_shape="uniform"), VOCAB)
    assert trainer.evaluate(model, batches(2)) == trainer.evaluate(model, batches(2))


def test_layer_dropout_changes_training_and_is_seeded() -> None:
    def train(layer_dropout: float, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = tiny()
        trainer = Trainer(config(layer_dropout=layer_dropout, seed=seed), VOCAB)
        torch.manual_seed(0)
        model = tiny()
        trainer.train_epoch(model, batches(3), trainer.create_optimizer(model, 1e-2))
        return model.state_dict()

    plain, dropped, again = train(0.0), train(0.5), train(0.5)
    assert all(torch.equal(dropped[k], again[k]) for k in plain)
    assert not all(torch.equal(dropped[k], plain[k]) for k in plain)


def test_compiled_model_draws_layer_dropout_per_step() -> None:
    # The decisions are an input of the graph: a compiled model must follow them, not
    # freeze the first ones at trace time (aot_eager: the reference backend on the CPU).
    torch.manual_seed(0)
    model = tiny().eval()
    ids = torch.randint(0, VOCAB, (4, 6))
    dropout = LayerDropout(LAYERS, 0.5, "uniform", seed=1)
    first, second = dropout.keep(0, 4), dropout.keep(1, 4)
    assert not torch.equal(first, second)

    def last_state(input_ids, keep):
        return model.hidden_states(input_ids, [LAYERS], keep)[LAYERS]

    compiled = torch.compile(last_state, backend="aot_eager", fullgraph=True)
    with ease_kernels.backend("reference"), torch.no_grad():
        for keep in (first, second):
            torch.testing.assert_close(compiled(ids, keep), last_state(ids, keep), rtol=1e-6, atol=1e-6)


# -- exit curricula and depth weights ---------------------------------------------------------
def test_rotational_curriculum_layer_sets_per_step() -> None:
    curriculum = ExitCurriculum("rotational", num_layers=5, period=2)
    assert [sorted(curriculum.active(step)) for step in range(4)] == [[1, 3, 5], [2, 4, 5], [1, 3, 5], [2, 4, 5]]
    three = ExitCurriculum("rotational", num_layers=7, period=3)
    assert sorted(three.active(0)) == [1, 4, 7] and sorted(three.active(1)) == [3, 6, 7]
    assert sorted(three.active(2)) == [2, 5, 7]


def test_gradual_curriculum_switches_exits_on_from_the_last() -> None:
    curriculum = ExitCurriculum("gradual", num_layers=5, total_steps=8)
    sets = [sorted(curriculum.active(step)) for step in (0, 2, 4, 6, 8, 20)]
    assert sets == [[5], [4, 5], [3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="exit_curriculum='gradual' .* needs the number of steps"):
        ExitCurriculum("gradual", num_layers=5)


@pytest.mark.parametrize("fused_loss", [False, True], ids=["plain", "fused"])
def test_curriculum_layers_off_compute_no_logits(fused_loss: bool) -> None:
    trainer = Trainer(config(exit_curriculum="rotational", curriculum_period=2, fused_loss=fused_loss), VOCAB)
    model = tiny()
    asked = []
    hidden_states = model.hidden_states
    model.hidden_states = lambda ids, layers, *rest: asked.append(sorted(layers)) or hidden_states(ids, layers, *rest)
    trainer.train_epoch(model, batches(4), trainer.create_optimizer(model, 1e-3))
    assert asked == [[1, 3, 4], [2, 4], [1, 3, 4], [2, 4]]


def test_curriculum_needs_the_last_layer_weighted() -> None:
    trainer = Trainer(config(layer_weights={1: 1.0, LAYERS: 0.0}, exit_curriculum="rotational"), VOCAB)
    model = tiny()
    with pytest.raises(ValueError, match=rf"exit_curriculum='rotational' supervises the last layer .* layer {LAYERS} weight 0"):
        trainer.train_epoch(model, batches(1), trainer.create_optimizer(model, 1e-3))


def test_depth_loss_weights_shapes() -> None:
    assert depth_loss_weights(4) == {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}
    linear = depth_loss_weights(4, "linear")
    assert linear == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    inverse = depth_loss_weights(3, "inverse", total=2.0)
    assert sum(inverse.values()) == pytest.approx(2.0) and inverse[1] > inverse[2] > inverse[3]
    assert depth_loss_weights(3, "sum") == pytest.approx({1: 0.1, 2: 0.3, 3: 0.6})
    sqrt = depth_loss_weights(4, "sqrt")
    assert sqrt[4] / sqrt[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"scale must be one of uniform, linear, sqrt, inverse, inverse_sqrt, sum"):
        depth_loss_weights(3, "cubic")


# -- metrics log ---------------------------------------------------------------------------------
def test_metrics_log_lines(tmp_path: Path) -> None:
    trainer = Trainer(config(log_dir=str(tmp_path), log_every=2, max_steps=6, eval_every=3), VOCAB)
    model = tiny()
    optimizer = trainer.create_optimizer(model, 3e-3)
    trainer.train_with_early_stopping(model, batches(4), batches(1, seed=1), optimizer, max_epochs=5)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    evals = [line for line in lines if line["kind"] == "eval"]
    assert [line["step"] for line in train] == [2, 4, 6] and [line["step"] for line in evals] == [3, 6]
    assert [line["tokens"] for line in train] == [64, 128, 192]
    for line in train:
        assert set(line) == {"kind", "step", "tokens", "lr", "loss", "grad_norm", "tokens_per_second", "layers"}
        assert set(line["layers"]) == {str(layer) for layer in range(1, LAYERS + 1)}
        assert all(0.0 <= v["accuracy"] <= 1.0 and math.isfinite(v["loss"]) for v in line["layers"].values())
        # The loss is the weighted sum of the per-layer losses (uniform weights of 1/4).
        assert line["loss"] == pytest.approx(sum(v["loss"] for v in line["layers"].values()) / LAYERS, rel=1e-6)
    assert all(set(line) >= {"loss", "accuracy", "objective", "layers"} for line in evals)


def test_epoch_run_with_a_schedule_resumes_bit_for_bit(tmp_path: Path) -> None:
    def run(folder: Path, kill_after_epoch: int | None = None) -> dict:
        torch.manual_seed(0)
        model = tiny()
        trainer = Trainer(config(lr_schedule="linear", warmup_steps=3, min_lr_ratio=0.2,
                                 checkpoint_dir=str(folder), resume=True), VOCAB)  # fmt: skip
        optimizer = trainer.create_optimizer(model, 3e-3)
        if kill_after_epoch is not None:
            write = trainer.write_checkpoint

            def write_then_die(*args, **kwargs):
                write(*args, **kwargs)
                if trainer.progress.epoch == kill_after_epoch:
                    raise Killed

            trainer.write_checkpoint = write_then_die  # type: ignore[method-assign]
        trainer.train_with_early_stopping(model, batches(3), batches(1, seed=1), optimizer, max_epochs=3, patience=3)
        return model.state_dict()

    straight = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "resumed", kill_after_epoch=2)
    resumed = run(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    def run(kill_at_step: int | None = None) -> None:
        torch.manual_seed(0)
        model = tiny()
        trainer = Trainer(config(max_steps=8, eval_every=4, log_dir=str(tmp_path), log_every=1,
                                 checkpoint_dir=str(tmp_path / "ckpt"), resume=True), VOCAB)  # fmt: skip
        optimizer = trainer.create_optimizer(model, 3e-3)
        if kill_at_step is not None:
            count = trainer.count_step

            def count_then_die(figures):
                count(figures)
                if trainer.progress.step == kill_at_step:
                    raise Killed  # steps 5 and 6 were logged after the checkpoint of step 4

            trainer.count_step = count_then_die  # type: ignore[method-assign]
        trainer.train_with_early_stopping(model, batches(5), batches(1, seed=1), optimizer, max_epochs=5)

    with pytest.raises(Killed):
        run(kill_at_step=6)
    run()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]  # fmt: skip
    assert steps == list(range(1, 9))


def test_token_budget_sets_the_schedule_horizon() -> None:
    from ease.training.early_stopping import planned_steps

    data = batches(10)  # 32 target tokens a batch
    assert planned_steps(config(max_tokens=100), data, max_epochs=5) == 4
    assert planned_steps(config(max_tokens=10_000), data, max_epochs=5) == 50
    assert planned_steps(config(max_steps=7, max_tokens=100), data, max_epochs=5) == 7
    assert planned_steps(config(), iter(data), max_epochs=5) is None
    # A DataLoader is never drawn from: its shuffling generator stays where it was.
    generator = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(torch.cat(data), batch_size=4, shuffle=True, generator=generator)
    before = generator.get_state()
    assert planned_steps(config(max_tokens=100), loader, max_epochs=5) == 5 * len(loader)
    assert torch.equal(generator.get_state(), before)


def test_metrics_reach_tensorboard_when_it_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(config(log_dir=str(tmp_path), log_every=1, max_steps=2, eval_every=2), VOCAB)
    model = tiny()
    trainer.train_with_early_stopping(model, batches(2), batches(1, seed=1), trainer.create_optimizer(model, 3e-3))
    trainer.metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/loss", f"train/layer{LAYERS}/accuracy"} <= tags
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)

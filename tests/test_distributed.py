"""Tests of ease.training.distributed: torchrun with DDP and FSDP2 matches one process.

The end-to-end tests launch ``torchrun --standalone --nproc_per_node=2`` (Gloo on the
CPU) on ``tests/_distributed_worker.py`` once for DDP and once for FSDP2, run the same
worker in this process as the single-process reference, and compare what both wrote.

Tolerances, and why:

- Losses: ``rel=1e-6``. Two ranks sum their rows' cross-entropies in float32 and add the
  sums; one process sums all rows at once. The order of additions changes the float32
  rounding (about 1e-7 per operation), nothing else: a loss weighted per rank instead of
  per token, or normalised by the wrong count, moves it by 1e-3 or more.
- Weights after SGD (momentum 0.9) steps: ``rtol=1e-5, atol=1e-6``. Each update is
  ``lr * gradient``, so the float32 rounding of the reduced gradient (a few 1e-7
  relative) reaches the weights unamplified; a wrong gradient scale (DDP's averaging left
  uncorrected: a factor of 2) or a wrong token weighting moves them by 1e-3 and more.
- Evaluation of identical weights (the initial model): every count (accuracy, exit
  fractions, tokens) is exactly equal, the losses to ``rel=1e-6`` (float32 sums again):
  "identical" up to the order of float additions, which no reduction over ranks avoids.
- Resume under torchrun: bit for bit (``torch.equal``); the ranks and the reductions run
  in the same order in both runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import _distributed_worker as worker
from _torchrun import died_of_a_signal, run_torchrun
from ease import DeepSupervisionTransformer, Trainer, TrainingConfig
from ease.training.checkpoint import read_checkpoint
from ease.training.distributed import (
    DistributedContext,
    loss_scale,
    setup_distributed,
    shard_rows,
    torchrun_environment,
    wrap_model,
)

REPO = Path(__file__).resolve().parent.parent
LOSS_REL = 1e-6  # float32 sums in another order, see the module docstring
WEIGHTS = {"rtol": 1e-5, "atol": 1e-6}  # SGD passes gradient rounding through unamplified


def launch(mode: str, loss_path: str, out: Path) -> None:
    """Run the worker under torchrun in ``out``; fail with its output and the ranks' logs."""

    def rank_logs() -> str:
        return "".join(f"\n--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(out.glob("rank*.log")))

    def start_afresh() -> None:
        shutil.rmtree(out)
        out.mkdir()

    run_torchrun(
        [str(REPO / "tests" / "_distributed_worker.py"), mode, str(out), loss_path],
        describe_failure=rank_logs,
        before_retry=start_afresh,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """The worker run in this process on one process, once per loss path."""
    folders = {}
    for loss_path in ("fused", "plain"):
        out = tmp_path_factory.mktemp(f"single-{loss_path}")
        worker.run("none", out, fused_loss=loss_path == "fused")
        folders[loss_path] = out
    return folders


@pytest.fixture(scope="module", params=[("ddp", "fused"), ("fsdp", "plain")], ids=["ddp", "fsdp"])
def launched(request, tmp_path_factory, reference) -> tuple[str, Path, Path]:
    """``(mode, torchrun output folder, matching single-process folder)``.

    DDP runs the Trainer's fused exit-head loss, FSDP2 the plain per-layer logits with two
    micro-batches per step, so both loss paths and gradient accumulation run under a wrapper.
    """
    mode, loss_path = request.param
    out = tmp_path_factory.mktemp(f"torchrun-{mode}")
    launch(mode, loss_path, out)
    return mode, out, reference[loss_path]


def reports(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("rank*.json"))]


def assert_same_weights(path_a: Path | dict, path_b: Path | dict, exact: bool = False) -> None:
    a = path_a if isinstance(path_a, dict) else torch.load(path_a)
    b = path_b if isinstance(path_b, dict) else torch.load(path_b)
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, name=name: f"{name}: {m}")


# -- end to end under torchrun --------------------------------------------------------------
def test_every_rank_ran_in_the_asked_mode(launched) -> None:
    mode, out, _ = launched
    ranks = reports(out)
    assert [(r["rank"], r["world_size"], r["mode"]) for r in ranks] == [(0, 2, mode), (1, 2, mode)]


def test_loss_history_matches_one_process(launched) -> None:
    _, out, single = launched
    (expected,) = reports(single)
    for report in reports(out):  # every rank returns the global figures
        assert report["step_losses"] == pytest.approx(expected["step_losses"], rel=LOSS_REL)
        for got, want in zip(report["history"], expected["history"], strict=True):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=LOSS_REL)
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=LOSS_REL)
        if "sampler_loss" in report:  # DDP: a DistributedSampler's batches
            assert report["sampler_loss"] == pytest.approx(expected["sampler_loss"], rel=LOSS_REL)


def test_final_weights_match_one_process(launched) -> None:
    mode, out, single = launched
    assert_same_weights(out / "weights_sgd.pt", single / "weights_sgd.pt")
    if mode == "ddp":  # a DataLoader with a DistributedSampler, used as it is
        assert_same_weights(out / "weights_sampler.pt", single / "weights_sampler.pt")
    # AdamW too (the runs that checkpoint after every epoch), see test_resume_* below.
    straight = read_checkpoint(out / "straight" / "last.pt")["model"]
    assert_same_weights(straight, read_checkpoint(single / "straight" / "last.pt")["model"])


def test_recipe_with_layer_dropout_matches_one_process(launched) -> None:
    # Layer dropout's decisions, the schedule and the step budget are the same on two ranks
    # as on one process: the same losses at every evaluation and the same weights.
    _, out, single = launched
    (expected,) = reports(single)
    for report in reports(out):
        assert report["recipe_steps"] == expected["recipe_steps"] == 6
        assert [h["step"] for h in report["recipe_history"]] == [2, 4, 6]
        for got, want in zip(report["recipe_history"], expected["recipe_history"], strict=True):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=LOSS_REL)
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=LOSS_REL)
    assert_same_weights(out / "weights_recipe.pt", single / "weights_recipe.pt")


def test_evaluation_figures_are_identical(launched) -> None:
    _, out, single = launched
    (expected,) = reports(single)
    want = expected["eval_initial"]
    for report in reports(out):
        got = report["eval_initial"]
        assert got["tokens"] == want["tokens"]
        assert got["accuracy"] == want["accuracy"]
        assert got["early_exit"] == want["early_exit"]  # counts: exact
        for key in ("loss", "objective", "ppl"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_REL)
        for layer, figures in want["layers"].items():
            assert got["layers"][layer]["accuracy"] == figures["accuracy"]
            assert got["layers"][layer]["loss"] == pytest.approx(figures["loss"], rel=LOSS_REL)
    # After training, the validation figures of every epoch agree across ranks exactly.
    rank0, rank1 = reports(out)
    assert rank0["history"] == rank1["history"]


def test_per_layer_groups_are_those_of_one_process(launched) -> None:
    _, out, single = launched
    (expected,) = reports(single)
    for report in reports(out):
        assert report["groups"] == expected["groups"]  # names, layers, learning rates, parameter counts
    lrs = {name: lr for name, layer, lr, _ in expected["groups"]}
    assert lrs["layer1"] == worker.SGD_LR * 1.0 and lrs["layer2"] == worker.SGD_LR * 0.5
    assert lrs["layer3"] == worker.SGD_LR * 0.25 and lrs["embeddings_head"] == worker.SGD_LR


def test_early_stopping_decides_alike_on_every_rank(launched) -> None:
    _, out, single = launched
    (expected,) = reports(single)
    assert expected["decision"] == [1, 2, True]  # epoch 2 got worse: stop, restore epoch 1
    for report in reports(out):
        assert report["decision"] == expected["decision"]
        assert report["resumed_decision"] == expected["resumed_decision"]


def test_output_and_checkpoints_come_from_rank_zero(launched) -> None:
    _, out, single = launched
    rank0, rank1 = reports(out)
    (expected,) = reports(single)
    # 2 (SGD phase) + 3 (straight) + 2 (stopped) + 1 (resumed) + 1 (NaN) checkpoints, all by rank 0.
    assert rank0["checkpoint_writes"] == expected["checkpoint_writes"] == 9
    assert rank1["checkpoint_writes"] == 0
    log0, log1 = (out / "rank0.log").read_text(), (out / "rank1.log").read_text()
    assert "epoch   1 |" in log0 and "train:" in log0 and "resumed from" in log0
    assert "epoch" not in log1 and "train" not in log1
    assert not list(out.rglob("*.tmp"))


def test_resume_under_torchrun_is_exact(launched) -> None:
    _, out, single = launched
    straight = read_checkpoint(out / "straight" / "last.pt")
    resumed = read_checkpoint(out / "resumed" / "last.pt")
    assert straight["trainer"]["epoch"] == resumed["trainer"]["epoch"] == 3
    assert straight["trainer"]["step"] == resumed["trainer"]["step"] == 12
    assert_same_weights(straight["model"], resumed["model"], exact=True)
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(straight["trainer"]["history"]) == strip(resumed["trainer"]["history"])
    # And the resumed run agrees with one process resumed the same way.
    assert_same_weights(resumed["model"], read_checkpoint(single / "resumed" / "last.pt")["model"])
    assert len(resumed["rng"]) == 2  # one RNG entry per rank


def test_nan_on_one_rank_stops_every_rank_with_the_named_error(launched) -> None:
    _, out, single = launched
    rank0, rank1 = reports(out)
    (expected,) = reports(single)
    message = expected["nan_error"]
    assert message is not None and rank0["nan_error"] == rank1["nan_error"]
    pattern = r"epoch 2: non-finite training loss nan at step 2: layer 2 cross-entropy is nan.*\(epoch 1\), is left"
    for got in (message, rank0["nan_error"]):
        assert re.search(pattern, got), got
    assert read_checkpoint(out / "nan" / "last.pt")["trainer"]["epoch"] == 1


def test_checkpoint_from_torchrun_loads_on_one_process(launched) -> None:
    """Full state dicts keyed by parameter names: the file does not depend on the wrapping."""
    _, out, single = launched
    trainer = Trainer(TrainingConfig(layer_weights=worker.LAYER_WEIGHTS, verbose=False), worker.VOCAB)
    model = DeepSupervisionTransformer(vocab_size=worker.VOCAB, dim=32, num_layers=worker.LAYERS, max_seq_len=32)
    optimizer = trainer.create_optimizer(model, base_lr=worker.ADAMW_LR)
    progress = trainer.load_checkpoint(out / "stopped" / "last.pt", model, optimizer)
    assert (progress.epoch, progress.step) == (2, 8)
    assert progress.best_state is not None and progress.best_epoch >= 1
    reference = read_checkpoint(single / "stopped" / "last.pt")
    assert_same_weights(model.state_dict(), reference["model"])
    saved = read_checkpoint(out / "stopped" / "last.pt")["optimizer"]
    assert saved["state"].keys() == reference["optimizer"]["state"].keys()
    for name, state in optimizer.state_dict()["state"].items():
        assert float(state["step"]) == 8.0, name


# -- global-batch arithmetic on one process ---------------------------------------------------
@pytest.mark.parametrize("steps", [2, 3, 8])
def test_gradient_accumulation_matches_one_step(steps: int) -> None:
    """k micro-batches (7 rows in 3 pieces: uneven; 8 pieces: every row alone) train like one batch."""
    train, val, _ = worker.data()
    results = []
    for accumulation in (1, steps):
        trainer, model = worker.build("none", None, fused_loss=True, accumulation=accumulation)
        optimizer = worker.sgd(trainer, model)
        loss = trainer.train_epoch(model, train, optimizer, verbose=False)
        results.append((loss, {k: v.clone() for k, v in model.state_dict().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=LOSS_REL)
    assert_same_weights(results[1][1], results[0][1])


def test_only_signal_deaths_are_relaunched() -> None:
    # torchrun's failure report, abridged: the CI abort (rank 0 SIGABRT, rank 1 SIGTERMed
    # after it) and a Python error in rank 1 (rank 0 SIGTERMed after it).
    aborted = (
        "Failures:\n[1]:\n  rank : 1\n  exitcode  : -15 (pid: 2)\n"
        "Root Cause (first observed failure):\n[0]:\n  rank : 0\n  exitcode  : -6 (pid: 1)\n"
    )
    python_error = (
        "Failures:\n[1]:\n  rank : 0\n  exitcode  : -15 (pid: 1)\n"
        "Root Cause (first observed failure):\n[0]:\n  rank : 1\n  exitcode  : 1 (pid: 2)\n"
    )
    assert died_of_a_signal(aborted)
    assert not died_of_a_signal(python_error)
    assert not died_of_a_signal("torchrun: timed out waiting for the rendezvous")


def test_shard_rows_splits_contiguously_and_pads_empty_shards() -> None:
    inputs = torch.arange(3 * 4).reshape(3, 4)
    targets = inputs + 100
    shards = shard_rows(inputs, targets, 2, ignore_index=-100)
    assert [s[0].shape[0] for s in shards] == [2, 1]
    assert torch.equal(torch.cat([s[0] for s in shards]), inputs)
    assert torch.equal(torch.cat([s[1] for s in shards]), targets)
    padded = shard_rows(inputs[:1], targets[:1], 3, ignore_index=-100)
    assert [tuple(s[0].shape) for s in padded] == [(1, 4)] * 3
    # The padding rows count no target: every rank still runs forward and backward.
    assert all(bool((s[1] == -100).all()) for s in padded[1:])


def test_loss_scale_turns_local_means_into_the_global_mean() -> None:
    # Two ranks with 30 and 10 tokens: DDP averages, so the shares must sum to world_size.
    assert loss_scale(30, 40, 2) + loss_scale(10, 40, 2) == pytest.approx(2.0)
    assert loss_scale(30, 40, 2) == 1.5 and loss_scale(64, 64, 1) == 1.0
    assert loss_scale(0, 0, 2) == 0.0


def test_setup_outside_torchrun(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup_distributed("auto") == DistributedContext()
    assert setup_distributed("none").enabled is False
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match=rf"distributed='{mode}' needs a torchrun launch"):
            setup_distributed(mode)
        with pytest.raises(ValueError, match="needs a torchrun launch"):
            Trainer(TrainingConfig(distributed=mode), worker.VOCAB)
    with pytest.raises(ValueError, match="distributed must be one of"):
        setup_distributed("deepspeed")


def test_torchrun_environment(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="LOCAL_RANK missing"):
        torchrun_environment()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_environment() == (4, 3, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent torchrun variables"):
        torchrun_environment()


def test_wrap_model_wants_the_bare_model() -> None:
    model = DeepSupervisionTransformer(vocab_size=worker.VOCAB, dim=32, num_layers=2)
    wrapped = wrap_model(model, DistributedContext())
    assert wrapped.model is model and wrapped.runner is None
    assert wrapped.run(lambda m, x: m is model and x, 5) == 5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("distributed", "mpi", "distributed must be one of"),
        ("grad_accumulation_steps", 0, "grad_accumulation_steps must be an integer >= 1, got 0"),
        ("grad_accumulation_steps", 1.5, "grad_accumulation_steps must be an integer >= 1"),
        ("checkpoint_dir", "", "checkpoint_dir must be a non-empty path or None"),
        ("resume", 1, "resume must be True or False"),
    ],
)
def test_config_rejects_bad_values(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**{field: value})


def test_resume_needs_a_checkpoint_dir() -> None:
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        TrainingConfig(resume=True)
    assert TrainingConfig(checkpoint_dir=Path("runs/a"), resume=True).checkpoint_dir == os.fspath(Path("runs/a"))
    assert math.isinf(Trainer(TrainingConfig(), 10).progress.best_val_loss)

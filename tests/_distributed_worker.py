"""One training run for tests/test_distributed.py, written to files.

Launched by the test as ``torchrun --nproc_per_node=2 tests/_distributed_worker.py MODE OUT
LOSS`` with MODE ``ddp`` or ``fsdp`` (Gloo on the CPU) and LOSS ``fused`` or ``plain``
(the Trainer's two loss paths), and called in-process with MODE ``none`` for the
single-process reference. Every rank runs the same script on the same global batches;
the Trainer gives each rank its rows. Under FSDP2 each batch is also cut into two
micro-batches (``grad_accumulation_steps=2``). The run:

1. evaluates the freshly initialised model (the same weights everywhere, so the
   figures must agree to float rounding);
2. trains one epoch step by step (``train_epoch`` on one batch at a time, SGD), recording
   the loss of every step;
3. goes on with ``train_with_early_stopping`` (SGD, patience 1), which stops after epoch 2
   and restores epoch 1;
4. with AdamW (the Trainer's optimiser): three epochs straight, two epochs then a resume
   with fresh objects for the third, each checkpointing into its own folder;
5. (DDP) trains one epoch from a ``DataLoader`` with a ``DistributedSampler``, which the
   Trainer must use as it is;
6. poisons the last rank's rows with a NaN in epoch 2: every rank must stop with the
   same error, and the checkpoint of epoch 1 must stay;
7. trains with the recipe options: layer dropout, a cosine schedule, a step budget with
   evaluations every 2 steps.

Rank ``r`` writes ``rank{r}.json`` (figures, decisions, how many checkpoint writes it
made) and ``rank{r}.log`` (its stdout and stderr); rank 0 writes the full weights after
phases 3, 5 and 7 (``weights_*.pt``) and the checkpoints. Dropout is 0: each rank would draw
its own masks, which no single process can reproduce. Layer dropout is not: its decisions
are drawn for the global batch from the seed and the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import torch

from ease._io import jsonable  # evaluation dicts have int layer keys

VOCAB = 50
LAYERS = 3
SGD_LR = 0.1
ADAMW_LR = 3e-3
LAYER_WEIGHTS = {1: 0.5, 2: 0.2, 3: 1.0}  # not uniform, not normalised
LAYER_LR_SCALES = {1: 1.0, 2: 0.5, 3: 0.25}


def periodic(rows: int, seq: int, generator: torch.Generator, period: int = 5) -> torch.Tensor:
    """A learnable task: each row repeats a random pattern, so token t + period equals token t."""
    pattern = torch.randint(0, VOCAB, (rows, period), generator=generator)
    return pattern.repeat(1, seq // period + 2)[:, : seq + 1].contiguous()


def with_ignored(batch: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``(inputs, targets)`` pair whose first ``rows`` rows ignore most targets.

    The ranks then hold different token counts, which a per-rank mean would get wrong.
    """
    inputs, targets = batch[:, :-1].clone(), batch[:, 1:].clone()
    targets[:rows, 3:] = -100
    return inputs, targets


def data() -> tuple[list, list, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    train = [periodic(8, 16, generator) for _ in range(3)]
    train.append(with_ignored(periodic(7, 16, generator), rows=3))  # 7 rows: 4 + 3 over two ranks
    val = [periodic(5, 16, generator), with_ignored(periodic(3, 16, generator), rows=2)]
    sampler_rows = periodic(32, 16, generator)
    return train, val, sampler_rows


def build(mode: str, checkpoint_dir: str | None, fused_loss: bool, accumulation: int, **recipe):
    from ease import DeepSupervisionTransformer, Trainer, TrainingConfig

    config = TrainingConfig(
        layer_weights=LAYER_WEIGHTS,
        layer_lr_scales=LAYER_LR_SCALES,
        routing_threshold=0.3,
        grad_clip=10.0,  # computed (a DTensor under FSDP2) but not binding: scale bugs would show
        distributed=mode,
        grad_accumulation_steps=accumulation,
        checkpoint_dir=checkpoint_dir,
        fused_loss=fused_loss,
        verbose=True,
        **recipe,
    )
    trainer = Trainer(config, VOCAB)
    model = DeepSupervisionTransformer(vocab_size=VOCAB, dim=32, num_layers=LAYERS, max_seq_len=32)
    return trainer, model


def without_seconds(epoch: dict) -> dict:
    """A history entry without its wall time, which no two runs share."""
    return {k: v for k, v in epoch.items() if k != "seconds"}


def sgd(trainer, model):
    """SGD with momentum over the Trainer's own per-layer groups (names, learning rates).

    The equivalence phases use it because AdamW hides what they check: its update
    ``m / (sqrt(v) + eps)`` ignores the gradient's scale (a loss normalised twice over
    would train the same) and amplifies the rounding of near-zero gradient entries (the
    attention's at initialisation) to a visible fraction of the learning rate.
    """
    groups = trainer.create_optimizer(model, base_lr=SGD_LR).param_groups
    return torch.optim.SGD(
        [{key: group[key] for key in ("params", "lr", "name", "layer", "lr_scale")} for group in groups],
        lr=SGD_LR,
        momentum=0.9,
    )


def save_weights(model, context, path: Path) -> None:
    from ease.training.distributed import full_model_state_dict

    state = full_model_state_dict(model, context)  # collective: every rank calls it
    if context.is_main:
        torch.save(state, path)


def run(mode: str, out: Path, fused_loss: bool) -> None:
    """Train as the module docstring says and write the results into ``out``.

    ``fused_loss`` picks the Trainer's loss path; FSDP runs with two micro-batches per
    step (``grad_accumulation_steps=2``), the others with one.
    """
    import ease.training.checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accumulation = 2 if mode == "fsdp" else 1
    writes = {"count": 0}
    real_write = ease.training.checkpoint._write

    def counting_write(payload, path):
        writes["count"] += 1
        real_write(payload, path)

    ease.training.checkpoint._write = counting_write
    train, val, sampler_rows = data()
    report: dict = {}

    print("phases 1-3", flush=True)  # every rank's log shows how far it got
    # Phases 1-3 (SGD): evaluation, one epoch step by step, two epochs with early stopping.
    trainer, model = build(mode, str(out / "sgd"), fused_loss, accumulation)
    context = trainer.distributed
    report["rank"], report["world_size"], report["mode"] = context.rank, context.world_size, context.mode
    report["eval_initial"] = jsonable(trainer.evaluate(model, val))
    optimizer = sgd(trainer, model)
    report["groups"] = [[g["name"], g["layer"], g["lr"], len(g["params"])] for g in optimizer.param_groups]
    report["step_losses"] = [trainer.train_epoch(model, [batch], optimizer, verbose=False) for batch in train]
    # patience=1: the validation objective worsens in epoch 2 (four batches of random
    # patterns are memorised, not generalised), so every rank must stop there and restore epoch 1.
    result = trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=3, patience=1)
    report["history"] = jsonable([without_seconds(h) for h in result.history])
    report["decision"] = [result.best_epoch, result.epochs_run, result.stopped_early]
    save_weights(model, context, out / "weights_sgd.pt")

    print("phase 4", flush=True)
    # Phase 4 (AdamW, the Trainer's optimiser): three epochs straight, and two epochs then
    # a resume with fresh objects for the third; each run checkpoints into its own folder.
    for name, stop_after in (("straight", 3), ("stopped", 2)):
        trainer, model = build(mode, str(out / name), fused_loss, accumulation)
        optimizer = trainer.create_optimizer(model, base_lr=ADAMW_LR)
        trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=stop_after, patience=3)
    trainer, model = build(mode, str(out / "resumed"), fused_loss, accumulation)
    optimizer = trainer.create_optimizer(model, base_lr=ADAMW_LR)
    resumed = trainer.train_with_early_stopping(
        model, train, val, optimizer, max_epochs=3, patience=3, resume_from=out / "stopped" / "last.pt"
    )
    report["resumed_history"] = jsonable([without_seconds(h) for h in resumed.history])
    report["resumed_decision"] = [resumed.best_epoch, resumed.epochs_run, resumed.stopped_early]

    if mode in ("ddp", "none"):
        print("phase 5", flush=True)
        # Phase 5: a DataLoader whose DistributedSampler already splits the rows.
        trainer, model = build(mode, None, fused_loss, 1)
        optimizer = sgd(trainer, model)
        if mode == "ddp":
            from torch.utils.data import DataLoader
            from torch.utils.data.distributed import DistributedSampler

            # Rank r gets rows r, r + 2, ...: step s covers rows 8s..8s+7 over both ranks.
            sampler = DistributedSampler(sampler_rows, shuffle=False)
            batches = DataLoader(sampler_rows, batch_size=4, sampler=sampler)
        else:
            batches = list(sampler_rows.split(8))
        report["sampler_loss"] = trainer.train_epoch(model, batches, optimizer, verbose=False)
        save_weights(model, context, out / "weights_sampler.pt")

    print("phase 6", flush=True)
    # Phase 6: block 2's output turns to NaN on the last rank only, at step 2 of epoch 2.
    # Every rank must raise the same error (the losses are reduced before the check), and
    # the checkpoint of epoch 1 must stay.
    trainer, model = build(mode, str(out / "nan"), fused_loss, accumulation)
    optimizer = trainer.create_optimizer(model, base_lr=ADAMW_LR)
    calls = {"n": 0}

    def poison(module, inputs, output):
        if module.training and context.rank == context.world_size - 1:
            calls["n"] += 1
            if calls["n"] == accumulation * (len(train) + 2):  # forward passes per step: accumulation
                return output * math.nan
        return output

    model.layers[1].register_forward_hook(poison)
    try:
        trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=3, patience=3)
        report["nan_error"] = None
    except FloatingPointError as error:
        report["nan_error"] = str(error)

    print("phase 7", flush=True)
    # Phase 7: the training recipe under a wrapper: layer dropout (drawn for the global
    # batch, so every rank skips what one process skips), a cosine schedule with warmup and
    # a step budget with evaluations every 2 steps.
    recipe = dict(
        layer_dropout=0.5, layer_dropout_shape="uniform", lr_schedule="cosine", warmup_steps=2,
        max_steps=6, eval_every=2,
    )  # fmt: skip
    trainer, model = build(mode, None, fused_loss, accumulation, **recipe)
    optimizer = sgd(trainer, model)
    budget = trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=5, patience=5)
    report["recipe_history"] = jsonable([without_seconds(h) for h in budget.history])
    report["recipe_steps"] = budget.steps_run
    save_weights(model, context, out / "weights_recipe.pt")

    report["checkpoint_writes"] = writes["count"]
    ease.training.checkpoint._write = real_write
    (out / f"rank{context.rank}.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    mode, out, loss_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    # Line-buffered: a rank that dies mid-run still leaves the lines it printed.
    with open(out / f"rank{rank}.log", "w", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run(mode, out, fused_loss=loss_path == "fused")
    # Progress on stderr, which the test prints on failure: it shows where a rank died.
    print(f"rank {rank}: report written", file=sys.stderr, flush=True)
    if torch.distributed.is_initialized():
        # Both ranks finish together and leave the group before the interpreter exits.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        print(f"rank {rank}: left the process group", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""What ``TrainingConfig(compile=True)`` saves or costs per training step, on this machine.

``python -m bench.bench_compile_step [--layers 3] [--dim 128] [--steps 40] [--out bench/results]``

Two trainers on the same model size, data and seed, one eager and one with ``compile=True``
(``torch.compile`` of the loss: model, exit head and fused loss); their steps alternate in
one process (eager, compiled, eager, ...) so both see the same machine load. Reports the
one-off first step (the compile) and the median step after it, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import environment, markdown_table, write_results
from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config
from ease.data import load_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="model depth (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side after the first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", default="bench/results", help="result folder (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(seq_len=64, batch_size=32)
    batches = data.train_batches[: args.steps + 1]
    sides = {}
    for name, compile_ in (("eager", False), ("compile", True)):
        torch.manual_seed(0)
        model = DeepSupervisionTransformer(data.vocab_size, args.dim, args.layers, max_seq_len=64)
        trainer = Trainer(create_deep_supervision_config(args.layers, verbose=False, compile=compile_), data.vocab_size)
        sides[name] = {"trainer": trainer, "model": model, "optimizer": trainer.create_optimizer(model, 3e-3), "times": []}
    for side in sides.values():
        start = time.perf_counter()
        side["trainer"].train_epoch(side["model"], batches[:1], side["optimizer"])
        side["first"] = time.perf_counter() - start
    for batch in batches[1:]:
        for side in sides.values():
            start = time.perf_counter()
            side["trainer"].train_epoch(side["model"], [batch], side["optimizer"])
            side["times"].append(time.perf_counter() - start)
    rows = [
        {"mode": name, "first_step_s": side["first"], "median_step_ms": 1e3 * statistics.median(side["times"]),
         "steps": len(side["times"])}
        for name, side in sides.items()
    ]  # fmt: skip
    speedup = rows[0]["median_step_ms"] / rows[1]["median_step_ms"]
    notes = [
        f"compiled step speed-up (eager median / compiled median): {speedup:.3f}x",
        f"model: {args.layers} layers, dim {args.dim}, vocab {data.vocab_size}, batch 32 x 64 tokens, "
        f"{args.threads} thread(s); steps interleaved eager/compiled in one process",
    ]
    print(markdown_table(rows))
    print("\n".join(notes))
    meta = {"environment": environment(torch.device("cpu")), "speedup": speedup,
            "command": "python -m bench.bench_compile_step " + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    json_path, md_path = write_results("compile-step", rows, meta, args.out, notes=notes)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end: one deep-supervision training step on the ease kernels against the same model
on the reference ops, in eager and under ``torch.compile`` (CUDA only).

``python -m bench.bench_train_step [--layers 12 --dim 2048 --vocab 32000 --batch 4 --seq 2048]``
times forward (every layer's exit loss, uniform weights) + backward + AdamW step in bf16
autocast, and reports tokens/s and peak memory per variant, with ratios against eager
reference ops measured in the same run. Writes JSON and markdown to --out.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import ease_kernels
from bench.common import environment, markdown_table, write_results
from ease import DeepSupervisionTransformer


def measure(model, compile_model: bool, backend: str, ids, targets, steps: int, warmup: int) -> dict:
    """Tokens/s and peak memory of ``steps`` timed training steps after ``warmup`` ones."""
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    weight = 1.0 / model.num_layers

    def step():
        with ease_kernels.backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_model(ids)
            loss = sum(weight * F.cross_entropy(z.flatten(0, 1).float(), targets.flatten()) for z in out.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {
        "step_ms": seconds * 1e3,
        "tokens_per_s": ids.numel() / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "warmup_seconds": warmup_seconds,
        "final_loss": float(loss),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="ease,eager,compile")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step needs CUDA; nothing timed")
        return 0
    variants = {"ease": (False, "auto"), "eager": (False, "reference"), "compile": (True, "reference")}
    rows = []
    for name in args.variants.split(","):
        compile_model, backend = variants[name]
        torch.manual_seed(0)
        model = DeepSupervisionTransformer(
            args.vocab, args.dim, args.layers, num_kv_heads=8, max_seq_len=args.seq
        ).cuda()
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
        targets = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
        result = measure(model, compile_model, backend, ids, targets, args.steps, args.warmup)
        rows.append({"variant": name, **result})
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    baseline = next((r for r in rows if r["variant"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = baseline["step_ms"] / row["step_ms"] if baseline else None
    meta = {
        "question": "deep-supervision training step, ease kernels vs reference ops (eager, compile)",
        "shape": vars(args),
        "environment": environment(),
    }
    columns = ["variant", "step_ms", "tokens_per_s", "peak_memory_gib", "speedup_vs_eager", "final_loss"]
    print(markdown_table(rows, columns))
    write_results("train-step", rows, meta, out_dir=args.out, columns=columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())

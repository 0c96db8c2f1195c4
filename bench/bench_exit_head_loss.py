"""Deep supervision's exit-head loss, plain against fused: peak memory and step time as the
number of supervised layers grows.

``python -m bench.bench_exit_head_loss [--layers 4,12,24] [--modes head,model] [--out DIR]``

For each number of supervised layers ``L`` and each variant, in a fresh process:

- ``plain``: every layer's logits through the exit head, then the cross-entropies (the
  trainer with ``fused_loss=False``);
- ``fused``: :func:`ease_kernels.exit_head_loss` (the trainer's default).

Two steps are measured. ``head`` (the headline: what the fusion changes, isolated) is the
loss of ``L`` random hidden states ``[tokens, dim]`` that require grad, forward and
backward. ``model`` is a full training step of a :class:`~ease.DeepSupervisionTransformer`
with ``L`` layers, every layer weighted ``1 / L`` (``Trainer.train_epoch`` on one batch:
forward, backward, clipping, AdamW).

Memory, per case, after one warm-up step with the gradients released (the baseline: inputs,
weights, optimiser state): ``peak_mib`` is the step's peak above that baseline (it includes
the gradients the step produces, those of the ``L`` hidden states among them, which grow
with ``L`` whatever the loss), ``working_mib`` the peak above the memory at the end of the
step (baseline plus every gradient): what the loss needs on top of its inputs and outputs.
On CUDA these come from the allocator (``torch.cuda.max_memory_allocated``); on the CPU from
the process's resident set: peak (``VmHWM``, reset through ``/proc/self/clear_refs``) and
current (``VmRSS``), with glibc told to return every block above 64 KiB to the system on free
(``MALLOC_MMAP_THRESHOLD_``) so that the resident set follows the live tensors. Time: on
CUDA ``triton.testing.do_bench`` (median) in the memory process; on the CPU the median of
``--repeat`` steps after a warm-up, in one more process per depth with the default allocator,
the variants taking turns step by step so that a shared machine's drifting load hits both
alike.

Defaults: on CUDA 8192 tokens, hidden 2048, vocabulary 32000 (the question's size) in bf16
autocast, as the trainer runs; on the CPU 2048 tokens, hidden 256, vocabulary 4096 (the same
vocabulary-to-hidden ratio, 16) in float32, which the CPU takes through the reference path.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import ease_kernels
from bench.common import default_device, environment, markdown_table, time_fn, write_results

IGNORE_INDEX = -100
MIB = 2**20


# ---------------------------------------------------------------------------------------
# Memory readings
# ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_now(device: torch.device) -> int:
    """Bytes in use now: allocated by the CUDA caching allocator, or resident on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


# ---------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------
def plain_head_loss(hidden, norm_weight, head_weight, targets, weights, eps) -> torch.Tensor:
    """The trainer's plain loss on given hidden states: every layer's logits, then the
    cross-entropies (logits upcast to float32, summed, divided by the token count)."""
    logits = [F.linear(ease_kernels.rms_norm(h, norm_weight, eps), head_weight) for h in hidden]
    tokens = (targets != IGNORE_INDEX).sum().clamp_min(1)
    loss = 0.0
    for z, weight in zip(logits, weights):
        ce = F.cross_entropy(z.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss + weight * ce / tokens
    return loss


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, as the trainer runs; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def head_case(args, layers: int, variant: str, device: torch.device):
    """``(step, release)`` for the head-only step: the loss of ``layers`` hidden states."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = [
        torch.randn(args.tokens, args.dim, generator=gen).to(device).requires_grad_() for _ in range(layers)
    ]
    norm_weight = torch.ones(args.dim, device=device, requires_grad=True)
    head_weight = (0.02 * torch.randn(args.vocab, args.dim, generator=gen)).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    weights = [1.0 / layers] * layers
    params = [*hidden, norm_weight, head_weight]

    def step() -> None:
        with autocast(device):
            if variant == "fused":
                loss = ease_kernels.exit_head_loss(hidden, norm_weight, head_weight, targets, weights, 1e-6).loss
            else:
                loss = plain_head_loss(hidden, norm_weight, head_weight, targets, weights, 1e-6)
        loss.backward()

    def release() -> None:
        for p in params:
            p.grad = None

    return step, release


def model_case(args, layers: int, variant: str, device: torch.device):
    """``(step, release)`` for a full deep-supervision training step of a ``layers``-layer model."""
    from ease import DeepSupervisionTransformer, Trainer, create_deep_supervision_config

    config = create_deep_supervision_config(layers, fused_loss=variant == "fused", verbose=False, seed=0)
    trainer = Trainer(config, args.vocab)
    seq = args.tokens // args.batch
    model = DeepSupervisionTransformer(args.vocab, args.dim, layers, max_seq_len=seq).to(device)
    optimizer = trainer.create_optimizer(model, base_lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = [torch.randint(0, args.vocab, (args.batch, seq + 1), generator=gen)]

    def step() -> None:
        trainer.train_epoch(model, batch, optimizer, verbose=False)

    def release() -> None:
        optimizer.zero_grad(set_to_none=True)

    return step, release


def measure_memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one step of one variant, in this (fresh) process; on CUDA its time too."""
    args = argparse.Namespace(**case["args"])
    device = torch.device(args.device)
    build = head_case if case["mode"] == "head" else model_case
    step, release = build(args, case["layers"], case["variant"], device)
    step()  # warm-up: lazily built state (optimiser moments, thread pools) exists afterwards
    release()
    gc.collect()
    baseline = memory_now(device)
    reset_peak(device)
    step()
    peak, end = memory_peak(device), memory_now(device)
    release()
    result = {"peak_mib": (peak - baseline) / MIB, "working_mib": (peak - end) / MIB, "baseline_mib": baseline / MIB}
    if device.type == "cuda":

        def timed() -> None:
            step()
            release()

        result["step_ms"] = time_fn(timed, device)
    return result


def measure_time_cpu(case: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median step time of every variant, timed in turns in this process.

    Taking turns (plain, fused, plain, fused, ...) exposes both variants to the same load,
    which on a shared CPU drifts over seconds; the median of each then compares fairly.
    """
    args = argparse.Namespace(**case["args"])
    device = torch.device(args.device)
    build = head_case if case["mode"] == "head" else model_case
    steps = {variant: build(args, case["layers"], variant, device) for variant in case["variants"]}
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    for turn in range(args.repeat + 1):  # the first turn warms up
        for variant, (step, release) in steps.items():
            start = time.perf_counter()
            step()
            release()
            if turn:
                times[variant].append((time.perf_counter() - start) * 1e3)
    return {variant: {"step_ms": statistics.median(t), "step_ms_all": t} for variant, t in times.items()}


def worker(case: dict[str, Any]) -> Any:
    """Run one case in this (fresh) process; the parent reads the returned value as JSON."""
    if case["args"]["threads"]:
        torch.set_num_threads(case["args"]["threads"])
    try:
        return measure_memory(case) if case["measure"] == "memory" else measure_time_cpu(case)
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}


# ---------------------------------------------------------------------------------------
# Driver: one fresh process per case
# ---------------------------------------------------------------------------------------
def run_case(case: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    if case["measure"] == "memory":
        # Every block above 64 KiB is mmapped and returned on free, so VmRSS is the live memory.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "bench.bench_exit_head_loss", "--worker", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(
    rows: list[dict[str, Any]], modes: list[str], layer_counts: list[int], tokens: int, dim: int, vocab: int
) -> list[str]:
    """Add to each row its ratios against plain at the same mode and depth; return the notes:
    the fused loss's growth with depth, the savings at L = 12 and the time ratios, against
    the targets."""
    by_key = {(r["mode"], r["layers"], r["variant"]): r for r in rows}
    for row in rows:
        plain = by_key.get((row["mode"], row["layers"], "plain"), {})
        if row.get("peak_mib") and plain.get("peak_mib"):
            row["peak_saving"] = plain["peak_mib"] / row["peak_mib"]
        if row.get("working_mib") and plain.get("working_mib"):
            row["working_saving"] = plain["working_mib"] / row["working_mib"]
        if row.get("step_ms") and plain.get("step_ms"):
            row["time_vs_plain"] = row["step_ms"] / plain["step_ms"]
    # What every gradient the head step returns weighs: any loss must produce these.
    notes = [
        "peak_mib includes the gradients the step returns (head: L hidden-state gradients of "
        f"{tokens} x {dim} float32, {tokens * dim * 4 / MIB:.1f} MiB each, and the head weight's, "
        f"{vocab * dim * 4 / MIB:.1f} MiB); working_mib is the peak above them and the inputs: "
        "the loss's own working memory"
    ]
    low, high, mid = min(layer_counts), max(layer_counts), 12 if 12 in layer_counts else None
    for mode in modes:
        first, last = by_key.get((mode, low, "fused"), {}), by_key.get((mode, high, "fused"), {})
        for metric in ("peak_mib", "working_mib"):
            if first.get(metric) and last.get(metric):
                # The target is the loss's; a model's activations grow with L whatever the loss.
                target = " (target <= 1.2x)" if mode == "head" else " (includes the model's activations)"
                notes.append(
                    f"{mode}: fused {metric} grows {last[metric] / first[metric]:.2f}x from L={low} to L={high}{target}"
                )
        if mid is not None:
            fused_mid = by_key.get((mode, mid, "fused"), {})
            for metric in ("peak_saving", "working_saving"):
                if fused_mid.get(metric):
                    target = " (target >= 4x)" if mode == "head" else ""
                    what = metric.split("_")[0]
                    notes.append(f"{mode}: at L={mid} plain / fused {what} = {fused_mid[metric]:.1f}x{target}")
        fused_rows = [r for r in rows if r["mode"] == mode and r["variant"] == "fused"]
        times = [r["time_vs_plain"] for r in fused_rows if r.get("time_vs_plain")]
        if times:
            notes.append(f"{mode}: fused step time / plain = {', '.join(f'{t:.2f}' for t in times)} (target <= 1.10)")
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,12,24", help="numbers of supervised layers")
    parser.add_argument("--modes", default="head,model", help="head (the loss alone), model (a training step)")
    parser.add_argument("--variants", default="plain,fused")
    parser.add_argument("--tokens", type=int, default=None, help="default 8192 on CUDA, 2048 on the CPU")
    parser.add_argument("--dim", type=int, default=None, help="default 2048 on CUDA, 256 on the CPU")
    parser.add_argument("--vocab", type=int, default=None, help="default 32000 on CUDA, 4096 on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch of the model step")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps (median); CPU only")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads per case (default 1: on a shared machine, OpenMP threads that spin "
        "while others hold the cores make step times swing tenfold)",
    )  # fmt: skip
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    device = torch.device(args.device) if args.device else default_device()
    cuda = device.type == "cuda"
    args.device = str(device)
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.dim = args.dim or (2048 if cuda else 256)
    args.vocab = args.vocab or (32000 if cuda else 4096)
    args.batch = args.batch or 4
    args.repeat = args.repeat or 3
    args.threads = args.threads or (None if cuda else 1)
    if args.tokens % args.batch:
        parser.error(f"--tokens {args.tokens} must be a multiple of --batch {args.batch}")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    layer_counts = [int(n) for n in args.layers.split(",")]

    rows = []
    variants = args.variants.split(",")
    for mode in args.modes.split(","):
        for layers in layer_counts:
            case = {"mode": mode, "layers": layers, "args": settings}
            group = {variant: {"mode": mode, "layers": layers, "variant": variant} for variant in variants}
            for variant, row in group.items():
                result = run_case({**case, "variant": variant, "measure": "memory"})
                row.update(result)
            if not cuda:
                result = run_case({**case, "variants": variants, "measure": "time"})
                for variant, row in group.items():
                    row.update(result.get(variant, {"error": result.get("error")}))
            for row in group.values():
                rows.append(row)
                print(json.dumps(row), flush=True)

    notes = summarize(rows, args.modes.split(","), layer_counts, args.tokens, args.dim, args.vocab)
    columns = [
        "mode", "layers", "variant", "peak_mib", "working_mib", "step_ms",
        ("peak_saving", "plain/fused peak"), ("working_saving", "plain/fused working"),
        ("time_vs_plain", "time fused/plain"), "error",
    ]  # fmt: skip
    env = environment(device)
    meta = {
        "question": "deep-supervision exit-head loss, plain vs fused: peak memory and step time vs supervised layers",
        "settings": settings,
        "default_chunk_rows": importlib.import_module("ease_kernels.exit_head_loss")._default_chunk_size(
            args.tokens, args.dim, args.vocab, device
        ),
        "command": "python -m bench.bench_exit_head_loss " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": env,
    }
    print(markdown_table(rows, columns))
    for note in notes:
        print("-", note)
    json_path, md_path = write_results("exit-head-loss", rows, meta, out_dir=args.out, columns=columns, notes=notes)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Everything issue 14 asks of a GPU, in one call: parity, then each kernel alone, then through
autograd against eager / torch.compile / Liger, then the fused loss and the training step.

Prepared so that one device session (15 minutes of device time, 10 per command) runs it in a
single command and brings back every result. Each step runs in its own process under its own
time limit, skipped once the suite's ``--budget`` is spent; the summary is rewritten after
every step, so a run cut short keeps what it measured. Steps, in order of what they decide:

1. ``parity``: the kernel test modules on CUDA (compiled kernels, not the interpreter);
2. ``alone``: copy bandwidth, then each launcher alone at the target shapes, captured in a
   CUDA graph and timed by ``triton.testing.do_bench`` (L2 flushed before every replay), in
   GB/s against the minimum bytes; registers and spills of each compiled kernel as the GPU's
   Triton built it (``bench/kernel_report.py`` predicts them on the CPU);
3. ``autograd``: ``python -m bench.bench_kernels --target`` (ease, eager, compile, Liger);
4. ``loss``: ``python -m bench.bench_exit_head_loss --layers 4,12 --modes head``;
5. ``train``: ``python -m bench.bench_train_step`` (ease, eager, compile);
6. ``compile``: ``python -m bench.check_compile`` (fullgraph, no graph break, gradients).

Run from the repository root: ``python -m bench.gpu_suite --out $OUT [--budget 540]
[--steps parity,alone,...]``. On the lent machine, carry Liger's wheel in ``.whl/``
(bench/README.md); it is installed into ``/tmp/site`` for the steps. Without CUDA it checks
its arguments, prints the plan and exits 0 (``--dry-run`` does that anywhere). Results:
``gpu-suite-<gpu>-<date>.{json,md}`` and each step's own files, in ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KERNEL_TESTS = [
    "tests/test_rms_norm.py", "tests/test_rope.py", "tests/test_exit_confidence.py",
    "tests/test_exit_head_loss.py", "tests/test_dispatch.py",
]  # fmt: skip

# step -> (seconds it may take, command after "python"); {out} is the output folder.
STEPS: dict[str, tuple[int, list[str]]] = {
    "parity": (150, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS]),
    "alone": (90, ["-m", "bench.gpu_suite", "--alone", "--out", "{out}"]),
    "autograd": (180, ["-m", "bench.bench_kernels", "--target", "--out", "{out}"]),
    "loss": (120, ["-m", "bench.bench_exit_head_loss", "--layers", "4,12", "--modes", "head", "--out", "{out}"]),
    "train": (150, ["-m", "bench.bench_train_step", "--steps", "5", "--out", "{out}"]),
    "compile": (90, ["-m", "bench.check_compile", "--out", "{out}"]),
}


# ---------------------------------------------------------------------------------------
# Step "alone": each launcher by itself, CUDA graph, L2 flushed
# ---------------------------------------------------------------------------------------
def _alone_cases(device) -> list[tuple[str, str, Callable[[], object], int]]:
    """``(kernel, shape, launch, minimum bytes)`` at the target shapes (bf16)."""
    import importlib

    import torch

    rms = importlib.import_module("ease_kernels.rms_norm")
    rope = importlib.import_module("ease_kernels.rope")
    confidence = importlib.import_module("ease_kernels.exit_confidence")
    loss = importlib.import_module("ease_kernels.exit_head_loss")
    bf16 = torch.bfloat16
    rows, hidden = 16384, 4096
    x = torch.randn(rows, hidden, device=device, dtype=bf16)
    r, dy, ds = (torch.randn_like(x) for _ in range(3))
    w = torch.randn(hidden, device=device, dtype=bf16)
    _, s, rstd = rms.rms_norm_fwd(x, w, 1e-6, r)
    act = x.numel() * 2
    q = torch.randn(4, 4096, 32, 128, device=device, dtype=bf16)
    k = torch.randn(4, 4096, 8, 128, device=device, dtype=bf16)
    cos, sin = (t.contiguous() for t in importlib.import_module("ease_kernels").rope_cos_sin(
        torch.arange(4096, device=device), 128, 500000.0))  # fmt: skip
    qk = (q.numel() + k.numel()) * 2
    logits = 4 * torch.randn(16384, 32000, device=device, dtype=bf16)
    wide = 4 * torch.randn(4096, 128256, device=device, dtype=bf16)
    chunk = 4 * torch.randn(2048, 32000, device=device, dtype=bf16)
    targets = torch.randint(0, 32000, (2048,), device=device)
    return [
        ("rms_norm fwd", "16384x4096", lambda: rms.rms_norm_fwd(x, w, 1e-6), 2 * act + rows * 4),
        ("rms_norm+residual fwd", "16384x4096", lambda: rms.rms_norm_fwd(x, w, 1e-6, r), 4 * act + rows * 4),
        ("rms_norm bwd", "16384x4096", lambda: rms.rms_norm_bwd(dy, x, w, rstd), 3 * act + rows * 4),
        ("rms_norm bwd (ds)", "16384x4096", lambda: rms.rms_norm_bwd(dy, s, w, rstd, ds), 4 * act + rows * 4),
        ("apply_rope fwd", "4x4096x(32+8)x128", lambda: rope._rope_launch(q, k, cos, sin, False), 2 * qk),
        ("apply_rope bwd", "4x4096x(32+8)x128", lambda: rope._rope_launch(q, k, cos, sin, True), 2 * qk),
        ("exit_confidence", "16384x32000", lambda: confidence._exit_confidence_launch(logits, 0.5),
         logits.numel() * 2 + 16384 * 13),
        ("exit_confidence", "4096x128256", lambda: confidence._exit_confidence_launch(wide, 0.5),
         wide.numel() * 2 + 4096 * 13),
        # Overwrites its logits with their gradient on every replay: the values drift, the
        # work does not. Minimum: read z once, write dz once.
        ("cross_entropy fwd+grad", "2048x32000",
         lambda: loss.cross_entropy_chunk(chunk, targets, 1e-4, -100, True), 2 * chunk.numel() * 2),
    ]  # fmt: skip


def _compiled_kernels() -> list[dict[str, Any]]:
    """Registers and spills of every ease kernel compiled in this process (best effort)."""
    import importlib

    found = []
    for name in ("rms_norm", "rope", "exit_confidence", "exit_head_loss"):
        module = importlib.import_module(f"ease_kernels.{name}")
        for attr, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for cache in caches.values():
                for kernel in (cache[0].values() if isinstance(cache, tuple) else cache.values()):
                    found.append({"kernel": attr, "n_regs": getattr(kernel, "n_regs", None),
                                  "n_spills": getattr(kernel, "n_spills", None),
                                  "num_warps": getattr(kernel.metadata, "num_warps", None),
                                  "shared": getattr(kernel.metadata, "shared", None)})  # fmt: skip
    return found


def run_alone(out: str) -> int:
    import torch
    from triton.testing import do_bench

    from bench.common import copy_bandwidth_gbs, environment, write_results

    device = torch.device("cuda")
    copy = copy_bandwidth_gbs(device)
    rows = []
    for kernel, shape, launch, nbytes in _alone_cases(device):
        launch()  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        ms = float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median"))  # L2 cleared per call
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({"kernel": kernel, "shape": shape, "ms": ms, "min_bytes": nbytes, "gbs": gbs,
                     "frac_copy": gbs / copy, "target": 0.85, "meets_target": gbs / copy >= 0.85})  # fmt: skip
        print(rows[-1], flush=True)
        del graph
    meta = {
        "question": "each ease kernel alone (CUDA graph, L2 flushed) against the copy bandwidth",
        "environment": environment(device),
        "ceilings": {"copy_bandwidth_gbs": copy},
        "compiled_kernels": _compiled_kernels(),
    }
    write_results("kernels-alone", rows, meta, out,
                  columns=["kernel", "shape", "ms", "gbs", "frac_copy", "meets_target"])  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
def _liger_path() -> str | None:
    """Install a carried Liger wheel (``.whl/*.whl``) into /tmp/site; its path, or None."""
    wheels = glob.glob(".whl/liger*.whl")
    if not wheels:
        return None
    target = "/tmp/site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--target", target, *wheels], capture_output=True, text=True)  # fmt: skip
    return target if done.returncode == 0 else None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--budget", type=int, default=540, help="seconds for all steps (default %(default)s)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {list(STEPS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)  # the "alone" step itself
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        parser.error(f"--steps must be a non-empty subset of {list(STEPS)}, got {steps}")
    if args.alone:
        return run_alone(args.out)

    import torch

    plan = [(name, STEPS[name][0], [a.format(out=args.out) for a in STEPS[name][1]]) for name in steps]
    for name, limit, command in plan:
        print(f"{name:9s} <= {limit:4d} s: python {' '.join(command)}")
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_suite needs CUDA; nothing run (plan above)")
        return 0

    from bench.common import environment, write_results

    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    liger = _liger_path()
    if liger:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (liger, env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    meta = {"environment": environment(torch.device("cuda")), "budget_s": args.budget, "liger": bool(liger),
            "command": "python -m bench.gpu_suite " + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    for name, limit, command in plan:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            rows.append({"step": name, "status": "skipped: budget spent", "seconds": 0.0})
            continue
        step_started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True,
                                  timeout=min(limit, left))  # fmt: skip
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {min(limit, left):.0f} s"
            output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        rows.append({"step": name, "status": status, "seconds": round(time.perf_counter() - step_started, 1),
                     "tail": _tail(output)})  # fmt: skip
        print(f"== {name}: {status} in {rows[-1]['seconds']} s\n{rows[-1]['tail']}", flush=True)
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        write_results("gpu-suite", rows, meta, args.out, columns=["step", "status", "seconds"])
    print(json.dumps([{k: v for k, v in r.items() if k != "tail"} for r in rows], indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What does one kernel call cost on the host, through each of the two Triton paths?

Every op in ``ease_kernels`` has one ``torch.autograd.Function`` whose forward and backward
reach the launchers through ``ease_kernels.dispatch.launch``: directly in eager mode, or
through the ``torch.library`` custom ops that wrap them (what ``torch.compile`` traces;
here forced by patching ``torch.compiler.is_compiling``). This benchmark replaces the launchers
with stubs that only allocate their outputs, so it runs anywhere (the CPU, no Triton
driver) and times nothing but the Python and dispatcher work around a launch: the cost
a small model pays per call, whatever the GPU.

Rows: per op, the microseconds per call of the stub alone, of the eager path and of the
custom-op path, forward only (inputs requiring grad) and forward plus backward; the
ratio is custom op over eager, timed in the same run (median of interleaved repeats).

Run from the repository root: ``python -m bench.bench_call_overhead``.
Results: ``bench/results/call-overhead-cpu-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from bench.common import environment, markdown_table, write_results
from ease_kernels.dispatch import launch

# The modules, not the functions of the same names that the package exports.
_rms = importlib.import_module("ease_kernels.rms_norm")
_rope = importlib.import_module("ease_kernels.rope")
_confidence = importlib.import_module("ease_kernels.exit_confidence")


# --------------------------------------------------------------------------- stubbed launchers
def _rms_norm_fwd_stub(x, weight, eps, residual=None):
    s = None if residual is None else torch.empty_like(x)
    return torch.empty_like(x), s, torch.empty(x.shape[:-1])


def _rms_norm_bwd_stub(dy, x, weight, rstd, ds):
    return torch.empty_like(x), torch.empty_like(weight)


def _rope_launch_stub(q, k, cos, sin, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _exit_confidence_launch_stub(logits, threshold):
    leading = logits.shape[:-1]
    return torch.empty(leading), torch.empty(leading, dtype=torch.int64), torch.empty(leading, dtype=torch.bool)


@contextlib.contextmanager
def stubbed_launchers() -> Iterator[None]:
    """The ops' modules call these stubs instead of launching kernels."""
    swaps = [
        (_rms, "rms_norm_fwd", _rms_norm_fwd_stub),
        (_rms, "rms_norm_bwd", _rms_norm_bwd_stub),
        (_rope, "_rope_launch", _rope_launch_stub),
        (_confidence, "_exit_confidence_launch", _exit_confidence_launch_stub),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, stub in swaps:
            setattr(module, name, stub)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def compiling(value: bool) -> Iterator[None]:
    """Make the ops take the custom-op path (``True``) or the eager path (``False``)."""
    original = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: value
    try:
        yield
    finally:
        torch.compiler.is_compiling = original


# --------------------------------------------------------------------------- timing
def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each function, the repeats interleaved."""
    for fn in fns.values():
        per_call_us(fn, calls // 10 + 1)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(per_call_us(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def cases(tokens: int, hidden: int, heads: int, vocab: int) -> dict[str, dict[str, Callable[[], object]]]:
    """Per op and pass: the stub alone, the eager path, the custom-op path."""
    x = torch.randn(tokens, hidden, requires_grad=True)
    residual = torch.randn(tokens, hidden, requires_grad=True)
    weight = torch.ones(hidden, requires_grad=True)
    head_dim = hidden // heads
    q = torch.randn(1, tokens, heads, head_dim, requires_grad=True)
    k = torch.randn(1, tokens, heads, head_dim, requires_grad=True)
    cos, sin = torch.randn(tokens, head_dim // 2), torch.randn(tokens, head_dim // 2)
    logits = torch.randn(tokens, vocab)

    def through(path: bool, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with compiling(path):
                return fn()

        return call

    def backward(fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return call

    rms = lambda: _rms._RMSNormFunction.apply(x, weight, 1e-6, None)  # noqa: E731
    rms_residual = lambda: _rms._RMSNormFunction.apply(x, weight, 1e-6, residual)  # noqa: E731
    rope = lambda: _rope._RopeFunction.apply(q, k, cos, sin, False)  # noqa: E731
    confidence = lambda: launch(  # noqa: E731
        _confidence._exit_confidence_launch, torch.ops.ease.exit_confidence, logits, 0.9
    )
    return {
        "rms_norm fwd": {
            "stub": lambda: _rms_norm_fwd_stub(x, weight, 1e-6), "eager": through(False, rms),
            "custom op": through(True, rms),
        },
        "rms_norm fwd+bwd": {
            "stub": lambda: (_rms_norm_fwd_stub(x, weight, 1e-6), _rms_norm_bwd_stub(x, x, weight, None, None)),
            "eager": through(False, backward(rms)), "custom op": through(True, backward(rms)),
        },
        "rms_norm+residual fwd+bwd": {
            "stub": lambda: (_rms_norm_fwd_stub(x, weight, 1e-6, residual), _rms_norm_bwd_stub(x, x, weight, None, x)),
            "eager": through(False, backward(rms_residual)), "custom op": through(True, backward(rms_residual)),
        },
        "apply_rope fwd": {
            "stub": lambda: _rope_launch_stub(q, k, cos, sin, False), "eager": through(False, rope),
            "custom op": through(True, rope),
        },
        "apply_rope fwd+bwd": {
            "stub": lambda: (_rope_launch_stub(q, k, cos, sin, False), _rope_launch_stub(q, k, cos, sin, True)),
            "eager": through(False, backward(rope)), "custom op": through(True, backward(rope)),
        },
        "exit_confidence": {
            "stub": lambda: _exit_confidence_launch_stub(logits, 0.9), "eager": through(False, confidence),
            "custom op": through(True, confidence),
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    """Time every case, print the table and write the result files."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_call_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed repeat (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--out", default="bench/results", help="result folder (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host overhead, not arithmetic: one thread keeps it steady
    rows = []
    with stubbed_launchers():
        for op, fns in cases(tokens=4, hidden=64, heads=4, vocab=128).items():
            times = measure(fns, args.calls, args.repeats)
            rows.append({
                "op": op, "stub us": times["stub"], "eager us": times["eager"], "custom op us": times["custom op"],
                "custom op - eager us": times["custom op"] - times["eager"],
                "custom op / eager": times["custom op"] / times["eager"],
            })  # fmt: skip
    print(markdown_table(rows))
    meta = {
        "environment": environment("cpu"),
        "command": "python -m bench.bench_call_overhead " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
    }
    json_path, md_path = write_results(
        "call-overhead", rows, meta, args.out,
        notes=["Launchers stubbed: host-side cost per call only (Python, dispatcher, autograd bookkeeping)."],
    )  # fmt: skip
    print(f"wrote {json_path} and {md_path}")
    return rows


if __name__ == "__main__":
    main()

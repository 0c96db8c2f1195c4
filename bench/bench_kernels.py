"""How fast are the ease_kernels Triton kernels, against eager PyTorch, torch.compile and Liger?

For RMSNorm (plain and residual-fused), RoPE and the exit-confidence check, at Llama-like
shapes, this times forward, backward and forward+backward (exit_confidence: forward only) for
each provider:

- ``ease``: the public ``ease_kernels`` function under ``ease_kernels.backend("triton")``;
- ``eager``: the reference op in eager PyTorch;
- ``compile``: ``torch.compile(reference, dynamic=False)``;
- ``liger``: Liger-Kernel's autograd Function, when ``liger_kernel`` imports.

Backward is timed as ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)`` on a
graph recorded once. Each row reports the median time (``triton.testing.do_bench``, cold L2),
the bandwidth against the minimum bytes the op must move (every tensor read or written once),
that bandwidth as a fraction of the device copy bandwidth measured at the start of the run,
and the speedups ``baseline_ms / ease_ms``.

Run ``python -m bench.bench_kernels [--quick] [--out DIR] [--ops rms_norm,rope,exit_confidence]
[--dtype bf16]``. Results go to ``bench/results/kernels-<gpu>-<date>.{json,md}`` (``kernels-quick-``
or ``kernels-<ops>-`` for a quick or partial run), rewritten after every case so an interrupted
run keeps what it measured. Without a CUDA device only the
eager reference ops are timed, at small shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import ease_kernels
from bench.common import (
    copy_bandwidth_gbs,
    default_device,
    environment,
    markdown_header,
    markdown_table,
    matmul_tflops,
    time_fn,
    write_results,
)

OPS = ("rms_norm", "rope", "exit_confidence")
PROVIDERS = ("ease", "eager", "compile", "liger")
BASELINES = ("eager", "compile", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

EPS = 1e-6
ROPE_THETA = 500000.0  # Llama 3
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama 3 8B attention
EXIT_THRESHOLD = 0.5

# (tokens, hidden) for rms_norm, (batch, seq) for rope, (tokens, vocab) for exit_confidence.
SHAPES = {
    "full": {
        "rms_norm": [(t, h) for t in (4096, 16384, 32768) for h in (2048, 4096, 8192)],
        "rms_norm_residual": [(16384, 4096)],
        "rope": [(1, 4096), (4, 4096), (1, 16384)],
        "exit_confidence": [(t, v) for t in (4096, 16384) for v in (32000, 128256)],
    },
    # The shapes the kernel targets are stated at: 16k tokens x hidden 4096 (bf16).
    "target": {
        "rms_norm": [(16384, 4096)],
        "rms_norm_residual": [(16384, 4096)],
        "rope": [(4, 4096)],
        "exit_confidence": [(16384, 32000), (4096, 128256)],
    },
    "quick": {
        "rms_norm": [(4096, 4096)],
        "rms_norm_residual": [(4096, 4096)],
        "rope": [(1, 4096)],
        "exit_confidence": [(4096, 32000)],
    },
    # Without a GPU only the eager reference runs; these keep the whole run near a minute.
    "cpu": {
        "rms_norm": [(1024, 1024)],
        "rms_norm_residual": [(1024, 1024)],
        "rope": [(1, 256)],
        "exit_confidence": [(256, 32000)],
    },
}

NO_CUDA_NOTE = "Triton not timed: no CUDA device (only the eager reference ops ran, at small shapes)"


# ---------------------------------------------------------------------------------------
# Cases: inputs, minimum bytes, and one runnable per provider
# ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One provider's forward on one case's inputs.

    ``forward()`` returns the outputs as a tuple (the ones that take gradients first);
    ``grad_inputs`` are the leaves the backward differentiates with respect to;
    ``canonical`` maps the outputs to the reference layout for the parity check;
    ``context`` is entered around everything the provider runs.
    """

    forward: Callable[[], tuple[torch.Tensor, ...]]
    grad_inputs: tuple[torch.Tensor, ...] = ()
    canonical: Callable[[tuple], tuple] = lambda outs: outs
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Case:
    """One op at one shape: minimum bytes per pass and a builder per provider."""

    op: str
    shape: str
    bytes: dict[str, int]  # pass -> minimum bytes read + written
    builders: dict[str, Callable[[], Run]]
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it has no run

    @property
    def passes(self) -> tuple[str, ...]:
        return tuple(self.bytes)


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _compiled(fn: Callable) -> Callable:
    # A fresh Dynamo state per case: every shape would otherwise count towards the
    # recompile limit of the one reference function and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _liger_apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """Call a Liger Function with as many of ``args`` as its installed version accepts."""
    try:
        count = len(inspect.signature(function.forward).parameters) - 1  # minus ctx
    except (TypeError, ValueError):
        count = len(args)
    return function.apply(*args[: max(count, 3)])


def _backward_passes(fwd: int, bwd: int) -> dict[str, int]:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def rms_norm_case(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
                  residual: bool = False) -> Case:
    """``rms_norm(x [tokens, hidden], w [hidden])``, or fused with ``residual`` (``(y, s)``)."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    leaves = (x, w) if r is None else (x, r, w)

    # Minimum traffic. fwd: read x (+ r) and w, write y (+ s) and the float32 rstd that
    # backward needs. bwd: read dy (+ ds), x (or s), w, rstd; write dx (= d residual, one
    # tensor) and dw.
    act, row, vec = tokens * hidden * x.element_size(), tokens * 4, hidden * w.element_size()
    n_act = 2 if residual else 1
    fwd = n_act * act + vec + n_act * act + row
    bwd = n_act * act + act + vec + row + act + vec

    def ease() -> Run:
        return Run(lambda: _as_tuple(ease_kernels.rms_norm(x, w, EPS, residual=r)), leaves,
                   context=lambda: ease_kernels.backend("triton"))

    def eager() -> Run:
        return Run(lambda: _as_tuple(ease_kernels.rms_norm_reference(x, w, EPS, r)), leaves)

    def compiled() -> Run:
        fn = _compiled(ease_kernels.rms_norm_reference)
        return Run(lambda: _as_tuple(fn(x, w, EPS, r)), leaves)

    def liger() -> Run:
        # in_place=False: Liger's default writes dx into dy's buffer, which would change
        # the grad_out tensor between timed calls; the bytes moved are the same.
        if residual:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            return Run(lambda: _as_tuple(_liger_apply(
                LigerFusedAddRMSNormFunction, x, r, w, EPS, 0.0, "llama", False)), leaves)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return Run(lambda: _as_tuple(_liger_apply(
            LigerRMSNormFunction, x, w, EPS, 0.0, "llama", False)), leaves)

    op = "rms_norm+residual" if residual else "rms_norm"
    return Case(op, f"{tokens}x{hidden}", _backward_passes(fwd, bwd),
                {"ease": ease, "eager": eager, "compile": compiled, "liger": liger})


def rope_case(batch: int, seq: int, dtype: torch.dtype, device: torch.device) -> Case:
    """``apply_rope(q [b, s, 32, 128], k [b, s, 8, 128], cos, sin [s, 64])``, shared positions."""
    q = torch.randn(batch, seq, Q_HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    cos, sin = ease_kernels.rope_cos_sin(torch.arange(seq, device=device), HEAD_DIM, ROPE_THETA)

    # fwd: read q, k, cos, sin (float32, [seq, head_dim / 2]); write q', k'. bwd: the same
    # with dq', dk' in and dq, dk out.
    qk = q.numel() * q.element_size() + k.numel() * k.element_size()
    cos_sin = 2 * cos.numel() * cos.element_size()
    fwd = bwd = 2 * qk + cos_sin

    def ease() -> Run:
        return Run(lambda: ease_kernels.apply_rope(q, k, cos, sin), (q, k),
                   context=lambda: ease_kernels.backend("triton"))

    def eager() -> Run:
        return Run(lambda: ease_kernels.apply_rope_reference(q, k, cos, sin), (q, k))

    def compiled() -> Run:
        fn = _compiled(ease_kernels.apply_rope_reference)
        return Run(lambda: fn(q, k, cos, sin), (q, k))

    def liger() -> Run:
        from liger_kernel.ops.rope import LigerRopeFunction

        # Liger takes q, k as [B, H, T, D] views of [B, T, H, D] storage (the Hugging Face
        # layout after transpose(1, 2)) and full-width cos/sin [1, T, D] in the model dtype;
        # the layout is adapted here, outside the timed region. Its kernels rotate their
        # inputs in place, hence the private copies.
        q_l = q.detach().clone().transpose(1, 2).requires_grad_()
        k_l = k.detach().clone().transpose(1, 2).requires_grad_()
        cos_l = torch.cat((cos, cos), dim=-1).unsqueeze(0).to(dtype)
        sin_l = torch.cat((sin, sin), dim=-1).unsqueeze(0).to(dtype)
        return Run(lambda: _as_tuple(LigerRopeFunction.apply(q_l, k_l, cos_l, sin_l)), (q_l, k_l),
                   canonical=lambda outs: tuple(o.transpose(1, 2) for o in outs))

    return Case("rope", f"{batch}x{seq}x({Q_HEADS}+{KV_HEADS})x{HEAD_DIM}",
                _backward_passes(fwd, bwd),
                {"ease": ease, "eager": eager, "compile": compiled, "liger": liger})


def exit_confidence_case(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Case:
    """``exit_confidence(logits [tokens, vocab], threshold)``: inference only, forward only."""
    logits = 4 * torch.randn(tokens, vocab, device=device, dtype=dtype)
    # Read the logits once; write confidence (float32), prediction (int64), exit (bool).
    fwd = logits.numel() * logits.element_size() + tokens * (4 + 8 + 1)

    def no_grad(fn: Callable[[], Any]) -> Callable[[], tuple]:
        def call() -> tuple:
            with torch.no_grad():
                return tuple(fn())
        return call

    def ease() -> Run:
        return Run(no_grad(lambda: ease_kernels.exit_confidence(logits, EXIT_THRESHOLD)),
                   context=lambda: ease_kernels.backend("triton"))

    def eager() -> Run:
        return Run(no_grad(lambda: ease_kernels.exit_confidence_reference(logits, EXIT_THRESHOLD)))

    def compiled() -> Run:
        fn = _compiled(ease_kernels.exit_confidence_reference)
        return Run(no_grad(lambda: fn(logits, EXIT_THRESHOLD)))

    return Case("exit_confidence", f"{tokens}x{vocab}", {"fwd": fwd},
                {"ease": ease, "eager": eager, "compile": compiled},
                skipped={"liger": "Liger-Kernel has no exit_confidence"})


def build_cases(ops: list[str], shapes: dict[str, list], dtype: torch.dtype,
                device: torch.device) -> Iterator[Callable[[], Case]]:
    """Case factories in run order; each allocates its inputs only when called."""
    if "rms_norm" in ops:
        for t, h in shapes["rms_norm"]:
            yield lambda t=t, h=h: rms_norm_case(t, h, dtype, device)
        for t, h in shapes["rms_norm_residual"]:
            yield lambda t=t, h=h: rms_norm_case(t, h, dtype, device, residual=True)
    if "rope" in ops:
        for b, s in shapes["rope"]:
            yield lambda b=b, s=s: rope_case(b, s, dtype, device)
    if "exit_confidence" in ops:
        for t, v in shapes["exit_confidence"]:
            yield lambda t=t, v=v: exit_confidence_case(t, v, dtype, device)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parity(outs: tuple, ref: tuple) -> dict[str, float]:
    """Largest |difference| of floating outputs, count of differing integer/bool elements."""
    max_abs, mismatches = 0.0, 0
    for out, want in zip(outs, ref):
        if out is None or want is None:
            continue
        if out.shape != want.shape:
            return {"max_abs_diff": float("nan"), "mismatches": -1}
        if out.is_floating_point():
            max_abs = max(max_abs, (out.detach().float() - want.float()).abs().max().item())
        else:
            mismatches += int((out != want).sum().item())
    return {"max_abs_diff": max_abs, "mismatches": mismatches}


def measure(case: Case, provider: str, timer: Callable[[Callable], float],
            device: torch.device, reference: tuple | None) -> tuple[dict[str, Any], tuple | None]:
    """Time every pass of ``case`` for ``provider``; errors are recorded, never raised.

    Returns ``({pass: ms | None, "errors": {pass: msg}, parity...}, canonical forward outputs)``.
    """
    result: dict[str, Any] = {p: None for p in case.passes}
    errors: dict[str, str] = {}
    result["errors"] = errors
    try:
        run = case.builders[provider]()
    except Exception as exc:  # noqa: BLE001 - a provider that cannot start is recorded
        errors.update({p: _error(exc) for p in case.passes})
        return result, None
    canonical_outs = None
    with run.context():
        try:
            outs = run.forward()  # compiles, autotunes, and gives the parity check its values
            _sync(device)
            canonical_outs = tuple(o.detach() if o is not None else None for o in run.canonical(outs))
            if reference is not None:
                result.update(_parity(canonical_outs, reference))
        except Exception as exc:  # noqa: BLE001
            errors.update({p: _error(exc) for p in case.passes})
            return result, None
        try:
            result["fwd"] = timer(run.forward)
        except Exception as exc:  # noqa: BLE001
            errors["fwd"] = _error(exc)
        if "bwd" in case.passes:
            grads = tuple(torch.randn_like(o) for o in outs)
            try:
                result["bwd"] = timer(lambda: torch.autograd.grad(
                    outs, run.grad_inputs, grads, retain_graph=True))
            except Exception as exc:  # noqa: BLE001
                errors["bwd"] = _error(exc)
            try:
                result["fwd+bwd"] = timer(lambda: torch.autograd.grad(
                    run.forward(), run.grad_inputs, grads))
            except Exception as exc:  # noqa: BLE001
                errors["fwd+bwd"] = _error(exc)
    del run, outs
    return result, canonical_outs


def case_rows(case: Case, timings: dict[str, dict[str, Any]], providers: list[str],
              dtype_name: str, copy_gbs: float | None, peak_gib: float | None) -> list[dict[str, Any]]:
    """One row per pass: ms, GB/s and fraction of copy bandwidth per provider, speedups."""
    rows = []
    for pass_ in case.passes:
        row: dict[str, Any] = {"op": case.op, "shape": case.shape, "dtype": dtype_name,
                               "pass": pass_, "bytes": case.bytes[pass_]}
        errors, parity = {}, {}
        for p in providers:
            t = timings.get(p, {})
            ms = t.get(pass_)
            gbs = case.bytes[pass_] / (ms * 1e-3) / 1e9 if ms else None
            row[f"{p}_ms"] = ms
            row[f"{p}_gbs"] = gbs
            row[f"{p}_frac_copy"] = gbs / copy_gbs if gbs and copy_gbs else None
            if p in case.skipped:
                errors[p] = case.skipped[p]
            elif pass_ in t.get("errors", {}):
                errors[p] = t["errors"][pass_]
            if "max_abs_diff" in t:
                parity[p] = {"max_abs_diff": t["max_abs_diff"], "mismatches": t["mismatches"]}
        ease_ms = row.get("ease_ms")
        for b in (b for b in BASELINES if "ease" in providers and b in providers):
            base_ms = row.get(f"{b}_ms")
            row[f"speedup_vs_{b}"] = base_ms / ease_ms if ease_ms and base_ms else None
        row["errors"] = errors
        row["parity_vs_eager"] = parity
        row["peak_mem_gib"] = peak_gib
        rows.append(row)
    return rows


def table_columns(providers: list[str]) -> list[tuple[str, str]]:
    """What the printed table shows: every provider's ms, the main one's bandwidth, speedups."""
    main = "ease" if "ease" in providers else providers[0]
    cols = [("op", "op"), ("shape", "shape"), ("pass", "pass")]
    cols += [(f"{p}_ms", f"{p} ms") for p in providers]
    cols += [(f"{main}_gbs", f"{main} GB/s"), (f"{main}_frac_copy", f"{main} / copy BW")]
    if "ease" in providers:
        cols += [(f"speedup_vs_{b}", f"vs {b}") for b in BASELINES if b in providers]
    return cols


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_kernels",
        description="Time the ease_kernels Triton kernels against eager, torch.compile and Liger.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one small shape per op and shorter timing (a smoke test)")
    parser.add_argument("--target", action="store_true",
                        help="only the shapes the targets are stated at (16k tokens x hidden 4096)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and markdown")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {PROVIDERS} (CUDA only; the CPU runs eager)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=None,
                        help="do_bench warm-up in ms (default 25, 10 with --quick)")
    parser.add_argument("--rep", type=int, default=None,
                        help="do_bench measuring time in ms (default 100, 40 with --quick)")
    args = parser.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for name, given, allowed in (("--ops", args.ops, OPS), ("--providers", args.providers, PROVIDERS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown or not given:
            parser.error(f"{name} must be a non-empty subset of {allowed}, got {given}")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = default_device()
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    notes: list[str] = []

    providers = [p for p in PROVIDERS if p in args.providers]
    if not cuda:
        providers = ["eager"]
        notes.append(NO_CUDA_NOTE)
        _log(NO_CUDA_NOTE)
    if "liger" in providers:
        try:
            import liger_kernel  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            providers.remove("liger")
            notes.append(f"liger not timed: {_error(exc)}")
            _log(notes[-1])
    if "ease" in providers and not ease_kernels.triton_available():
        providers.remove("ease")
        notes.append("ease not timed: Triton does not import")
        _log(notes[-1])
    if "compile" in providers:
        # Each case resets Dynamo; this only guards shapes within one case. The setting is
        # called recompile_limit in newer torch and cache_size_limit in older.
        for setting in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, setting):
                setattr(torch._dynamo.config, setting, max(getattr(torch._dynamo.config, setting), 64))

    mode = "cpu" if not cuda else ("quick" if args.quick else "target" if args.target else "full")
    warmup = args.warmup if args.warmup is not None else (10 if args.quick else 25)
    rep = args.rep if args.rep is not None else (40 if args.quick else 100)

    repeat = 5 if args.quick else 10

    def timer(fn: Callable[[], Any]) -> float:
        return time_fn(fn, device, warmup=warmup, rep=rep, repeat=repeat)

    started = time.perf_counter()
    env = environment(device)
    _log(f"device: {env['device_name']}; measuring copy bandwidth and bf16 matmul rate ...")
    copy_gbs = copy_bandwidth_gbs(device)
    tflops = matmul_tflops(device)
    meta = {
        "command": "python -m bench.bench_kernels " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "environment": env,
        "ceilings": {"copy_bandwidth_gbs": copy_gbs, "matmul_bf16_tflops": tflops},
        "settings": {"mode": mode, "dtype": args.dtype, "providers": providers, "ops": args.ops,
                     "timer": (f"triton.testing.do_bench median, warmup {warmup} ms, rep {rep} ms"
                               if cuda else f"time.perf_counter median of {repeat} after 1 warm-up"),
                     "eps": EPS,
                     "rope": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                              "theta": ROPE_THETA},
                     "exit_threshold": EXIT_THRESHOLD},
        "definitions": {
            "ms": "median milliseconds per call",
            "gbs": "minimum bytes the op must move (each tensor read or written once) / time",
            "frac_copy": "gbs / device copy bandwidth measured in this run",
            "speedup_vs_X": "X_ms / ease_ms (> 1: ease is faster)",
            "bwd": "torch.autograd.grad(out, inputs, grad_out, retain_graph=True) on one recorded graph",
            "parity_vs_eager": "max |provider - eager| of floating forward outputs; mismatching "
                               "integer/bool elements",
        },
    }
    _log(f"copy bandwidth {copy_gbs:.0f} GB/s"
         + (f", bf16 matmul {tflops:.0f} TFLOP/s" if tflops else ""))
    notes.append(f"providers timed: {', '.join(providers)}")

    # A quick or partial run gets its own file name so that it never overwrites a full one
    # (letters, digits, "-", "_" and "." only: names that any file transfer keeps).
    name = "kernels" + ("-quick" if args.quick else "-target" if args.target else "")
    if set(args.ops) != set(OPS):
        name += "-" + "-".join(o for o in OPS if o in args.ops)
    columns = table_columns(providers)
    rows: list[dict[str, Any]] = []
    paths = None
    for make_case in build_cases(args.ops, SHAPES[mode], dtype, device):
        case = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            case = make_case()
            timings: dict[str, dict[str, Any]] = {}
            reference = None
            # eager first: its outputs are the parity reference for the others.
            for provider in sorted(providers, key=lambda p: p != "eager"):
                if provider in case.skipped:
                    continue
                provider_started = time.perf_counter()
                timings[provider], outs = measure(case, provider, timer, device, reference)
                if provider == "eager":
                    reference = outs
                outs = None
                free_memory(device)
                errs = timings[provider]["errors"]
                _log(f"  {case.op:18s} {case.shape:24s} {provider:8s} "
                     + " ".join(f"{p}={timings[provider][p]:.4f}ms" for p in case.passes
                                if timings[provider][p] is not None)
                     + (f" |diff vs eager|={timings[provider]['max_abs_diff']:.3g}"
                        if "max_abs_diff" in timings[provider] else "")
                     + (f" errors: {next(iter(errs.values()))}" if errs else "")
                     + f" [{time.perf_counter() - provider_started:.1f}s]")
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            rows += case_rows(case, timings, providers, args.dtype, copy_gbs, peak)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory allocating the inputs
            label = f"{case.op} {case.shape}" if case else "a case"
            notes.append(f"{label} not run: {_error(exc)}")
            _log(notes[-1])
        finally:
            del case
            reference = None
            free_memory(device)
        if cuda and "compile" in providers:
            torch._dynamo.reset()
        # Rewritten after every case so that a run cut short keeps what it measured.
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        paths = write_results(name, rows, meta, args.out, columns=columns,
                              notes=notes + _error_notes(rows))

    print(markdown_header(name, meta))
    print()
    print(markdown_table(rows, columns))
    print()
    for note in notes + _error_notes(rows):
        print(f"- {note}")
    if paths:
        print(f"\nwrote {paths[0]} and {paths[1]} in {meta['wall_s']:.0f} s")
    return 0


def _error_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per distinct (op, provider, error), so the table's dashes are explained."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        for provider, message in row["errors"].items():
            seen.setdefault((row["op"], provider, message), []).append(f"{row['shape']} {row['pass']}")
    return [f"{op} / {provider}: {message} ({len(where)} row(s))"
            for (op, provider, message), where in seen.items()]


if __name__ == "__main__":
    raise SystemExit(main())

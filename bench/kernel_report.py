"""What does each ease kernel compile to on an H100, without an H100?

Triton compiles for sm_90 on any machine: this runs every launcher of ``ease_kernels`` at the
target shapes on ``meta`` tensors (no memory, no GPU), catches each kernel launch instead of
running it, compiles that very launch (same constexprs, integer specialisations and
``num_warps``) for ``GPUTarget("cuda", 90, 32)``, and reads the result:

- registers per thread, spilled bytes (``ptxas -v``: spill stores + loads), local memory and
  shared memory per program (``cuobjdump -res-usage``, Triton's metadata);
- SASS instructions (``cuobjdump -sass``): in all, and per element in each hot loop (the
  instructions between a backward branch and its target, over the elements one thread owns
  in one iteration);
- bytes moved per element: the widths of the global loads and stores in that loop, over the
  same elements, against the minimum the op must move.

It is the evidence on the CPU when no GPU is available: the instruction count bounds how
fast a kernel can issue, the bytes how fast it can stream. Run from the repository root:
``python -m bench.kernel_report [--out DIR]``; about half a minute on two cores. Results:
``bench/results/kernel-report-sm90-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

TARGET = ("cuda", 90, 32)  # H100: sm_90, 32 threads a warp
H100_SMS = 132
META = torch.device("meta")


# ---------------------------------------------------------------------------------------
# Catching launches
# ---------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch as a launcher made it: the JIT function and its bound arguments."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: dict[str, Any]  # every argument by name, constexprs included
    num_warps: int
    num_stages: int | None
    grid: tuple[int, ...]
    maxnreg: int | None = None


@contextlib.contextmanager
def caught_launches() -> Iterator[list[Launch]]:
    """Inside the block, ``kernel[grid](...)`` records a :class:`Launch` instead of running.

    ``persistent_programs`` answers as on an H100 (132 SMs), since the meta tensors the
    launchers get here have no CUDA device to ask.
    """
    from triton.runtime.jit import JITFunction

    from ease_kernels import _launch

    launches: list[Launch] = []
    original_run = JITFunction.run
    original_sm_count = _launch._sm_count

    def run(self, *args, grid, warmup, **kwargs):
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        grid = grid if isinstance(grid, tuple) else tuple(grid)
        launches.append(Launch(self, bound, options.get("num_warps", 4), options.get("num_stages"), grid,
                               options.get("maxnreg")))

    def meta_is_cuda(n_rows: int, device: torch.device, programs_per_sm: int = _launch.PROGRAMS_PER_SM) -> int:
        return max(1, min(n_rows, programs_per_sm * H100_SMS))

    modules = [sys.modules[name] for name in list(sys.modules) if name.startswith("ease_kernels.")]
    patched = [(m, "persistent_programs") for m in modules if getattr(m, "persistent_programs", None)]
    saved = [(m, name, getattr(m, name)) for m, name in patched]
    JITFunction.run = run
    _launch._sm_count = lambda device: H100_SMS
    try:
        for module, name in patched:
            setattr(module, name, meta_is_cuda)
        yield launches
    finally:
        JITFunction.run = original_run
        _launch._sm_count = original_sm_count
        for module, name, value in saved:
            setattr(module, name, value)


# ---------------------------------------------------------------------------------------
# Compiling one launch for sm_90 and reading the result
# ---------------------------------------------------------------------------------------
def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_launch(launch: Launch):
    """``triton.compile`` of exactly this launch for sm_90: the signature, constexprs and
    divisibility attributes the runtime would derive from these arguments."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = launch.args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":  # an integer 1, folded like the runtime folds it
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    if launch.maxnreg is not None:
        options["maxnreg"] = launch.maxnreg
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*TARGET), options=options)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """``(address, instruction)`` of every SASS instruction of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.search, text.splitlines()) if m]


def resource_usage(cubin: bytes, ptx: str) -> dict[str, int]:
    """Registers, local memory and spills, from ``cuobjdump -res-usage`` and ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path, ptx_path = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        with open(ptx_path, "w", encoding="utf-8") as f:
            f.write(ptx)
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
        # Triton's PTX is newer than the CUDA 12 ptxas it ships; ptxas-blackwell reads it.
        ptxas = next((p for p in (_bin("ptxas-blackwell"), _bin("ptxas")) if os.path.exists(p)))
        verbose = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", ptx_path, "-o", os.path.join(tmp, "v.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose.stdout + verbose.stderr)
    return {
        "registers": int(found.get("REG", -1)),
        "local_bytes": int(found.get("LOCAL", -1)),
        "spill_bytes": (int(spills.group(1)) + int(spills.group(2))) if spills else -1,
    }


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Innermost loops as ``(first, last)`` indices: a branch back to an earlier address,
    containing no other such branch (software-pipelined loops keep one steady-state body)."""
    index_of = {address: i for i, (address, _) in enumerate(instructions)}
    found = []
    for i, (_, text) in enumerate(instructions):
        match = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if match:
            target = index_of.get(int(match.group(1), 16))
            if target is not None and target < i:
                found.append((target, i))
    return [(a, b) for a, b in found if not any(a < c and d < b for c, d in found if (c, d) != (a, b))]


_MEMORY = re.compile(r"\b(LDG|STG|LDGSTS|LD|ST|RED|ATOMG)\b(\.[A-Z0-9.]+)?")


def global_bytes(text: str) -> int:
    """Bytes one thread moves with one global load or store (0 for other instructions)."""
    match = _MEMORY.search(text)
    if not match or match.group(1) in ("LD", "ST"):  # generic LD/ST: not emitted for globals here
        return 0
    suffix = match.group(2) or ""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in suffix:
            return size
    return 4


# ---------------------------------------------------------------------------------------
# The kernels at their target shapes
# ---------------------------------------------------------------------------------------
@dataclass
class Loop:
    """What one hot loop of a kernel does per iteration, to turn counts into per-element ones."""

    name: str
    elements: Callable[[Launch], float] | None  # elements one thread owns in one iteration
    min_bytes: float | None = None  # bytes per element the op must move in this loop
    # A loop the compiler unrolled (a store-only loop): elements counted from its stores.
    stored_bytes_per_element: int | None = None


@dataclass
class Spec:
    name: str  # what is compiled, e.g. "rms_norm bwd dx"
    shape: str
    run: Callable[[], object]  # calls the launcher on meta tensors
    kernel: str  # the JIT function's name among the launches
    loops: list[Loop] = field(default_factory=list)  # in SASS order; [] = the whole kernel
    whole: Loop | None = None  # per-element accounting of a kernel without a loop
    note: str = ""


def _threads(launch: Launch) -> int:
    return launch.num_warps * 32


def _per_thread(block_key: str) -> Callable[[Launch], float]:
    return lambda launch: launch.args[block_key] / _threads(launch)


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def specs() -> list[Spec]:
    """Every kernel at the shapes the targets are stated at (bench/NOTES.md): 16k tokens x
    hidden 4096 bf16; RoPE 4 x 4096 tokens, 32 query + 8 key/value heads of 128; exit
    confidence 16k x 32000 (both criteria); the fused loss's cross-entropy on a 2048-row
    chunk of 32000."""
    import importlib

    rms = importlib.import_module("ease_kernels.rms_norm")
    rope = importlib.import_module("ease_kernels.rope")
    confidence = importlib.import_module("ease_kernels.exit_confidence")
    loss = importlib.import_module("ease_kernels.exit_head_loss")
    rows, hidden = 16384, 4096
    x, w, rstd = _meta(rows, hidden), _meta(hidden), _meta(rows, dtype=torch.float32)
    q, k = _meta(4, 4096, 32, 128), _meta(4, 4096, 8, 128)
    cos = sin = _meta(4096, 64, dtype=torch.float32)
    logits, targets = _meta(16384, 32000), _meta(2048, dtype=torch.int64)
    chunk = _meta(2048, 32000)

    def rope_loop(name: str, heads: int) -> Loop:
        # Elements of real heads (masked rows of the tile do no useful work) per thread.
        def elements(launch: Launch) -> float:
            return 2 * min(heads, launch.args["BLOCK_H"]) * launch.args["BLOCK_HALF"] / _threads(launch)

        return Loop(name, elements, 4.0)

    return [
        Spec("rms_norm fwd", "16384x4096", lambda: rms.rms_norm_fwd(x, w, 1e-6), "_rms_norm_fwd_fused",
             whole=Loop("row", _per_thread("BLOCK"), 4.0), note="min: read x, write y (w from L2)"),
        Spec("rms_norm+residual fwd", "16384x4096", lambda: rms.rms_norm_fwd(x, w, 1e-6, x),
             "_rms_norm_fwd_fused", whole=Loop("row", _per_thread("BLOCK"), 8.0),
             note="min: read x, residual; write s, y"),
        Spec("rms_norm bwd dx", "16384x4096", lambda: rms.rms_norm_bwd(x, x, w, rstd), "_rms_norm_bwd_dx_fused",
             loops=[Loop("row", _per_thread("BLOCK"), 6.0)], note="min: read x, dy; write dx"),
        Spec("rms_norm bwd dx (with ds)", "16384x4096", lambda: rms.rms_norm_bwd(x, x, w, rstd, x),
             "_rms_norm_bwd_dx_fused", loops=[Loop("row", _per_thread("BLOCK"), 8.0)],
             note="min: read x, dy, ds; write dx"),
        Spec("rms_norm bwd dx hidden 8192", "16384x8192",
             lambda: rms.rms_norm_bwd(_meta(rows, 8192), _meta(rows, 8192), _meta(8192), rstd),
             "_rms_norm_bwd_dx_fused", loops=[Loop("row", _per_thread("BLOCK"), 6.0)],
             note="16 warps: one program per SM (two would need <= 64 registers)"),
        Spec("rms_norm bwd dw", "264x4096", lambda: rms.rms_norm_bwd(x, x, w, rstd), "_rms_norm_bwd_dw",
             loops=[Loop("partials", lambda launch: launch.args["BLOCK_P"] * launch.args["BLOCK_N"] / _threads(launch),
                         4.0)],
             note="sums the per-program float32 partials of dw"),
        Spec("apply_rope fwd", "4x4096x(32+8)x128", lambda: rope._rope_launch(q, k, cos, sin, False),
             "_rope_fwd_bwd_kernel",
             loops=[rope_loop("q heads", 32), rope_loop("k heads", 8)],
             note="min per element of q and k: read 2 B, write 2 B (cos/sin once per token)"),
        Spec("apply_rope bwd", "4x4096x(32+8)x128", lambda: rope._rope_launch(q, k, cos, sin, True),
             "_rope_fwd_bwd_kernel",
             loops=[rope_loop("q heads", 32), rope_loop("k heads", 8)]),
        Spec("exit_confidence", "16384x32000", lambda: confidence._exit_confidence_launch(logits, 0.5),
             "_exit_confidence_fwd_kernel", loops=[Loop("vocab", _per_thread("BLOCK_V"), 2.0)],
             note="min: read the logits once"),
        Spec("exit_confidence margin", "16384x32000",
             lambda: confidence._exit_confidence_launch(logits, 0.5, "margin"),
             "_exit_confidence_fwd_kernel", loops=[Loop("vocab", _per_thread("BLOCK_V"), 2.0)],
             note="criterion margin: also the running top-2 logit; min: read the logits once"),
        Spec("cross_entropy fwd+grad", "2048x32000",
             lambda: loss.cross_entropy_chunk(chunk, targets, 1e-4, -100, True), "_cross_entropy_fwd_bwd_fused",
             loops=[Loop("softmax pass", _per_thread("BLOCK_V"), 2.0),
                    Loop("zeros for an ignored row", None, 2.0, stored_bytes_per_element=2),
                    Loop("gradient pass", _per_thread("BLOCK_V"), 2.0)],
             note="min over both passes: read z once, write dz once (4 B); the row does not fit registers"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def analyse(spec: Spec) -> list[dict[str, Any]]:
    """One row per hot loop (or per kernel without one) of ``spec``'s kernel."""
    with caught_launches() as launches:
        spec.run()
    matching = [launch for launch in launches if launch.kernel.__name__ == spec.kernel]
    if not matching:
        return [{"kernel": spec.name, "shape": spec.shape, "error": f"no launch of {spec.kernel}"}]
    launch = matching[0]
    compiled = compile_launch(launch)
    instructions = sass_instructions(compiled.asm["cubin"])
    usage = resource_usage(compiled.asm["cubin"], compiled.asm["ptx"])
    constexprs = {p.name: launch.args[p.name] for p in launch.kernel.params if p.is_constexpr}
    base = {
        "kernel": spec.name, "shape": spec.shape, "function": spec.kernel, **usage,
        "shared_bytes": compiled.metadata.shared, "num_warps": launch.num_warps,
        "grid": "x".join(map(str, launch.grid)), "sass_total": len(instructions),
        "constexprs": constexprs, "note": spec.note,
    }  # fmt: skip
    found = loops(instructions)
    rows = []
    if spec.loops and len(found) == len(spec.loops):
        pairs = list(zip(spec.loops, found))
    elif spec.loops:
        base["note"] = f"{spec.note}; SASS has {len(found)} loops, {len(spec.loops)} expected: whole kernel counted"
        pairs = [(Loop("whole kernel", spec.loops[0].elements, spec.loops[0].min_bytes), (0, len(instructions) - 1))]
    else:
        pairs = [(spec.whole, (0, len(instructions) - 1))]
    for loop, (first, last) in pairs:
        body = instructions[first : last + 1]
        moved = sum(global_bytes(text) for _, text in body)
        if loop.stored_bytes_per_element:
            stored = sum(global_bytes(text) for _, text in body if re.search(r"\bSTG\b", text))
            elements = stored / loop.stored_bytes_per_element
        else:
            elements = loop.elements(launch)
        rows.append({
            **base, "loop": loop.name, "loop_sass": len(body), "elements_per_thread": elements,
            "sass_per_element": len(body) / elements, "bytes_per_element": moved / elements,
            "min_bytes_per_element": loop.min_bytes,
            "mufu_per_element": sum("MUFU" in text for _, text in body) / elements,
        })  # fmt: skip
    return rows


COLUMNS = [
    "kernel", "loop", "registers", "spill_bytes", "shared_bytes", "num_warps", "sass_total", "loop_sass",
    "elements_per_thread", "sass_per_element", "mufu_per_element", "bytes_per_element", "min_bytes_per_element",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and markdown")
    parser.add_argument("--only", default="", help="comma-separated substrings of kernel names to report")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the kernels are written for
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report compiles for sm_90: run it without TRITON_INTERPRET=1")

    from bench.common import environment, markdown_table, write_results

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    wanted = [w for w in args.only.split(",") if w]
    for spec in specs():
        if wanted and not any(w in spec.name for w in wanted):
            continue
        spec_started = time.perf_counter()
        rows += analyse(spec)
        print(f"{spec.name}: {time.perf_counter() - spec_started:.1f} s", file=sys.stderr, flush=True)
    import triton

    env = environment("cpu")
    meta = {
        "command": "python -m bench.kernel_report " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "environment": env,
        "target": {"backend": TARGET[0], "arch": f"sm_{TARGET[1]}", "warp_size": TARGET[2], "sms": H100_SMS,
                   "triton": triton.__version__},
        "definitions": {
            "registers": "per thread (cuobjdump -res-usage)",
            "spill_bytes": "ptxas -v spill stores + spill loads",
            "shared_bytes": "shared memory per program (Triton metadata)",
            "loop_sass": "SASS instructions in the hot loop (branch target to backward branch), or the whole kernel",
            "elements_per_thread": "elements of the op one thread handles in one loop iteration",
            "sass_per_element": "loop_sass / elements_per_thread: what one element costs in issued instructions",
            "mufu_per_element": "MUFU (exp2, rcp, rsqrt) instructions per element",
            "bytes_per_element": "global load/store bytes in the loop per element (masked lanes counted)",
            "min_bytes_per_element": "what the op must move per element (each tensor once)",
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    json_path, md_path = write_results("kernel-report-sm90", rows, meta, args.out, columns=COLUMNS,
                                       notes=[f"{r['kernel']}: {r['note']}" for r in rows if r.get("note")])
    print(f"wrote {json_path} and {md_path} in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

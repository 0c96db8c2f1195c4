"""Helpers every benchmark in ``bench/`` shares: environment, timers, ceilings, result files.

A benchmark answers one question, times its baseline in the same run, prints a markdown
table and writes JSON plus markdown through :func:`write_results`. The ceilings
(:func:`copy_bandwidth_gbs`, :func:`matmul_tflops`) are measured in that same run, so a
result file carries the numbers it should be read against.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ease._io import atomic_write_text as _atomic_write  # result files are written atomically

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------
def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The short commit hash, with ``+dirty`` when tracked files have uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return f"{commit}+dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (safe in a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a result was measured on, without the host name.

    Returns a dict with ``date`` (UTC, ISO 8601), ``device`` (``"cuda"``/``"cpu"``),
    ``device_name`` (the GPU's name from ``torch.cuda.get_device_name``, or the CPU model),
    ``device_slug`` (for file names), ``gpu_name`` (None on the CPU), GPU memory and SM count,
    the CUDA, torch, Triton, Python and liger-kernel versions (None where not installed),
    the platform string and the repository's git commit.
    """
    device = torch.device(device) if device is not None else default_device()
    triton_version = _package_version("triton")
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu_name": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "liger_kernel": _package_version("liger-kernel") or _package_version("liger_kernel"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["device_name"] = env["gpu_name"]
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    else:
        env["device_name"] = _cpu_name()
    env["device_slug"] = slug(env["gpu_name"] or "cpu")
    return env


# ---------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on CUDA via ``triton.testing.do_bench``.

    ``warmup`` and ``rep`` are target durations in milliseconds (``do_bench``'s meaning);
    ``do_bench`` clears the L2 cache before every timed call, so the result is a cold-cache time.
    """
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_cpu(fn: Callable[[], Any], repeat: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls, after one untimed warm-up call."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 25, rep: int = 100,
            repeat: int = 10) -> float:
    """Median milliseconds of ``fn()``: :func:`time_cuda` on CUDA, :func:`time_cpu` elsewhere."""
    if device.type == "cuda":
        return time_cuda(fn, warmup=warmup, rep=rep)
    return time_cpu(fn, repeat=repeat)


# ---------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------
def copy_bandwidth_gbs(device: torch.device | str, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes), counting bytes read plus written.

    Times ``dst.copy_(src)`` of an ``nbytes`` buffer (1 GiB on CUDA, far beyond L2; 256 MiB on
    the CPU). This is the practical ceiling for a memory-bound kernel on this device.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    try:
        ms = time_fn(lambda: dst.copy_(src), device, repeat=5)
    finally:
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, n: int = 8192) -> float | None:
    """bf16 ``n x n @ n x n`` matrix-product rate in TFLOP/s on CUDA; None on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    try:
        ms = time_cuda(lambda: a @ b)
    finally:
        del a, b
        torch.cuda.empty_cache()
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


Column = str | tuple[str, str]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None) -> str:
    """A GitHub markdown table of ``rows``.

    ``columns`` picks and orders what is shown: each a key of the rows, or a ``(key, header)``
    pair to print another header. Default: every key of the first row. Missing values print
    as ``–``; floats keep about three significant digits.
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    pairs = [(c, c) if isinstance(c, str) else c for c in columns]
    lines = [
        "| " + " | ".join(header for _, header in pairs) + " |",
        "| " + " | ".join("---" for _ in pairs) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in pairs) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_header(title: str, meta: dict[str, Any]) -> str:
    """The header every result markdown file starts with: date, device, versions, ceilings."""
    env = meta.get("environment", {})
    ceilings = meta.get("ceilings", {})
    copy = ceilings.get("copy_bandwidth_gbs")
    mm = ceilings.get("matmul_bf16_tflops")
    lines = [
        f"# {title}",
        "",
        f"- date: {env.get('date')}",
        f"- device: {env.get('device_name')} ({env.get('device')})",
        f"- versions: torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}, liger-kernel {env.get('liger_kernel')}",
        f"- commit: {env.get('git_commit')}",
        f"- ceilings measured in this run: device copy {_cell(copy)} GB/s (read + write), "
        f"bf16 matmul {_cell(mm)} TFLOP/s",
    ]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    return "\n".join(lines)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    out_dir: str | os.PathLike = "bench/results",
    *,
    columns: Sequence[Column] | None = None,
    notes: Iterable[str] = (),
) -> tuple[Path, Path]:
    """Write ``<name>-<device-slug>-<date>.json`` and ``.md`` into ``out_dir``, atomically.

    Args:
        name: the benchmark's name (``"kernels"``).
        rows: one dict per measurement; all of them go into the JSON.
        meta: must hold ``"environment"`` (from :func:`environment`); ``"ceilings"``,
            ``"command"`` and anything else JSON-serialisable are kept too.
        out_dir: the folder, created if missing (relative paths are taken from the cwd).
        columns: what the markdown table shows, as for :func:`markdown_table`.
        notes: lines appended under the markdown table and kept in the JSON (errors,
            skipped providers).

    Returns:
        ``(json_path, markdown_path)``.
    """
    env = meta.get("environment") or environment()
    stem = f"{name}-{env.get('device_slug', 'unknown')}-{env['date'][:10]}"
    out = Path(out_dir)
    json_path = out / f"{stem}.json"
    md_path = out / f"{stem}.md"
    notes = list(notes)
    payload = {"name": name, **meta, "environment": env, "notes": notes, "rows": list(rows)}
    _atomic_write(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    md = [markdown_header(name, {**meta, "environment": env}), "", markdown_table(rows, columns), ""]
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    _atomic_write(md_path, "\n".join(md))
    return json_path, md_path

"""Launch settings shared by the kernels: block size and ``num_warps`` for a row, program counts.

Every launcher takes its block size and warp count from :func:`row_block` and the size of a
persistent grid from :func:`persistent_programs`, so the policy (and its cap) lives in one
place instead of constants scattered through the ops. :func:`jit` is ``triton.jit``, or a
stand-in that lets kernel modules import when Triton is not installed.
"""

from __future__ import annotations

import torch

try:
    import triton.language as tl
    from triton import jit
except ImportError:  # Triton is optional; dispatch.use_triton never picks a kernel without it
    tl = None  # kernel annotations are strings (``from __future__ import annotations``)

    def jit(fn):
        """Stand-in for ``triton.jit`` when Triton is absent: the kernel is never launched."""
        return fn


def constant(value: float) -> object:
    """A module-level number a kernel may read (``tl.constexpr``; the number without Triton)."""
    return value if tl is None else tl.constexpr(value)


# The largest block one program holds in registers. Triton refuses tensors above 2**20
# elements, but long before that a block spills registers: 2**16 float32 is 256 KiB, the
# whole register file of an SM. Kernels that can loop over a row should ask for less.
HARD_MAX_BLOCK = 65536

# Programs per streaming multiprocessor for persistent kernels (on an H100, 2 was within
# ~10% of the best of 1..16 for the RMSNorm backward at hidden 2048..65536); without CUDA
# (the interpreter) a small constant keeps per-program buffers small.
PROGRAMS_PER_SM = 2
PROGRAMS_WITHOUT_CUDA = 8


def row_block(n_cols: int, *, max_block: int = HARD_MAX_BLOCK, can_loop: bool = False) -> tuple[int, int]:
    """Block size and ``num_warps`` for a kernel whose program walks a row of ``n_cols``.

    The block is the next power of two at or above ``n_cols`` (at least 1), capped at
    ``max_block``. A row longer than the block is the caller's to handle: a kernel that
    loops over the row in chunks passes ``can_loop=True`` and loops when
    ``n_cols > block``; any other kernel gets a ``ValueError`` here instead of wrong results.

    ``num_warps`` grows with the block so each thread keeps a few dozen elements at most
    (the thresholds are Liger-Kernel's ``calculate_settings``, tuned on A100/H100).

    Args:
        n_cols: elements in one row, ``>= 0``.
        max_block: the largest block, a power of two ``<= HARD_MAX_BLOCK``.
        can_loop: whether the kernel loops over rows longer than one block.

    Returns:
        ``(block, num_warps)``.

    Raises:
        ValueError: a negative ``n_cols``, a ``max_block`` that is not a power of two in
            ``[1, HARD_MAX_BLOCK]``, or ``n_cols > max_block`` without ``can_loop``.
    """
    if not 1 <= max_block <= HARD_MAX_BLOCK or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a power of two in [1, {HARD_MAX_BLOCK}], got {max_block}")
    if n_cols < 0:
        raise ValueError(f"n_cols must be >= 0, got {n_cols}")
    if n_cols > max_block and not can_loop:
        raise ValueError(
            f"a row of {n_cols} elements does not fit one block of at most {max_block} elements, "
            "and this kernel does not loop over a row"
        )
    block = min(1 << max(n_cols - 1, 0).bit_length(), max_block)
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps


# Registers of one streaming multiprocessor (sm_70 to sm_90 and sm_100: 64K 32-bit).
REGISTERS_PER_SM = 65536


def resident_registers(programs_per_sm: int, num_warps: int) -> int:
    """The most registers a thread may use for ``programs_per_sm`` programs of ``num_warps``
    warps to be resident on one SM together (``maxnreg``; at most 255, the ISA's limit).

    A persistent grid sized for ``programs_per_sm`` programs per SM runs in one wave only
    if they all fit; one register over, and half of them wait for the other half.
    """
    return min(255, REGISTERS_PER_SM // (programs_per_sm * num_warps * 32))


def persistent_programs(n_rows: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many programs a persistent kernel (each looping over several rows) launches.

    ``programs_per_sm`` per streaming multiprocessor on CUDA, a small constant elsewhere,
    never more than ``n_rows`` and at least 1. Kernels that keep one partial result per
    program (a per-column sum, reduced afterwards) thereby keep that buffer small and
    deterministic.
    """
    if device.type == "cuda":
        programs = programs_per_sm * _sm_count(device)
    else:
        programs = PROGRAMS_WITHOUT_CUDA
    return max(1, min(n_rows, programs))


# Streaming multiprocessors per CUDA device index, looked up once: the property call costs
# microseconds of Python, on every backward otherwise.
_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]

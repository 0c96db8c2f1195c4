"""Launch ``torchrun --standalone --nproc_per_node=2`` from a test, on the CPU (Gloo).

One place for what every such launch needs: a clean environment (no inherited rank
variables, the repository on ``PYTHONPATH``, one OpenMP thread, Triton's interpreter),
a time limit, and one relaunch when a rank dies of a signal.

The relaunch: in one CI run on a two-core machine, rank 0 of an FSDP2 launch aborted
inside PyTorch's C++ code ("terminate called without an active exception": a std::thread
destroyed while still joinable); 69 launches since (31 alone, 38 two at a time) and those
of several test runs did not repeat it. A launch whose first failing rank was killed by a
signal is therefore run once more, with the first failure kept as a warning. A Python
error fails at once (its rank exits with 1), and so does a second signal death.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 300  # seconds; a launch takes 10-25 s on two cores
ROOT_CAUSE_EXIT_CODE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def died_of_a_signal(torchrun_stderr: str) -> bool:
    """True when the rank torchrun names as the root cause was killed by a signal (code < 0).

    A Python error exits with 1; the other ranks then fail in turn (a closed connection, or
    torchrun's SIGTERM), but the root cause torchrun reports is the first failure.
    """
    found = ROOT_CAUSE_EXIT_CODE.search(torchrun_stderr)
    return found is not None and int(found.group(1)) < 0


def environment(**extra: str) -> dict[str, str]:
    """This process's environment for a fresh two-rank launch, plus ``extra``."""
    env = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        TRITON_INTERPRET=env.get("TRITON_INTERPRET", "1"),
    )
    env.update(extra)
    return env


def run_torchrun(
    target: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    describe_failure: Callable[[], str] = str,
    before_retry: Callable[[], None] = lambda: None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=2 *target`` and return the finished run.

    Fails the test with torchrun's stderr (and ``describe_failure()``, e.g. the ranks'
    logs) unless it exits with 0; relaunches once, after ``before_retry()``, when a rank
    died of a signal (see the module docstring).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target]
    for attempt in (1, 2):
        completed = subprocess.run(
            command, env=env or environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO
        )
        if completed.returncode == 0:
            return completed
        failure = f"torchrun {' '.join(target)} failed ({completed.returncode}):\n{completed.stderr[-6000:]}"
        failure += describe_failure()
        if attempt == 2 or not died_of_a_signal(completed.stderr):
            pytest.fail(failure)
        warnings.warn(f"relaunching after a rank died of a signal; first launch:\n{failure}", stacklevel=2)
        before_retry()
    raise AssertionError("unreachable")

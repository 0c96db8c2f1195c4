"""Tests of ease._io: atomic writes keep the old file on failure, publish like open(), and
clean up what killed writers left."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ease._io import atomic_path, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_published_file_has_the_permissions_open_would_give(tmp_path) -> None:
    # mkstemp's temporary file is owner-only (0600); results and checkpoints must not
    # stay unreadable to the group after the rename.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "results.json", "{}")
    assert mode(written) == mode(plain)
    with atomic_path(tmp_path / "weights.bin") as tmp:
        tmp.write_bytes(b"\0")
    assert mode(tmp_path / "weights.bin") == mode(plain)


def test_replaces_the_previous_content(tmp_path) -> None:
    target = tmp_path / "out" / "results.md"  # the folder is created
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["results.md"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "last.pt"
    target.write_text("good checkpoint")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a check")
            raise RuntimeError("disk full")
    assert target.read_text() == "good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -- stale temporary files ------------------------------------------------------------------------
KILLED_WRITER = """
import os, signal, sys
from ease._io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs: the temporary file stays
"""


def killed_writer(target) -> None:
    """Run a process that dies by SIGKILL in the middle of an atomic write to ``target``."""
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, env=child_env())
    assert done.returncode == -signal.SIGKILL


@pytest.mark.skipif(os.name != "posix", reason="dead writers are recognised by pid on POSIX only")
def test_the_next_write_removes_the_temporary_of_a_killed_writer(tmp_path) -> None:
    target = tmp_path / "last.pt"
    killed_writer(target)
    (first,) = tmp_path.glob(".last.pt.*.tmp")  # what a SIGKILL leaves
    killed_writer(target)  # a writer killed in turn: it removed the first one's before dying
    (second,) = tmp_path.glob(".last.pt.*.tmp")
    assert second != first
    atomic_write_text(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.skipif(os.name != "posix", reason="dead writers are recognised by pid on POSIX only")
def test_only_our_own_stale_temporaries_are_removed(tmp_path) -> None:
    target = tmp_path / "last.pt"
    killed_writer(tmp_path / "other.pt")  # another target's
    strangers = [".last.pt.killed.tmp", "last.pt.tmp", ".last.pt.notapid@host.abc.tmp", "notes.txt"]
    for name in strangers:
        (tmp_path / name).write_text("not ours to delete")
    with atomic_path(target) as live:  # a live writer (this process) keeps its file
        live.write_text("being written")
        atomic_write_text(target, "another writer")
        assert live.read_text() == "being written"
    assert target.read_text() == "being written"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["last.pt", *strangers, *[p.name for p in tmp_path.glob(".other.pt.*.tmp")]])
    assert len(list(tmp_path.glob(".other.pt.*.tmp"))) == 1

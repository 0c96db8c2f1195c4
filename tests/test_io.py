"""Tests of ease._io: atomic writes keep the old file on failure and publish like open()."""

from __future__ import annotations

import stat

import pytest

from ease._io import atomic_path, atomic_write_text


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

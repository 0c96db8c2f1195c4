"""File output: atomic writes (a temporary file in the target's folder, then a rename)
and JSON-ready values.

A crash or an interrupt mid-write leaves the previous file (or none) under the real
name, never a truncated one: ``os.replace`` is atomic on POSIX and Windows.

A writer killed outright (SIGKILL, a lost node) runs no cleanup and leaves its temporary
file behind. Temporary files are named ``.<target>.<pid>@<host>.<random>.tmp``, and the
next write to the same target removes those whose writer is gone: written on this host
by a process that no longer exists. The writer's identity, not the file's age, decides,
because a live writer can leave its file unchanged for long (an ``fsync`` of a large
checkpoint on a slow disk) and no age is safe; a file from another host (a shared file
system) is left alone, since its process cannot be checked from here. A reused pid
only keeps a stale file a little longer; it never removes a live writer's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; the published file gets the mode open() would give it.
_FILE_MODE = 0o666 & ~_current_umask()


# A host name as it may appear in a file name: letters, digits and dashes.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _temporary_prefix(target: Path) -> str:
    # Read at each call, not at import: a forked child is a writer of its own.
    return f".{target.name}.{os.getpid()}@{_HOST}."


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process on this host (a zombie counts: not yet reaped)."""
    if pid <= 0:
        return True  # never ours to judge (and os.kill(0, ...) would mean the process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` for ``target`` whose writer is dead.

    Only files named as :func:`atomic_path` names them for this very ``target``, written
    on this host by a process that no longer exists, are removed; everything else in the
    folder is left alone. Does nothing off POSIX, where a pid cannot be probed safely
    (``os.kill`` terminates the process on Windows).

    Returns:
        The paths removed.
    """
    target = Path(target)
    if os.name != "posix" or not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp")
    removed = []
    for entry in os.scandir(target.parent):
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) != _HOST or _process_exists(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer may clean up at the same time
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The published file has the permissions a plain ``open(target, "w")`` would give it
    (``0o666`` less the umask), not the owner-only ones of a temporary file. On an
    exception the temporary file is removed and ``target`` is left untouched. Temporary
    files left for ``target`` by killed writers are removed first
    (:func:`remove_stale_temporaries`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=_temporary_prefix(target), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename publishes them
    return Path(target)


def jsonable(value: object) -> object:
    """``value`` with every dict key a string (JSON has no integer keys), recursively;
    tuples become lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

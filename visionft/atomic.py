"""Atomic file writes: every file a run writes goes to a temporary file beside its path, is flushed to disk, then
renamed over the path (``os.replace``). A crash, a kill or a failed write (full disk, no permission) leaves the
previous file, never a truncated one; the failure is a ``WriteFailed`` (``DiskFull`` for a full disk or quota), a
user error whose one line names the file, the cause and the fix."""
from __future__ import annotations

import errno
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from visionft.errors import UsageError, UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteFailed(OSError, UsageError):
    """A file could not be written; the previous file at that path (if any) is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


class DiskFull(WriteFailed, UserError):
    """No space (or quota) left on the device."""


def write_synced(path: Path, data) -> None:
    """``data`` (bytes) written to ``path`` and flushed to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temporary(path: Path) -> Path:
    """The temporary file a write of ``path`` goes to before its rename (per host and process, hidden)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


@contextmanager
def replacing(path: Path, what: str = "file", then: str = "run again"):
    """Yields a temporary path beside ``path``: whatever is written there replaces ``path`` when the block ends.
    An OSError (in the block or the rename) removes the temporary file and becomes a ``WriteFailed``/``DiskFull``
    saying ``<cause> writing <path> (the previous <what> there is intact): free space, then <then>``."""
    path = Path(path)
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, WriteFailed):
            raise
        raise failure(e, path, what, then) from None
    finally:
        tmp.unlink(missing_ok=True)


def failure(e: OSError, path: Path, what: str, then: str) -> WriteFailed:
    full = e.errno in NO_SPACE
    cause = "no space left on the device" if full else (e.strerror or type(e).__name__).lower()
    kept = f"the previous {what} there is intact" if path.exists() else f"no partial {what} was left there"
    fix = "free space" if full else f"make {path.parent} writable"
    return (DiskFull if full else WriteFailed)(e.errno, f"{cause} writing {path} ({kept}): {fix}, then {then}")


def write_text(path: Path, text: str, what: str = "file", then: str = "run again") -> Path:
    """``text`` (UTF-8) written to ``path`` atomically (``replacing``)."""
    with replacing(path, what, then) as tmp:
        write_synced(tmp, text.encode("utf-8"))
    return Path(path)

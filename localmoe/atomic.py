"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from localmoe.errors import LocalMoEError


def check_writable(path, what: str = "output") -> Path:
    """Raise LocalMoEError unless write_atomic(path) can work: the directory exists and takes a
    new file (tried: a temp file is made and removed), and path is not a directory."""
    path = Path(path)
    d = path.parent
    if path.is_dir():
        raise LocalMoEError(f"{what} {path} is a directory; give a file name")
    if not d.is_dir():
        raise LocalMoEError(f"{what} {path}: the directory {d} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise LocalMoEError(f"{what} {path}: cannot create files in {d}: {e.strerror or e}") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return path


def fsync_dir(d) -> None:
    """Make a rename in directory d durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes | str) -> Path:
    """Write data to path: a temp file in the same directory, fsync, rename, fsync the directory.
    On any error the temp file is removed and the old file (if any) is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; this is an ordinary output file
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)
    except OSError:  # some filesystems cannot fsync a directory; the data itself is synced
        pass
    return path

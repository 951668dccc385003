"""The disk tier: the GGUF file read with pread into our own buffers, then
dropped from the page cache (POSIX_FADV_DONTNEED) so that the kernel does not
keep a second copy of what we already hold or chose not to hold."""
from __future__ import annotations

import os

import numpy as np

from localmoe.errors import LocalMoEError

_FADVISE = hasattr(os, "posix_fadvise")


class DiskReader:
    def __init__(self, path):
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise LocalMoEError(f"{path}: cannot open for reading: {e}") from None
        if _FADVISE:  # no readahead: it would pull neighbouring experts into the page cache
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.path = path

    def read_into(self, dst: np.ndarray, offset: int) -> None:
        """Fill dst (contiguous u8) with the file's bytes at offset."""
        view = memoryview(dst).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise LocalMoEError(f"{self.path}: short read at offset {offset + done} (file truncated?)")
            done += n
        if _FADVISE:
            os.posix_fadvise(self.fd, offset, done, os.POSIX_FADV_DONTNEED)

    def copy(self, offset: int, n: int) -> np.ndarray:
        """u8[n]: a private copy of the file's bytes at offset."""
        out = np.empty(n, np.uint8)
        self.read_into(out, offset)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Memory sizes as users type them: "6G", "512M", "1.5GiB", "800000000"."""
from __future__ import annotations

import re

from localmoe.errors import LocalMoEError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """Bytes in `text`; K/M/G/T are powers of 1024 (like llama.cpp and free -h)."""
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE.match(str(text))
        if m is None:
            raise LocalMoEError(f"cannot read memory size {text!r}; use e.g. 6G, 512M or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise LocalMoEError(f"memory size must be positive, got {text!r}")
    return n


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

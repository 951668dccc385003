"""Heat maps as PNG files without matplotlib: a diverging colour ramp, zlib + struct encoding, atomic writes."""
from __future__ import annotations

import struct
import zlib

import numpy as np

from localmoe.atomic import write_atomic  # noqa: F401 (quality.py writes its PNG and JSON with it)

# ColorBrewer RdBu end points and middle: below, at and above the reference value
LOW, MID, HIGH = (33, 102, 172), (247, 247, 247), (178, 24, 43)
GRID = (128, 128, 128)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit RGB image rgb u8[h, w, 3]: one IDAT, filter type 0 on every row."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ValueError(f"need a non-empty uint8 [h, w, 3] array, got {a.dtype} {a.shape}")
    h, w, _ = a.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, 3 * w)], axis=1)  # filter byte 0 first

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB), no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def diverging_rgb(values: np.ndarray, mid: float, top: float) -> np.ndarray:
    """u8[..., 3]: LOW at 0, MID at `mid`, HIGH at `top` and above, linear in between."""
    v = np.clip(np.asarray(values, np.float64), 0.0, top)
    lo, md, hi = (np.array(c, np.float64) for c in (LOW, MID, HIGH))
    below = (v / mid)[..., None]
    above = ((v - mid) / (top - mid))[..., None]
    out = np.where((v <= mid)[..., None], lo + (md - lo) * below, md + (hi - md) * above)
    return np.rint(out).astype(np.uint8)


def heat_map(values: np.ndarray, mid: float, top: float, cell: int = 32) -> np.ndarray:
    """u8[rows * (cell + 1) + 1, cols * (cell + 1) + 1, 3]: one cell x cell square per value of
    values f[rows, cols] (row 0 at the top), coloured by diverging_rgb, 1-pixel GRID lines between."""
    rgb = diverging_rgb(values, mid, top)
    n_r, n_c = rgb.shape[:2]
    img = np.empty((n_r * (cell + 1) + 1, n_c * (cell + 1) + 1, 3), np.uint8)
    img[:] = GRID
    for r in range(n_r):
        for c in range(n_c):
            img[1 + r * (cell + 1):(r + 1) * (cell + 1), 1 + c * (cell + 1):(c + 1) * (cell + 1)] = rgb[r, c]
    return img


# 3x5 bitmaps of the digits 0-9, one string of 15 bits per digit, row-major
_DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
           "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111"]
INK, PAPER = (0, 0, 0), (255, 255, 255)


def draw_number(img: np.ndarray, n: int, top: int, left: int, scale: int = 2) -> None:
    """Draw the decimal digits of n >= 0 into img u8[h, w, 3] at (top, left), each digit 3x5 pixels x scale."""
    for i, ch in enumerate(str(n)):
        glyph = np.array([int(b) for b in _DIGITS[int(ch)]], bool).reshape(5, 3)
        block = np.kron(glyph, np.ones((scale, scale), bool))
        x = left + i * 4 * scale
        img[top:top + 5 * scale, x:x + 3 * scale][block] = INK


def with_axis_numbers(grid: np.ndarray, n_rows: int, n_cols: int, cell: int, scale: int = 2) -> np.ndarray:
    """grid (from heat_map) inside a PAPER margin with row numbers 0.. on the left, column numbers on top."""
    digits = len(str(max(n_rows, n_cols) - 1))
    pad = (4 * digits + 2) * scale
    img = np.empty((grid.shape[0] + pad, grid.shape[1] + pad, 3), np.uint8)
    img[:] = PAPER
    img[pad:, pad:] = grid
    mid = (cell + 1) // 2 - (5 * scale) // 2
    for r in range(n_rows):
        draw_number(img, r, pad + 1 + r * (cell + 1) + mid, scale, scale)
    for c in range(n_cols):
        draw_number(img, c, scale, pad + 1 + c * (cell + 1) + mid, scale)
    return img

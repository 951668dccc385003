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


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering lo..hi with about n ticks."""
    raw = (hi - lo) / max(n - 1, 1) or 1.0
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = np.floor(lo / step) * step
    return [float(first + i * step) for i in range(int(np.ceil((hi - first) / step - 1e-9)) + 1)]


def _segment(img: np.ndarray, p: tuple[int, int], q: tuple[int, int], rgb, width: int = 2) -> None:
    """A straight line from pixel p to q (row, col), `width` pixels thick."""
    n = max(abs(q[0] - p[0]), abs(q[1] - p[1]), 1)
    for t in np.linspace(0.0, 1.0, n + 1):
        r, c = round(p[0] + t * (q[0] - p[0])), round(p[1] + t * (q[1] - p[1]))
        img[max(r - width // 2, 0):r + (width + 1) // 2, max(c - width // 2, 0):c + (width + 1) // 2] = rgb


def scatter_plot(series: list[tuple[tuple[int, int, int], list[tuple[float, float, int]]]], width: int = 640,
                 height: int = 440, scale: int = 2) -> np.ndarray:
    """u8[height, width, 3]: each series (colour, [(x, y, label >= 0 or None)]) as square markers joined by
    lines, each marker numbered by its label (None: unnumbered); GRID lines at round x and y values, numbered on the axes (the
    axes' meaning is the caller's to state, as the glyphs are digits only)."""
    pts = [(x, y) for _, ps in series for x, y, _ in ps]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    left, bottom, top, right = 6 * 4 * scale, 5 * scale + 12, 12, 12 + 4 * 4 * scale
    img = np.empty((height, width, 3), np.uint8)
    img[:] = PAPER

    def at(x, y):  # value -> (row, col)
        c = left + (x - xt[0]) / (xt[-1] - xt[0] or 1) * (width - left - right)
        r = height - bottom - (y - yt[0]) / (yt[-1] - yt[0] or 1) * (height - bottom - top)
        return int(round(r)), int(round(c))

    for x in xt:
        r0, c = at(x, yt[0])
        img[top:r0 + 1, c] = GRID
        draw_number(img, int(round(x)), r0 + 6, max(c - 4 * scale, 0), scale)
    for y in yt:
        r, c0 = at(xt[0], y)
        img[r, c0:width - right + 1] = GRID
        draw_number(img, int(round(y)), max(r - 5 * scale // 2, 0), 2, scale)
    for rgb, ps in series:
        cells = [at(x, y) for x, y, _ in ps]
        for p, q in zip(cells, cells[1:]):
            _segment(img, p, q, rgb)
        for (r, c), (_, _, label) in zip(cells, ps):
            img[max(r - 4, 0):r + 5, max(c - 4, 0):c + 5] = rgb
            if label is not None:
                draw_number(img, label, max(r - 6 - 5 * scale, 0), c + 6, scale)
    return img

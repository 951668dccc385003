"""Expert statistics: what `--stats` prints and `--stats-out` saves; a saved
file is also a profile that warm-starts the cache (`--expert-profile`)."""
from __future__ import annotations

import json

import numpy as np

from localmoe.atomic import write_atomic
from localmoe.errors import LocalMoEError

from .budget import format_size

VERSION = 1
MAX_PROFILE_BYTES = 64 << 20  # a profile holds n_layer x n_expert counts: far less


def save_stats(path, stats: dict) -> None:
    """Write stats as JSON atomically: a reader sees the old file or the new one, never half."""
    try:
        write_atomic(path, json.dumps({"version": VERSION, **stats}))
    except OSError as e:
        raise LocalMoEError(f"cannot write the statistics to {path}: {e.strerror or e}") from None


def load_profile(path, n_layer: int, n_expert: int) -> np.ndarray:
    """i64[n_layer, n_expert] hit counts from a stats file saved for this model."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
        if len(raw) > MAX_PROFILE_BYTES:
            raise ValueError(f"larger than {MAX_PROFILE_BYTES >> 20} MiB")
        d = json.loads(raw)
    except (OSError, ValueError) as e:
        raise LocalMoEError(f"expert profile {path}: cannot read it as JSON: {e}") from None
    except RecursionError:
        raise LocalMoEError(f"expert profile {path}: cannot read it as JSON: nested too deeply") from None
    counts = d.get("counts") if isinstance(d, dict) else None
    try:
        c = np.asarray(counts)
    except (TypeError, ValueError, RecursionError):
        c = None
    if c is not None and c.dtype.kind not in "iu":  # floats, bools, strings, ragged or huge numbers
        c = None
    if c is not None and c.dtype.kind == "u" and c.size and c.max() > np.iinfo(np.int64).max:
        c = None
    if c is not None:
        c = c.astype(np.int64)
    if c is None or c.shape != (n_layer, n_expert) or (c < 0).any():
        shape = None if c is None else c.shape
        raise LocalMoEError(f"expert profile {path}: 'counts' must be {n_layer} x {n_expert} non-negative "
                            f"integers for this model, got {'shape ' + str(shape) if shape else 'something else'}")
    return c


def format_stats(stats: dict) -> str:
    """Human-readable lines for --stats."""
    counts = np.asarray(stats["counts"], np.int64)
    lines = ["expert statistics (tokens routed per expert; top 4 per layer):"]
    for il, row in enumerate(counts):
        if row.sum() == 0:
            continue
        top = np.argsort(-row, kind="stable")[:4]
        share = ", ".join(f"e{e}: {row[e]} ({row[e] / row.sum():.0%})" for e in top)
        lines.append(f"  layer {il}: {share}")
    cache = stats.get("cache")
    if cache:
        lines.append(f"cache ({cache['policy']}): hit rate {_pct(cache['hit_rate'])} over "
                     f"{cache['selections']} expert selections, {cache['demand_loads']} demand loads, "
                     f"{cache['prefetch_loads']} prefetch loads")
        lines.append(f"prefetch prediction accuracy: {_pct(cache['prefetch_accuracy'])} "
                     f"({cache['predicted_correct']}/{cache['predicted_total']})")
        lines.append(f"disk: {format_size(cache['bytes_read'])} of experts read")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"

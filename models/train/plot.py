"""Per-layer expert shares over training, from a run's log.jsonl, as one PNG.

    python -m models.train.plot ~/.cache/localmoe/train/ds-full [--out shares.png]

One heat map per MoE layer, top to bottom: a row per expert, a column per log
record (every log_every steps, left to right); layers are numbered from 0 at the
first MoE layer (deepseek2's leading dense layers have no experts). White is the balanced share
1/n_expert, blue less (a collapsing expert turns dark blue), red up to 3x more.
The layer index is printed left of each map, the first and last logged step
under the last one.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.png import PAPER, draw_number, encode_png, heat_map, write_atomic
from localmoe.errors import LocalMoEError

CELL, GAP, SCALE = 4, 10, 2     # pixels per cell, between layers, per digit pixel


def read_shares(log: Path) -> tuple[list[int], np.ndarray]:
    """(steps, shares f64[n_records, n_layer, n_expert]) of every record of a log.jsonl."""
    try:
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise LocalMoEError(f"cannot read {log}: {e}") from None
    recs = [r for r in recs if "expert_share" in r]
    if not recs:
        raise LocalMoEError(f"{log} has no expert_share records")
    shapes = {np.shape(r["expert_share"]) for r in recs}
    if len(shapes) != 1:
        raise LocalMoEError(f"{log} mixes runs of different shapes {sorted(shapes)}; use one run's log")
    return [r["step"] for r in recs], np.array([r["expert_share"] for r in recs], np.float64)


def draw(steps: list[int], shares: np.ndarray) -> np.ndarray:
    """u8[h, w, 3]: the picture described in the module docstring."""
    n_layer, n_expert = shares.shape[1:]
    balanced = 1.0 / n_expert
    maps = [heat_map(shares[:, l].T, balanced, 3 * balanced, CELL) for l in range(n_layer)]
    label = (4 * len(str(n_layer - 1)) + 2) * SCALE
    h, w = maps[0].shape[:2]
    foot = 8 * SCALE
    img = np.empty((n_layer * (h + GAP) + foot, label + max(w, 4 * SCALE * len(str(steps[-1])) * 2), 3), np.uint8)
    img[:] = PAPER
    for l, m in enumerate(maps):
        top = l * (h + GAP)
        img[top:top + h, label:label + w] = m
        draw_number(img, l, top + h // 2 - 5 * SCALE // 2, SCALE, SCALE)
    bottom = n_layer * (h + GAP)
    right = img.shape[1] - 4 * SCALE * len(str(steps[-1]))
    if right > label + 4 * SCALE * (len(str(steps[0])) + 1):   # room for both numbers
        draw_number(img, steps[0], bottom, label, SCALE)
    draw_number(img, steps[-1], bottom, right, SCALE)
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (with log.jsonl) or a log.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/expert_shares.png)")
    a = p.parse_args(argv)
    log = a.run / "log.jsonl" if a.run.is_dir() else a.run
    out = a.out or log.with_name("expert_shares.png")
    try:
        steps, shares = read_shares(log)
        write_atomic(out, encode_png(draw(steps, shares)))
    except (LocalMoEError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {shares.shape[1]} layers x {shares.shape[2]} experts, steps {steps[0]}..{steps[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

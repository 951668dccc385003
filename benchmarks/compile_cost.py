"""Numba compile cost: cold vs warm start, each in a fresh process.

    python -m benchmarks.compile_cost [--types Q4_K] [--repeats 3]

Cold = NUMBA_CACHE_DIR is a new empty directory, so every kernel compiles.
Warm = a second process on the same directory, loading the cached machine code.
Measured: `localmoe --help` (must not import numba at all), and a process that
imports localmoe.quant and makes a first `localmoe.quant.matvec` call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import print_table

# Runs in the child: times the import and the first call (which compiles or loads from cache).
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from localmoe.quant import matvec, quant_type
qt = quant_type(sys.argv[1])
t1 = time.perf_counter()
n_rows, n_cols = 64, 256
matvec(np.zeros((n_rows, qt.row_bytes(n_cols)), np.uint8), qt.qtype, (n_rows, n_cols), np.ones(n_cols, np.float32))
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first call": t2 - t1}))
"""


# Does `localmoe --help` pull in numba? (It should not: subcommands load lazily.)
HELP_IMPORTS = """
import sys
from localmoe.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
print("NUMBA_IMPORTED", "numba" in sys.modules)
"""


def localmoe_cmd() -> list[str]:
    """The console script beside this interpreter (not a pyenv shim, which adds its own start-up)."""
    exe = Path(sys.executable).parent / "localmoe"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from localmoe.cli import main; main()"]


def run(cmd: list[str], cache_dir: str) -> tuple[float, str]:
    """(wall seconds, stdout) of cmd in a fresh process using cache_dir for numba."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{r.stderr}")
    return wall, r.stdout


def measure(cmd: list[str], repeats: int) -> dict[str, list[dict]]:
    """{'cold': [...], 'warm': [...]}: per repeat, process wall time plus the child's own JSON timings."""
    out = {"cold": [], "warm": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as d:
            for phase in ("cold", "warm"):
                wall, stdout = run(cmd, d)
                times = json.loads(stdout) if stdout.startswith("{") else {}
                out[phase].append({"process": wall, **times})
    return out


def available_types(wanted: list[str]) -> list[str]:
    """The wanted types whose kernels exist in this checkout (others are reported, not measured)."""
    from localmoe.quant import quant_type
    have = []
    for name in wanted:
        try:
            quant_type(name)
            have.append(name)
        except (ImportError, KeyError):
            print(f"note: {name} skipped, its quant module does not exist yet")
    return have


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q4_K", help="comma list of quant types for the first-matvec rows")
    ap.add_argument("--repeats", type=int, default=3, help="cold/warm pairs; medians are shown")
    args = ap.parse_args(argv)

    rows = []
    jobs = [("localmoe --help", localmoe_cmd() + ["--help"])]
    jobs += [(f"first {t} matvec", [sys.executable, "-c", CHILD, t])
             for t in available_types([t.strip().upper() for t in args.types.split(",")])]
    for label, cmd in jobs:
        res = measure(cmd, args.repeats)
        for part in res["cold"][0]:
            cold = statistics.median(r[part] for r in res["cold"])
            warm = statistics.median(r[part] for r in res["warm"])
            rows.append([label, part, cold, warm])
    print(f"seconds, median of {args.repeats}; cold = empty NUMBA_CACHE_DIR, warm = second process on it;"
          " 'process' is the whole subprocess wall time (interpreter start included)")
    print_table(["what", "part", "cold s", "warm s"], rows)
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as d:
        imported = run([sys.executable, "-c", HELP_IMPORTS], d)[1].split()[-1]
    print(f"localmoe --help imports numba: {'yes (it should not)' if imported == 'True' else 'no'}")


if __name__ == "__main__":
    main()

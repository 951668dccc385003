"""Whole-model quantization: localmoe beside llama.cpp's llama_model_quantize, same file, same threads.

    python -m benchmarks.quantize                          # bench-size qwen3moe F16 -> Q4_K_M, Q3_K_M
    python -m benchmarks.quantize --mixes Q8_0 --rounds 3 --size tiny

Each run is a fresh child process (python -c ...); a probe process around it
reads resource.getrusage(RUSAGE_CHILDREN) when it exits: peak RSS (ru_maxrss)
and CPU seconds (user + system, all threads). The child that runs localmoe
first imports it (numba's cached kernels load, no compile once the cache is
warm: one untimed warm-up run per side and mix does that, and fills the page
cache). Wall time is the child's whole lifetime, imports included, for both
sides; MB/s = input file bytes / wall seconds. The two sides alternate within
each round so a change in machine load hits both. Times are medians over
--rounds, RSS the maximum; ratios are localmoe / llama.cpp (< 1: localmoe is
faster or smaller). The load average is printed before and after: compare
wall times only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import print_table

_OURS = ("import sys, localmoe; localmoe.quantize(sys.argv[1], sys.argv[2], sys.argv[3], "
         "threads=int(sys.argv[4]), force=True, progress=False)")
_LLAMA = ("import sys, llama_cpp\n"
          "from localmoe.quant_mix import MIXES\n"
          "p = llama_cpp.llama_model_quantize_default_params()\n"
          "p.ftype, p.nthread = int(MIXES[sys.argv[3]][0]), int(sys.argv[4])\n"
          "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
_SIDES = (("localmoe", _OURS), ("llama.cpp", _LLAMA))


def run_child(code: str, args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of `python -c code args` in its own process.

    Each call runs in a fresh intermediate process so RUSAGE_CHILDREN holds just this child."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
             "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss)\n"
             "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c", code, *args],
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout.split()
    return float(out[-3]), float(out[-2]), float(out[-1]) / 1024   # ru_maxrss is KiB on Linux


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_mix(src: Path, d: str, mix: str, threads: int, rounds: int) -> dict[str, tuple[float, float, float]] | None:
    """side -> (median wall s, median CPU s, max RSS MiB), or None when a side fails."""
    cmds = {side: [str(src), os.path.join(d, f"{side}-{mix}.gguf"), mix, str(threads)] for side, _ in _SIDES}
    runs: dict[str, list] = {side: [] for side, _ in _SIDES}
    for i in range(rounds + 1):           # round 0 is the warm-up
        for side, code in _SIDES:
            try:
                r = run_child(code, cmds[side])
            except subprocess.CalledProcessError as e:
                print(f"{side} {mix} failed: {(e.stderr.strip().splitlines() or ['?'])[-1]}")
                return None
            if i:
                runs[side].append(r)
                print(f"  {mix} round {i} {side}: {r[0]:.1f} s wall, {r[1]:.1f} s CPU, {r[2]:.0f} MiB", flush=True)
    return {side: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), max(r[2] for r in rs))
            for side, rs in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3moe")
    ap.add_argument("--size", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--mixes", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side and mix (after one warm-up)")
    ap.add_argument("--out-dir", default=None, help="where the outputs go (default: a temp dir beside the model)")
    args = ap.parse_args(argv)

    from models.build import cached_model
    src = cached_model(args.arch, args.size, "f16")
    size_mb = src.stat().st_size / 1e6
    print(f"input {src.name}: {size_mb:.0f} MB, {args.threads} threads, median of {args.rounds} rounds "
          f"after 1 warm-up; load average {_load()}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out_dir or src.parent) as d:
        for mix in args.mixes.split(","):
            res = bench_mix(src, d, mix, args.threads, args.rounds)
            if res is None:
                continue
            same = Path(d, f"localmoe-{mix}.gguf").read_bytes() == Path(d, f"llama.cpp-{mix}.gguf").read_bytes()
            (tl, cl, ml), (tr, cr, mr) = res["localmoe"], res["llama.cpp"]
            rows.append([mix, tl, cl, size_mb / tl, ml, tr, cr, size_mb / tr, mr, tl / tr, cl / cr, ml / mr,
                         "yes" if same else "no"])
    print_table(["mix", "ours wall s", "ours CPU s", "ours MB/s", "ours RSS MiB", "llama wall s", "llama CPU s",
                 "llama MB/s", "llama RSS MiB", "wall ratio", "CPU ratio", "RSS ratio", "same file"], rows)
    print(f"load average after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Whole-model quantization: localmoe beside llama.cpp's llama_model_quantize, same file, same threads.

    python -m benchmarks.quantize                          # bench-size qwen3moe F16 -> Q4_K_M, Q3_K_M
    python -m benchmarks.quantize --mixes Q8_0 --rounds 3 --size tiny

Each run is a fresh child process (python -c ...), so its peak RSS is
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss read right after it exits; the
child that runs localmoe first imports it (numba's cached kernels load, no
compile once the cache is warm: one untimed warm-up run per mix does that).
Wall time is the child's whole lifetime, imports included, for both sides.
MB/s = input file bytes / wall seconds. Medians over --rounds.
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


def run_child(code: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `python -c code args` in its own process.

    Each call runs in a fresh intermediate process so RUSAGE_CHILDREN holds just this child."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c", code, *args],
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout.split()
    return float(out[-2]), float(out[-1]) / 1024   # ru_maxrss is KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3moe")
    ap.add_argument("--size", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--mixes", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="where the outputs go (default: a temp dir beside the model)")
    args = ap.parse_args(argv)

    from models.build import cached_model
    src = cached_model(args.arch, args.size, "f16")
    size_mb = src.stat().st_size / 1e6
    print(f"input {src.name}: {size_mb:.0f} MB, {args.threads} threads, median of {args.rounds} rounds")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out_dir or src.parent) as d:
        for mix in args.mixes.split(","):
            res = {}
            for side, code in (("localmoe", _OURS), ("llama.cpp", _LLAMA)):
                out = os.path.join(d, f"{side}-{mix}.gguf")
                cmd = [str(src), out, mix, str(args.threads)]
                try:
                    run_child(code, cmd)  # warm-up: page cache, numba's on-disk cache
                except subprocess.CalledProcessError as e:
                    print(f"{side} {mix} failed: {e.stderr.strip().splitlines()[-1]}")
                    break
                runs = [run_child(code, cmd) for _ in range(args.rounds)]
                res[side] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
            if len(res) < 2:
                continue
            same = Path(d, f"localmoe-{mix}.gguf").read_bytes() == Path(d, f"llama.cpp-{mix}.gguf").read_bytes()
            (tl, ml), (tr, mr) = res["localmoe"], res["llama.cpp"]
            rows.append([mix, tl, size_mb / tl, ml, tr, size_mb / tr, mr, tl / tr, ml / mr, "yes" if same else "no"])
    print_table(["mix", "ours s", "ours MB/s", "ours RSS MiB", "llama s", "llama MB/s", "llama RSS MiB",
                 "time ratio", "RSS ratio", "same file"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

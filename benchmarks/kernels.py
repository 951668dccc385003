"""Matvec weight bandwidth per quant type: localmoe beside llama.cpp (ggml), same bytes, same threads.

    python -m benchmarks.kernels [--types Q4_K,Q6_K] [--shapes 2048x768] [--threads 1,2] [--rounds 5]
    python -m benchmarks.kernels --experts 8 --shapes 2048x768,768x2048   # a decode step's expert matvecs

For each type and MoE-sized shape (rows x cols) it prints the weight GB/s of
localmoe's `matvec_into` and of ggml_mul_mat (llama-cpp-python's libggml, via
ctypes) at each thread count, next to the machine's read bandwidth measured
in the same run (numba streaming sum over >= 1 GiB, re-measured right before
each timing, because a shared machine's bandwidth drifts: between 40 and 76
GB/s at 2 threads within minutes here) and the % of that roofline.
Weights rotate through several copies (>= --min-mib in total) so that every
call reads from DRAM, not from the 32 MiB L3.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from gguf import GGMLQuantizationType as T

from benchmarks._common import (GB, GgmlMatvec, median_time, numba_threads, print_table, read_bandwidth,
                               stream_array, thread_counts)

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = ["2048x768", "768x2048", "4096x14336", "14336x4096"]

# Byte offsets of the fp16 scale fields inside one block (ggml-common.h block_* structs).
# Random bytes elsewhere are valid quants; scales are pinned so no block holds inf/nan/subnormals.
SCALE_OFFSETS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}


def make_weights(qt, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """u8[n_rows, row_bytes] of well-formed (finite, normal-scale) random weights of type qt."""
    if qt.qtype in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((n_rows, n_cols), dtype=np.float32) * np.float32(0.02)
        if qt.qtype == T.F16:
            w = w.astype(np.float16)
        elif qt.qtype == T.BF16:
            w = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for random data
        return w.view(np.uint8).reshape(n_rows, -1)
    raw = rng.integers(0, 256, (n_rows, qt.row_bytes(n_cols)), dtype=np.uint8)
    blocks = raw.reshape(n_rows, -1, qt.type_size)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for off in SCALE_OFFSETS[qt.qtype]:
        blocks[:, :, off:off + 2] = scale
    return raw


def load_type(name: str):
    """(QuantType, None) or (None, why it is skipped)."""
    from localmoe.quant import quant_type
    from localmoe.quant.base import _MODULES
    try:
        qt = quant_type(name)
        qt.matvec_into(np.empty(1, np.float32), np.zeros(qt.block_size, np.float32),
                       np.zeros((1, qt.type_size), np.uint8))
    except (ImportError, KeyError):
        return None, f"skipped: quant/{_MODULES[T[name]]}.py does not define {name} yet"
    except NotImplementedError:
        return None, f"skipped: {name}.matvec_into is not implemented yet"
    return qt, None


def time_per_call(run, k: int, rounds: int) -> float:
    """Seconds per call: median over `rounds` of one pass through all k weight copies."""
    def one_pass():
        for i in range(k):
            run(i)
    return median_time(one_pass, rounds) / k


def localmoe_rows(label: str, nbytes: int, k: int, threads, stream, args, call) -> list[list]:
    """[label, MiB, k, threads, roof, GB/s, % roof] per thread count for `call(i)` reading nbytes
    of copy i, the roof measured right before each timing."""
    rows = []
    for n in threads:
        roof = read_bandwidth(stream, [n], repeats=args.rounds)[n]
        with numba_threads(n):
            gbs = nbytes / time_per_call(call, k, args.rounds) / GB
        rows.append([label, nbytes / 2**20, k, n, roof, gbs, 100 * gbs / roof])
    return rows


def bench_shape(qt, n_rows, n_cols, threads, stream, args, rng) -> list[list]:
    one = make_weights(qt, n_rows, n_cols, rng)
    k = max(2, math.ceil(args.min_mib * 2**20 / one.nbytes))
    copies = [one] + [make_weights(qt, n_rows, n_cols, rng) for _ in range(k - 1)]
    x = rng.standard_normal(n_cols, dtype=np.float32)
    out = np.empty(n_rows, dtype=np.float32)
    rows = localmoe_rows(f"{n_rows}x{n_cols}", one.nbytes, k, threads, stream, args,
                         lambda i: qt.matvec_into(out, x, copies[i]))
    with numba_threads(threads[0]):
        qt.matvec_into(out, x, copies[0])
    if args.no_ggml:
        return rows
    for repack in (False, True):  # plain buffer, then llama.cpp's default CPU_REPACK buffer where it applies
        ggml = GgmlMatvec.create(int(qt.qtype), copies, x, repack=repack)
        if ggml is None:
            for row in rows:
                row += ["-", ""]
            continue
        try:
            for row, n in zip(rows, threads):
                roof = read_bandwidth(stream, [n], repeats=args.rounds)[n]
                theirs = one.nbytes / time_per_call(lambda i: ggml.run(i, n), k, args.rounds) / GB
                row += [theirs, 100 * theirs / roof]
            ggml.run(0, threads[0])
            ref = ggml.result(0)
        finally:
            ggml.close()
        if not repack:
            diff = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    for row in rows:  # vs what llama.cpp runs by default: repacked where available
        best = row[-2] if isinstance(row[-2], float) else row[-4]
        row += [row[5] / best, f"{diff:.1e}"]
    return rows


def bench_experts_shape(qt, n_rows, n_cols, threads, stream, args, rng) -> list[list]:
    """--experts E: one matvec_experts_into call = x against all E experts of a stacked
    u8[E, n_rows, row_bytes] tensor (one parallel region), as a MoE decode step runs them."""
    e = args.experts
    stack_bytes = e * n_rows * qt.row_bytes(n_cols)
    k = max(2, math.ceil(args.min_mib * 2**20 / stack_bytes))
    stacks = [np.stack([make_weights(qt, n_rows, n_cols, rng) for _ in range(e)]) for _ in range(k)]
    x = rng.standard_normal((1, n_cols), dtype=np.float32)
    out = np.empty((1, e, n_rows), dtype=np.float32)
    sel, xrow = np.arange(e, dtype=np.int64), np.zeros(e, dtype=np.int64)
    return localmoe_rows(f"{e}x{n_rows}x{n_cols}", stack_bytes, k, threads, stream, args,
                         lambda i: qt.matvec_experts_into(out, qt.prepare(x), [stacks[i]], sel, xrow))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma list of quant types")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of ROWSxCOLS")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--rounds", type=int, default=5, help="timed passes over the copies; the median is shown")
    ap.add_argument("--min-mib", type=float, default=256, help="total MiB of weight copies to rotate through")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="GiB array for the read-bandwidth roofline")
    ap.add_argument("--no-ggml", action="store_true", help="leave out the llama.cpp column")
    ap.add_argument("--experts", type=int, default=0,
                    help="E > 0: time one matvec_experts_into over E stacked experts per call (localmoe only)")
    args = ap.parse_args(argv)
    args.no_ggml = args.no_ggml or args.experts > 0
    threads = thread_counts(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    types = [t.strip().upper() for t in args.types.split(",")]
    if unknown := [t for t in types if t not in TYPES]:
        raise SystemExit(f"unknown types {unknown}; choose from {','.join(TYPES)}")

    stream = stream_array(args.stream_gib)
    print(f"roof = read bandwidth, re-measured right before each timing: numba streaming sum over "
          f"{args.stream_gib:g} GiB, median of {args.rounds};\n  each '% roof' is against the roof measured just "
          f"before it (the 'roof' column shows the one before localmoe's timing).")
    print(f"GB/s = weight bytes / seconds per matvec; per-call time = median of {args.rounds} passes over k "
          f"weight copies (>= {args.min_mib:g} MiB in total, so weights come from DRAM, not L3).")
    print("Both sides include converting x to the weight's vec_dot type (Q8_0/Q8_1/Q8_K/f16/bf16) inside each call.")
    print("llama.cpp = ggml_mul_mat on llama-cpp-python's CPU backend (libggml-cpu via ctypes), same bytes, same x, "
          "same threads:\n  'plain' = weights in a CPU buffer, 'repack' = in the CPU_REPACK buffer llama.cpp uses by "
          "default ('-' = no repacked kernel for this type on this CPU);\n  ours/llama is against repack where it "
          "exists; rel.diff = max|ours - plain| / max|plain|.\n")
    header = ["shape", "MiB", "k", "thr", "roof GB/s", "localmoe GB/s", "% roof"]
    if not args.no_ggml:
        header += ["plain GB/s", "% roof", "repack GB/s", "% roof", "ours/llama", "rel.diff"]
    rng = np.random.default_rng(0)
    for name in types:
        qt, why = load_type(name)
        if qt is None:
            print(f"== {name}: {why}\n")
            continue
        rows, notes = [], []
        for n_rows, n_cols in shapes:
            if n_cols % qt.block_size:
                notes.append(f"   {n_rows}x{n_cols} skipped: {n_cols} columns is not a multiple of {qt.block_size}")
                continue
            bench = bench_experts_shape if args.experts else bench_shape
            rows += bench(qt, n_rows, n_cols, threads, stream, args, rng)
        print_table(header, rows, title=f"== {name}")
        print("\n".join(notes + [""]))


if __name__ == "__main__":
    main()

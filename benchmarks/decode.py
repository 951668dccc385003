"""Whole-model prefill and decode speed and peak memory: localmoe beside llama.cpp, same GGUF, same threads.

    python -m benchmarks.decode [--models qwen3moe,llama] [--layers N] [--quant Q4_K_M] [--threads 2]

The models are models.build's bench size (real per-layer shapes of Qwen3-30B-A3B
and Mixtral-8x7B, random weights, few layers), quantized by llama.cpp's own
quantizer and cached in ~/.cache/localmoe/bench (the F16 intermediate is
deleted). Each side runs in a child process of its own (this script with
--worker) so that its peak RSS is its own; both mmap the file, and VmHWM counts
file-backed resident pages for both. One repetition = a greedy prefill of the
prompt into an empty cache (logits of the last token only, both sides) then
--decode single-token steps, each feeding back the argmax; an untimed
repetition with 2 steps comes first (numba compile/cache load, page faults).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import GB, print_table, read_bandwidth, stream_array, thread_counts

MODELS = {"qwen3moe": 4, "llama": 2}  # arch -> default layer count (llama = Mixtral-8x7B shapes)
TARGETS = {"prefill": 0.3, "decode": 0.5, "rss": 1.2}  # localmoe / llama.cpp: >= for speed, <= for memory
SIDES = ("localmoe", "llama.cpp")
PROMPT_TEXT = ("The history of the river valley begins with small farming villages that traded grain, salt "
               "and pottery with their neighbours upstream. ")
MARK = "RESULT "  # prefix of the worker's one JSON line on stdout


# ---- model files ------------------------------------------------------------------------------

def bench_file(arch: str, size: str, layers: int, quant: str, threads: int) -> Path:
    """SIZE ARCH with LAYERS blocks: F16 from models.build, else quantized by llama.cpp (cached)."""
    from localmoe.errors import LocalMoEError
    from models.build import build, cached_model, source_hash
    from models.vocab import cache_dir
    if quant == "F16":
        return cached_model(arch, size, "f16", layers=layers)
    ftype = llama_ftype(quant)
    d = cache_dir().parent / "bench"
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{arch}-{size}-L{layers}-{quant}"
    dst = d / f"{stem}-{source_hash()}.gguf"
    if dst.exists():
        return dst
    for old in d.glob(f"{stem}-*.gguf"):  # from an older builder source: would never be used again
        old.unlink()
    f16, tmp = d / f"{stem}.f16.partial", d / f"{stem}.partial"
    import llama_cpp
    try:
        print(f"building {f16.name} ...", file=sys.stderr, flush=True)
        build(arch, size, f16, "f16", layers=layers)
        print(f"quantizing to {dst.name} ...", file=sys.stderr, flush=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        with stdout_to_stderr():  # llama.cpp logs every tensor on C stdout; keep stdout for the table
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise LocalMoEError(f"llama_model_quantize({f16.name}, {quant}) returned {rc}")
        tmp.replace(dst)
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


@contextlib.contextmanager
def stdout_to_stderr():
    """Point file descriptor 1 at stderr for the block (C code writes there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def llama_ftype(quant: str) -> int:
    """llama.cpp's LLAMA_FTYPE_MOSTLY_<quant>, e.g. Q4_K_M -> 15."""
    import llama_cpp
    from localmoe.errors import LocalMoEError
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}", None)
    if ftype is None:
        raise LocalMoEError(f"--quant {quant}: llama.cpp has no LLAMA_FTYPE_MOSTLY_{quant}")
    return ftype


def prompt_tokens(path: Path, n: int) -> list[int]:
    """First n tokens (BOS as the vocab says) of PROMPT_TEXT repeated; the same ids go to both sides."""
    import localmoe
    tok = localmoe.load_tokenizer(path)
    text = PROMPT_TEXT
    while len(ids := tok.encode(text)) < n:
        text += PROMPT_TEXT
    return ids[:n]


# ---- one side, in its own process -----------------------------------------------------------

def localmoe_side(path: str, threads: int, n_ctx: int):
    """(prefill(ids) -> next id, step(id) -> next id) on a localmoe Model."""
    import localmoe
    m = localmoe.load(path, n_threads=threads, n_ctx=n_ctx)

    def prefill(ids):
        m.reset()
        return int(np.argmax(m.forward(ids, all_logits=False)[-1]))

    def step(tok):
        return int(np.argmax(m.forward([tok])[0]))
    return prefill, step


def llama_side(path: str, threads: int, n_ctx: int):
    """The same on llama_cpp.Llama: logits of the last token only, read from the context."""
    import llama_cpp
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def last():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def prefill(ids):
        llm.reset()  # eval() then drops the cache from position 0
        llm.eval(ids)
        return last()

    def step(tok):
        llm.eval([tok])
        return last()
    return prefill, step


def worker(side: str, path: str, threads: int, prompt: list[int], n_decode: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    prefill, step = (localmoe_side if side == "localmoe" else llama_side)(path, threads, len(prompt) + n_decode)
    load_s = time.perf_counter() - t0

    def once(n):
        t = time.perf_counter()
        toks = [prefill(prompt)]
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            toks.append(step(toks[-1]))
        return t_prefill, time.perf_counter() - t, toks

    once(2)
    runs = [once(n_decode) for _ in range(repeats)]
    return {"load_s": load_s, "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
            "tokens": runs[-1][2], **memory_kib()}


def memory_kib() -> dict:
    """This process's peak RSS (VmHWM) and its anonymous / file-backed split now, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0])
    return out


def run_worker(side: str, path: Path, a, prompt: list[int]) -> dict:
    """Run one side in a child process; {"error": ...} instead of raising when it fails."""
    cmd = [sys.executable, "-m", "benchmarks.decode", "--worker", side, "--model", str(path),
           "--threads", str(a.threads), "--decode", str(a.decode), "--repeats", str(a.repeats),
           "--tokens", ",".join(map(str, prompt))]
    print(f"running {side} on {path.name} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return {"error": f"exit status {p.returncode}: {tail}"}


# ---- the table --------------------------------------------------------------------------------

def rows_for(label: str, res: dict, roof_tps: float, a) -> list[list]:
    ours, ref = (res[s] for s in SIDES)

    def stat(r, key):
        if "error" in r:
            return None
        if key == "prefill":
            return a.prompt / statistics.median(r["prefill_s"])
        if key == "decode":
            return a.decode / statistics.median(r["decode_s"])
        if key == "roof":
            return 100 * stat(r, "decode") / roof_tps
        if key == "rss":
            return r["VmHWM"] / 1024
        if key == "anon":
            return r["RssAnon"] / 1024
        return r["load_s"]

    def row(name, key, target=None, higher=True):
        x, y = stat(ours, key), stat(ref, key)
        ratio = x / y if x is not None and y else None
        met = None if target is None else "n/a" if ratio is None else \
            "yes" if (ratio >= target if higher else ratio <= target) else "NO"
        goal = None if target is None else f"{'>=' if higher else '<='} {target}"
        return [label, name, x, y, ratio, goal, met]

    return [row(f"prefill tok/s ({a.prompt} tok)", "prefill", TARGETS["prefill"]),
            row(f"decode tok/s ({a.decode} tok)", "decode", TARGETS["decode"]),
            row(f"decode % of roof ({roof_tps:.1f} tok/s)", "roof"),
            row("peak RSS MiB (VmHWM)", "rss", TARGETS["rss"], higher=False),
            row("anon RSS MiB at exit", "anon"),
            row("load s (incl. imports)", "load")]


def bandwidth(a) -> float:
    """Read GB/s at --threads (_common.read_bandwidth over a fresh --stream-gib array)."""
    return read_bandwidth(stream_array(a.stream_gib), [a.threads])[a.threads]


def run_note(res: dict, a) -> str:
    """Per-repetition seconds (to judge noise), greedy agreement, failures."""
    parts = []
    for side, r in res.items():
        if "error" in r:
            parts.append(f"{side} FAILED: {r['error']}")
        else:
            parts.append(f"{side} s per rep: prefill " + " ".join(f"{t:.3g}" for t in r["prefill_s"])
                         + ", decode " + " ".join(f"{t:.3g}" for t in r["decode_s"]))
    if not any("error" in r for r in res.values()):
        t0, t1 = (res[side]["tokens"] for side in SIDES)
        agree = next((i for i, (x, y) in enumerate(zip(t0, t1)) if x != y), len(t0))
        parts.append(f"greedy ids equal for the first {agree} of {a.decode + 1}")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} "
                    "(llama = Mixtral-8x7B shapes)")
    ap.add_argument("--layers", type=int, default=None,
                    help="block count for every model (default: " +
                    ", ".join(f"{k} {v}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--size", default="bench", choices=("bench", "tiny"),
                    help="models.build size; tiny (seconds) only checks that the script runs")
    ap.add_argument("--quant", default="Q4_K_M", help="llama.cpp file type (Q4_K_M, Q8_0, ...) or F16")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (one prefill batch)")
    ap.add_argument("--decode", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; medians are shown")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="GiB array for the read-bandwidth roofline")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = worker(a.worker, a.model, a.threads, [int(t) for t in a.tokens.split(",")], a.decode, a.repeats)
        print(MARK + json.dumps(res), flush=True)
        return 0

    from localmoe.errors import LocalMoEError
    from localmoe.summary import summarize
    from models.archs import DEFAULT_VARIANT
    archs = [m for m in a.models.split(",") if m]
    bad = [m for m in archs if m not in MODELS]
    if bad or a.prompt < 1 or a.decode < 1 or a.repeats < 1 or (a.layers or 1) < 1:
        ap.error(f"unknown models {bad}" if bad else "--prompt/--decode/--repeats/--layers must be >= 1")
    thread_counts(str(a.threads))  # within numba's pool, else SystemExit with the range
    try:
        if a.quant != "F16":
            llama_ftype(a.quant)
        load0, bw0 = os.getloadavg()[0], bandwidth(a)
        runs, notes = [], []
        for arch in archs:
            layers = a.layers or MODELS[arch]
            path = bench_file(arch, a.size, layers, a.quant, a.threads)
            s = summarize(path)
            bpt = s["decode"]["bytes_per_token"]
            prompt = prompt_tokens(path, a.prompt)
            res = {side: run_worker(side, path, a, prompt) for side in SIDES}
            label = f"{arch}-{DEFAULT_VARIANT[arch]} {a.size} L{layers} {a.quant}"
            runs.append((label, res, bpt))
            notes.append(f"{label}: {path.name}, {s['file_bytes'] / GB:.2f} GB, {bpt / 1e6:.1f} MB read per "
                         f"decoded token (localmoe.summary); " + run_note(res, a))
        bw1 = bandwidth(a)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bw = max(bw0, bw1)  # other load only lowers a measured bandwidth
    table = [row for label, res, bpt in runs for row in rows_for(label, res, bw * GB / bpt, a)]
    print(f"threads {a.threads}; medians of {a.repeats} repetitions after 1 untimed; roof read bandwidth "
          f"{bw:.1f} GB/s = max of {bw0:.1f} before and {bw1:.1f} after ({a.threads} threads, median of 5 "
          f"passes over {a.stream_gib:g} GiB each); load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print_table(["model", "metric", "localmoe", "llama.cpp", "ratio", "target", "met"], table)
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

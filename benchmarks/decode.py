"""Whole-model prefill and decode speed and peak memory: localmoe beside llama.cpp, same GGUF, same threads.

    python -m benchmarks.decode [--models qwen3moe,llama,shipped,qwen3moe:24] [--prompts 128,512,2048]
                                [--positions 128,2048,4096] [--quant Q4_K_M] [--threads 2]

A model is ARCH (a bench file of models.build: real per-layer shapes of
Qwen3-30B-A3B (qwen3moe) or Mixtral-8x7B (llama), random weights, few layers),
ARCH:N (the same with N layers), `shipped` (localmoe's packaged model) or a path
to a .gguf file. Bench files are quantized by llama.cpp's own quantizer and
cached in ~/.cache/localmoe/bench (the F16 intermediate is deleted). Each side
runs in a child process of its own (this script with --worker) so that its peak
RSS is its own; both mmap the file, and VmHWM counts file-backed resident pages
for both. One repetition, for each length L of --prompts and --positions in
increasing order: a greedy prefill of the first L prompt tokens into an empty
cache (logits of the last token only, both sides), timed when L is a prompt
length; then, when L is a position, --decode single-token steps, each feeding
back the argmax. A position that is no prompt length is reached by appending
prompt tokens to what the cache already holds (untimed) where it can. An untimed
pass (the shortest length, 2 steps) comes first: numba compile/cache load, page
faults. Lengths past a model's training context are skipped for that model.
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
SHIPPED = "shipped"
DEFAULT_MODELS = "qwen3moe,llama,shipped,qwen3moe:24"
# localmoe / llama.cpp: >= for speed, <= for memory (issue 18: the shipped model's speed at 0.8x)
TARGETS = {"speed": 1.0, "speed_shipped": 0.8, "rss": 1.2}
SIDES = ("localmoe", "llama.cpp")
PROMPT_TEXT = ("The history of the river valley begins with small farming villages that traded grain, salt "
               "and pottery with their neighbours upstream. ")
MARK = "RESULT "  # prefix of the worker's one JSON line on stdout


# ---- model files ------------------------------------------------------------------------------

def parse_models(spec: str, layers: int | None) -> list[tuple[str, str, int | None]]:
    """'qwen3moe,llama:8,shipped,x.gguf' -> [(kind, arch or path, layers)]; ValueError when unknown."""
    out = []
    for item in (m.strip() for m in spec.split(",")):
        if not item:
            continue
        if item == SHIPPED:
            out.append(("shipped", item, None))
        elif item.endswith(".gguf"):
            out.append(("file", item, None))
        else:
            arch, _, n = item.partition(":")
            if arch not in MODELS or (n and not (n.isdigit() and int(n) >= 1)):
                raise ValueError(f"unknown model {item!r}: use ARCH or ARCH:LAYERS (ARCH one of "
                                 f"{', '.join(MODELS)}), {SHIPPED}, or a .gguf path")
            out.append(("bench", arch, int(n) if n else layers or MODELS[arch]))
    return out


def model_file(kind: str, name: str, layers: int | None, a) -> tuple[Path, str]:
    """(path, table label) of one --models entry, building a bench file when needed."""
    from localmoe.errors import LocalMoEError
    from models.archs import DEFAULT_VARIANT
    if kind == "shipped":
        from localmoe.shipped import default_model_path
        path = default_model_path()
        return path, f"shipped {path.name}"
    if kind == "file":
        path = Path(name).expanduser()
        if not path.is_file():
            raise LocalMoEError(f"--models: no file {path}")
        return path, path.name
    return (bench_file(name, a.size, layers, a.quant, a.threads),
            f"{name}-{DEFAULT_VARIANT[name]} {a.size} L{layers} {a.quant}")


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
    text = PROMPT_TEXT * (n // max(1, len(tok.encode(PROMPT_TEXT))) + 1)
    while len(ids := tok.encode(text)) < n:
        text += text
    return ids[:n]


# ---- one side, in its own process -----------------------------------------------------------

def localmoe_side(path: str, threads: int, n_ctx: int):
    """(prefill(ids) -> next id from an empty cache, extend(ids) -> next id, step(id) -> next id)."""
    import localmoe
    m = localmoe.load(path, n_threads=threads, n_ctx=n_ctx)

    def extend(ids):
        return int(np.argmax(m.forward(ids, all_logits=False)[-1]))

    def prefill(ids):
        m.reset()
        return extend(ids)

    def step(tok):
        return int(np.argmax(m.forward([tok])[0]))
    return prefill, extend, step


def llama_side(path: str, threads: int, n_ctx: int):
    """The same on llama_cpp.Llama: logits of the last token only, read from the context."""
    import llama_cpp
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def last():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def extend(ids):
        llm.eval(ids)  # appends after the tokens already evaluated
        return last()

    def prefill(ids):
        llm.reset()  # eval() then drops the cache from position 0
        return extend(ids)

    def step(tok):
        llm.eval([tok])
        return last()
    return prefill, extend, step


def n_ctx_for(prompts: list[int], positions: list[int], n_decode: int) -> int:
    return max(prompts + [p + n_decode for p in positions])


def worker(side: str, job: dict) -> dict:
    """Run job's schedule (see the module docstring) on one side; seconds per repetition and length."""
    ids, prompts, positions, n = job["tokens"], job["prompts"], job["positions"], job["decode"]
    t0 = time.perf_counter()
    prefill, extend, step = (localmoe_side if side == "localmoe" else llama_side)(
        job["path"], job["threads"], n_ctx_for(prompts, positions, n))
    load_s = time.perf_counter() - t0

    def decode(tok, steps):
        toks = [tok]
        for _ in range(steps):
            toks.append(step(toks[-1]))
        return toks

    def once():
        rep, tokens, cached = {"prefill": {}, "decode": {}}, None, None  # cached: tokens in the cache
        for length in sorted(set(prompts) | set(positions)):
            t = time.perf_counter()
            if length in prompts or cached is None or length <= cached:
                tok = prefill(ids[:length])
            else:  # a position only: append the prompt's next tokens rather than prefill from 0 again
                tok = extend(ids[cached:length])
            cached = length
            if length in prompts:
                rep["prefill"][length] = time.perf_counter() - t
            if length in positions:
                t = time.perf_counter()
                toks = decode(tok, n)
                rep["decode"][length] = time.perf_counter() - t
                cached += n
                tokens = tokens or toks
        return rep, tokens

    decode(prefill(ids[:min(prompts + positions)]), 2)
    runs = [once() for _ in range(job["repeats"])]
    return {"load_s": load_s, "prefill_s": {p: [r["prefill"][p] for r, _ in runs] for p in prompts},
            "decode_s": {p: [r["decode"][p] for r, _ in runs] for p in positions},
            "tokens": runs[-1][1], **memory_kib()}


def memory_kib() -> dict:
    """This process's peak RSS (VmHWM) and its anonymous / file-backed split now, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0])
    return out


def run_worker(side: str, job: dict, timeout: float) -> dict:
    """Run one side in a child process; {"error": ...} instead of raising when it fails."""
    cmd = [sys.executable, "-m", "benchmarks.decode", "--worker", side]
    print(f"running {side} on {Path(job['path']).name} ...", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --worker-timeout {timeout:g} s"}
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            for key in ("prefill_s", "decode_s"):  # JSON made the lengths strings
                res[key] = {int(k): v for k, v in res[key].items()}
            return res
    tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return {"error": f"exit status {p.returncode}: {tail}"}


# ---- the table --------------------------------------------------------------------------------

def rows_for(label: str, res: dict, job: dict, roof_tps: float, speed_target: float) -> list[list]:
    ours, ref = (res[s] for s in SIDES)
    n = job["decode"]

    def stat(r, key, length=None):
        if "error" in r:
            return None
        if key == "prefill":
            return length / statistics.median(r["prefill_s"][length])
        if key == "decode":
            return n / statistics.median(r["decode_s"][length])
        if key == "roof":
            return 100 * stat(r, "decode", length) / roof_tps
        if key == "rss":
            return r["VmHWM"] / 1024
        if key == "anon":
            return r["RssAnon"] / 1024
        return r["load_s"]

    def row(name, key, length=None, target=None, higher=True):
        x, y = stat(ours, key, length), stat(ref, key, length)
        ratio = x / y if x is not None and y else None
        met = None if target is None else "n/a" if ratio is None else \
            "yes" if (ratio >= target if higher else ratio <= target) else "NO"
        goal = None if target is None else f"{'>=' if higher else '<='} {target}"
        return [label, name, x, y, ratio, goal, met]

    rows = [row(f"prefill tok/s ({p} tok)", "prefill", p, speed_target) for p in job["prompts"]]
    rows += [row(f"decode tok/s at pos {p} ({n} tok)", "decode", p, speed_target) for p in job["positions"]]
    if job["positions"]:
        p = job["positions"][0]
        rows.append(row(f"decode % of roof at pos {p} ({roof_tps:.1f} tok/s)", "roof", p))
    n_ctx = n_ctx_for(job["prompts"], job["positions"], n)
    return rows + [row(f"peak RSS MiB (VmHWM, n_ctx {n_ctx})", "rss", target=TARGETS["rss"], higher=False),
                   row("anon RSS MiB at exit", "anon"),
                   row("load s (incl. imports)", "load")]


def bandwidth(a) -> float:
    """Read GB/s at --threads (_common.read_bandwidth over a fresh --stream-gib array)."""
    return read_bandwidth(stream_array(a.stream_gib), [a.threads])[a.threads]


def run_note(res: dict, job: dict) -> str:
    """Per-repetition seconds (to judge noise), greedy agreement, failures."""
    parts = []
    for side, r in res.items():
        if "error" in r:
            parts.append(f"{side} FAILED: {r['error']}")
            continue
        times = [f"prefill {p}: " + " ".join(f"{t:.3g}" for t in ts) for p, ts in r["prefill_s"].items()]
        times += [f"decode at {p}: " + " ".join(f"{t:.3g}" for t in ts) for p, ts in r["decode_s"].items()]
        parts.append(f"{side} s per rep: " + ", ".join(times))
    if not any("error" in r for r in res.values()) and job["positions"]:
        t0, t1 = (res[side]["tokens"] for side in SIDES)
        agree = next((i for i, (x, y) in enumerate(zip(t0, t1)) if x != y), len(t0))
        parts.append(f"greedy ids at pos {job['positions'][0]} equal for the first {agree} of {job['decode'] + 1}")
    return "; ".join(parts)


def lengths(spec: str, name: str) -> list[int]:
    """'128,512' -> [128, 512] (sorted, unique); ValueError unless every entry is an integer >= 1."""
    try:
        out = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{name} takes comma-separated token counts, got {spec!r}") from None
    if any(x < 1 for x in out):
        raise ValueError(f"{name} entries must be >= 1, got {spec!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma list of ARCH or ARCH:LAYERS (ARCH: {', '.join(MODELS)}; llama = Mixtral-8x7B "
                    f"shapes), {SHIPPED} (the packaged model) or a .gguf path (default {DEFAULT_MODELS})")
    ap.add_argument("--layers", type=int, default=None,
                    help="block count for every ARCH given without :LAYERS (default: " +
                    ", ".join(f"{k} {v}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--size", default="bench", choices=("bench", "tiny"),
                    help="models.build size; tiny (seconds) only checks that the script runs")
    ap.add_argument("--quant", default="Q4_K_M", help="llama.cpp file type (Q4_K_M, Q8_0, ...) or F16 "
                    "for the bench files")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--prompts", "--prompt", default="128,512,2048",
                    help="prompt lengths whose prefill is timed, comma list (one prefill call each)")
    ap.add_argument("--positions", default="128,2048,4096",
                    help="cache lengths at which --decode steps are timed, comma list ('' for none)")
    ap.add_argument("--decode", type=int, default=64, help="decode steps per position and repetition")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; medians are shown")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="GiB array for the read-bandwidth roofline")
    ap.add_argument("--worker-timeout", type=float, default=7200, help="seconds for one side on one model")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = worker(a.worker, json.load(sys.stdin))
        print(MARK + json.dumps(res), flush=True)
        return 0

    from localmoe.errors import LocalMoEError
    from localmoe.summary import summarize
    try:
        models = parse_models(a.models, a.layers)
        prompts, positions = lengths(a.prompts, "--prompts"), lengths(a.positions, "--positions")
    except ValueError as e:
        ap.error(str(e))
    if not models or not (prompts or positions):
        ap.error("nothing to run: give --models and at least one --prompts or --positions length")
    if a.decode < 1 or a.repeats < 1 or (a.layers or 1) < 1 or a.stream_gib <= 0:
        ap.error("--decode/--repeats/--layers must be >= 1 and --stream-gib > 0")
    thread_counts(str(a.threads))  # within numba's pool, else SystemExit with the range
    try:
        if a.quant != "F16":
            llama_ftype(a.quant)
        load0, bw0 = os.getloadavg()[0], bandwidth(a)
        runs, notes = [], []
        for kind, name, layers in models:
            path, label = model_file(kind, name, layers, a)
            s = summarize(path)
            bpt = s["decode"]["bytes_per_token"]
            n_train = s["hyperparameters"].get("context_length") or float("inf")
            job = {"path": str(path), "threads": a.threads, "decode": a.decode, "repeats": a.repeats,
                   "prompts": [p for p in prompts if p <= n_train],
                   "positions": [p for p in positions if p + a.decode <= n_train]}
            skipped = [p for p in prompts if p not in job["prompts"]] + \
                [p for p in positions if p not in job["positions"]]
            note = f"{label}: {path.name}, {s['file_bytes'] / GB:.2f} GB, {bpt / 1e6:.1f} MB read per decoded " \
                   f"token (localmoe.summary)"
            if skipped:
                note += f"; skipped lengths {sorted(set(skipped))} (past the training context {n_train})"
            if not (job["prompts"] or job["positions"]):
                notes.append(note + "; nothing left to run")
                continue
            job["tokens"] = prompt_tokens(path, n_ctx_for(job["prompts"], job["positions"], 0))
            res = {side: run_worker(side, job, a.worker_timeout) for side in SIDES}
            target = TARGETS["speed_shipped" if kind == "shipped" else "speed"]
            runs.append((label, res, job, bpt, target))
            notes.append(note + "; " + run_note(res, job))
        bw1 = bandwidth(a)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bw = max(bw0, bw1)  # other load only lowers a measured bandwidth
    table = [row for label, res, job, bpt, target in runs
             for row in rows_for(label, res, job, bw * GB / bpt, target)]
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

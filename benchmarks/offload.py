"""Running MoE models larger than memory: localmoe's planner beside llama.cpp's mmap.

  python -m benchmarks.offload build                 # bench-size olmoe (8 layers), Q4_K_M by llama.cpp
  python -m benchmarks.offload run [--limit SIZE]    # both engines, same cgroup memory limit
  python -m benchmarks.offload policies              # LRU vs LFU-with-decay hit rates on routing traces

`run` puts each engine in its own process inside a fresh child memory cgroup
(v1 memory.limit_in_bytes or v2 memory.max; both charge the page cache, so
llama.cpp's mmap gets no memory for free), drops the page cache before each
run (/proc/sys/vm/drop_caches, else POSIX_FADV_DONTNEED on the model file; the
report says which), and teacher-forces the same token sequence through both
(prompt, warm-up steps, then timed one-token steps). Bytes read from disk come
from /proc/self/io read_bytes over the timed steps; peak RSS from VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARCH, LAYERS = "olmoe", 8      # 64 experts, 8 active: experts are ~90% of the file
FTYPE = "Q4_K_M"
OVERHEAD = 160 << 20           # the localmoe process beyond its plan: Python, numpy, numba, compiled kernels, their page cache
TEXT = ("The history of the printing press begins with movable type in East Asia and continues with "
        "Gutenberg's press in Mainz, which spread across Europe within a few decades and changed how "
        "knowledge, religion and politics moved between cities, universities and ordinary readers. ")


# --- the model ----------------------------------------------------------------------

def bench_model(arch: str = ARCH, layers: int = LAYERS) -> Path:
    """Random-weight bench-size model quantized by llama.cpp (cached beside the F16 build)."""
    import llama_cpp

    from models.build import cached_model
    src = cached_model(arch, "bench", "f16", layers=layers)
    dst = src.with_name(f"{src.stem}-{FTYPE}.gguf")
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        tmp = dst.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {src}")
        tmp.replace(dst)
    return dst


def token_ids(path: Path, n: int) -> list[int]:
    """n ids of TEXT (repeated) by the model's own tokenizer."""
    from localmoe.gguf_file import open_gguf
    from localmoe.tokenizer import Tokenizer
    with open_gguf(path) as gf:
        ids = Tokenizer.from_gguf(gf.metadata).encode(TEXT * (1 + n // 20), add_special=False)
    return ids[:n]


# --- one engine in one process (runs inside the cgroup) ----------------------------------

def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def worker(a) -> dict:
    if a.omp_passive:  # before llama.cpp's OpenMP starts; localmoe's load(ram_budget=) sets it itself
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    ids = token_ids(Path(a.model), a.n_prompt + a.n_warmup + a.n_decode)
    prompt, warm, timed = ids[:a.n_prompt], ids[a.n_prompt:a.n_prompt + a.n_warmup], ids[a.n_prompt + a.n_warmup:]
    t_load = time.perf_counter()
    if a.engine == "localmoe":
        from localmoe.model import load
        m = load(a.model, n_threads=a.threads, n_ctx=a.n_ctx, ram_budget=a.budget, policy=a.policy,
                 prefetch=not a.no_prefetch)
        step = lambda t: m.forward([t], all_logits=False)  # noqa: E731
        m.forward(prompt, all_logits=False)
    else:
        import llama_cpp
        if a.no_repack:  # keep weights in the mmap instead of repacked copies in anonymous memory
            default = llama_cpp.llama_cpp.llama_model_default_params

            def no_extra_bufts():
                p = default()
                p.use_extra_bufts = False
                return p
            llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
        m = llama_cpp.Llama(a.model, n_ctx=a.n_ctx, n_threads=a.threads, use_mmap=True, verbose=False)
        step = lambda t: m.eval([t])  # noqa: E731
        m.eval(prompt)
    t_load = time.perf_counter() - t_load
    for t in warm:
        step(t)
    if a.engine == "localmoe":
        m.store.reset_stats()
    io0, times = _read_bytes(), []
    for t in timed:
        t0 = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - t0)
    out = {"engine": a.engine, "load_and_prompt_s": t_load, "n_decode": len(timed),
           "decode_tok_s": len(timed) / sum(times), "median_step_s": statistics.median(times),
           "read_bytes_per_token": (_read_bytes() - io0) / len(timed), "peak_rss": _vm_hwm()}
    if a.engine == "localmoe":
        c = m.store.stats()["cache"]
        out.update(hit_rate=c["hit_rate"], prefetch_accuracy=c["prefetch_accuracy"],
                   expert_bytes_per_token=c["bytes_read"] / len(timed), plan_bytes=m.plan.resident_bytes)
        m.close()
    return out


# --- cgroup and page cache --------------------------------------------------------------

class MemoryCgroup:
    """A child memory cgroup of our own, limited to `limit` bytes; removed on exit."""

    def __init__(self, limit: int):
        self.limit = limit
        mine = {}  # controller -> our cgroup path; "" is the v2 hierarchy
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                mine[c] = path.lstrip("/")
        name = f"localmoe-offload-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/memory")
        if "memory" in mine and (v1 / "memory.limit_in_bytes").exists():
            self.version, self.dir = 1, v1 / mine["memory"] / name
            self.limit_file, self.peak_file = "memory.limit_in_bytes", "memory.max_usage_in_bytes"
        else:
            self.version, self.dir = 2, Path("/sys/fs/cgroup") / mine.get("", "") / name
            self.limit_file, self.peak_file = "memory.max", "memory.peak"

    def __enter__(self):
        self.dir.mkdir()
        (self.dir / self.limit_file).write_text(str(self.limit))
        return self

    def add_self(self) -> None:  # preexec_fn of the worker: it and all it maps are charged here
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.dir / self.peak_file).read_text())

    def __exit__(self, *exc):
        if self.version == 1:
            (self.dir / "memory.force_empty").write_text("0")
        self.dir.rmdir()


def drop_page_cache(path: Path) -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return "fadvise(DONTNEED) on the model file"


def run(a) -> None:
    from localmoe.planner import format_size, parse_size
    model = bench_model()
    size = model.stat().st_size
    limit = parse_size(a.limit) if a.limit else int(size / 2.5)
    budget = limit - OVERHEAD
    print(f"model {model.name}: {format_size(size)}; memory limit {format_size(limit)} "
          f"({size / limit:.2f}x smaller than the file); localmoe --ram-budget {format_size(budget)} "
          f"(limit - {format_size(OVERHEAD)} stated process overhead)", flush=True)
    common = ["--model", str(model), "--threads", str(a.threads), "--n-ctx", str(a.n_ctx),
              "--n-prompt", str(a.n_prompt), "--n-warmup", str(a.n_warmup), "--n-decode", str(a.n_decode)]
    lm = ["--engine", "localmoe", "--budget", str(budget), "--policy", a.policy]
    configs = [("localmoe", lm), ("localmoe, no prefetch", lm + ["--no-prefetch"]),
               ("llama.cpp (mmap)", ["--engine", "llama.cpp"]),
               ("llama.cpp (mmap, no repack)", ["--engine", "llama.cpp", "--no-repack"]),
               ("llama.cpp (mmap, no repack, OMP_WAIT_POLICY=PASSIVE)",
                ["--engine", "llama.cpp", "--no-repack", "--omp-passive"])]
    rows = []
    for label, extra in configs:
        how = drop_page_cache(model)
        t0 = time.perf_counter()
        with MemoryCgroup(limit) as cg:
            p = subprocess.run([sys.executable, "-m", "benchmarks.offload", "worker", *common, *extra],
                               capture_output=True, text=True, preexec_fn=cg.add_self)
            peak = cg.peak()
        if p.returncode != 0:
            rows.append({"engine": label, "failed": f"exit {p.returncode}" + (" (OOM kill)" if p.returncode == -9 else "")})
            print(f"{label}: {rows[-1]['failed']}\n{p.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r.update(engine=label, cgroup_peak=peak, page_cache_drop=how, wall_s=time.perf_counter() - t0)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(table(rows, limit))
    for r in rows:
        if "plan_bytes" in r:
            ok = "within" if r["peak_rss"] <= budget + OVERHEAD else "ABOVE"
            print(f"{r['engine']}: peak RSS {format_size(r['peak_rss'])} is {ok} the budget {format_size(budget)} "
                  f"+ the stated overhead {format_size(OVERHEAD)} (plan: {format_size(r['plan_bytes'])})")


def table(rows, limit) -> str:
    from localmoe.planner import format_size as fs

    def pct(x):
        return "-" if x is None else f"{x:.1%}"
    out = ["| engine | decode tok/s | disk read / token | hit rate | prefetch accuracy | peak RSS | "
           f"cgroup peak (limit {fs(limit)}) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['engine']} | {r['failed']} | | | | | |")
            continue
        out.append(f"| {r['engine']} | {r['decode_tok_s']:.2f} | {fs(r['read_bytes_per_token'])} | "
                   f"{pct(r.get('hit_rate'))} | {pct(r.get('prefetch_accuracy'))} | {fs(r['peak_rss'])} | "
                   f"{fs(r['cgroup_peak'])} |")
    return "\n".join(out)


# --- cache policies on routing traces ----------------------------------------------------

def synthetic(kind: str, n_expert: int, k: int, n_steps: int, rng) -> np.ndarray:
    """i32[n_steps, k] distinct experts per step: uniform, zipf-S (popularity ~ 1/rank^S over a
    random order) or sticky (half the steps repeat the previous step's choice)."""
    p = None
    if kind.startswith("zipf"):
        p = 1.0 / np.arange(1, n_expert + 1) ** float(kind[4:])
        p = p[rng.permutation(n_expert)] / p.sum()
    out = np.empty((n_steps, k), np.int32)
    for i in range(n_steps):
        if kind == "sticky" and i and rng.random() < 0.5:
            out[i] = out[i - 1]
        else:
            out[i] = rng.choice(n_expert, k, replace=False, p=p)
    return out


def real_traces(path: Path, n_tokens: int) -> tuple[int, list[np.ndarray]]:
    """(n_expert, per MoE layer i32[n_tokens, k]): the routing of TEXT decoded one token at a time."""
    from localmoe.model import load
    m = load(path, n_ctx=n_tokens)
    seen: dict[int, list] = {}
    note = m.store.note_selected

    def spy(layer, ids):
        seen.setdefault(layer, []).append(ids[0].copy())
        note(layer, ids)
    m.store.note_selected = spy
    for t in token_ids(path, n_tokens):
        m._hidden(np.array([t]))  # the blocks only: routing does not need the output head
    return m.args.n_expert, [np.stack(v) for _, v in sorted(seen.items())]


def hit_rate(trace: np.ndarray, policy: str, capacity: int, n_expert: int) -> float:
    """Selections found cached by a capacity-slot cache under `policy` (as the store evicts:
    experts of the current step go last)."""
    from localmoe.planner.policy import make_policy
    pol, cached, hits = make_policy(policy, n_expert), set(), 0
    for ids in trace:
        now = set(ids.tolist())
        hits += len(now & cached)
        pol.update(ids)
        for e in now - cached:
            if len(cached) >= capacity:
                cached.remove(min(cached - now or cached, key=lambda x: pol.score[x]))
            cached.add(e)
    return hits / trace.size


def policies(a) -> None:
    from models.build import cached_model
    rng = np.random.default_rng(0)
    cases = []
    models = [("olmoe bench-L8 Q4_K_M", bench_model())]
    models += [(f"{arch} {size}", cached_model(arch, size, "f16"))
               for arch, size in (("qwen3moe", "bench"), ("olmoe", "tiny"), ("deepseek2", "tiny"), ("llama", "tiny"))]
    for name, path in models:
        n_expert, traces = real_traces(path, a.tokens)
        for il, tr in enumerate(traces):
            cases.append((f"{name} layer {il} (real)", tr, n_expert))
    for n_expert, k in ((8, 2), (64, 8), (128, 8)):
        for kind in ("uniform", "zipf0.8", "zipf1.2", "sticky"):
            cases.append((f"{kind} {n_expert}x{k}", synthetic(kind, n_expert, k, a.tokens, rng), n_expert))
    print(f"| trace ({a.tokens} steps) | experts | slots | LRU hit | LFU-decay hit |\n|---|---|---|---|---|")
    for name, tr, n_expert in cases:
        for frac in (0.25, 0.5):
            cap = max(tr.shape[1], int(frac * n_expert))
            lru, lfu = (hit_rate(tr, p, cap, n_expert) for p in ("lru", "lfu"))
            print(f"| {name} | {n_expert} | {cap} | {lru:.1%} | {lfu:.1%} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("--limit", help="cgroup memory limit (default: model file size / 2.5)")
    for p in (r, w := sub.add_parser("worker")):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--n-ctx", type=int, default=256)
        p.add_argument("--n-prompt", type=int, default=16)
        p.add_argument("--n-warmup", type=int, default=4)
        p.add_argument("--n-decode", type=int, default=32)
        p.add_argument("--policy", default="lfu")
    w.add_argument("--engine", choices=["localmoe", "llama.cpp"], required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--budget")
    w.add_argument("--no-prefetch", action="store_true")
    w.add_argument("--no-repack", action="store_true")
    w.add_argument("--omp-passive", action="store_true", help="llama.cpp: OMP_WAIT_POLICY=PASSIVE, as localmoe sets")
    pol = sub.add_parser("policies")
    pol.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        print(bench_model())
    elif a.cmd == "run":
        run(a)
    elif a.cmd == "worker":
        print(json.dumps(worker(a)))
    else:
        policies(a)


if __name__ == "__main__":
    main()

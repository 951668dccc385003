"""The GPU tier: decode and prefill tok/s at --gpu-budget 0/25/50/100% of the expert bytes,
beside llama.cpp built with CUDA on the same file.

    python -m benchmarks.gpu --llama-bench /path/to/llama-bench [--layers 4] [--quant Q4_K_M]

Needs a CUDA GPU: it refuses to run on numba-cuda's simulator or without a device (a
simulated or absent GPU has no speed to report). The model is benchmarks.decode's
bench-size Qwen3-30B-A3B (real per-layer shapes, random weights, --layers blocks),
quantized by llama.cpp.

localmoe: each budget in its own child process, `load(gpu_budget="N%")`, a greedy
prefill of --prompt tokens then --decode single-token steps, medians of --repeats after
one untimed repetition. The expert slots per layer and the VRAM planned are printed.

llama.cpp: `llama-bench` from a build with -DGGML_CUDA=on (CMAKE_ARGS for llama-cpp-python
builds only the library; build llama.cpp's tools), -ngl 99 (every layer on the GPU) and
  0%:   -ot exps=CPU          every expert tensor in host memory, computed by the CPU
  N%:   --n-cpu-moe round(L * (1 - N/100))   the experts of the first layers on the CPU
  100%: no override
so each row compares the same share of expert bytes in VRAM. Without --llama-bench the
llama.cpp columns are left empty (the table says so).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

SHARES = (0, 25, 50, 100)
MARK = "RESULT "


def refuse_without_gpu() -> str:
    """The GPU's name, or SystemExit with the reason there is none to measure on."""
    from localmoe.errors import LocalMoEError
    from localmoe.gpu.device import cuda, simulated
    if simulated():
        raise SystemExit("error: NUMBA_ENABLE_CUDASIM is set: the simulator has no speed to measure; "
                         "run benchmarks.gpu on a machine with a CUDA GPU")
    try:
        dev = cuda().get_current_device()
    except LocalMoEError as e:
        raise SystemExit(f"error: benchmarks.gpu needs a CUDA GPU: {e}") from None
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return f"{name} (compute capability {'.'.join(map(str, dev.compute_capability))})"


def worker(path: str, share: int, prompt: list[int], n_decode: int, repeats: int) -> dict:
    import time

    import localmoe
    m = localmoe.load(path, n_ctx=len(prompt) + n_decode + 1, gpu_budget=f"{share}%")
    sync = m.gpu.cuda.synchronize

    def once(n):
        t = time.perf_counter()
        m.reset()
        toks = [int(np.argmax(m.forward(prompt, all_logits=False)[-1]))]
        sync()
        t_pre = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            toks.append(int(np.argmax(m.forward([toks[-1]])[0])))
        sync()
        return t_pre, time.perf_counter() - t, toks

    once(2)
    runs = [once(n_decode) for _ in range(repeats)]
    st = m.gpu.stats()
    m.close()
    return {"prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs], "tokens": runs[-1][2],
            "vram_bytes": st["gpu_plan"]["total_bytes"], "slots": st["gpu_plan"]["slots"],
            "gpu_pairs": st["gpu_pairs"], "cpu_pairs": st["cpu_pairs"], "moves": st["gpu_expert_moves"]}


def run_worker(path: Path, share: int, a, prompt: list[int]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--worker", str(share), "--model", str(path),
           "--decode", str(a.decode), "--repeats", str(a.repeats), "--tokens", ",".join(map(str, prompt))]
    print(f"localmoe at {share}% ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                       timeout=a.timeout)
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return {"error": tail}


def llama_bench(a, path: Path, share: int, n_layer: int) -> dict:
    """{"prefill": tok/s, "decode": tok/s, "args": ...} from llama-bench's JSON, or {"error": ...}."""
    if share == 0:
        extra = ["-ot", "exps=CPU"]
    elif share == 100:
        extra = []
    else:
        extra = ["--n-cpu-moe", str(round(n_layer * (1 - share / 100)))]
    cmd = [a.llama_bench, "-m", str(path), "-ngl", "99", "-p", str(a.prompt), "-n", str(a.decode),
           "-r", str(a.repeats), "-o", "json", *extra]
    print("llama.cpp: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        rows = json.loads(p.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    out = {"args": " ".join(extra) or "(all on GPU)"}
    for r in rows:
        out["prefill" if r.get("n_prompt") else "decode"] = float(r["avg_ts"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", default=None, help="llama-bench built with -DGGML_CUDA=on")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the bench-size qwen3moe")
    ap.add_argument("--quant", default="Q4_K_M", help="llama.cpp file type")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shares", default=",".join(map(str, SHARES)), help="GPU budgets, % of expert bytes")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gpu = refuse_without_gpu()
    if a.worker is not None:
        res = worker(a.model, a.worker, [int(t) for t in a.tokens.split(",")], a.decode, a.repeats)
        print(MARK + json.dumps(res), flush=True)
        return 0

    from benchmarks._common import print_table
    from benchmarks.decode import bench_file, prompt_tokens
    shares = [int(s) for s in a.shares.split(",") if s]
    path = bench_file("qwen3moe", "bench", a.layers, a.quant, 4)
    prompt = prompt_tokens(path, a.prompt)
    table, notes = [], [f"GPU: {gpu}; model {path.name}"]
    for share in shares:
        ours = run_worker(path, share, a, prompt)
        ref = llama_bench(a, path, share, a.layers) if a.llama_bench else {"error": "no --llama-bench"}
        for metric, n in (("prefill", a.prompt), ("decode", a.decode)):
            x = None if "error" in ours else n / statistics.median(ours[f"{metric}_s"])
            y = ref.get(metric)
            table.append([f"{share}%", f"{metric} tok/s", x, y, x / y if x and y else None])
        notes.append(f"{share}%: localmoe " + (ours["error"] if "error" in ours else
                     f"VRAM {ours['vram_bytes'] / 2**20:.0f} MiB, slots {ours['slots']}, pairs on GPU "
                     f"{ours['gpu_pairs']} / CPU {ours['cpu_pairs']}, moves {ours['moves']}")
                     + f"; llama.cpp {ref.get('args', ref.get('error'))}")
    print_table(["GPU budget", "metric", "localmoe", "llama.cpp", "ratio"], table)
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

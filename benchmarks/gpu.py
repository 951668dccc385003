"""The GPU tier: decode and prefill tok/s at --gpu-budget 0/25/50/100% of the expert bytes,
beside llama.cpp built with CUDA on the same file.

    python -m benchmarks.gpu --llama-bench /path/to/llama-bench [--layers 4] [--quant Q4_K_M]

Needs a CUDA GPU: it refuses to run on numba-cuda's simulator or without a device (a
simulated or absent GPU has no speed to report). The model is models.build's bench-size
Qwen3-30B-A3B (real per-layer shapes, random weights, --layers blocks), quantized by
localmoe's quantizer (byte-identical to llama.cpp's), cached beside the F16 build.

localmoe: one child process loads the model at each budget in turn, `load(gpu_budget="N%")`,
and times a greedy prefill of --prompt tokens then --decode single-token steps, medians
of --repeats after one untimed repetition (kernels compile in the first). The expert
slots per layer and the VRAM planned are printed.

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


def bench_model(layers: int, quant: str) -> Path:
    """Bench-size qwen3moe with LAYERS blocks, quantized to QUANT by localmoe's quantizer (its
    output is byte-identical to llama_model_quantize's, and it needs no llama.cpp build), cached."""
    from localmoe.quantizer import quantize
    from models.build import cached_model
    src = cached_model("qwen3moe", "bench", "f16", layers=layers)
    dst = src.with_name(f"{src.stem}-{quant}.gguf")
    if not dst.exists():
        print(f"quantizing {src.name} to {quant} ...", file=sys.stderr, flush=True)
        quantize(src, dst, quant, progress=False)
    return dst


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


def measure(path: str, share: int, prompt: list[int], n_decode: int, repeats: int) -> dict:
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


def worker(path: str, shares: list[int], prompt: list[int], n_decode: int, repeats: int) -> None:
    """Every share in this one process (the kernels compile once), one RESULT line each."""
    import gc
    for share in shares:
        try:
            res = measure(path, share, prompt, n_decode, repeats)
        except Exception as e:  # reported in the table, the other shares still run
            res = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()  # the closed model's device arrays go before the next one's
        print(MARK + json.dumps({"share": share, **res}), flush=True)


def run_worker(path: Path, shares: list[int], a, prompt: list[int]) -> dict:
    """{share: result} from one child process (its own CUDA context, freed at exit)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--worker", "--shares", ",".join(map(str, shares)),
           "--model", str(path), "--decode", str(a.decode), "--repeats", str(a.repeats),
           "--tokens", ",".join(map(str, prompt))]
    print(f"localmoe at {shares} % ...", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                           timeout=a.timeout)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out, err = e.stdout or "", f"timed out after {a.timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    res = {}
    for line in out.splitlines():
        if line.startswith(MARK):
            r = json.loads(line[len(MARK):])
            res[r.pop("share")] = r
    tail = ((err or "").strip().splitlines() or ["no output"])[-1]
    return {s: res.get(s, {"error": tail}) for s in shares}


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
    ap.add_argument("--layers", type=int, default=2, help="blocks of the bench-size qwen3moe")
    ap.add_argument("--quant", default="Q4_K_M", help="llama.cpp file type")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shares", default=",".join(map(str, SHARES)), help="GPU budgets, % of expert bytes")
    ap.add_argument("--timeout", type=int, default=480, help="seconds for localmoe's child process, and for each "
                    "llama-bench run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gpu = refuse_without_gpu()
    shares = [int(s) for s in a.shares.split(",") if s]
    if a.worker:
        worker(a.model, shares, [int(t) for t in a.tokens.split(",")], a.decode, a.repeats)
        return 0

    from benchmarks._common import print_table
    from benchmarks.decode import prompt_tokens
    path = bench_model(a.layers, a.quant)
    prompt = prompt_tokens(path, a.prompt)
    table, notes = [], [f"GPU: {gpu}; model {path.name}"]
    all_ours = run_worker(path, shares, a, prompt)
    for share in shares:
        ours = all_ours[share]
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

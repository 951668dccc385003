"""Where localmoe's and llama.cpp's greedy decodes part, and how close a tie it was.

    python -m benchmarks.parting                       # the quality run's Q8_0 file, k = 2, 3, 5, 6
    python -m benchmarks.parting --model X.gguf --experts 2 --prompt 16 --steps 64
    python -m benchmarks.parting --batch-vs-steps --prompt 57    # where batched prompt logits differ
    python -m benchmarks.parting --batch-vs-steps --prompt 99 --text 'ROMEO.\nBut soft...'

Both engines load the same file with n_expert_used = k, prefill the first --prompt held-out
tokens (benchmarks.quality's text), then decode greedily, each feeding back its own argmax.
At the first step where the argmaxes differ it prints both engines' top-2 gaps, the
difference of the two candidate logits in each engine, and the largest |logit difference|
between the engines at that step: a parting is a near-tie when the gaps are below it.
Per prompt position it also prints the prefill logits' NMSE (localmoe vs llama.cpp).
--batch-vs-steps instead lists the prompt positions whose logits differ (bit for bit) between
each engine's one-batch prompt and its token-by-token run, and between the engines.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.quality import DEFAULT_MODEL, DEFAULT_OUT, corpus_tokens, expert_key


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(((a - ref) ** 2).sum() / (ref ** 2).sum())


def top2_gap(logits: np.ndarray) -> float:
    s = np.sort(logits)
    return float(s[-1] - s[-2])


def part(path: str, prompt: list[int], k: int, steps: int, threads: int) -> None:
    import llama_cpp
    import localmoe
    key = expert_key(path)
    n_ctx = len(prompt) + steps + 1
    with localmoe.load(path, n_threads=threads, n_ctx=n_ctx) as m:
        m.set_expert_used(k)
        llm = llama_cpp.Llama(path, n_threads=threads, n_ctx=n_ctx, logits_all=True,
                              kv_overrides={key: int(k)}, verbose=False)
        try:
            ours = m.forward(prompt)
            llm.eval(prompt)
            ref = np.array(llm.scores[:len(prompt)], dtype=np.float32)
            print(f"k={k} prefill NMSE per position: " + " ".join(f"{nmse(a, b):.0e}" for a, b in zip(ours, ref)))
            lo, ll = ours[-1], ref[-1]
            for i in range(steps):
                a, b = int(np.argmax(lo)), int(np.argmax(ll))
                if a != b:
                    print(f"k={k} parts at generated token {i}: localmoe {a}, llama.cpp {b}; top-2 gap localmoe "
                          f"{top2_gap(lo):.2e}, llama.cpp {top2_gap(ll):.2e}; logit[{a}] - logit[{b}]: localmoe "
                          f"{lo[a] - lo[b]:+.2e}, llama.cpp {ll[a] - ll[b]:+.2e}; max |difference| "
                          f"{np.abs(lo - ll).max():.2e}; logit rms {np.sqrt((ll ** 2).mean()):.2f}")
                    return
                lo = m.forward([a])[-1]
                llm.eval([a])
                ll = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            print(f"k={k}: the same {steps} tokens")
        finally:
            llm.close()


def batch_vs_steps(path: str, prompt: list[int], k: int, threads: int) -> None:
    import llama_cpp
    import localmoe
    key = expert_key(path)
    n = len(prompt)
    with localmoe.load(path, n_threads=threads, n_ctx=n + 1) as m:
        m.set_expert_used(k)
        ours_b = m.forward(prompt)
        m.reset()
        ours_s = np.stack([m.forward([t])[-1] for t in prompt])
    llm = llama_cpp.Llama(path, n_threads=threads, n_ctx=n + 1, logits_all=True, kv_overrides={key: int(k)},
                          verbose=False)
    try:
        llm.eval(prompt)
        ref_b = np.array(llm.scores[:n], dtype=np.float32)
        llm.reset()
        for t in prompt:
            llm.eval([t])
        ref_s = np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()
    for name, a, b in (("llama.cpp batch vs its steps", ref_b, ref_s), ("localmoe batch vs its steps", ours_b, ours_s),
                       ("localmoe vs llama.cpp, steps", ours_s, ref_s), ("localmoe vs llama.cpp, batch", ours_b, ref_b)):
        differ = [i for i in range(n) if not np.array_equal(a[i], b[i])]
        print(f"k={k} {name}: {len(differ)} of {n} positions differ {differ[:12]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_OUT / "model-Q8_0.gguf"))
    ap.add_argument("--text-model", default=str(DEFAULT_MODEL), help="whose tokenizer encodes the held-out text")
    ap.add_argument("--experts", default="2,3,5,6", help="comma list of k")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=65)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-vs-steps", action="store_true", help="compare one-batch and token-by-token prompt logits")
    ap.add_argument("--text", help="use this text (\\n escapes allowed) instead of the held-out plays")
    a = ap.parse_args(argv)
    if a.text is not None:
        import localmoe
        from localmoe.cli.options import process_escapes
        held = np.asarray(localmoe.load_tokenizer(a.model).encode(process_escapes(a.text), add_special=False))
    else:
        held, _ = corpus_tokens(Path(a.text_model))
    for k in (int(v) for v in a.experts.split(",")):
        if a.batch_vs_steps:
            batch_vs_steps(a.model, held[:a.prompt].tolist(), k, a.threads)
        else:
            part(a.model, held[:a.prompt].tolist(), k, a.steps, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

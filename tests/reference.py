"""llama.cpp (through llama-cpp-python) as the reference for the model runtime.

`llama_cpp` is imported unconditionally: a missing llama-cpp-python fails the
reference tests instead of skipping them.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

import llama_cpp
import numpy as np

from models.build import cached_model

N_THREADS = 2
# ftype name -> llama.cpp file type; files made by llama.cpp's own quantizer
FTYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
}


def model_file(arch: str, ftype: str = "F16", variant: str | None = None) -> Path:
    """Tiny random ARCH model: F16 from models.build, else quantized by llama.cpp (cached beside it)."""
    src = cached_model(arch, "tiny", "f16", variant=variant)
    if ftype == "F16":
        return src
    dst = src.with_name(f"{src.stem}-{ftype}.gguf")
    if dst.exists():
        return dst
    with open(dst.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers may quantize the same file
        if not dst.exists():
            tmp = dst.with_suffix(".partial")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[ftype]
            params.nthread = N_THREADS
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({src.name}, {ftype}) returned {rc}")
            tmp.replace(dst)
    return dst


def _llama(path: Path, n_ctx: int, kv_overrides: dict | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), logits_all=True, n_threads=N_THREADS, n_ctx=n_ctx,
                           n_batch=n_ctx, n_ubatch=n_ctx, kv_overrides=kv_overrides, verbose=False)


def tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization (BOS added as the model says): the tests feed ids, not text."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=True)


def logits_batch(path: Path, tokens: list[int], n_ctx: int = 128, kv_overrides: dict | None = None) -> np.ndarray:
    """f32[n_tok, n_vocab]: the whole prompt in one decode call, logits for every position."""
    llm = _llama(path, n_ctx, kv_overrides)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def logits_stepwise(path: Path, tokens: list[int], n_ctx: int = 128, kv_overrides: dict | None = None) -> np.ndarray:
    """f32[n_tok, n_vocab]: one token per decode call in a fresh context."""
    llm = _llama(path, n_ctx, kv_overrides)
    for t in tokens:
        llm.eval([t])
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(path: Path, prompt: list[int], n: int, n_ctx: int = 128) -> tuple[list[int], np.ndarray]:
    """(n greedy ids after the prompt, f32[n, n_vocab] the logits each was chosen from); ignores EOG."""
    llm = _llama(path, n_ctx)
    llm.eval(prompt)
    out, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        out.append(int(np.argmax(row)))
        logits.append(row)
        llm.eval([out[-1]])
    return out, np.stack(logits)


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    """sum((a-b)^2) / sum(b^2) over every element."""
    ref64 = ref.astype(np.float64)
    return float(((ours.astype(np.float64) - ref64) ** 2).sum() / (ref64 ** 2).sum())


def _rel_gap(scores: np.ndarray, k: int) -> np.ndarray:
    """f64[n_tok]: gap between the k-th and (k+1)-th largest score per row, relative to the largest |score| among them."""
    s = -np.sort(-scores.astype(np.float64), axis=-1)
    return (s[:, k - 1] - s[:, k]) / np.maximum(np.abs(s[:, :k + 1]).max(axis=-1), 1e-30)


def _deepseek2_gap(logits: np.ndarray, bias, a) -> np.ndarray:
    """Smallest relative gap among deepseek2's selection decisions (localmoe.arch.deepseek2.route):
    the group cut (groups score their two best biased probabilities), then top-k in the kept groups."""
    from localmoe.layers import sigmoid, softmax
    sel = softmax(logits) if a.gating == "softmax" else sigmoid(logits)
    if bias is not None:
        sel = sel + bias
    gap = np.full(sel.shape[0], np.inf)
    if a.n_group > 1:
        groups = sel.reshape(sel.shape[0], a.n_group, -1)
        score = -np.sort(-groups, axis=-1)[..., :2].sum(axis=-1)
        gap = _rel_gap(score, a.n_group_used)
        keep = np.argsort(-score, axis=-1, kind="stable")[:, :a.n_group_used]
        sel = np.take_along_axis(groups, keep[..., None], axis=1).reshape(sel.shape[0], -1)
    if a.n_expert_used < sel.shape[1]:
        gap = np.minimum(gap, _rel_gap(sel, a.n_expert_used))
    return gap


@contextlib.contextmanager
def router_margins(n_tok: int):
    """Record, per token, the smallest relative gap between the k-th and (k+1)-th
    router score over all MoE layers of the runs inside the block (f64[n_tok]).
    Covers base.route_topk and deepseek2's biased / group-limited route()."""
    from localmoe.arch import base, deepseek2
    orig, orig_d2 = base.route_topk, deepseek2.route
    margins = np.full(n_tok, np.inf)

    def spy(logits, k, gating, *rest):
        ids, w = orig(logits, k, gating, *rest)
        if k < logits.shape[1] and logits.shape[0] == n_tok:
            # the selection compares monotone transforms of the logits: the logit gap is what noise must cross
            np.minimum(margins, _rel_gap(logits, k), out=margins)
        return ids, w

    def spy_d2(logits, bias, a, *rest):
        if logits.shape[0] == n_tok and (bias is not None or a.n_group > 1):  # else route() calls route_topk
            np.minimum(margins, _deepseek2_gap(logits, bias, a), out=margins)
        return orig_d2(logits, bias, a, *rest)

    base.route_topk, deepseek2.route = spy, spy_d2
    try:
        yield margins
    finally:
        base.route_topk, deepseek2.route = orig, orig_d2


# --- the checks every tests/test_arch_*.py runs -----------------------------

PROMPT = "The quick brown fox jumps over the lazy dog because it"
ROUTER_TIE = 1e-3       # relative router-logit gap below which a top-k pick is a coin toss
MAX_TIE_POSITIONS = 2   # positions a near-tie may exclude from the logits comparison
N_GREEDY = 32


def check_logits(arch: str, ftype: str, prompt: str = PROMPT, variant: str | None = None) -> None:
    """Our logits for every prompt position vs llama.cpp's one-batch logits:
    NMSE <= max(1e-4, 3 n), n = NMSE between llama.cpp's batch and step-by-step runs.
    Positions where our router met a near-tie (top-k gap < ROUTER_TIE relative) may be
    left out (at most MAX_TIE_POSITIONS): there a different pick is legitimate."""
    import localmoe
    path = model_file(arch, ftype, variant)
    name = f"{arch}/{variant}" if variant else arch
    tokens = tokenize(path, prompt)
    ref = logits_batch(path, tokens)
    n = nmse(logits_stepwise(path, tokens), ref)
    tol = max(1e-4, 3 * n)
    model = localmoe.load(path, n_ctx=128)
    with router_margins(len(tokens)) as margins:
        ours = model.eval(tokens)
    e = nmse(ours, ref)
    keep = margins >= ROUTER_TIE
    e_keep = nmse(ours[keep], ref[keep])
    msg = (f"{name} {ftype}: NMSE={e:.3g} (near-tie-free positions: {e_keep:.3g}, "
           f"{int((~keep).sum())} near-tie positions) vs llama.cpp self-noise n={n:.3g}, tol={tol:.3g}")
    print(msg)
    assert e <= tol or (e_keep <= tol and (~keep).sum() <= MAX_TIE_POSITIONS), msg


def check_greedy(arch: str, ftype: str, prompt: str = PROMPT, variant: str | None = None) -> None:
    """32 greedy tokens equal llama.cpp's, or diverge only at a near-tie, either
    - in the logits: llama.cpp's top-2 gap there is below 4x the RMS difference of the
      two logit rows, and that difference is small (row NMSE < 1e-2), or
    - in the router: the forward pass that produced the diverging row met a router
      near-tie (gap < ROUTER_TIE, the rule check_logits uses), where a different expert
      pick is legitimate and may move the logits by any amount.
    Every step before the divergence must match exactly, so a broken model cannot pass."""
    import localmoe
    path = model_file(arch, ftype, variant)
    name = f"{arch}/{variant}" if variant else arch
    prompt_ids = tokenize(path, prompt)
    ref_ids, ref_logits = greedy(path, prompt_ids, N_GREEDY)
    model = localmoe.load(path, n_ctx=128)
    model.reset()
    with router_margins(len(prompt_ids)) as margins:
        row = model.forward(prompt_ids)[-1]
    margin = float(margins[-1])
    ours = []
    for i in range(N_GREEDY):
        ours.append(int(np.argmax(row)))
        if ours[-1] != ref_ids[i]:
            top2 = np.sort(ref_logits[i])[-2:]
            gap = float(top2[1] - top2[0])
            rms = float(np.sqrt(np.mean((row - ref_logits[i]) ** 2)))
            e = nmse(row, ref_logits[i])
            msg = (f"{name} {ftype}: greedy diverges at step {i} (ours {ours[-1]}, llama.cpp {ref_ids[i]}): "
                   f"llama.cpp top-2 gap {gap:.3g}, rms logit diff {rms:.3g}, row NMSE {e:.3g}, "
                   f"router gap in that pass {margin:.3g} (near-tie below {ROUTER_TIE})")
            print(msg)
            assert (gap < 4 * rms and e < 1e-2) or margin < ROUTER_TIE, msg
            return
        with router_margins(1) as margins:
            row = model.forward([ours[-1]])[0]
        margin = float(margins[0])
    print(f"{name} {ftype}: {N_GREEDY} greedy tokens identical to llama.cpp")

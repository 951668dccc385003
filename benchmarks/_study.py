"""benchmarks/quality.py --study: the fine-grained MoE study's levers on held-out text (see quality.py's
docstring, section e). The localmoe side runs every lever in one child process (study_worker);
llama.cpp runs the active-experts sweep only (quality.worker), having neither of the other levers."""
from __future__ import annotations

import time

import numpy as np

LEVERS = {  # lever -> (table label, PNG colour)
    "k": ("a) active experts", (33, 102, 172)),
    "drop": ("b) experts dropped", (178, 24, 43)),
    "min_weight": ("c) min expert weight", (26, 150, 65)),
}
FINDINGS = {
    "k": "fewer active experts: large speed gain for little quality loss",
    "drop": "fewer total experts: little speed gain, large quality cost",
    "min_weight": "adaptive routing: at least 10% more throughput without degradation",
}


def configs(k_train: int, drops: list[float], thresholds: list[float]) -> list[list]:
    """[lever, setting] in table order; the first is the baseline (trained k, no lever)."""
    return ([["k", k] for k in range(k_train, 0, -1)] + [["drop", f] for f in drops]
            + [["min_weight", w] for w in thresholds])


def study_worker(job: dict) -> dict:
    """PPL, mean experts run and decode times for each of job["configs"] on one Model. The expert
    ranking for "drop" comes from routing job["profile_chunks"] chunks of the training split (never
    the scored text). Decode repetitions go round-robin over the configs, so that a change in the
    machine's load falls on all of them alike; process CPU times are kept in the JSON too (with
    several threads they include the pool's waiting, so the table shows wall time)."""
    import localmoe
    from localmoe.perplexity import perplexity

    tokens = np.load(job["tokens"]).tolist()
    train = np.load(job["train"])
    ctx, prompt = job["ctx"], tokens[:job["prompt"]]
    m = localmoe.load(job["path"], n_threads=job["threads"], n_ctx=max(ctx, len(prompt) + job["decode"] + 1))
    k0 = m.args.n_expert_used
    m.store.reset_stats()
    for c in range(job["profile_chunks"]):
        m.eval(train[c * ctx:(c + 1) * ctx].tolist())
    counts = m.store.counts.copy()

    def apply(lever, v):
        m.mask_experts(None)
        m.set_min_expert_weight(None)
        m.set_expert_used(k0 if lever != "k" else v)
        if lever == "drop":
            return m.drop_experts(v, counts)
        if lever == "min_weight":
            m.set_min_expert_weight(v)

    def decode(n_steps):  # greedy: the prompt from an empty cache, then n_steps single-token steps, each timed
        m.reset()
        toks = [int(np.argmax(m.forward(prompt, all_logits=False)[-1]))]
        walls, cpus = [], []
        for _ in range(n_steps):
            t, c = time.perf_counter(), time.process_time()
            toks.append(int(np.argmax(m.forward([toks[-1]])[-1])))
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        return walls, cpus, toks

    out = {}
    for i, (lever, v) in enumerate(job["configs"]):
        kept = apply(lever, v)
        m.reset_routing_stats()
        t = time.perf_counter()
        r = perplexity(m, tokens, n_ctx=ctx, n_chunks=job["chunks"])
        s = m.routing_stats()
        out[i] = {"lever": lever, "value": v, "ppl": r.ppl, "ppl_err": r.ppl_err, "n_scored": r.n_scored,
                  "wall_s": time.perf_counter() - t, "mean_experts_run": s["mean_experts_run"],
                  "experts_kept": m.args.n_expert if kept is None else min(len(e) for e in kept.values()),
                  "kept": kept, "step_s": [], "step_cpu_s": []}
    for lever, v in job["configs"]:  # untimed warm-up of each config's decode path
        apply(lever, v)
        decode(2)
    for _ in range(job["repeats"]):
        for i, (lever, v) in enumerate(job["configs"]):
            apply(lever, v)
            walls, cpus, out[i]["tokens"] = decode(job["decode"])
            out[i]["step_s"].append(walls)
            out[i]["step_cpu_s"].append(cpus)
    m.close()
    return {"configs": out, "profile_counts": counts.tolist()}


def tok_s(step_s: list[list[float]]) -> float:
    """Decode tokens/s from step_s [repetition][step] seconds: each step's fastest repetition,
    summed. On a shared machine other processes only ever slow a step down, and a quiet few
    milliseconds come far more often than a quiet whole run."""
    best = np.min(np.asarray(step_s, np.float64), axis=0)
    return best.size / best.sum()


def study_rows(res: dict) -> tuple[list[list], dict]:
    """Table rows and the PNG's points {lever: [(speed %, PPL %, label or None)]}, each relative to the
    baseline (trained k, no lever, localmoe)."""
    st = res["study"]
    cfg = st["localmoe"]["configs"]
    ref = st.get("llama.cpp", {})
    base = cfg[0]
    b_ppl, b_tps = base["ppl"], tok_s(base["step_s"])
    rows, points = [], {lever: [] for lever in LEVERS}
    for i in sorted(cfg):
        c = cfg[i]
        lever, v = c["lever"], c["value"]
        tps = tok_s(c["step_s"])
        r_ppl = r_tps = None
        if lever == "k" and "error" not in ref:
            r_ppl = ref["ppl"][v]["ppl"]
            r_tps = tok_s(ref["decode"][v]["step_s"])
        setting = (f"k={v}" + (" (trained)" if i == 0 else "") if lever == "k"
                   else f"{v:.0%} dropped" if lever == "drop" else f"W={v:g}")
        rows.append([LEVERS[lever][0], setting, f"{c['mean_experts_run']:.2f}", c["experts_kept"],
                     f"{c['ppl']:.2f}", f"{c['ppl'] / b_ppl - 1:+.1%}", f"{tps:.1f}", f"{tps / b_tps - 1:+.1%}",
                     "n/a" if lever != "k" else None if r_ppl is None else f"{r_ppl:.2f}",
                     "n/a" if lever != "k" else None if r_tps is None else f"{r_tps:.1f}"])
        label = v if lever == "k" else round(100 * v)
        points[lever].append((100 * tps / b_tps, 100 * c["ppl"] / b_ppl, int(label)))
    points["drop"].insert(0, (100.0, 100.0, None))     # each lever starts from the baseline (labelled k)
    points["min_weight"].insert(0, (100.0, 100.0, None))
    return rows, points


def verdicts(res: dict, tolerance: float) -> list[str]:
    """One line per lever: the study's finding and what this run measured."""
    cfg = res["study"]["localmoe"]["configs"]
    base = cfg[0]
    b_ppl, b_tps = base["ppl"], tok_s(base["step_s"])

    def d(c):  # (PPL change, decode tokens/s change)
        return c["ppl"] / b_ppl - 1, tok_s(c["step_s"]) / b_tps - 1

    def dec(c):
        return f"decode {d(c)[1]:+.1%}"
    by = {lever: [cfg[i] for i in sorted(cfg) if cfg[i]["lever"] == lever and i] for lever in LEVERS}
    lines = []
    if by["k"]:
        p = d(by["k"][-1])[0]
        lines.append(f"a) {FINDINGS['k']}. Here k={by['k'][-1]['value']}: {dec(by['k'][-1])}, PPL {p:+.1%}.")
    if by["drop"]:
        lines.append(f"b) {FINDINGS['drop']}. Here: " + "; ".join(
            f"{c['value']:.0%} dropped: {dec(c)}, PPL {d(c)[0]:+.1%}" for c in by["drop"]) + ".")
    if by["min_weight"]:
        ok = [c for c in by["min_weight"] if d(c)[0] <= tolerance]
        best = max(ok, key=lambda c: d(c)[1], default=None)
        lines.append(f"c) {FINDINGS['min_weight']}. Here, counting a PPL rise of at most {tolerance:.1%} as no "
                     "degradation: " + ("no threshold stays within it" if best is None else
                                        f"best W={best['value']:g}, {best['mean_experts_run']:.2f} experts run, "
                                        f"{dec(best)}, PPL {d(best)[0]:+.2%} -> "
                                        + ("meets" if d(best)[1] >= 0.10 else "does not meet") + " the 10%")
                     + ".")
    return lines

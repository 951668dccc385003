"""Memory beyond the weights: localmoe's planner minimum beside the buffers llama.cpp allocates.

    python -m benchmarks.memory                                   # qwen3moe and llama bench files, n_ctx 512, 4096, 32768
    python -m benchmarks.memory --models shipped --ctx 256,2048

For each model and n_ctx, with micro-batches (n_ubatch) of 512 tokens on both sides:
- localmoe: the memory planner's own counts (`localmoe.planner.plan.footprint`, what `localmoe plan`
  prints): non-expert weights, the fp16 KV cache, run bytes (the Model's RunBuffers plus the
  arrays a micro-batch makes: residual stream, expert hidden states, a logits row per token),
  one layer's active experts, and the minimum RAM budget, their sum.
- llama.cpp: the buffer sizes it logs when it creates a context (llama-cpp-python 0.3.36,
  verbose, the same settings as benchmarks/decode.py: n_batch 512, no flash attention): `KV
  buffer size`, `compute buffer size` (the scratch of its worst-case graph: a full micro-batch
  with every row's logits) and `output buffer size`.
Targets (issue 18): localmoe's run bytes <= llama.cpp's compute buffer; the minimum <= non-expert
weights + KV + llama.cpp's compute buffer + one layer's active experts.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys

from benchmarks._common import print_table
from benchmarks.decode import model_file, parse_models

MIB = 1 << 20
N_UBATCH = 512
_SIZE = re.compile(r"(KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


def llama_buffers(path, n_ctx: int) -> dict[str, float]:
    """{'KV' | 'compute' | 'output': MiB} summed over the backends llama.cpp logs at context creation."""
    import llama_cpp
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # llama-cpp-python's log callback prints to sys.stderr
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=N_UBATCH, n_ubatch=N_UBATCH, n_threads=1,
                              verbose=True)
        llm.close()
    sizes: dict[str, float] = {}
    for kind, mib in _SIZE.findall(log.getvalue()):
        sizes[kind] = sizes.get(kind, 0.0) + float(mib)
    if "compute" not in sizes:
        raise RuntimeError(f"llama.cpp logged no compute buffer size for {path}:\n{log.getvalue()[-2000:]}")
    return sizes


def localmoe_counts(path, n_ctx: int) -> dict[str, float]:
    from localmoe.arch import arch_module
    from localmoe.gguf_file import open_gguf
    from localmoe.planner.plan import footprint
    with open_gguf(path) as g:
        fp = footprint(g, arch_module(g.arch).ModelArgs.from_gguf(g), n_ctx)
    return {"non_expert": fp.non_expert_bytes / MIB, "kv": fp.kv_bytes / MIB, "run": fp.run_bytes / MIB,
            "active": fp.n_expert_used * fp.max_expert_bytes / MIB, "minimum": fp.minimum_bytes / MIB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen3moe,llama", help="as benchmarks.decode --models")
    ap.add_argument("--ctx", default="512,4096,32768", help="context lengths")
    ap.add_argument("--quant", default="Q4_K_M", help="bench files' type (as benchmarks.decode)")
    ap.add_argument("--size", default="bench", choices=("bench", "tiny"))
    ap.add_argument("--threads", type=int, default=2, help="for building a bench file")
    a = ap.parse_args(argv)
    ctxs = [int(c) for c in a.ctx.split(",") if c]
    rows = []
    for kind, name, layers in parse_models(a.models, None):
        path, label = model_file(kind, name, layers, a)
        for n_ctx in ctxs:
            ours, ref = localmoe_counts(path, n_ctx), llama_buffers(path, n_ctx)
            anchor = ours["non_expert"] + ref["KV"] + ref["compute"] + ours["active"]
            rows.append([label, n_ctx, f"{ours['non_expert']:.1f}", f"{ours['kv']:.1f}", f"{ref['KV']:.1f}",
                         f"{ours['run']:.1f}", f"{ref['compute']:.1f}", f"{ref.get('output', 0):.2f}",
                         f"{ours['run'] / ref['compute']:.2f}", f"{ours['active']:.1f}",
                         f"{ours['minimum']:.1f}", f"{anchor:.1f}", "yes" if ours["minimum"] <= anchor else "NO"])
    print_table(["model", "n_ctx", "non-expert MiB", "KV MiB", "llama.cpp KV", "run MiB", "llama.cpp compute",
                 "llama.cpp output", "run / compute", "active experts MiB", "minimum MiB", "anchor MiB",
                 "min <= anchor"], rows)
    print("anchor = non-expert weights + llama.cpp's KV + llama.cpp's compute buffer + one layer's active experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

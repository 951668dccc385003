"""Checks of an exported model: the tokenizer and the logits agree across HF/torch,
llama.cpp (llama-cpp-python) and localmoe."""
import copy
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    """sum((a-b)^2) / sum(b^2) over every element."""
    ref64 = ref.astype(np.float64)
    return float(((ours.astype(np.float64) - ref64) ** 2).sum() / (ref64 ** 2).sum())


def check_tokenizer(path: Path, tok: Tokenizer, text: str) -> dict:
    """Do HF, localmoe and llama.cpp encode TEXT to the same ids (no BOS)?"""
    import llama_cpp

    from localmoe.tokenizer import load_tokenizer
    hf = tok.encode(text).ids
    ours = load_tokenizer(path).encode(text, add_special=False)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ref = llm.tokenize(text.encode(), add_bos=False, special=False)
    return {"n_tokens": len(hf), "localmoe_equals_hf": ours == hf, "llama_cpp_equals_hf": ref == hf}


def check_logits(path: Path, model: nn.Module, ids: list[int], n_threads: int = 1) -> dict:
    """NMSE of torch's (f32 weights) and localmoe's logits against llama.cpp's, one batch of IDS."""
    import llama_cpp

    import localmoe
    n = len(ids)
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n,
                          n_threads=n_threads, verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[:n], dtype=np.float32)
    model.eval()
    with torch.no_grad():
        ours_torch = model(torch.tensor([ids]))[0][0].numpy()
        # the same with the weights rounded as the F16 file stores them: what is left is the graph, not
        # the rounding (which also flips near-tied expert choices, more often under a balancing bias)
        rounded = copy.deepcopy(model)
        for name, p in rounded.named_parameters():
            if p.dim() >= 2 and "gate_inp" not in name:
                p.copy_(p.half().float())
        ours_rounded = rounded(torch.tensor([ids]))[0][0].numpy()
    # a few flipped routes put nearly all the error on a few tokens; a graph error spreads over all of them
    per_token = ((ours_rounded.astype(np.float64) - ref) ** 2).sum(1) / (ref.astype(np.float64) ** 2).sum(1)
    res = {"n_tokens": n, "nmse_torch_vs_llama_cpp": nmse(ours_torch, ref),
           "nmse_torch_f16_weights_vs_llama_cpp": nmse(ours_rounded, ref),
           "median_token_nmse_torch_f16_weights_vs_llama_cpp": float(np.median(per_token))}
    ours = localmoe.load(path, n_threads=n_threads, n_ctx=n).eval(ids)
    res["nmse_localmoe_vs_llama_cpp"] = nmse(ours, ref)
    return res

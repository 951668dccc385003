"""What `localmoe inspect` shows: architecture, tensors, expert layout, bytes/token.

`summarize(path_or_gguf_file)` returns a JSON-serialisable dict with these
stable keys (values are null where the file does not say):

- `file` (str), `file_bytes` (int): the path and its size.
- `architecture` (str), `name` (str|null): general.architecture / general.name.
- `file_type` (str|null): general.file_type as a llama.cpp name, e.g. "MOSTLY_Q4_K_M".
- `quantization_version` (int|null), `tokenizer_model` (str|null),
  `vocab_size` (int|null: {arch}.vocab_size, else the token count, else token_embd rows).
- `hyperparameters`: {key: value} for every `{arch}.*` key. Arrays longer
  than `MAX_ARRAY` become the string "[N values]".
- `tensors`: list of {name, type, shape, n_elements, bytes, role}; shape in
  numpy order (GGUF ne reversed); role is one of `ROLES`.
- `totals_by_type`: {type name: {count, n_elements, bytes}}; `total_bytes`,
  `n_params` over all tensors.
- `experts`: {expert_count, expert_used_count, expert_shared_count,
  has_shared_experts, block_count, leading_dense_block_count,
  nextn_predict_layers, moe_layers [int], dense_layers [int],
  routed_expert_bytes, shared_expert_bytes, other_bytes}: bytes in the file;
  other_bytes is everything else, token_embd included.
- `decode`: bytes read per generated token, the bound on decode speed:
  {bytes_per_token, routed_expert_bytes, shared_expert_bytes, other_bytes,
  token_embd_bytes, tied_output}; other_bytes here excludes token_embd.
  Non-expert weights are read in full, except token_embd of which one row
  is read (in full when the output head is tied to it);
  each MoE layer reads expert_used/expert_count of its routed tensors and its
  shared experts in full. MTP (nextn) layers are not run at decode and count
  nothing. bytes_per_token is null when expert_used_count is missing.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from gguf import LlamaFileType

from .errors import GGUFFormatError, UnsupportedError

INT_MAX = (1 << 31) - 1  # as localmoe.arch.base (not imported: inspect of other archs needs no numba)
MAX_LAYERS = 512

MAX_ARRAY = 32
ROLES = ("routed_expert", "shared_expert", "token_embd", "other")

# stacked routed experts (n_expert, ...): blk.N.ffn_{gate,up,down}_exps.weight, also .bias (gpt-oss);
# llama.cpp no longer loads the old per-expert blk.N.ffn_gate.E tensors
_ROUTED = re.compile(r"^blk\.(\d+)\.[^.]*_exps(?:\.|$)")
_SHARED = re.compile(r"^blk\.(\d+)\.[^.]*_shexp(?:\.|$)")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _role(name: str) -> str:
    if _ROUTED.match(name):
        return "routed_expert"
    if _SHARED.match(name):
        return "shared_expert"
    if name.startswith("token_embd."):
        return "token_embd"
    return "other"


def _small(md, key: str):
    """Long arrays collapsed so the output stays readable (and are never decoded)."""
    n = md.array_length(key)
    return f"[{n} values]" if n is not None and n > MAX_ARRAY else md[key]


def _file_type(value) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"


def _vocab_size(gf, tensors) -> int | None:
    n = _arch_int(gf, "vocab_size")
    if n is not None:
        return n
    key = "tokenizer.ggml.tokens"
    if key in gf.metadata:  # counted without decoding 150k strings
        return gf.metadata.array_length(key) if gf.metadata.value_type(key)[1] else 1
    embd = tensors.get("token_embd.weight")
    return int(embd.shape[0]) if embd is not None else None


def _opt_int(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT_MAX:
        raise GGUFFormatError(f"{key} must be an integer in 0..{INT_MAX}, not {value!r:.60}")
    return value


def _arch_int(gf, suffix: str) -> int | None:
    return _opt_int(gf.arch_get(suffix, None), f"{gf.arch}.{suffix}")


def _check_runnable(gf) -> None:
    """A file of an architecture localmoe runs must have hyperparameters that agree with its
    tensors (GGUFFormatError otherwise); one that uses an unsupported feature still shows."""
    from .arch import ARCHES, arch_module
    if gf.arch in ARCHES:
        try:
            arch_module(gf.arch).ModelArgs.from_gguf(gf)
        except UnsupportedError:
            pass


def summarize(gguf_file) -> dict:
    """Summary dict of a GGUFFile, or of a path (opened with localmoe.gguf_file.open_gguf)."""
    if isinstance(gguf_file, (str, os.PathLike)):
        from .gguf_file import open_gguf
        with open_gguf(gguf_file) as gf:
            return summarize(gf)
    gf = gguf_file
    arch = gf.arch
    _check_runnable(gf)
    prefix = f"{arch}."

    hyper = {k[len(prefix):]: _small(gf.metadata, k) for k in gf.metadata if k.startswith(prefix)}
    tensors = gf.tensors
    rows, by_type = [], defaultdict(lambda: {"count": 0, "n_elements": 0, "bytes": 0})
    for t in tensors.values():
        qname = t.qtype.name
        rows.append({"name": t.name, "type": qname, "shape": [int(s) for s in t.shape],
                     "n_elements": int(t.n_elements), "bytes": int(t.n_bytes), "role": _role(t.name)})
        agg = by_type[qname]
        agg["count"] += 1
        agg["n_elements"] += int(t.n_elements)
        agg["bytes"] += int(t.n_bytes)

    return {
        "file": gf.path,
        "file_bytes": gf.file_size,
        "architecture": arch,
        "name": gf.get("general.name", None),
        "file_type": _file_type(gf.get("general.file_type", None)),
        "quantization_version": _opt_int(gf.get("general.quantization_version", None), "general.quantization_version"),
        "tokenizer_model": gf.get("tokenizer.ggml.model", None),
        "vocab_size": _vocab_size(gf, tensors),
        "hyperparameters": hyper,
        "tensors": rows,
        "totals_by_type": dict(sorted(by_type.items())),
        "total_bytes": sum(r["bytes"] for r in rows),
        "n_params": sum(r["n_elements"] for r in rows),
        **_experts_and_decode(gf, rows),
    }


def _experts_and_decode(gf, rows) -> dict:
    block_count = _arch_int(gf, "block_count")
    n_expert = _arch_int(gf, "expert_count")
    n_used = _arch_int(gf, "expert_used_count")
    n_shared = _arch_int(gf, "expert_shared_count")
    nextn = _arch_int(gf, "nextn_predict_layers") or 0
    first_nextn = block_count - nextn if block_count is not None and nextn else None

    layers_seen, moe_layers = set(), set()
    for r in rows:
        m = _LAYER.match(r["name"])
        if m:
            layers_seen.add(int(m.group(1)))
            if r["role"] == "routed_expert":
                moe_layers.add(int(m.group(1)))
    n_layers = block_count if block_count is not None else (max(layers_seen) + 1 if layers_seen else 0)
    if n_layers > MAX_LAYERS or n_layers < max(layers_seen, default=-1) + 1:
        raise GGUFFormatError(f"{gf.arch}.block_count={block_count} does not fit the blk.N tensors "
                              f"(blocks {min(layers_seen, default=0)}..{max(layers_seen, default=-1)}; "
                              f"at most {MAX_LAYERS})")
    dense_layers = [i for i in range(n_layers) if i not in moe_layers]

    def skipped(name):  # MTP layers: not part of the decode graph
        m = _LAYER.match(name)
        return first_nextn is not None and m is not None and int(m.group(1)) >= first_nextn

    totals = defaultdict(int)
    decode = defaultdict(int)
    tied = not any(r["name"].startswith("output.") for r in rows)
    for r in rows:
        role, b = r["role"], r["bytes"]
        totals[role] += b
        if skipped(r["name"]):
            continue
        if role == "token_embd":
            # one embedding row per token, unless the LM head reuses the matrix
            decode["token_embd"] += b if tied else b // max(r["shape"][0], 1)
        elif role == "routed_expert":
            decode["routed"] += b  # scaled below
        else:
            decode[role] += b

    routed = None
    if n_used is not None and n_expert:
        routed = decode["routed"] * n_used // n_expert
    elif not moe_layers:
        routed = 0
    per_token = None if routed is None else routed + decode["shared_expert"] + decode["other"] + decode["token_embd"]
    return {
        "experts": {
            "expert_count": n_expert,
            "expert_used_count": n_used,
            "expert_shared_count": n_shared,
            "has_shared_experts": bool(n_shared) or totals["shared_expert"] > 0,
            "block_count": block_count,
            "leading_dense_block_count": _arch_int(gf, "leading_dense_block_count"),
            "nextn_predict_layers": nextn,
            "moe_layers": sorted(moe_layers),
            "dense_layers": dense_layers,
            "routed_expert_bytes": totals["routed_expert"],
            "shared_expert_bytes": totals["shared_expert"],
            "other_bytes": totals["other"] + totals["token_embd"],
        },
        "decode": {
            "bytes_per_token": per_token,
            "routed_expert_bytes": routed,
            "shared_expert_bytes": decode["shared_expert"],
            "other_bytes": decode["other"],
            "token_embd_bytes": decode["token_embd"],
            "tied_output": tied,
        },
    }

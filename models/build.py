"""Random-weight GGUF test models that llama.cpp loads and runs.

    python -m models.build --arch qwen3moe --size tiny --out tiny-qwen3moe.gguf

`build()` writes one file; `cached_model()` builds once into a cache dir whose
file names carry a hash of this builder's source, so edits invalidate them.
Tensors are streamed to disk chunk by chunk: bench-size experts never sit in
memory whole. Each tensor draws from its own generator seeded by
(seed, crc32(name)), so layer count and tensor order do not change the numbers
and the split MLA tensors (attn_k_b/attn_v_b) equal the fused attn_kv_b.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import math
import os
import pickle
import re
import sys
import tempfile
import zlib
from pathlib import Path

import gguf
import numpy as np

from localmoe.errors import LocalMoEError
from models import archs
from models.vocab import cache_dir, vocab_path

GGT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
DTYPES = {"f32": (GGT.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (GGT.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (GGT.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
CHUNK = 1 << 24          # elements generated at once
ROUTER_GAIN = 2.0        # router logits ~N(0, 2^2): peaked enough that top-k varies per token
SOURCES = (Path(__file__), Path(archs.__file__))
TOKENIZER_CACHE_VERSION = 1   # bump when _read_tokenizer_keys changes what it returns


def build(arch: str, size: str = "tiny", out=None, dtype: str = "f16", seed: int = 0,
          variant: str | None = None, layers: int | None = None) -> Path:
    """Write a random-weight GGUF for ARCH; returns its path (default ./SIZE-ARCH[-VARIANT].gguf)."""
    if dtype not in DTYPES:
        raise LocalMoEError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    archs.resolve(arch, variant)
    tok = dict(_tokenizer_keys(archs.VOCAB[arch]))
    n_vocab = len(tok["tokenizer.ggml.tokens"][1])
    s = archs.spec(arch, size, variant, n_vocab, layers)
    if s.pre is not None:
        tok["tokenizer.ggml.pre"] = (VT.STRING, s.pre, None)
    name = "-".join(x for x in ("localmoe-random", arch, variant, size) if x)
    out = Path(out) if out is not None else Path(f"{size}-{arch}{'-' + variant if variant else ''}.gguf")
    with _atomic(out) as tmp:
        _write(s, tok, tmp, dtype, seed, name)
    return out


def cached_model(arch: str, size: str = "tiny", dtype: str = "f16", variant: str | None = None,
                 seed: int = 0, layers: int | None = None) -> Path:
    """Path of a model built once per (arguments, builder source); safe across processes."""
    archs.resolve(arch, variant)
    variant = variant or archs.DEFAULT_VARIANT[arch]
    d = _models_dir()
    stem = f"{arch}-{variant}-{size}-{dtype}-s{seed}" + (f"-L{layers}" if layers is not None else "")
    path = d / f"{stem}-{source_hash()}.gguf"
    if path.exists():
        return path
    with open(d / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # another process may be building the same file
        if not path.exists():
            build(arch, size, path, dtype, seed, variant, layers)
            for old in d.glob(f"{stem}-*.gguf"):   # builds from older sources, not others' derived files
                if old != path and re.fullmatch(re.escape(stem) + r"-[0-9a-f]{12}\.gguf", old.name):
                    old.unlink(missing_ok=True)
    return path


def _models_dir() -> Path:
    d = cache_dir().parent / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _atomic(dst: Path):
    """Yield a temp path beside DST; fsync and rename it over DST on success."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name, suffix=".partial")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)          # mkstemp makes it 0600
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=None)
def _tokenizer_keys(vocab: str) -> dict:
    """Every tokenizer.* key of the real vocab file as {key: (type, value, array subtype)}, bytes kept.

    GGUFReader takes ~10 s on a 150k-token vocab, so the result is pickled beside the models.
    """
    src = vocab_path(vocab)
    st = src.stat()
    cached = _models_dir() / f"tokenizer-{vocab}-{st.st_size}-{st.st_mtime_ns}-v{TOKENIZER_CACHE_VERSION}.pickle"
    if cached.exists():
        return pickle.loads(cached.read_bytes())
    keys = _read_tokenizer_keys(src)
    with _atomic(cached) as tmp:
        tmp.write_bytes(pickle.dumps(keys, protocol=pickle.HIGHEST_PROTOCOL))
    return keys


def _read_tokenizer_keys(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    keys = {}
    for k, f in r.fields.items():
        if not k.startswith("tokenizer."):
            continue
        t = f.types[0]
        if t == VT.ARRAY:
            sub = f.types[1]
            if sub == VT.STRING:
                val = [bytes(f.parts[i]) for i in f.data]
            else:
                val = np.concatenate([f.parts[i] for i in f.data]).tolist()
            keys[k] = (t, val, sub)
        elif t == VT.STRING:
            keys[k] = (t, bytes(f.parts[f.data[0]]), None)
        else:
            keys[k] = (t, f.parts[f.data[0]][0].item(), None)
    return keys


def _value_type(v) -> VT:
    if isinstance(v, bool):
        return VT.BOOL
    if isinstance(v, int):
        return VT.UINT32
    if isinstance(v, float):
        return VT.FLOAT32
    return VT.STRING


def qtype_for(t: archs.Tensor, dtype: str) -> GGT:
    """As convert_hf_to_gguf: 1-D tensors, norms, routers and biases stay F32."""
    if len(t.ne) == 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp" in t.name \
            or not t.name.endswith(".weight"):
        return GGT.F32
    return DTYPES[dtype][0]


def _chunks(t: archs.Tensor, seed: int):
    """f32 numpy-order pieces of T along its outer axis (deterministic per name)."""
    shape = tuple(reversed(t.ne))
    if t.derive is not None:
        src, fn = t.derive
        yield np.ascontiguousarray(fn(np.concatenate(list(_chunks(src, seed)))), dtype=np.float32)
        return
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    inner = math.prod(shape[1:])
    step = max(1, CHUNK // max(inner, 1))
    fan_in = t.ne[0]
    std, mean = {"w": (1 / math.sqrt(fan_in), 0.0), "embd": (1.0, 0.0), "norm": (0.1, 1.0),
                 "router": (ROUTER_GAIN / math.sqrt(fan_in), 0.0), "bias": (0.1, 0.0),
                 "probs_b": (0.05, 0.0)}[t.init]
    for lo in range(0, shape[0], step):
        a = rng.standard_normal((min(step, shape[0] - lo),) + shape[1:], dtype=np.float32)
        a *= np.float32(std)
        a += np.float32(mean)
        yield a


def _encode(a: np.ndarray, qt: GGT) -> np.ndarray:
    if qt == GGT.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if qt == GGT.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(a), GGT.BF16)


def _write(s: archs.Spec, tok: dict, path: Path, dtype: str, seed: int, name: str) -> None:
    w = gguf.GGUFWriter(path=None, arch=s.arch)
    w.add_name(name)
    w.add_file_type(DTYPES[dtype][1])
    for k, v in s.keys.items():
        w.add_key_value(f"{s.arch}.{k}", v, _value_type(v))
    for k, (t, v, sub) in tok.items():
        w.add_key_value(k, v, t, sub_type=sub)
    plan = []
    for t in s.tensors:
        qt = qtype_for(t, dtype)
        shape = tuple(reversed(t.ne))
        nbytes = math.prod(shape) * gguf.GGML_QUANT_SIZES[qt][1]
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        plan.append((t, qt, nbytes))
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    w.write_padding(f, f.tell())
    for t, qt, nbytes in plan:
        written = 0
        for a in _chunks(t, seed):
            b = _encode(a, qt)
            b.tofile(f)
            written += b.nbytes
        assert written == nbytes, (t.name, written, nbytes)
        w.write_padding(f, nbytes)
    w.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.build", description=__doc__.split("\n\n")[0],
        epilog="Variants: " + "; ".join(f"{a}: {', '.join(archs.variants(a))} (default {archs.DEFAULT_VARIANT[a]})"
                                        for a in archs.ARCHS)
        + f". deepseek2 '{archs.KVB_SUFFIX}' variants store the MLA kv up-projection as one attn_kv_b "
          "(older converters) instead of attn_k_b/attn_v_b. bench = real per-layer shapes with few layers; "
          "deepseek2 v3 bench is LARGE (one layer of 256 experts of 7168x2048 is ~22 GB at f16), so it "
          "defaults to 1 layer. When --layers cuts a model, leading dense layers shrink so one MoE layer remains.")
    p.add_argument("--arch", required=True, choices=archs.ARCHS, help="general.architecture")
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"),
                   help="tiny: seconds to build, for tests; bench: real per-layer shapes (default tiny)")
    p.add_argument("--out", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--dtype", default="f16", choices=tuple(DTYPES),
                   help="type of the 2-D weights; norms, routers and biases stay f32 (default f16)")
    p.add_argument("--seed", type=int, default=0, help="numpy Generator seed (default 0)")
    p.add_argument("--variant", default=None, help="sub-style, see below")
    p.add_argument("--layers", type=int, default=None,
                   help="block count (default: tiny 2-3; bench 2-3, deepseek2 v3 1)")
    a = p.parse_args(argv)
    try:
        out = build(a.arch, a.size, a.out, a.dtype, a.seed, a.variant, a.layers)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

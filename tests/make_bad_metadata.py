"""Valid header, wrong numbers: GGUF files whose metadata contradicts their tensors.

    python tests/make_bad_metadata.py MODEL.gguf OUT_DIR   # writes the whole corpus of MODEL

`mutations(model)` lists, for every hyperparameter key the model's architecture
reads (found by watching localmoe.arch.base's key readers while the valid file
loads), the key at 0, 1, -1, 2^32-1, 2^63-1, stored as a string / float /
array, and at a value that contradicts the tensor shapes; and the model without
token_embd, output_norm or a block tensor. `rewrite()` writes one such file by
patching the header bytes (struct, no parser of the code under test): the KV
records are copied or re-encoded, tensor infos kept with new offsets. Tensor
data is copied, or left as a sparse hole of zeros (`data=False`): validation
must fail before any tensor byte is read, and a model that does load runs on
zeros just as well for memory safety. The files are generated at test time.
"""
from __future__ import annotations

import contextlib
import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as VT

_CODES = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
          VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
HUGE = (("2^32-1", VT.UINT32, 2**32 - 1), ("2^63-1", VT.UINT64, 2**63 - 1))
# keys no tensor shape pins down: a value other than the file's is not a contradiction
FREE = {"context_length", "expert_used_count", "expert_group_count", "expert_group_used_count",
        "expert_gating_func", "nextn_predict_layers", "rope.scaling.original_context_length"}


# --- reading and writing headers ------------------------------------------------------------

@dataclass
class Header:
    version: int
    alignment: int
    kvs: dict = field(default_factory=dict)      # key -> encoded record (key, type, value)
    tensors: list = field(default_factory=list)  # (name, info bytes without the offset, n_bytes, offset)
    data_offset: int = 0


def _str(buf, pos: int) -> tuple[bytes, int]:
    n = struct.unpack_from("<Q", buf, pos)[0]
    return bytes(buf[pos + 8:pos + 8 + n]), pos + 8 + n


def _skip(buf, vt: int, pos: int) -> int:
    if vt == VT.STRING:
        return _str(buf, pos)[1]
    if vt == VT.ARRAY:
        sub, n = struct.unpack_from("<iQ", buf, pos)
        pos += 12
        if sub == VT.STRING:
            for _ in range(n):
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            return pos
        return pos + struct.calcsize(_CODES[VT(sub)]) * n
    return pos + struct.calcsize(_CODES[VT(vt)])


def read_header(buf) -> Header:
    version, n_tensors, n_kv = struct.unpack_from("<Iqq", buf, 4)
    h, pos = Header(version, 32), 24
    for _ in range(n_kv):
        start = pos
        key, pos = _str(buf, pos)
        vt = struct.unpack_from("<i", buf, pos)[0]
        pos = _skip(buf, vt, pos + 4)
        h.kvs[key.decode()] = bytes(buf[start:pos])
        if key == b"general.alignment":
            h.alignment = struct.unpack_from("<I", buf, pos - 4)[0]
    for _ in range(n_tensors):
        start = pos
        name, pos = _str(buf, pos)
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        ne = struct.unpack_from(f"<{n_dims}q", buf, pos + 4)
        qtype = struct.unpack_from("<i", buf, pos + 4 + 8 * n_dims)[0]
        pos += 4 + 8 * n_dims + 4
        offset = struct.unpack_from("<Q", buf, pos)[0]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_el = 1
        for d in ne:
            n_el *= d
        h.tensors.append((name.decode(), bytes(buf[start:pos]), n_el // block * size, offset))
        pos += 8
    h.data_offset = -(-pos // h.alignment) * h.alignment
    return h


def _value(vt: VT, v) -> bytes:
    if vt == VT.STRING:
        raw = v.encode() if isinstance(v, str) else v
        return struct.pack("<Q", len(raw)) + raw
    return struct.pack(_CODES[vt], v)


def encode_kv(key: str, vt: VT, value, sub: VT | None = None) -> bytes:
    out = _value(VT.STRING, key) + struct.pack("<i", vt)
    if vt == VT.ARRAY:
        return out + struct.pack("<iQ", sub, len(value)) + b"".join(_value(sub, v) for v in value)
    return out + _value(vt, value)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def rewrite(src, dst, kv: dict | None = None, drop: tuple = (), data: bool = False, strip_tokenizer=False) -> Path:
    """Copy GGUF `src` to `dst` with kv {key: (type, value[, subtype]) or None (removed)} set,
    the tensors in `drop` removed and, if strip_tokenizer, every tokenizer.* key removed."""
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        h = read_header(buf)
        kvs = {k: r for k, r in h.kvs.items() if not (strip_tokenizer and k.startswith("tokenizer."))}
        for k, v in (kv or {}).items():
            if v is None:
                kvs.pop(k, None)
            else:
                kvs[k] = encode_kv(k, *v)
        tensors = [t for t in h.tensors if t[0] not in drop]
        out, off = [], 0
        for name, info, n_bytes, old in tensors:
            out.append(info + struct.pack("<Q", off))
            off = _pad(off + n_bytes, h.alignment)
        head = (b"GGUF" + struct.pack("<Iqq", h.version, len(tensors), len(kvs))
                + b"".join(kvs.values()) + b"".join(out))
        start = _pad(len(head), h.alignment)
        with open(dst, "wb") as o:
            o.write(head + bytes(start - len(head)))
            if data:
                for name, info, n_bytes, old in tensors:
                    o.write(buf[h.data_offset + old:h.data_offset + old + n_bytes])
                    o.write(bytes(_pad(n_bytes, h.alignment) - n_bytes))
            o.truncate(start + off)  # without data: a sparse hole of zeros
    return Path(dst)


# --- which keys an architecture reads --------------------------------------------------------

def read_keys(path) -> dict[str, tuple[str, object]]:
    """{key suffix: (kind, value used)} for every key ModelArgs.from_gguf reads from the file
    at `path` (kind: int, float, bool, str), the defaults of absent keys included."""
    from localmoe.arch import arch_module, base
    from localmoe.gguf_file import open_gguf
    seen = {}

    def spy(kind, fn):
        def wrapped(g, key, *a, **kw):
            v = fn(g, key, *a, **kw)
            seen.setdefault(key, (kind, v))
            return v
        return wrapped
    with contextlib.ExitStack() as stack, open_gguf(path) as g:
        for kind in ("int", "float", "bool", "str"):
            name = f"{kind}_key"
            stack.enter_context(mock.patch.object(base, name, spy(kind, getattr(base, name))))
        arch_module(g.arch).ModelArgs.from_gguf(g)
        return seen


# --- the corpus ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    name: str               # e.g. "expert_count=0", "attention.head_count:string", "-token_embd.weight"
    key: str                # the key suffix, or the tensor name, that the error must name
    kv: dict = field(default_factory=dict)
    drop: tuple = ()
    must_fail: bool = True  # False: a valid value is possible (0, 1, ...); it must then load and run


def _int_cases(key, cur):
    base = cur if cur else 8
    yield f"{key}:string", VT.STRING, str(base), True
    yield f"{key}:float", VT.FLOAT32, float(base), True
    yield f"{key}:array", (VT.ARRAY, VT.UINT32), [base, base + 1], True
    yield f"{key}=-1", VT.INT32, -1, True
    for label, vt, v in HUGE:
        yield f"{key}={label}", vt, v, True
    yield f"{key}=0", VT.UINT32, 0, False
    yield f"{key}=1", VT.UINT32, 1, False
    if cur is not None and cur > 1:
        pinned = key not in FREE
        yield f"{key}={cur + 1}", VT.UINT32, cur + 1, pinned
        yield f"{key}={cur * 2}", VT.UINT32, cur * 2, pinned


def _float_cases(key, cur):
    yield f"{key}:string", VT.STRING, "1e-6", True
    yield f"{key}:array", (VT.ARRAY, VT.FLOAT32), [1.0, 2.0], True
    for label, v in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        yield f"{key}={label}", VT.FLOAT32, v, True
    for v in (0.0, -1.0, 1.0, 3.0e38):
        yield f"{key}={v:g}", VT.FLOAT32, v, False


def _bool_cases(key, cur):
    yield f"{key}:string", VT.STRING, "false", True
    yield f"{key}:int", VT.UINT32, 1, True
    yield f"{key}={not cur}", VT.BOOL, not cur, False


def _str_cases(key, cur):
    yield f"{key}:int", VT.UINT32, 1, True
    yield f"{key}:array", (VT.ARRAY, VT.STRING), ["yarn", "linear"], True
    yield f"{key}=bogus", VT.STRING, "bogus", True


CASES = {"int": _int_cases, "float": _float_cases, "bool": _bool_cases, "str": _str_cases}


def mutations(path) -> list[Mutation]:
    """The corpus for the model at `path`: every read key, every kind of wrong value; missing tensors."""
    from localmoe.gguf_file import open_gguf
    keys = read_keys(path)
    with open_gguf(path) as g:
        arch, names = g.arch, list(g.tensors)
    out = []
    for key, (kind, cur) in keys.items():
        for name, vt, value, must_fail in CASES[kind](key, cur):
            typ, sub = vt if isinstance(vt, tuple) else (vt, None)
            out.append(Mutation(name, key, {f"{arch}.{key}": (typ, value, sub)}, must_fail=must_fail))
    last = max(int(n.split(".")[1]) for n in names if n.startswith("blk."))
    block = [n for n in names if n.startswith(f"blk.{last}.")]
    for t in ["token_embd.weight", "output_norm.weight", f"blk.0.{names_of(names, 0)[0]}"] + block:
        out.append(Mutation(f"-{t}", t, drop=(t,), must_fail=not t.endswith(".bias")))  # biases are optional
    return out


def names_of(names, il: int) -> list[str]:
    p = f"blk.{il}."
    return [n[len(p):] for n in names if n.startswith(p)]


def main(argv=None) -> int:
    args = (argv if argv is not None else sys.argv)[1:]
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, out = Path(args[0]), Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    muts = mutations(src)
    for m in muts:
        safe = m.name.replace("/", "_").replace(":", "_")
        rewrite(src, out / f"{src.stem}.{safe}.gguf", m.kv, m.drop)
    print(f"wrote {len(muts)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

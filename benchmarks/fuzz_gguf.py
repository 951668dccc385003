"""GGUF header surgery for the fuzz campaign (benchmarks/fuzz.py).

`parse(raw)` splits a valid file's header into KV entries (raw bytes kept, so
a 150k-token vocabulary is never decoded) and tensor infos, and records where
every integer field of the header lies (counts, lengths, types, dims,
offsets). `build(...)` writes a header back from edited parts; tensor data
offsets are relative to the data section, so a rewritten header of any length
can be followed by the original data bytes. This is independent of
localmoe.gguf_file on purpose: the fuzzer must be able to write what the
reader under test rejects.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType as VT

DEFAULT_ALIGNMENT = 32
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}
INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
FLOAT_TYPES = (VT.FLOAT32, VT.FLOAT64)


@dataclass
class KV:
    key: str
    raw: bytes          # type field(s) + value, exactly as in the file (or as encode_value wrote it)


@dataclass
class Tensor:
    name: str
    ne: list[int]       # GGUF order (ne[0] = row length)
    ttype: int
    offset: int         # relative to the data section


@dataclass
class Header:
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    data_offset: int
    # (position, struct code, label) of every integer field, for the raw-bytes mutators
    fields: list[tuple[int, str, str]] = field(default_factory=list)


class _Reader:
    def __init__(self, raw: bytes, fields: list):
        self.raw, self.pos, self.fields = raw, 0, fields

    def int(self, code: str, label: str) -> int:
        v = struct.unpack_from(code, self.raw, self.pos)[0]
        self.fields.append((self.pos, code, label))
        self.pos += struct.calcsize(code)
        return v

    def string(self, label: str) -> bytes:
        n = self.int("<Q", label + " length")
        s = self.raw[self.pos:self.pos + n]
        self.pos += n
        return s


def _skip_value(r: _Reader, vtype: int, key: str) -> None:
    if vtype == VT.STRING:
        r.string(f"{key} string")
    else:
        r.pos += struct.calcsize(_SCALAR[VT(vtype)])


def parse(raw: bytes) -> Header:
    """Header of a valid GGUF v2/v3 file (raises on anything else: inputs are our own bases)."""
    fields: list = []
    r = _Reader(raw, fields)
    assert raw[:4] == b"GGUF", "not a GGUF file"
    r.pos = 4
    version = r.int("<I", "version")
    n_tensors = r.int("<q", "tensor count")
    n_kv = r.int("<q", "kv count")
    kvs = []
    for _ in range(n_kv):
        key = r.string("key").decode()
        start = r.pos
        vtype = r.int("<i", f"{key} type")
        if vtype == VT.ARRAY:
            etype = r.int("<i", f"{key} element type")
            n = r.int("<Q", f"{key} array length")
            if etype == VT.STRING:
                for j in range(n):
                    n_s = struct.unpack_from("<Q", raw, r.pos)[0]
                    if j < 4:  # a few element lengths are enough to aim at
                        fields.append((r.pos, "<Q", f"{key}[{j}] length"))
                    r.pos += 8 + n_s
            else:
                r.pos += struct.calcsize(_SCALAR[VT(etype)]) * n
        elif vtype in (VT.STRING, *_SCALAR):
            if vtype in INT_TYPES:
                fields.append((r.pos, _SCALAR[VT(vtype)], f"{key} value"))
            _skip_value(r, vtype, key)
        kvs.append(KV(key, raw[start:r.pos]))
    tensors = []
    for _ in range(n_tensors):
        name = r.string("tensor name").decode()
        n_dims = r.int("<I", f"{name} n_dims")
        ne = [r.int("<q", f"{name} ne[{j}]") for j in range(n_dims)]
        ttype = r.int("<i", f"{name} type")
        offset = r.int("<Q", f"{name} offset")
        tensors.append(Tensor(name, ne, ttype, offset))
    h = Header(version, kvs, tensors, 0, fields)
    h.data_offset = _pad(r.pos, alignment(h)) if tensors else r.pos
    return h


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _str(s: bytes | str) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _scalar_bytes(vtype: VT, v) -> bytes:
    if vtype == VT.STRING:
        return _str(v)
    if vtype in FLOAT_TYPES:
        return np.asarray(v, np.float32 if vtype == VT.FLOAT32 else np.float64).tobytes()
    size = struct.calcsize(_SCALAR[vtype])
    return (int(v) % (1 << (8 * size))).to_bytes(size, "little")  # wraps into the field: two's complement


def encode_value(vtype: str, value) -> bytes:
    """Type field(s) + value. vtype: "UINT32", ..., or "ARRAY:UINT32"; out-of-range ints wrap."""
    if vtype.startswith("ARRAY:"):
        et = VT[vtype[6:]]
        return (struct.pack("<iiQ", VT.ARRAY, et, len(value))
                + b"".join(_scalar_bytes(et, v) for v in value))
    vt = VT[vtype]
    return struct.pack("<i", vt) + _scalar_bytes(vt, value)


def alignment(h: Header) -> int:
    """The alignment the data section will be padded to (the default when the key is unusable)."""
    for kv in h.kvs:
        if kv.key == "general.alignment" and len(kv.raw) == 8 and struct.unpack_from("<i", kv.raw)[0] == VT.UINT32:
            a = struct.unpack_from("<I", kv.raw, 4)[0]
            if a and not a & (a - 1):
                return a
    return DEFAULT_ALIGNMENT


def build(h: Header) -> bytes:
    """Header bytes, padded to where the data section starts."""
    out = [b"GGUF", struct.pack("<Iqq", h.version, len(h.tensors), len(h.kvs))]
    out += [_str(kv.key) + kv.raw for kv in h.kvs]
    for t in h.tensors:
        out.append(_str(t.name) + struct.pack(f"<I{len(t.ne)}qiQ", len(t.ne), *t.ne, t.ttype, t.offset))
    raw = b"".join(out)
    return raw + b"\0" * (_pad(len(raw), alignment(h)) - len(raw)) if h.tensors else raw


def write_with_data(path: str, header: bytes, base_path: str, base_data_offset: int, sparse: bool) -> None:
    """header + the base file's data section; sparse=True leaves it as a hole of zeros (no copy)."""
    size = os.path.getsize(base_path) - base_data_offset
    with open(path, "wb") as out:
        out.write(header)
        if sparse:
            out.truncate(len(header) + size)
            return
        with open(base_path, "rb") as src:
            out.flush()
            pos = base_data_offset
            while pos < base_data_offset + size:  # in-kernel copy from the page cache
                n = os.sendfile(out.fileno(), src.fileno(), pos, base_data_offset + size - pos)
                if n <= 0:
                    raise OSError(f"sendfile copied nothing from {base_path} at {pos}")
                pos += n

"""Safe GGUF reading: a bounded validation walk, then zero-copy views.

`validate(path)` walks the header with bounded reads and applies the checks of
llama.cpp's gguf.cpp (gguf_init_from_file_impl) plus llama-model-loader's
"tensor data within the file" check, so we reject what llama.cpp rejects and
load what it loads. Every problem raises one GGUFFormatError that names it.

`open_gguf(path)` reuses that walk as an index: gguf.GGUFReader parses every
array element eagerly (about 8 s for a 150k-token vocab), so metadata values
are decoded here on first access and tensor bytes are uint8 views of the mmap.
gguf-py supplies the type enums and block sizes; tests use GGUFReader as the
oracle for the decoded values.

Shapes are numpy order: (rows, cols) = GGUF's ne reversed.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as VT

from .errors import GGUFFormatError, LocalMoEError

GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64               # tensor names must be shorter than this
MAX_STRING_LENGTH = 1 << 30      # llama.cpp GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30     # llama.cpp GGUF_MAX_ARRAY_ELEMENTS
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
INT64_MAX = (1 << 63) - 1
# smallest possible encodings: key (8-byte length + 1 char) + type + 1-byte value;
# tensor: name length + n_dims + type + offset
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8

# struct codes, also valid numpy dtype strings ("<I" is uint32); BOOL is a byte
_CODES = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h",
    VT.UINT32: "<I", VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B",
    VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_STRUCT = {vt: struct.Struct(code) for vt, code in _CODES.items()}
_U32, _I32, _U64, _I64 = (struct.Struct(f) for f in ("<I", "<i", "<Q", "<q"))


class GGUFOpenError(LocalMoEError, OSError):
    """The path cannot be opened as a file (missing, a directory, unreadable)."""


class TensorNotFoundError(LocalMoEError, KeyError):
    """GGUFFile.tensor(name) for a name the file does not have."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class _KV:
    vtype: VT        # scalar type, or element type of an array
    is_array: bool
    count: int       # array length (1 for scalars)
    offset: int      # absolute offset of the value (of the first element for arrays)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor; `shape` is numpy order (GGUF ne reversed), `offset` is absolute in the file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int
    _file: "GGUFFile" = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """Zero-copy read-only uint8[n_bytes] view of the tensor's bytes in the mmap."""
        return self._file._view(self.offset, self.n_bytes)


@dataclass
class _Index:
    version: int
    alignment: int
    data_offset: int
    kvs: dict[str, _KV]
    tensors: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int, int]]


class _Cursor:
    """Bounded little-endian reads from buf[0:size]; every overrun is a GGUFFormatError."""

    def __init__(self, buf, size: int, where: str):
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def error(self, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.where}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"truncated file: {what} at offset {self.pos} needs {n} bytes, "
                             f"only {self.size - self.pos} left (file is {self.size} bytes)")

    def unpack(self, st: struct.Struct, what: str):
        self.need(st.size, what)
        v = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return v

    def string(self, what: str) -> bytes:
        start = self.pos
        n = self.unpack(_U64, f"length of {what}")
        if n > MAX_STRING_LENGTH:
            raise self.error(f"{what} at offset {start} has length {n} > {MAX_STRING_LENGTH}")
        self.need(n, f"{what} (string of {n} bytes)")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def text(self, what: str) -> str:
        start = self.pos
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at offset {start} is not valid UTF-8: {raw[:40]!r}") from None

    def skip_strings(self, n: int, what: str) -> None:
        """Walk n length-prefixed strings (hot loop for 150k-token vocabularies)."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        for j in range(n):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of {what}[{j}]")
            ln = unpack(buf, pos)[0]
            if ln > MAX_STRING_LENGTH or ln > size - pos - 8:
                self.pos = pos
                raise self.error(f"{what}[{j}] at offset {pos}: string length {ln} runs past "
                                 f"the end of the file ({size} bytes)")
            pos += 8 + ln
        self.pos = pos


def _value_type(c: _Cursor, raw: int, key: str, what: str) -> VT:
    if raw == VT.ARRAY:
        raise c.error(f"key '{key}': nested arrays (array of arrays) are not supported")
    try:
        return VT(raw)
    except ValueError:
        raise c.error(f"key '{key}' has unknown {what} {raw} at offset {c.pos - 4}") from None


def _read_kv(c: _Cursor, key: str) -> _KV:
    vtype = c.unpack(_I32, f"value type of key '{key}'")
    if vtype == VT.ARRAY:
        vtype = _value_type(c, c.unpack(_I32, f"array type of key '{key}'"), key, "array element type")
        n = c.unpack(_U64, f"array length of key '{key}'")
        if n > MAX_ARRAY_ELEMENTS:
            raise c.error(f"key '{key}': array length {n} > {MAX_ARRAY_ELEMENTS}")
        start = c.pos
        if vtype == VT.STRING:
            c.need(8 * n, f"array of {n} strings for key '{key}'")
            c.skip_strings(n, f"key '{key}'")
        else:
            c.need(_STRUCT[vtype].size * n, f"array of {n} {vtype.name} for key '{key}'")
            c.pos += _STRUCT[vtype].size * n
        return _KV(vtype, True, n, start)
    vtype = _value_type(c, vtype, key, "value type")
    start = c.pos
    if vtype == VT.STRING:
        c.string(f"value of key '{key}'")
    else:
        c.unpack(_STRUCT[vtype], f"{vtype.name} value of key '{key}'")
    return _KV(vtype, False, 1, start)


def _read_tensor_info(c: _Cursor, i: int, seen: set[str]):
    name = c.text(f"name of tensor {i}")
    if len(name.encode()) >= GGML_MAX_NAME:
        raise c.error(f"tensor {i} name {name[:80]!r} is too long (>= {GGML_MAX_NAME} bytes)")
    if name in seen:
        raise c.error(f"duplicate tensor name '{name}' (tensor {i})")
    seen.add(name)
    n_dims = c.unpack(_U32, f"n_dims of tensor '{name}'")
    if n_dims > GGML_MAX_DIMS:
        raise c.error(f"tensor '{name}' has n_dims {n_dims} > {GGML_MAX_DIMS}")
    ne = [c.unpack(_I64, f"dimension {j} of tensor '{name}'") for j in range(n_dims)]
    if any(d < 0 for d in ne):
        raise c.error(f"tensor '{name}' has a negative dimension: ne={ne}")
    ne0 = ne[0] if ne else 1
    # same order as llama.cpp: only factors > 1 can overflow
    n_el = ne0
    for d in ne[1:]:
        if d > 1 and INT64_MAX // d < n_el:
            raise c.error(f"tensor '{name}': element count of ne={ne} overflows int64")
        n_el *= d
    raw_type = c.unpack(_I32, f"type of tensor '{name}'")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise c.error(f"tensor '{name}' has unknown tensor type {raw_type} "
                      f"(not a known or no longer supported GGML type)") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if ne0 % block:
        raise c.error(f"tensor '{name}' of type {qtype.name}: row length ne[0]={ne0} "
                      f"is not a multiple of the block size {block}")
    offset = c.unpack(_U64, f"data offset of tensor '{name}'")
    return name, qtype, tuple(reversed(ne)), n_el, n_el // block * type_size, offset


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _scan(buf, size: int, where: str) -> _Index:
    c = _Cursor(buf, size, where)
    c.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        raise c.error(f"bad magic {magic!r} at offset 0, expected b'GGUF' (not a GGUF file)")
    c.pos = 4
    version = c.unpack(_U32, "version")
    if version != 0 and version & 0xFFFF == 0:
        raise c.error(f"version {version:#010x}: a big-endian GGUF file is not supported")
    if version not in SUPPORTED_VERSIONS:
        raise c.error(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = c.unpack(_I64, "tensor count")
    n_kv = c.unpack(_I64, "KV count")
    if n_tensors < 0 or n_kv < 0:
        raise c.error(f"negative count: {n_tensors} tensors, {n_kv} KV pairs")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > size - c.pos:
        raise c.error(f"header claims {n_tensors} tensors and {n_kv} KV pairs, more than the "
                      f"{size - c.pos} bytes after offset {c.pos} can hold")

    kvs: dict[str, _KV] = {}
    for i in range(n_kv):
        start = c.pos
        key = c.text(f"key of KV pair {i}")
        if not key:
            raise c.error(f"KV pair {i} at offset {start} has an empty key")
        if key in kvs:
            raise c.error(f"duplicate key '{key}' (KV pair {i} at offset {start})")
        kvs[key] = _read_kv(c, key)

    alignment = DEFAULT_ALIGNMENT
    kv = kvs.get("general.alignment")
    if kv is not None:
        if kv.vtype != VT.UINT32 or kv.is_array:
            kind = f"array of {kv.vtype.name}" if kv.is_array else kv.vtype.name
            raise c.error(f"key 'general.alignment' must be UINT32, not {kind}")
        alignment = _U32.unpack_from(buf, kv.offset)[0]
        if alignment == 0 or alignment & (alignment - 1):
            raise c.error(f"general.alignment {alignment} is not a power of two")

    seen: set[str] = set()
    tensors = [_read_tensor_info(c, i, seen) for i in range(n_tensors)]
    # llama.cpp pads to the data section only when there are tensors
    data_offset = _pad(c.pos, alignment) if tensors else c.pos
    if data_offset > size:
        raise c.error(f"truncated file: data section starts at offset {data_offset}, "
                      f"file is {size} bytes")
    expected = 0
    for name, qtype, shape, n_el, n_bytes, offset in tensors:
        if offset != expected:
            raise c.error(f"tensor '{name}' has data offset {offset}, expected {expected} (tensor data "
                          f"must be in order, contiguous and aligned to {alignment})")
        if data_offset + offset + n_bytes > size:
            raise c.error(f"tensor '{name}' data at offset {data_offset + offset} + {n_bytes} bytes "
                          f"runs past the end of the file ({size} bytes): truncated?")
        expected += _pad(n_bytes, alignment)
    tensors = [(n, q, s, e, b, data_offset + o) for n, q, s, e, b, o in tensors]
    return _Index(version, alignment, data_offset, kvs, tensors)


def _open(path) -> tuple[str, object, int]:
    """(display name, open binary file, size); missing / directory / empty are clear errors."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        raise GGUFOpenError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise GGUFOpenError(f"{name}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise GGUFOpenError(f"{name}: cannot open: {e.strerror or e}") from None
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        f.close()
        raise GGUFFormatError(f"{name}: empty file (0 bytes), not a GGUF file")
    return name, f, size


def _mmap(name: str, f, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise GGUFOpenError(f"{name}: cannot memory-map: {e}") from None


def validate(path) -> None:
    """Raise GGUFFormatError (or GGUFOpenError) unless `path` is a GGUF file llama.cpp would load.

    Cost is bounded by the header size: tensor data is never read.
    """
    name, f, size = _open(path)
    with f, _mmap(name, f, size) as mm:
        _scan(mm, size, name)


def open_gguf(path) -> "GGUFFile":
    """Validate `path` and open it memory-mapped."""
    name, f, size = _open(path)
    with f:
        mm = _mmap(name, f, size)
    try:
        return GGUFFile(name, mm, size, _scan(mm, size, name))
    except BaseException:
        mm.close()
        raise


class Metadata(Mapping):
    """key -> Python value (str, int, float, bool or a list of those), decoded on first access."""

    def __init__(self, file: "GGUFFile", kvs: dict[str, _KV]):
        self._file, self._kvs, self._cache = file, kvs, {}

    def __getitem__(self, key: str) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            kv = self._kvs[key]
        value = self._cache[key] = self._file._decode(key, kv)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._kvs)

    def __len__(self) -> int:
        return len(self._kvs)

    def value_type(self, key: str) -> tuple[VT, bool]:
        """(GGUF value type, is_array) of `key`, e.g. to tell UINT32 from INT64."""
        kv = self._kvs[key]
        return kv.vtype, kv.is_array

    def array_length(self, key: str) -> int | None:
        """Element count of an array value (None for a scalar), known without decoding it."""
        kv = self._kvs[key]
        return kv.count if kv.is_array else None


_MISSING = object()


class GGUFFile:
    """A validated, memory-mapped GGUF file. Use open_gguf(path); closes as a context manager."""

    def __init__(self, path: str, mm: mmap.mmap, size: int, index: _Index):
        self.path = path
        self.file_size = size
        self.version = index.version
        self.alignment = index.alignment
        self.data_offset = index.data_offset
        self._mm: mmap.mmap | None = mm
        self.metadata = Metadata(self, index.kvs)
        self.tensors: dict[str, TensorInfo] = {
            n: TensorInfo(n, q, s, e, b, o, self) for n, q, s, e, b, o in index.tensors}

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFFormatError(f"{self.path}: missing string key 'general.architecture'")
        return arch

    def get(self, key: str, default=None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default=_MISSING) -> Any:
        """metadata[f"{arch}.{suffix}"]; without a default a missing key is a GGUFFormatError."""
        key = f"{self.arch}.{suffix}"
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFFormatError(f"{self.path}: missing required key '{key}'")
        return default

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named '{name}'") from None

    def _buf(self) -> mmap.mmap:
        if self._mm is None:
            raise LocalMoEError(f"{self.path}: file is closed")
        return self._mm

    def _view(self, offset: int, n: int) -> np.ndarray:
        return np.frombuffer(self._buf(), np.uint8, n, offset)

    def _decode(self, key: str, kv: _KV) -> Any:
        buf = self._buf()
        if kv.vtype == VT.STRING:
            out, pos = [], kv.offset
            for _ in range(kv.count):
                n = _U64.unpack_from(buf, pos)[0]
                raw = buf[pos + 8:pos + 8 + n]
                try:
                    out.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise GGUFFormatError(f"{self.path}: key '{key}': string at offset {pos} "
                                          f"is not valid UTF-8: {raw[:40]!r}") from None
                pos += 8 + n
            return out if kv.is_array else out[0]
        arr = np.frombuffer(buf, _CODES[kv.vtype], kv.count, kv.offset)
        if kv.vtype == VT.BOOL:
            arr = arr != 0  # llama.cpp: any non-zero byte is true
        values = arr.tolist()
        return values if kv.is_array else values[0]

    def close(self) -> None:
        """Unmap the file. Tensor views still alive keep the mapping until they are freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views export the buffer; the OS mapping goes when they do

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<GGUFFile {self.path!r} v{self.version} {len(self.metadata)} keys "
                f"{len(self.tensors)} tensors>")

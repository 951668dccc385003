"""(Re)generate tests/bad_gguf/: one small malformed GGUF file per failure mode.

    python tests/make_bad_gguf.py

Each file is the valid file from `valid_gguf()` (written by gguf.GGUFWriter)
with one field patched with struct. CASES maps file stem -> (builder, a word
the GGUFFormatError message must contain). test_gguf_file.py checks that the
committed files are byte-identical to what this script builds.
"""
from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as VT, GGUFWriter

OUT = Path(__file__).parent / "bad_gguf"
ALIGN = 32
# (name, qtype, numpy shape); byte counts: 512, 128, 136, 144
TENSORS = [("a.weight", T.F32, (4, 32)), ("b.weight", T.F16, (2, 32)),
           ("c.weight", T.Q8_0, (2, 64)), ("d.weight", T.Q4_K, (1, 256))]
SCALARS = [("test.u8", VT.UINT8, 200), ("test.i8", VT.INT8, -5), ("test.u16", VT.UINT16, 60000),
           ("test.i16", VT.INT16, -300), ("test.u32", VT.UINT32, 4_000_000_000),
           ("test.i32", VT.INT32, -7), ("test.f32", VT.FLOAT32, 1.5), ("test.bool", VT.BOOL, True),
           ("test.str", VT.STRING, "h\u00e9llo"), ("test.u64", VT.UINT64, 2**40),
           ("test.i64", VT.INT64, -2**40), ("test.f64", VT.FLOAT64, 0.1)]
ARRAYS = [("test.arr_u8", VT.UINT8, [1, 2, 3]), ("test.arr_i32", VT.INT32, [1, -2, 3]),
          ("test.arr_f32", VT.FLOAT32, [0.5, -1.0]), ("test.arr_bool", VT.BOOL, [True, False, True]),
          ("test.arr_str", VT.STRING, ["a", "bc", "d\u00e9f"])]


def tensor_bytes(qtype: T, shape: tuple[int, int]) -> np.ndarray:
    """Deterministic payload; quantized types get raw bytes (never dequantized here)."""
    block, size = GGML_QUANT_SIZES[qtype]
    n_bytes = shape[0] * shape[1] // block * size
    if qtype == T.F32:
        return np.linspace(-1, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    if qtype == T.F16:
        return np.linspace(-1, 1, shape[0] * shape[1]).astype(np.float16).reshape(shape)
    return (np.arange(n_bytes, dtype=np.uint32) * 7 % 251).astype(np.uint8).reshape(shape[0], -1)


def valid_gguf() -> bytes:
    """A small valid GGUF v3: every scalar type, arrays, 4 tensors (F32, F16, Q8_0, Q4_K)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "valid.gguf"
        w = GGUFWriter(path, arch="test")
        w.add_custom_alignment(ALIGN)
        for key, vt, val in SCALARS:
            w.add_key_value(key, val, vt)
        for key, vt, val in ARRAYS:
            w.add_key_value(key, val, VT.ARRAY, sub_type=vt)
        for name, qtype, shape in TENSORS:
            raw = tensor_bytes(qtype, shape)
            # uint8 payloads are quantized: gguf derives the element shape from the byte shape
            w.add_tensor(name, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


# --- locating fields in the valid file (no parser: search for length-prefixed names) ---

def put(b: bytes, off: int, fmt: str, *vals) -> bytes:
    n = struct.calcsize(fmt)
    return b[:off] + struct.pack(fmt, *vals) + b[off + n:]


def splice(b: bytes, off: int, old_len: int, new: bytes) -> bytes:
    return b[:off] + new + b[off + old_len:]


def record(b: bytes, name: str) -> int:
    """Offset of the length-prefixed string `name` (a key or a tensor name)."""
    raw = name.encode()
    off = b.index(struct.pack("<Q", len(raw)) + raw)
    assert b.count(struct.pack("<Q", len(raw)) + raw) == 1, name
    return off


def kv_type(b: bytes, key: str) -> int:
    """Offset of the value type of `key`; the value (or array element type) follows."""
    return record(b, key) + 8 + len(key.encode())


def tensor_fields(b: bytes, name: str) -> dict[str, int]:
    """Offsets of a tensor info's n_dims, ne[0], type and data offset fields, and its end."""
    n_dims_at = record(b, name) + 8 + len(name.encode())
    n_dims = struct.unpack_from("<I", b, n_dims_at)[0]
    ne_at = n_dims_at + 4
    type_at = ne_at + 8 * n_dims
    return {"n_dims": n_dims_at, "ne": ne_at, "type": type_at, "offset": type_at + 4, "end": type_at + 12}


def get_offset(b: bytes, name: str) -> int:
    return struct.unpack_from("<Q", b, tensor_fields(b, name)["offset"])[0]


def header_end(b: bytes) -> int:
    return tensor_fields(b, TENSORS[-1][0])["end"]


def str_element(b: bytes, key: str, j: int) -> int:
    """Offset of the length of element j of string array `key`."""
    off = kv_type(b, key) + 4 + 4 + 8
    for _ in range(j):
        off += 8 + struct.unpack_from("<Q", b, off)[0]
    return off


def rename_tensor(b: bytes, name: str, new: str) -> bytes:
    raw = new.encode()
    return splice(b, record(b, name), 8 + len(name.encode()), struct.pack("<Q", len(raw)) + raw)


# name -> (valid bytes -> bad bytes, word the error message must contain)
CASES = {
    "empty": (lambda b: b"", "empty file"),
    "bad_magic": (lambda b: put(b, 0, "4s", b"GGML"), "magic"),
    "version_1": (lambda b: put(b, 4, "<I", 1), "version 1"),
    "version_4": (lambda b: put(b, 4, "<I", 4), "version 4"),
    "big_endian": (lambda b: put(b, 4, ">I", 3), "big-endian"),
    "negative_kv_count": (lambda b: put(b, 16, "<q", -1), "negative count"),
    "huge_tensor_count": (lambda b: put(b, 8, "<q", 2**40), "header claims"),
    "huge_kv_count": (lambda b: put(b, 16, "<q", 2**62), "header claims"),
    "key_past_eof": (lambda b: put(b, 24, "<Q", len(b)), "key of KV pair 0"),
    "key_over_1gib": (lambda b: put(b, 24, "<Q", 2**40), "1073741824"),
    "empty_key": (lambda b: splice(b, record(b, "test.u8"), 8 + 7, struct.pack("<Q", 0)), "empty key"),
    "duplicate_key": (lambda b: put(b, record(b, "test.i8") + 8, "7s", b"test.u8"), "duplicate key 'test.u8'"),
    "invalid_utf8_key": (lambda b: put(b, record(b, "test.u8") + 8, "2s", b"\xff\xfe"), "UTF-8"),
    "string_value_past_eof": (lambda b: put(b, kv_type(b, "test.str") + 4, "<Q", 10**6), "'test.str'"),
    "array_past_eof": (lambda b: put(b, kv_type(b, "test.arr_i32") + 8, "<Q", 10**6), "'test.arr_i32'"),
    "array_over_1g_elements": (lambda b: put(b, kv_type(b, "test.arr_u8") + 8, "<Q", 2**40), "array length"),
    "string_array_element_past_eof": (
        lambda b: put(b, str_element(b, "test.arr_str", 1), "<Q", 10**6), "'test.arr_str'[1]"),
    "nested_array": (lambda b: put(b, kv_type(b, "test.arr_i32") + 4, "<i", VT.ARRAY), "nested arrays"),
    "unknown_value_type": (lambda b: put(b, kv_type(b, "test.u8"), "<i", 13), "unknown value type 13"),
    "unknown_array_type": (lambda b: put(b, kv_type(b, "test.arr_u8") + 4, "<i", 99),
                           "unknown array element type 99"),
    "alignment_not_power_of_two": (lambda b: put(b, kv_type(b, "general.alignment") + 4, "<I", 48),
                                   "power of two"),
    "alignment_zero": (lambda b: put(b, kv_type(b, "general.alignment") + 4, "<I", 0), "power of two"),
    "alignment_wrong_type": (lambda b: put(b, kv_type(b, "general.alignment"), "<i", VT.INT32),
                             "must be UINT32"),
    "tensor_name_too_long": (lambda b: rename_tensor(b, "a.weight", "a" * 64), "too long"),
    "duplicate_tensor_name": (lambda b: put(b, record(b, "b.weight") + 8, "8s", b"a.weight"),
                              "duplicate tensor name 'a.weight'"),
    "too_many_dims": (lambda b: put(b, tensor_fields(b, "a.weight")["n_dims"], "<I", 5), "n_dims 5"),
    "negative_dim": (lambda b: put(b, tensor_fields(b, "a.weight")["ne"] + 8, "<q", -4), "negative dimension"),
    "dims_overflow": (lambda b: put(b, tensor_fields(b, "a.weight")["ne"] + 8, "<q", 2**62),
                      "overflows int64"),
    "unknown_tensor_type": (lambda b: put(b, tensor_fields(b, "b.weight")["type"], "<i", 99),
                            "unknown tensor type 99"),
    "removed_tensor_type": (lambda b: put(b, tensor_fields(b, "b.weight")["type"], "<i", 4),  # Q4_2
                            "unknown tensor type 4"),
    "row_not_block_multiple": (lambda b: put(b, tensor_fields(b, "c.weight")["ne"], "<q", 48),
                               "block size 32"),
    "misaligned_offset": (lambda b: put(b, tensor_fields(b, "b.weight")["offset"], "<Q",
                                        get_offset(b, "b.weight") + 1), "'b.weight' has data offset"),
    "offset_gap": (lambda b: put(b, tensor_fields(b, "c.weight")["offset"], "<Q",
                                 get_offset(b, "c.weight") + ALIGN), "'c.weight' has data offset"),
    "offsets_out_of_order": (
        lambda b: put(put(b, tensor_fields(b, "b.weight")["offset"], "<Q", get_offset(b, "c.weight")),
                      tensor_fields(b, "c.weight")["offset"], "<Q", get_offset(b, "b.weight")),
        "'b.weight' has data offset"),
    "dim_past_eof": (lambda b: put(b, tensor_fields(b, "d.weight")["ne"] + 8, "<q", 2),
                     "runs past the end of the file"),
    "truncated_in_kv": (lambda b: b[:kv_type(b, "test.f64") + 4 + 3], "truncated file"),
    "truncated_in_tensor_info": (lambda b: b[:tensor_fields(b, "c.weight")["ne"] + 5], "truncated file"),
    "truncated_before_data": (lambda b: b[:header_end(b) + 1], "data section starts"),
    "truncated_in_data": (lambda b: b[:len(b) - ALIGN - 10], "runs past the end of the file"),
}


def build_all() -> dict[str, bytes]:
    """file name -> bytes for every case."""
    base = valid_gguf()
    assert header_end(base) % ALIGN not in (0, ALIGN - 1), "truncated_before_data needs padding"
    return {f"{name}.gguf": fn(base) for name, (fn, _) in CASES.items()}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    files = build_all()
    for stale in OUT.glob("*.gguf"):
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(files)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

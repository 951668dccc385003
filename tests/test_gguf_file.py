"""localmoe.gguf_file: valid files load, every malformed file is one GGUFFormatError."""
from __future__ import annotations

import ctypes
import math
import os
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import make_bad_gguf as mk
from localmoe.errors import GGUFFormatError, LocalMoEError
from localmoe.gguf_file import GGUFOpenError, TensorNotFoundError, open_gguf, validate
from models.vocab import NAMES, vocab_path

VALID = mk.valid_gguf()
# the file ends with d.weight's 144 bytes padded to 160; cutting only padding still loads, as in llama.cpp
DATA_END = len(VALID) - 16


@pytest.fixture(scope="module")
def valid_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    p.write_bytes(VALID)
    return p


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One path that the property tests overwrite per example."""
    return tmp_path_factory.mktemp("fuzz") / "x.gguf"


def load_fully(path) -> dict:
    """Everything a user can touch: all metadata values and every tensor byte."""
    validate(path)
    with open_gguf(path) as g:
        meta = dict(g.metadata)
        for t in g.tensors.values():
            assert t.data.size == t.n_bytes
            t.data.sum()  # reads every byte of the mapping
    return meta


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (bit flips make NaN floats)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


def reader_metadata(path) -> dict:
    """gguf-py's decoding of the same file: the oracle for our lazy decoder."""
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# --- valid files -------------------------------------------------------------------------

def test_writer_file_metadata_and_tensors(valid_path):
    with open_gguf(valid_path) as g:
        assert g.version == 3 and g.alignment == mk.ALIGN and g.file_size == len(VALID)
        assert g.arch == "test"
        expected = {"general.architecture": "test", "general.alignment": mk.ALIGN}
        expected |= {k: v for k, _, v in mk.SCALARS + mk.ARRAYS}
        assert list(g.metadata) == list(expected)
        for key, value in expected.items():
            assert same(g.metadata[key], value), key  # exact: all test values are exact in f32
        assert g.arch_get("u8") == 200 and g.get("nope", 7) == 7 and g.arch_get("nope", None) is None
        r = gguf.GGUFReader(valid_path)
        assert g.data_offset == r.data_offset
        assert list(g.tensors) == [n for n, _, _ in mk.TENSORS]
        for (name, qtype, shape), rt in zip(mk.TENSORS, r.tensors):
            t = g.tensor(name)
            assert (t.qtype, t.shape, t.n_elements) == (qtype, shape, shape[0] * shape[1])
            assert t.offset == rt.data_offset and t.n_bytes == rt.n_bytes
            assert t.data.dtype == np.uint8 and t.data.shape == (t.n_bytes,)
            assert t.data.tobytes() == mk.tensor_bytes(qtype, shape).tobytes()
            assert not t.data.flags.writeable and not t.data.flags.owndata  # a view of the mmap


def test_version_2_loads(tmp_path):
    p = tmp_path / "v2.gguf"
    p.write_bytes(mk.put(VALID, 4, "<I", 2))
    with open_gguf(p) as g:
        assert g.version == 2 and g.metadata["test.str"] == "h\u00e9llo"


@pytest.mark.parametrize("name", NAMES)
def test_vocab_files_load(name):
    with open_gguf(vocab_path(name)) as g:
        meta = dict(g.metadata)
        assert isinstance(g.arch, str) and not g.tensors
        tokens = meta["tokenizer.ggml.tokens"]
        assert len(tokens) > 1000 and all(isinstance(s, str) for s in tokens[:100])
        assert len(meta["tokenizer.ggml.token_type"]) == len(tokens)


def test_vocab_metadata_matches_gguf_reader():
    path = vocab_path("llama-spm")  # the smallest: GGUFReader is slow on big vocabularies
    with open_gguf(path) as g:
        ours = dict(g.metadata)
    ref = reader_metadata(path)
    assert ours.keys() == ref.keys()
    assert [k for k in ref if not same(ours[k], ref[k])] == []


def test_lazy_metadata_and_value_types(valid_path):
    with open_gguf(valid_path) as g:
        assert g.metadata._cache == {}
        g.metadata["test.arr_str"]
        assert list(g.metadata._cache) == ["test.arr_str"]
        assert g.metadata.value_type("test.u32") == (gguf.GGUFValueType.UINT32, False)
        assert g.metadata.value_type("test.arr_bool") == (gguf.GGUFValueType.BOOL, True)


def test_sparse_1gib_file_validates(tmp_path):
    """Validation reads the header only; a 1 GiB tensor costs nothing (sparse file)."""
    p = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(p, arch="test")
    w.add_tensor_info("big.weight", (1 << 18, 1 << 10), np.dtype(np.float32), 1 << 30)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_offset = -(-p.stat().st_size // 32) * 32
    os.truncate(p, data_offset + (1 << 30))
    validate(p)
    with open_gguf(p) as g:
        t = g.tensor("big.weight")
        assert (t.shape, t.n_bytes, t.offset) == ((1 << 18, 1 << 10), 1 << 30, data_offset)
    os.truncate(p, data_offset + (1 << 30) - 1)
    with pytest.raises(GGUFFormatError, match="past the end"):
        validate(p)


# --- API errors -------------------------------------------------------------------------

def test_bad_paths(tmp_path):
    with pytest.raises(GGUFOpenError, match="no such file") as e:
        open_gguf(tmp_path / "missing.gguf")
    assert isinstance(e.value, LocalMoEError)
    with pytest.raises(GGUFOpenError, match="is a directory"):
        validate(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty file"):
        open_gguf(tmp_path / "empty.gguf")


def test_missing_tensor_and_keys(tmp_path, valid_path):
    with open_gguf(valid_path) as g:
        with pytest.raises(TensorNotFoundError, match="no tensor named 'x.weight'") as e:
            g.tensor("x.weight")
        assert isinstance(e.value, KeyError) and isinstance(e.value, LocalMoEError)
        with pytest.raises(GGUFFormatError, match="'test.block_count'"):
            g.arch_get("block_count")
        with pytest.raises(KeyError):
            g.metadata["nope"]
    p = tmp_path / "noarch.gguf"  # rename the key, same length
    p.write_bytes(mk.put(VALID, mk.record(VALID, "general.architecture") + 8, "20s", b"general.Architecture"))
    with open_gguf(p) as g, pytest.raises(GGUFFormatError, match="general.architecture"):
        g.arch


def test_invalid_utf8_value_is_format_error(tmp_path):
    p = tmp_path / "utf8.gguf"
    p.write_bytes(mk.put(VALID, mk.kv_type(VALID, "test.str") + 4 + 8, "1s", b"\xff"))
    validate(p)  # like llama.cpp, values are not checked at open; decoding one is
    with open_gguf(p) as g:
        assert g.metadata["test.u8"] == 200
        with pytest.raises(GGUFFormatError, match="'test.str'.*UTF-8"):
            g.metadata["test.str"]


def test_close_keeps_live_views_valid(valid_path):
    g = open_gguf(valid_path)
    view = g.tensor("a.weight").data
    with g:
        pass
    with pytest.raises(LocalMoEError, match="closed"):
        g.tensor("a.weight").data
    # the mapping stays until the last view is gone: reading it must not crash
    assert view.tobytes() == mk.tensor_bytes(gguf.GGMLQuantizationType.F32, (4, 32)).tobytes()
    with open_gguf(valid_path) as g2:
        g2.metadata["test.arr_f32"]  # decoding must not leave a buffer export behind
        mm = g2._mm
    assert mm.closed


# --- the bad-file corpus -------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(mk.CASES))
def test_corpus_file_is_rejected(case):
    path = mk.OUT / f"{case}.gguf"
    word = mk.CASES[case][1]
    for fn in (validate, open_gguf):
        tracemalloc.start()
        try:
            with pytest.raises(GGUFFormatError) as e:
                fn(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert word in str(e.value) and str(path) in str(e.value)
        assert peak < 1 << 20, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"


def test_corpus_matches_script():
    built = mk.build_all()
    on_disk = {p.name: p.read_bytes() for p in mk.OUT.glob("*.gguf")}
    assert sorted(on_disk) == sorted(built), "run python tests/make_bad_gguf.py"
    assert [n for n in built if built[n] != on_disk[n]] == [], "run python tests/make_bad_gguf.py"


# --- every truncation and random byte flips: load fully or GGUFFormatError -----------------

def loads_or_format_error(path) -> bool:
    """True if the file loads fully, False on GGUFFormatError; anything else propagates."""
    try:
        load_fully(path)
    except GGUFFormatError:
        return False
    return True


def test_every_truncation(scratch):
    loads = []
    for n in range(len(VALID)):
        scratch.write_bytes(VALID[:n])
        loads.append(loads_or_format_error(scratch))
    assert [n for n, ok in enumerate(loads) if ok] == list(range(DATA_END, len(VALID)))


def _field_starts() -> list[int]:
    """Offsets of every count, length, type, dimension and data offset in VALID's header."""
    starts = [4, 8, 16]
    for key in ["general.architecture", "general.alignment"] + [k for k, _, _ in mk.SCALARS + mk.ARRAYS]:
        starts += [mk.record(VALID, key), mk.kv_type(VALID, key), mk.kv_type(VALID, key) + 4,
                   mk.kv_type(VALID, key) + 8]
    for name, _, _ in mk.TENSORS:
        f = mk.tensor_fields(VALID, name)
        starts += [mk.record(VALID, name), f["n_dims"], f["ne"], f["ne"] + 8, f["type"], f["offset"]]
    return starts


# hypothesis favours small integers, so aim some flips at the header's fields explicitly
any_flip = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))
field_flip = st.builds(lambda start, i, v: (start + i, v),
                       st.sampled_from(_field_starts()), st.integers(0, 7), st.integers(0, 255))
flips = st.lists(st.one_of(any_flip, field_flip), min_size=1, max_size=4)


def flipped(changes) -> bytes:
    b = bytearray(VALID)
    for pos, val in changes:
        b[pos] = val
    return bytes(b)


@settings(max_examples=300, deadline=1000)
@given(changes=flips)
def test_byte_flips(scratch, changes):
    scratch.write_bytes(flipped(changes))
    try:
        meta = load_fully(scratch)
    except GGUFFormatError:
        return
    ref = reader_metadata(scratch)
    assert [k for k in ref if not same(meta[k], ref[k])] == []


# --- llama.cpp as the reference: reject what it rejects, load what it loads ----------------

def _ggml_base():
    import llama_cpp
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for fn, res in [("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t),
                    ("gguf_get_alignment", ctypes.c_size_t)]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p]
    for fn in ("gguf_get_tensor_offset", "gguf_get_tensor_size"):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.Params = Params
    return lib


def llama_cpp_layout(lib, path) -> tuple | None:
    """(alignment, data offset, tensor offsets) as llama.cpp sees them; None if it would not load.

    gguf_init_from_file does the header checks; llama-model-loader adds the
    "tensor data within the file bounds" check, repeated here.
    """
    ctx = lib.gguf_init_from_file(os.fsencode(path), lib.Params(True, None))
    if not ctx:
        return None
    try:
        base, size = lib.gguf_get_data_offset(ctx), os.path.getsize(path)
        spans = [(base + lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i))
                 for i in range(lib.gguf_get_n_tensors(ctx))]
        if any(o + n > size for o, n in spans):
            return None
        return lib.gguf_get_alignment(ctx), base, [o for o, _ in spans]
    finally:
        lib.gguf_free(ctx)


KNOWN_DIFFERENCE = "known difference"


def our_layout(path) -> tuple | str | None:
    try:
        with open_gguf(path) as g:
            return g.alignment, g.data_offset, [t.offset for t in g.tensors.values()]
    except GGUFFormatError as e:
        # deliberate: we require UTF-8 keys and tensor names; gguf-py lacks type 42 (Q2_0)
        if "UTF-8" in str(e) or "unknown tensor type 42 " in str(e):
            return KNOWN_DIFFERENCE
        return None


@pytest.fixture(scope="module")
def ggml():
    return _ggml_base()


@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(set(mk.CASES) - {"invalid_utf8_key"}))
def test_llama_cpp_rejects_corpus(ggml, case):
    assert llama_cpp_layout(ggml, mk.OUT / f"{case}.gguf") is None


@pytest.fixture(scope="module")
def edge_path(tmp_path_factory) -> Path:
    """Zero-element, 0-d and 1-d tensors (all legal in GGUF)."""
    p = tmp_path_factory.mktemp("gguf") / "edge.gguf"
    w = gguf.GGUFWriter(p, arch="test")
    w.add_tensor("empty.weight", np.zeros((0, 32), np.float32))
    w.add_tensor("scalar", np.array(2.5, np.float32))
    w.add_tensor("v.weight", np.arange(3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_edge_shapes(edge_path):
    with open_gguf(edge_path) as g:
        got = {n: (t.shape, t.n_elements, t.n_bytes) for n, t in g.tensors.items()}
        assert got == {"empty.weight": ((0, 32), 0, 0), "scalar": ((), 1, 4), "v.weight": ((3,), 3, 12)}
        assert g.tensor("empty.weight").data.size == 0
        assert g.tensor("scalar").data.view(np.float32).tolist() == [2.5]
        assert g.tensor("v.weight").data.view(np.float32).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.reference
def test_llama_cpp_layout_of_valid_files(ggml, valid_path, edge_path):
    for path in [valid_path, edge_path] + [vocab_path(n) for n in NAMES]:
        assert our_layout(path) == llama_cpp_layout(ggml, path) is not None, path


@pytest.mark.reference
@settings(max_examples=300, deadline=1000)
@given(changes=flips, cut=st.one_of(st.just(len(VALID)), st.integers(0, len(VALID))))
def test_llama_cpp_agrees_on_damaged_files(ggml, scratch, changes, cut):
    scratch.write_bytes(flipped(changes)[:cut])
    ours = our_layout(scratch)
    assume(ours != KNOWN_DIFFERENCE)
    assert ours == llama_cpp_layout(ggml, scratch)

"""`localmoe quantize-model` against llama.cpp's quantizer (llama_model_quantize / llama-quantize).

Reference tests: the random tiny models of every architecture, quantized by both;
same tensor types, >= 99.9% identical blocks (the whole file identical where the
block quantizers are), same logits in llama.cpp. Type choice: llama.cpp's
llama_quant_compute_types (through ctypes) on full-size tensor lists of real
configurations. Plus the error paths and the atomic write.
"""
import ctypes
import errno
import importlib
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

import localmoe
import reference
from benchmarks._common import InitParams
from localmoe.cli import main
from localmoe.errors import GGUFFormatError, LocalMoEError, UnsupportedError
from localmoe.gguf_file import open_gguf
from localmoe.quant_mix import MIXES, plan_types
from models import archs
from models.build import cached_model

qmod = importlib.import_module("localmoe.quantizer")

MODELS = [("llama", None), ("qwen2moe", None), ("qwen3moe", None), ("olmoe", None), ("deepseek", None)] + \
    [("deepseek2", v) for v in archs.variants("deepseek2")]
REF_MIXES = ["Q8_0", "Q4_K_M", "Q3_K_M"]


def _llama_quantize(src: Path, dst: Path, mix: str, allow_requantize: bool = False) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix][0])
    params.nthread = 2
    params.allow_requantize = allow_requantize
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0


def _ours(src: Path, dst: Path, mix: str, **kw):
    return localmoe.quantize(src, dst, mix, threads=2, progress=False, **kw)


def _compare_files(ours: Path, ref: Path) -> float:
    """Assert same header bytes, tensor names/types/shapes; return the fraction of identical blocks."""
    a, b = open_gguf(ours), open_gguf(ref)
    with a, b:
        assert a.data_offset == b.data_offset
        with open(ours, "rb") as fa, open(ref, "rb") as fb:
            assert fa.read(a.data_offset) == fb.read(b.data_offset), "headers differ"
        same = total = 0
        for name, ta in a.tensors.items():
            tb = b.tensors[name]
            assert (ta.qtype, ta.shape) == (tb.qtype, tb.shape), name
            size = gguf.GGML_QUANT_SIZES[ta.qtype][1]
            eq = (ta.data.reshape(-1, size) == tb.data.reshape(-1, size)).all(axis=1)
            same, total = same + int(eq.sum()), total + eq.size
    return same / total


def _nmse(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((x - ref) ** 2) / np.sum(ref ** 2))


@pytest.mark.reference
@pytest.mark.parametrize("mix", REF_MIXES)
@pytest.mark.parametrize("arch,variant", MODELS, ids=[f"{a}-{v}" if v else a for a, v in MODELS])
def test_same_file_as_llama_cpp(tmp_path, arch, variant, mix):
    src = cached_model(arch, "tiny", "f16", variant=variant)
    ref = reference.model_file(arch, mix, variant)   # llama.cpp's quantizer, cached
    ours = tmp_path / "ours.gguf"
    _ours(src, ours, mix)
    frac = _compare_files(ours, ref)
    print(f"{arch} {variant or ''} {mix}: {frac:.4%} identical blocks")
    assert frac >= 0.999
    if mix == "Q8_0":  # every block quantizer involved is byte-exact: the whole file must be
        assert ours.read_bytes() == ref.read_bytes()
    if frac < 1.0:
        tokens = reference.tokenize(src, "The quick brown fox jumps over the lazy dog.")
        lo, lr = reference.logits_batch(ours, tokens), reference.logits_batch(ref, tokens)
        assert _nmse(lo, lr) < 1e-6, "logits NMSE vs llama.cpp's file >= 1e-6"


# --- type choice on full-size configurations, against llama.cpp's own rules --------------

FULL = [  # (arch, variant, n_layer, n_vocab): real configurations (HF config.json)
    ("llama", "8x7b", 32, 32000),          # Mixtral 8x7B
    ("qwen3moe", "30b-a3b", 48, 151936),   # Qwen3-30B-A3B
    ("deepseek2", "v3", 61, 129280),       # DeepSeek-V3 (3 dense layers)
    ("deepseek2", "v3-kvb", 61, 129280),
    ("deepseek2", "v2-lite", 27, 102400),  # DeepSeek-V2-Lite
    ("qwen2moe", "a2.7b", 24, 151936),     # Qwen1.5-MoE-A2.7B
    ("olmoe", "1b-7b", 16, 50304),         # OLMoE-1B-7B
    ("llama", "8x22b", 56, 32768),         # Mixtral 8x22B
    ("qwen3moe", "235b-a22b", 94, 151936), # Qwen3-235B-A22B
    ("deepseek", "16b", 28, 102400),       # DeepSeek-MoE-16B
    ("deepseek2", "v2", 60, 102400),       # DeepSeek-V2
]


class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (f, ctypes.c_uint32) for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                       "n_embd_head_k", "n_embd_head_v")]


def _libs():
    d = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(d / "libggml-base.so"))
    lib = ctypes.CDLL(str(d / "libllama.so"))
    base.ggml_init.argtypes, base.ggml_init.restype = [InitParams], ctypes.c_void_p
    base.ggml_tensor_overhead.restype = ctypes.c_size_t
    base.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    base.ggml_new_tensor.restype = ctypes.c_void_p
    base.ggml_set_name.argtypes, base.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    base.ggml_free.argtypes = [ctypes.c_void_p]
    fns = {n: getattr(lib, m) for n, m in (
        ("model", "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc"),
        ("init", "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params"),
        ("types", "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem"),
        ("free", "_Z16llama_quant_freeP19quantize_state_impl"))}
    fns["model"].argtypes, fns["model"].restype = [ctypes.POINTER(_Desc)], ctypes.c_void_p
    fns["init"].argtypes = [ctypes.c_void_p, ctypes.POINTER(llama_cpp.llama_model_quantize_params)]
    fns["init"].restype = ctypes.c_void_p
    fns["types"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    fns["free"].argtypes = [ctypes.c_void_p]
    return base, fns


def _llama_cpp_types(spec: archs.Spec, metadata: dict, tensors, mixes) -> dict:
    """mix -> {name: type} from llama.cpp's llama_quant_compute_types on a mock model."""
    base, fn = _libs()
    a = spec.arch
    n_head = metadata[f"{a}.attention.head_count"]
    desc = _Desc(a.encode(), metadata[f"{a}.embedding_length"], metadata[f"{a}.feed_forward_length"],
                 metadata[f"{a}.block_count"], n_head, metadata.get(f"{a}.attention.head_count_kv", n_head),
                 metadata[f"{a}.expert_count"], 128, 128)
    model = fn["model"](ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    qs = fn["init"](model, ctypes.byref(params))
    ctx = base.ggml_init(InitParams(len(tensors) * base.ggml_tensor_overhead() + (1 << 16), None, True))
    try:
        ptrs = (ctypes.c_void_p * len(tensors))()
        for i, (name, qtype, shape) in enumerate(tensors):
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            ptrs[i] = base.ggml_new_tensor(ctx, int(qtype), len(shape), ne)
            base.ggml_set_name(ptrs[i], name.encode())
        out = {}
        for mix in mixes:
            res = (ctypes.c_int * len(tensors))()
            fn["types"](qs, int(MIXES[mix][0]), ptrs, res, len(tensors))
            out[mix] = {t[0]: T(r) for t, r in zip(tensors, res)}
        return out
    finally:
        base.ggml_free(ctx)
        fn["free"](qs)
        llama_cpp.llama_model_free(model)


@pytest.mark.reference
@pytest.mark.parametrize("arch,variant,n_layer,n_vocab", FULL, ids=[f"{a}-{v}" for a, v, _, _ in FULL])
def test_type_choice_matches_llama_cpp_full_size(arch, variant, n_layer, n_vocab):
    spec = archs.spec(arch, "bench", variant, n_vocab, layers=n_layer)
    metadata = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in spec.keys.items()}}
    tensors = [(t.name, T.F16 if len(t.ne) > 1 else T.F32, tuple(reversed(t.ne))) for t in spec.tensors]
    ref = _llama_cpp_types(spec, metadata, tensors, list(MIXES))
    for mix in MIXES:
        ours = plan_types(mix, metadata, tensors)
        diff = {n: (ours[n].name, ref[mix][n].name) for n in ours if ours[n] != ref[mix][n]}
        assert not diff, f"{mix}: (ours, llama.cpp) differ for {len(diff)} tensors, e.g. {list(diff.items())[:4]}"


# --- behaviour: dry run, errors, atomic write ----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return cached_model("olmoe", "tiny", "f16")


def test_dry_run_writes_nothing_and_plans_exact_size(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(main, ["quantize-model", str(tiny), str(out), "--type", "Q4_K_M", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "blk.0.ffn_down_exps.weight" in res.output and "F16 -> Q6_K" in res.output
    plan = localmoe.quantize(tiny, out, "Q4_K_M", dry_run=True)
    ref = reference.model_file("olmoe", "Q4_K_M")
    assert plan.output_size == ref.stat().st_size   # exact: bytes of llama.cpp's file
    assert f"({plan.output_size} bytes)" in res.output


def test_output_exists_needs_force(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(main, ["quantize-model", str(tiny), str(out), "--type", "Q8_0"])
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    assert out.read_bytes() == b"keep me"


def test_same_path_and_bad_inputs(tiny, tmp_path):
    with pytest.raises(LocalMoEError, match="same file"):
        localmoe.quantize(tiny, tiny, "Q8_0", force=True)
    link = tmp_path / "link.gguf"
    link.symlink_to(tiny)
    with pytest.raises(LocalMoEError, match="same file"):
        localmoe.quantize(tiny, link, "Q8_0", force=True)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny.read_bytes()[:100_000])
    with pytest.raises(GGUFFormatError, match="truncated"):
        localmoe.quantize(bad, tmp_path / "o.gguf", "Q8_0")
    with pytest.raises(UnsupportedError, match="unknown quantization type"):
        localmoe.quantize(tiny, tmp_path / "o.gguf", "Q9_9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "truncated.gguf"]


def _small_model(path: Path, data: np.ndarray, raw_dtype=None) -> None:
    """A llama file with one 2-D weight (no output tensor, so no Q6_K for the Q4_0/Q8_0 mixes)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in (("block_count", 1), ("embedding_length", 64), ("context_length", 64),
                 ("feed_forward_length", 64), ("attention.head_count", 1), ("rope.dimension_count", 64)):
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint16("split.count", 1)   # dropped by llama.cpp
    w.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_input_type(tmp_path):
    src = tmp_path / "f64.gguf"
    _small_model(src, np.zeros((4, 64), np.float64))
    with pytest.raises(UnsupportedError, match="F64.*must be F32, F16 or BF16"):
        localmoe.quantize(src, tmp_path / "o.gguf", "Q8_0")


@pytest.mark.reference
def test_requantize_needs_flag_and_matches_llama_cpp(tmp_path, capfd):
    rng = np.random.default_rng(0)
    f32 = tmp_path / "f32.gguf"
    _small_model(f32, rng.standard_normal((64, 256)).astype(np.float32))
    q8 = tmp_path / "q8.gguf"
    _llama_quantize(f32, q8, "Q8_0")
    with pytest.raises(LocalMoEError, match="already quantized.*--allow-requantize"):
        localmoe.quantize(q8, tmp_path / "o.gguf", "Q4_0")
    localmoe.quantize(q8, tmp_path / "o.gguf", "Q4_0", allow_requantize=True)
    assert "warning: requantizing 1 already quantized tensors" in capfd.readouterr().err
    _llama_quantize(q8, tmp_path / "ref.gguf", "Q4_0", allow_requantize=True)
    assert (tmp_path / "o.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@pytest.mark.reference
def test_small_file_same_bytes_and_split_keys_dropped(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "f16.gguf"
    _small_model(src, rng.standard_normal((64, 256)).astype(np.float16))
    for mix in ("Q8_0", "Q4_0"):
        _llama_quantize(src, tmp_path / f"ref-{mix}.gguf", mix)
        localmoe.quantize(src, tmp_path / f"ours-{mix}.gguf", mix)
        ours = (tmp_path / f"ours-{mix}.gguf").read_bytes()
        assert ours == (tmp_path / f"ref-{mix}.gguf").read_bytes(), mix
        keys = list(gguf.GGUFReader(tmp_path / f"ours-{mix}.gguf").fields)
        assert "split.count" not in keys and keys[-2:] == ["general.quantization_version", "general.file_type"]


def test_disk_full_is_checked_first(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(qmod.shutil, "disk_usage", lambda p: _Usage(1000))
    with pytest.raises(LocalMoEError, match="not enough disk space"):
        localmoe.quantize(tiny, tmp_path / "o.gguf", "Q8_0")
    assert not list(tmp_path.iterdir())


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = free, 0, free


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["ENOSPC", "ctrl-c"])
def test_failure_mid_write_leaves_no_partial_and_keeps_old_output(tiny, tmp_path, monkeypatch, exc):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous model")
    real, calls = qmod._write_tensor, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            partial, = tmp_path.glob(".o.gguf.*.partial")   # a unique temp name beside the output
            assert partial.stat().st_size > 0   # it was being written
            raise exc
        return real(*args)
    monkeypatch.setattr(qmod, "_write_tensor", failing)
    with pytest.raises(LocalMoEError if isinstance(exc, OSError) else KeyboardInterrupt) as ei:
        localmoe.quantize(tiny, out, "Q8_0", force=True, progress=False)
    if isinstance(exc, OSError):
        assert "No space left" in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]
    assert out.read_bytes() == b"previous model"


def test_log_lines_when_not_a_terminal(tiny, tmp_path, capfd):
    localmoe.quantize(tiny, tmp_path / "o.gguf", "Q8_0")
    err = capfd.readouterr().err.splitlines()
    n = len(open_gguf(tiny).tensors)
    assert len(err) == n and err[0].startswith(f"[   1/{n:4d}] output.weight")
    assert "F16 -> Q8_0" in err[0]


def test_bad_values_are_rejected(tmp_path):
    src = tmp_path / "inf.gguf"
    x = np.ones((4, 64), np.float32)
    x[2, 5] = np.inf
    _small_model(src, x)
    with pytest.raises(LocalMoEError, match="inf/NaN"):
        localmoe.quantize(src, tmp_path / "o.gguf", "Q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["inf.gguf"]


@pytest.mark.reference
def test_small_slabs_give_the_same_file(tmp_path, monkeypatch):
    """Slabs of a few rows (cutting experts and tensors anywhere) change nothing in the output."""
    monkeypatch.setattr(qmod, "SLAB_BYTES", 37 * 4 * 256 + 4)   # 37 rows of 256 columns: never a whole expert
    out = tmp_path / "o.gguf"
    localmoe.quantize(cached_model("olmoe", "tiny", "f16"), out, "Q8_0", progress=False)
    assert out.read_bytes() == reference.model_file("olmoe", "Q8_0").read_bytes()


@pytest.mark.reference
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_bf16_and_f32_inputs(tmp_path, dtype):
    src = cached_model("olmoe", "tiny", dtype)
    _llama_quantize(src, tmp_path / "ref.gguf", "Q8_0")
    localmoe.quantize(src, tmp_path / "ours.gguf", "Q8_0", progress=False)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()

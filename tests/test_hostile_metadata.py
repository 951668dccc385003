"""Valid header, wrong numbers: metadata that contradicts the tensors must give a clear
LocalMoEError naming the key (or tensor), fast and without large allocations, and never
reach a kernel. The corpus comes from tests/make_bad_metadata.py (every key each
architecture reads x 0, 1, -1, 2^32-1, 2^63-1, wrong types, contradictions; missing
tensors), written at test time into tmp. Heap corruption only shows in a separate
process: the CLI and the property test run there, under glibc's heap checks."""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import make_bad_metadata as mb
from localmoe.arch import ARCHES, arch_module
from localmoe.errors import GGUFFormatError, LocalMoEError
from localmoe.model import load
from localmoe.shipped import default_model_path
from localmoe.summary import summarize
from models import archs
from models.build import cached_model

VT = mb.VT
LOCALMOE = shutil.which("localmoe")
# one tiny model per distinct config (llama 8x22b and qwen3moe 235b-a22b are the same at tiny size)
MODELS = [("llama", None), ("qwen2moe", None), ("qwen3moe", None), ("olmoe", None), ("deepseek", None)] + \
         [("deepseek2", v) for v in archs.variants("deepseek2")]
MAX_SECONDS = 1.0           # CPU s: open + validate one mutated file (in-process, the full header of a real vocab)
MAX_TRACED = 8 << 20        # bytes: tracemalloc peak while it fails (numpy arrays included)
# glibc aborts at the first heap inconsistency it sees, and fills freed memory, so corruption shows
CHILD_ENV = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
CHILD_AS = 16 << 30         # address-space limit for CLI children: a runaway allocation fails instead of swapping


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import every architecture (numba kernels) first: the time bound is for the checks, not imports."""
    for arch in ARCHES:
        arch_module(arch)


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_AS, CHILD_AS))


def model_path(arch, variant):
    return cached_model(arch, "tiny", "f16", variant)


def check_fails_fast(path, needle: str, n_ctx: int = 8, traced: bool = True) -> LocalMoEError | None:
    """Load `path`; a LocalMoEError must name `needle`, in under MAX_SECONDS with a small traced peak
    (measured in a second load: tracemalloc slows the header walk). Returns the error, or None when
    the file loads (test_valid_mutations_run runs such files)."""
    t0 = time.process_time()  # CPU seconds: the test machine may be shared, wall time is not ours
    try:
        load(path, n_ctx=n_ctx).close()
        return None
    except LocalMoEError as e:
        secs, err = time.process_time() - t0, e
    assert needle in str(err), f"{path.name}: error does not name {needle!r}: {err}"
    assert secs < MAX_SECONDS, f"{path.name}: {secs:.2f} s to fail (bound {MAX_SECONDS} s)"
    if not traced:
        return err
    tracemalloc.start()
    try:
        with pytest.raises(LocalMoEError):
            load(path, n_ctx=n_ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_TRACED, f"{path.name}: traced peak {peak} bytes while failing (bound {MAX_TRACED})"
    return err


# --- the whole corpus, in-process ------------------------------------------------------------

@pytest.mark.parametrize("arch,variant", MODELS, ids=[f"{a}-{v}" if v else a for a, v in MODELS])
def test_corpus_in_process(arch, variant, tmp_path):
    """Every mutation of every key the architecture reads. Files without the tokenizer keys (not
    part of these checks) keep ~1800 cases to seconds; test_full_header_is_as_fast times real headers."""
    src = mb.rewrite(model_path(arch, variant), tmp_path / "base.gguf", strip_tokenizer=True)
    muts = mb.mutations(src)
    assert len(muts) > 100
    failed, loaded = [], []
    for m in muts:
        path = mb.rewrite(src, tmp_path / "m.gguf", m.kv, m.drop)
        try:
            err = check_fails_fast(path, m.key)
        except AssertionError as e:
            failed.append(f"{m.name}: {e}")
            continue
        if err is None:
            loaded.append(m.name)
            if m.must_fail:
                failed.append(f"{m.name}: loaded and ran, but must be an error")
    assert not failed, f"{len(failed)} of {len(muts)} mutations:\n" + "\n".join(failed)
    # the valid ones load and run (value 1 of a key, ...); most do not
    assert len(loaded) < len(muts) // 3, loaded


def test_full_header_is_as_fast(tmp_path):
    """The time bound holds with a 150k-token vocabulary in the header too (qwen2 vocab; the traced
    peak is checked on the stripped files: tracemalloc makes this header walk minutes long)."""
    src = model_path("qwen3moe", None)
    for m in [m for m in mb.mutations(src) if m.must_fail][::15]:
        path = mb.rewrite(src, tmp_path / "m.gguf", m.kv, m.drop)
        assert check_fails_fast(path, m.key, traced=False) is not None, m.name


def test_corpus_covers_every_key_read():
    """The generator's key list is what the loader reads: also keys absent from the file (defaults)."""
    keys = mb.read_keys(model_path("deepseek2", "v3"))
    for k in ("block_count", "expert_count", "attention.kv_lora_rank", "attention.q_lora_rank",
              "attention.key_length_mla", "leading_dense_block_count", "expert_shared_count",
              "expert_feed_forward_length", "expert_group_used_count", "expert_weights_norm",
              "rope.scaling.yarn_log_multiplier", "feed_forward_length"):
        assert k in keys, k
    assert "attention.key_length" in mb.read_keys(model_path("llama", None))  # absent: n_embd / n_head


def test_rewrite_copies_bytes_exactly(tmp_path):
    """With no edits and data=True the rewriter reproduces the file byte for byte."""
    src = default_model_path()
    out = mb.rewrite(src, tmp_path / "same.gguf", data=True)
    assert out.read_bytes() == src.read_bytes()


# --- the issue's reproductions on the shipped model --------------------------------------------

def shipped(tmp_path, kv=None, drop=(), key_prefix="qwen3moe."):
    kv = {key_prefix + k: v for k, v in (kv or {}).items()}
    return mb.rewrite(default_model_path(), tmp_path / "bad.gguf", kv, drop, data=True)


def cli(*args, timeout=120):
    assert LOCALMOE, "the localmoe console script is not on PATH (pip install -e .)"
    return subprocess.run([LOCALMOE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=CHILD_ENV, preexec_fn=_limit)


def assert_clean_error(r, needle: str):
    """Exit status 1 (not a signal: abort/segv are negative), `error: ` naming needle, no traceback."""
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and needle in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20)
    return p


@pytest.mark.parametrize("n", [0, 1, 16])
def test_finding1_expert_count(n, tmp_path, text_file):
    """expert_count 0 / 1 / 16 with 8 experts in the tensors: was SIGABRT (munmap_chunk), heap
    corruption in perplexity (the router buffer sized from the key), an IndexError."""
    path = shipped(tmp_path, {"expert_count": (VT.UINT32, n, None)})
    e = check_fails_fast(path, "qwen3moe.expert_count")
    assert isinstance(e, GGUFFormatError) and "ffn_gate_inp" in str(e) and "is 8" in str(e), e
    for args in (["inspect", path], ["run", "-n", "2", "-p", "Hi", path], ["perplexity", path, text_file, "--ctx", "16"]):
        assert_clean_error(cli(*args), "qwen3moe.expert_count")


U32, U64 = VT.UINT32, VT.UINT64
FINDING2 = {  # name -> (kv edits, dropped tensors, what the error must name)
    "block_count_2^32-1": ({"block_count": (U32, 2**32 - 1, None)}, (), "block_count"),
    "head_count_2^32-1": ({"attention.head_count": (U32, 2**32 - 1, None)}, (), "attention.head_count"),
    "head_count_kv_2^32-1": ({"attention.head_count_kv": (U32, 2**32 - 1, None)}, (), "attention.head_count_kv"),
    "key_length_2^32-1": ({"attention.key_length": (U32, 2**32 - 1, None)}, (), "attention.key_length"),
    "expert_count_2^32-1": ({"expert_count": (U32, 2**32 - 1, None)}, (), "expert_count"),
    "head_count_0": ({"attention.head_count": (U32, 0, None)}, (), "attention.head_count"),
    "expert_used_count_0": ({"expert_used_count": (U32, 0, None)}, (), "expert_used_count"),
    "expert_used_count_9": ({"expert_used_count": (U32, 9, None)}, (), "expert_used_count"),
    "expert_count_string": ({"expert_count": (VT.STRING, "8", None)}, (), "expert_count"),
    "block_count_array": ({"block_count": (VT.ARRAY, [2, 2], U32)}, (), "block_count"),
    "no_token_embd": ({}, ("token_embd.weight",), "token_embd.weight"),
    "no_output_norm": ({}, ("output_norm.weight",), "output_norm.weight"),
    "context_length_0": ({"context_length": (U32, 0, None)}, (), "context_length"),
    "rms_eps_nan": ({"attention.layer_norm_rms_epsilon": (VT.FLOAT32, math.nan, None)}, (), "layer_norm_rms_epsilon"),
    "rms_eps_inf": ({"attention.layer_norm_rms_epsilon": (VT.FLOAT32, math.inf, None)}, (), "layer_norm_rms_epsilon"),
    "rms_eps_negative": ({"attention.layer_norm_rms_epsilon": (VT.FLOAT32, -1e-6, None)}, (),
                         "layer_norm_rms_epsilon"),
}


@pytest.mark.parametrize("case", list(FINDING2))
def test_finding2(case, tmp_path):
    kv, drop, needle = FINDING2[case]
    path = shipped(tmp_path, kv, drop)
    assert check_fails_fast(path, needle) is not None
    with pytest.raises(LocalMoEError, match=needle.replace(".", r"\.")):
        summarize(path)  # inspect: a clean error, never a traceback or a 7 GB list
    assert_clean_error(cli("run", "-n", "2", "-p", "Hi", path), needle)


def test_expert_count_in_inspect_json_is_checked(tmp_path):
    """inspect of a file whose experts agree still reports them (the check does not hide anything)."""
    r = cli("inspect", "--json", "--no-tensors", default_model_path())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["experts"]["expert_count"] == 8


# --- the CLI on the corpus, in subprocesses -----------------------------------------------------

def _pick(ms: list, i: int):
    """The i-th key's wrong value: a contradiction of the tensors, a huge / non-finite value or a
    wrong type, in turn (what the key has of them), so each kind reaches the CLI."""
    kinds = [[m for m in ms if m.name.split("=")[-1].isdigit() and m.name.split("=")[-1] not in ("0", "1")],
             [m for m in ms if any(h in m.name for h in ("2^", "nan", "inf", "bogus"))],
             [m for m in ms if ":" in m.name]]
    kinds = [k for k in kinds if k]
    return kinds[i % len(kinds)][0]


def cli_sample():
    """(arch, variant, mutation, commands): every qwen3moe key once, with inspect, run and perplexity;
    a sample of deepseek2 (MLA, q LoRA, groups, shared experts) and llama keys with run; missing tensors."""
    out = []
    for arch, variant, keys in (("qwen3moe", None, None),
                                ("deepseek2", "v3", ("attention.kv_lora_rank", "attention.q_lora_rank",
                                                     "attention.key_length_mla", "leading_dense_block_count",
                                                     "expert_shared_count", "expert_group_used_count",
                                                     "rope.scaling.yarn_log_multiplier")),
                                ("llama", None, ("feed_forward_length", "rope.dimension_count"))):
        ms = [m for m in mb.mutations(model_path(arch, variant)) if m.must_fail]
        keys = keys or sorted({m.key for m in ms if not m.drop})
        cmds = ("inspect", "run", "perplexity") if arch == "qwen3moe" else ("run",)
        out += [(arch, variant, _pick([m for m in ms if m.key == k], i), cmds) for i, k in enumerate(keys)]
        if arch == "qwen3moe":
            out += [(arch, variant, m, cmds) for m in ms if m.drop and m.key in
                    ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_gate_inp.weight")]
    return out


CLI_SAMPLE = cli_sample()


@pytest.mark.slow
@pytest.mark.parametrize("arch,variant,mut,cmds", CLI_SAMPLE, ids=[f"{a}:{m.name}" for a, _, m, _ in CLI_SAMPLE])
def test_cli_corpus(arch, variant, mut, cmds, tmp_path, text_file):
    path = mb.rewrite(model_path(arch, variant), tmp_path / "bad.gguf", mut.kv, mut.drop)
    args = {"inspect": ["inspect", path], "run": ["run", "-n", "2", "-p", "Hi", path],
            "perplexity": ["perplexity", path, text_file, "--ctx", "16", "--chunks", "1"]}
    for cmd in cmds:
        assert_clean_error(cli(*args[cmd]), mut.key)


# --- property: random KV mutations either run or fail cleanly, in a subprocess -----------------

WORKER = textwrap.dedent("""
    import sys
    from localmoe.errors import LocalMoEError
    from localmoe.model import load
    for line in sys.stdin:
        try:
            with load(line.strip(), n_threads=1, n_ctx=8) as m:
                m.forward([0, 1])
                m.forward([2])
            print("ok", flush=True)
        except LocalMoEError as e:
            print("error:", str(e).replace(chr(10), " "), flush=True)
""")


class Worker:
    """One child loading file after file: cheap per example, and a crash shows as its death."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=CHILD_ENV, preexec_fn=_limit)

    def ask(self, path) -> str:
        if self.p.poll() is not None:
            self.__init__()
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:  # died: show why (signal = negative code, or a Python traceback on stderr)
            rc, err = self.p.wait(timeout=30), self.p.stderr.read()
            raise AssertionError(f"worker died on {path} with exit {rc}:\n{err[-3000:]}")
        return line.strip()

    def close(self):
        self.p.stdin.close()
        rc = self.p.wait(timeout=60)
        err = self.p.stderr.read()
        assert rc == 0, f"worker exit {rc}:\n{err[-3000:]}"


@pytest.mark.slow
def test_valid_mutations_run(worker, tmp_path):
    """The mutations of the shipped model that load (a valid 1, a float that may be 0, ...) also run:
    a forward pass of two tokens and one more, in the worker under glibc's heap checks."""
    src = default_model_path()
    ran = 0
    for m in mb.mutations(src):
        path = mb.rewrite(src, tmp_path / "m.gguf", m.kv, m.drop)
        try:
            load(path, n_ctx=8).close()
        except LocalMoEError:
            continue
        assert not m.must_fail, m.name
        path = mb.rewrite(src, tmp_path / "m.gguf", m.kv, m.drop, data=True)  # real weights to run
        assert worker.ask(path) == "ok", m.name
        ran += 1
    assert ran >= 10


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


_INT_TYPES = [(VT.UINT8, 0, 2**8 - 1), (VT.INT8, -2**7, 2**7 - 1), (VT.UINT16, 0, 2**16 - 1),
              (VT.INT16, -2**15, 2**15 - 1), (VT.UINT32, 0, 2**32 - 1), (VT.INT32, -2**31, 2**31 - 1),
              (VT.UINT64, 0, 2**64 - 1), (VT.INT64, -2**63, 2**63 - 1)]


@st.composite
def kv_value(draw):
    """(type, value, array subtype): any GGUF scalar type or a short array, edge values favoured."""
    kind = draw(st.sampled_from(["int", "int", "int", "float", "bool", "str", "array"]))
    if kind == "int":
        vt, lo, hi = draw(st.sampled_from(_INT_TYPES))
        v = draw(st.one_of(st.integers(lo, hi), st.sampled_from([x for x in (0, 1, 2, 3, 7, 8, 9, 16, 64, 128, 255,
                                                                            256, 4096, -1, lo, hi) if lo <= x <= hi])))
        return vt, v, None
    if kind == "float":
        return draw(st.sampled_from([VT.FLOAT32, VT.FLOAT64])), draw(st.floats(width=32)), None
    if kind == "bool":
        return VT.BOOL, draw(st.booleans()), None
    if kind == "str":
        return VT.STRING, draw(st.text(max_size=8)), None
    return VT.ARRAY, draw(st.lists(st.integers(0, 300), min_size=0, max_size=4)), VT.UINT32


_STRIPPED = {}


def stripped(arch, variant, factory):
    """The tiny model without its tokenizer keys (forward needs none): a small header to rewrite."""
    if (arch, variant) not in _STRIPPED:
        _STRIPPED[arch, variant] = mb.rewrite(model_path(arch, variant), factory.mktemp("base") / "m.gguf",
                                              strip_tokenizer=True)
    return _STRIPPED[arch, variant]


def near(kind, cur):
    """Values close to the file's own (cur: what the loader used), which often still load and run."""
    if kind == "int" and cur is not None:
        return st.sampled_from([cur, cur + 1, max(cur - 1, 0), cur * 2, cur // 2]).map(lambda v: (VT.UINT32, v, None))
    if kind == "float" and cur is not None:
        return st.sampled_from([cur, cur * 2, cur / 2, 0.0, -cur]).map(lambda v: (VT.FLOAT32, v, None))
    return kv_value()


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_kv_mutations(data, worker, tmp_path_factory):
    arch, variant = data.draw(st.sampled_from(MODELS), label="model")
    src = stripped(arch, variant, tmp_path_factory)
    keys = mb.read_keys(src)
    kv = {}
    for key in data.draw(st.lists(st.sampled_from(sorted(keys)), min_size=1, max_size=3, unique=True), label="keys"):
        kv[f"{arch}.{key}"] = data.draw(st.one_of(kv_value(), near(*keys[key])), label=key)
    path = mb.rewrite(src, tmp_path_factory.mktemp("prop") / "m.gguf", kv)
    reply = worker.ask(path)
    assert reply == "ok" or reply.startswith("error: "), reply
    event("ran" if reply == "ok" else "clean error")
    path.unlink()

"""`localmoe quantize-model`: an F32/F16/BF16 GGUF in, the file llama.cpp's llama-quantize writes out.

Output layout, as llama_model_quantize_impl builds it: every input KV in order
(split.* dropped), then general.quantization_version and general.file_type
re-appended at the end (gguf_set_val_u32 removes, then appends); tensors in
the loader's order (quant_mix.tensor_order), each padded with zeros to the
alignment. Types come from quant_mix.plan_types.

Memory stays bounded whatever the model size: tensors are streamed in slabs
of whole rows (F16/BF16/F32 rows read from the mapped input by the quantize
kernel itself, quantized, written, unmapped), and the output goes to a
temp file of a unique name beside OUT (.OUT.XXXX.partial), which is validated
and renamed only when complete. One writer per output: a second quantize to the
same OUT is refused while the first runs (an flock on .OUT.lock). SIGTERM is
handled like Ctrl-C: the temp file is removed and the error says so.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as VT

from .atomic import fsync_dir
from .errors import LocalMoEError, UnsupportedError
from .gguf_file import DEFAULT_ALIGNMENT, GGUFFile, open_gguf
from .quant_mix import MIXES, is_quantized, plan_types, tensor_order

GGML_QNT_VERSION = 2
GGUF_VERSION = 3
SLAB_BYTES = 64 << 20      # rows per slab: this many bytes as f32 (bounds the working set)
_DROPPED_KEYS = ("general.quantization_version", "general.file_type", "split.no", "split.count",
                 "split.tensors.count")
_SOURCE_TYPES = (T.F32, T.F16, T.BF16)
_NUMPY = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
          VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8",
          VT.BOOL: "<u1"}
# byte offsets of the fp16 scales inside a block, checked like ggml_validate_row_data
_SCALE_OFFSETS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
                  T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


class QuantizeError(LocalMoEError):
    """The quantization cannot run or failed (output exists, disk full, bad values...)."""


class QuantizeTerminated(QuantizeError):
    """SIGTERM arrived while writing (handled like KeyboardInterrupt: the temp file is removed)."""


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]      # numpy order
    old: T
    new: T
    n_bytes_in: int
    n_bytes_out: int

    @property
    def converts(self) -> bool:
        return self.old != self.new


@dataclass
class Plan:
    """What quantize() writes; with dry_run=True it is all that happens."""
    mix: str
    tensors: list[TensorPlan]
    header: bytes = field(repr=False)
    alignment: int

    @property
    def input_bytes(self) -> int:
        return sum(t.n_bytes_in for t in self.tensors)

    @property
    def output_size(self) -> int:
        """Exact size of the output file in bytes."""
        return len(self.header) + sum(_pad(t.n_bytes_out, self.alignment) for t in self.tensors)

    @property
    def requantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.converts and is_quantized(t.old)]


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """shape as gguf_add_tensor stores it: ggml_n_dims drops trailing ne of 1 (leading here)."""
    ne = list(reversed(shape)) or [1]
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(reversed(ne))


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_bytes(key: str, vtype: VT, is_array: bool, value) -> bytes:
    head = _string(key)
    if not is_array:
        head += struct.pack("<i", vtype)
        if vtype == VT.STRING:
            return head + _string(value)
        return head + np.array(value, _NUMPY[vtype]).tobytes()
    head += struct.pack("<iiQ", VT.ARRAY, vtype, len(value))
    if vtype == VT.STRING:
        return head + b"".join(_string(s) for s in value)
    return head + np.array(value, _NUMPY[vtype]).tobytes()


def _header(gf: GGUFFile, tensors: list[TensorPlan], file_type: int, alignment: int) -> bytes:
    md = gf.metadata
    kvs = [_kv_bytes(k, *md.value_type(k), md[k]) for k in md if k not in _DROPPED_KEYS]
    kvs.append(_kv_bytes("general.quantization_version", VT.UINT32, False, GGML_QNT_VERSION))
    kvs.append(_kv_bytes("general.file_type", VT.UINT32, False, file_type))
    infos, offset = [], 0
    for t in tensors:
        ne = list(reversed(t.shape))
        infos.append(_string(t.name) + struct.pack(f"<I{len(ne)}qiQ", len(ne), *ne, t.new, offset))
        offset += _pad(t.n_bytes_out, alignment)
    out = b"GGUF" + struct.pack("<Iqq", GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return out + bytes(_pad(len(out), alignment) - len(out))


def _n_bytes(qtype: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def make_plan(gf: GGUFFile, mix: str) -> Plan:
    """The per-tensor plan and the output header for quantizing gf to `mix`."""
    mix = mix.upper()
    if mix not in MIXES:
        raise UnsupportedError(f"unknown quantization type {mix!r}; choose one of {', '.join(MIXES)}")
    md = gf.metadata
    if int(md.get("split.count", 1)) > 1:
        raise UnsupportedError(f"{gf.path} is one shard of a split model ({md['split.count']} files); "
                               f"merge it first (llama-gguf-split --merge)")
    shapes = {name: _ggml_shape(ti.shape) for name, ti in gf.tensors.items()}
    try:
        types = plan_types(mix, md, [(n, gf.tensors[n].qtype, s) for n, s in shapes.items()])
    except KeyError as e:
        raise UnsupportedError(f"{gf.path}: missing metadata key {e} needed to choose tensor types") from None
    tensors = []
    for name in tensor_order(gf.tensors):
        ti = gf.tensors[name]
        new = types[name]
        tensors.append(TensorPlan(name, shapes[name], ti.qtype, new, ti.n_bytes, _n_bytes(new, shapes[name])))
    # llama.cpp pads to GGUF_DEFAULT_ALIGNMENT but copies a general.alignment KV; honouring the KV
    # keeps the file readable and is identical whenever the KV is absent or 32
    alignment = int(md.get("general.alignment", DEFAULT_ALIGNMENT))
    return Plan(mix, tensors, _header(gf, tensors, int(MIXES[mix][0]), alignment), alignment)


def _check_inputs(plan: Plan, path: str, allow_requantize: bool) -> None:
    from .quant import QuantType, quant_type, supported_types
    for t in plan.tensors:
        if not t.converts:
            continue
        if t.old not in _SOURCE_TYPES and (not is_quantized(t.old) or t.old not in supported_types()):
            raise UnsupportedError(f"tensor {t.name} has type {t.old.name}, which localmoe cannot convert; "
                                   f"input tensors must be F32, F16 or BF16")
        if is_quantized(t.old) and not allow_requantize:
            raise QuantizeError(f"{path} is already quantized (tensor {t.name} is {t.old.name}); requantizing "
                                f"loses quality. Start from the F16/BF16/F32 model, or pass --allow-requantize")
        if t.new not in supported_types() or type(quant_type(t.new)).quantize is QuantType.quantize:
            raise UnsupportedError(f"tensor {t.name}: quantizing to {t.new.name} is not implemented yet")


def _validate_rows(t: TensorPlan, out: np.ndarray) -> None:
    """Like ggml_validate_row_data: no inf/NaN values or fp16 scales (llama.cpp then fails the file)."""
    if t.new in _SOURCE_TYPES:
        vals = out.view(np.float32) if t.new == T.F32 else None
        if vals is None:  # F16 / BF16 bit patterns: exponent all ones
            h = out.view(np.uint16)
            bad = (h & 0x7C00) == 0x7C00 if t.new == T.F16 else (h & 0x7F80) == 0x7F80
        else:
            bad = ~np.isfinite(vals)
    else:
        size = GGML_QUANT_SIZES[t.new][1]
        blocks = out.reshape(-1, size)
        bad = np.zeros(blocks.shape[0], bool)
        for o in _SCALE_OFFSETS[t.new]:
            h = blocks[:, o].astype(np.uint16) | (blocks[:, o + 1].astype(np.uint16) << 8)
            bad |= (h & 0x7C00) == 0x7C00
    if bad.any():
        raise QuantizeError(f"tensor {t.name}: converting to {t.new.name} gives inf/NaN values (the input "
                            f"has inf/NaN or values beyond the fp16 range); llama.cpp rejects this too")


class _Progress:
    """tqdm bar (tensors and bytes, rate, ETA) on a terminal, else one log line per tensor."""

    def __init__(self, plan: Plan, enabled):
        self.n, self.i, self.bar = len(plan.tensors), 0, None
        self.enabled = enabled if enabled is not None else True
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=plan.input_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"quantize {plan.mix}", dynamic_ncols=True)

    def tensor(self, t: TensorPlan) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.i}/{self.n} {t.name}", refresh=False)
        elif self.enabled:
            conv = f"{t.old.name} -> {t.new.name}" if t.converts else f"{t.old.name} (copied)"
            print(f"[{self.i:4d}/{self.n:4d}] {t.name:40s} {list(t.shape)} {conv} "
                  f"{t.n_bytes_in / 2**20:.2f} MiB -> {t.n_bytes_out / 2**20:.2f} MiB", file=sys.stderr, flush=True)

    def advance(self, n_bytes: int) -> None:
        if self.bar is not None:
            self.bar.update(n_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Scratch:
    """Reused slab buffers: fresh arrays per slab would page-fault every time."""

    def __init__(self):
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, n: int, dtype) -> np.ndarray:
        buf = self.bufs.get(key)
        if buf is None or buf.nbytes < n * np.dtype(dtype).itemsize:
            buf = self.bufs[key] = np.empty(n * np.dtype(dtype).itemsize, np.uint8)
        return buf[:n * np.dtype(dtype).itemsize].view(dtype)


class _Source:
    """The input file mapped. Kernels read tensor rows straight from the page cache; the next
    slab is prefetched (MADV_WILLNEED) and each finished slab unmapped (MADV_DONTNEED: the pages
    stay cached) so the RSS stays at about one slab. Copy-on-write rather than read-only only so
    numpy views are writable (nothing writes them): the kernels then have one compiled signature."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = len(self.mm)

    def rows(self, offset: int, n_rows: int, row_bytes: int) -> np.ndarray:
        return np.frombuffer(self.mm, np.uint8, n_rows * row_bytes, offset).reshape(n_rows, row_bytes)

    def advise(self, option: int, offset: int, n: int) -> None:
        start = offset - offset % mmap.PAGESIZE
        end = min(offset + n, self.size)
        if end > start:
            self.mm.madvise(option, start, end - start)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a row view lives on in an exception's traceback; GC closes the map
            pass


def _write_tensor(src: _Source, dst, ti, t: TensorPlan, alignment: int, progress: _Progress,
                  scratch: _Scratch) -> None:
    """Stream one tensor from src to dst in slabs of whole rows."""
    from .quant import quant_type
    from .quant.kquant_quantize import row_kernel
    n_cols = t.shape[-1]
    n_rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
    rb_in, rb_out = t.n_bytes_in // n_rows, t.n_bytes_out // n_rows
    slab = max(1, SLAB_BYTES // (4 * n_cols))
    kernel = row_kernel(int(t.new)) if t.converts else None
    for r0 in range(0, n_rows, slab):
        _check_terminated()
        n = min(slab, n_rows - r0)
        at = ti.offset + r0 * rb_in
        src.advise(mmap.MADV_WILLNEED, at + n * rb_in, min(slab, n_rows - r0 - n) * rb_in)
        raw = src.rows(at, n, rb_in)
        if kernel is not None:
            if t.old in _SOURCE_TYPES:
                rows, kind = raw, t.old
            else:  # requantizing: through f32
                rows = scratch.get("f32", n * n_cols, np.float32).reshape(n, n_cols)
                quant_type(t.old).dequantize_into(rows, raw)
                rows, kind = rows.view(np.uint8), T.F32
            raw = scratch.get("out", n * rb_out, np.uint8).reshape(n, rb_out)
            kernel(raw, rows, int(kind), GGML_QUANT_SIZES[t.new][1])
            _validate_rows(t, raw)
        dst.write(raw)
        src.advise(mmap.MADV_DONTNEED, at, n * rb_in)
        progress.advance(n * rb_in)
    dst.write(bytes(_pad(t.n_bytes_out, alignment) - t.n_bytes_out))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@contextlib.contextmanager
def _threads(threads: int | None):
    """numba's pool limited to `threads` for the block (all of it when None)."""
    import numba
    if threads is not None and not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise QuantizeError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {threads}")
    old = numba.get_num_threads()
    numba.set_num_threads(threads or numba.config.NUMBA_NUM_THREADS)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def quantize(in_path, out_path, qtype: str, threads: int | None = None, force: bool = False,
             dry_run: bool = False, allow_requantize: bool = False, progress: bool | None = None) -> Plan:
    """Quantize the GGUF model at in_path to the mix `qtype` (e.g. "Q4_K_M") into out_path.

    progress: None shows a bar on a terminal and log lines otherwise, False is silent.
    Returns the Plan; with dry_run nothing is written.
    """
    src_path, out = Path(in_path), Path(out_path)
    if _same_file(src_path, out):
        raise QuantizeError(f"input and output are the same file ({out}); choose another output path")
    with open_gguf(src_path) as gf:
        plan = make_plan(gf, qtype)
        if dry_run:
            return plan
        _check_inputs(plan, gf.path, allow_requantize)
        if out.is_dir():
            raise QuantizeError(f"{out} is a directory; give an output file name")
        out_dir = out.parent
        if not out_dir.is_dir():
            raise QuantizeError(f"output directory {out_dir} does not exist")
        with _output_lock(out):  # first: it also shows whether the directory takes files at all
            if out.exists() and not force:
                raise QuantizeError(f"{out} already exists; pass --force to overwrite it")
            free = shutil.disk_usage(out_dir).free
            if free < plan.output_size:
                raise QuantizeError(f"not enough disk space in {out_dir}: the output needs "
                                    f"{plan.output_size / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
            if plan.requantized and progress is not False:
                print(f"warning: requantizing {len(plan.requantized)} already quantized tensors "
                      f"(dequantize, then quantize again): expect lower quality than quantizing "
                      f"from the F16/BF16 model", file=sys.stderr)
            with _threads(threads), _sigterm_raises():
                _write_atomic(gf, plan, out, progress)
    return plan


@contextlib.contextmanager
def _output_lock(out: Path):
    """Hold an exclusive flock on .OUT.lock beside out for the block; QuantizeError when another
    writer holds it, or with the real cause when the directory does not take new files."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer is the user's business
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QuantizeError(f"cannot write {out}: cannot create files in {out.parent}: "
                                f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuantizeError(f"another quantize-model is writing {out} (it holds {lock}); "
                                f"wait for it to finish or choose another output") from None
        try:  # the holder before us may have removed the file we locked: lock the new one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        _unlink_quietly(lock)  # while still locked: the next writer re-checks the inode
        os.close(fd)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM makes the write raise QuantizeTerminated at its next slab, so the cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):  # only a flag: an exception raised here could land in a ctypes
        _terminated.set()        # callback or numba's cache loading, which swallow it
    _terminated.clear()
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _terminated.clear()


# set by SIGTERM; the write loop checks it before each slab (a fraction of a second apart)
_terminated = threading.Event()


def _check_terminated() -> None:
    if _terminated.is_set():
        raise QuantizeTerminated("quantize-model stopped by SIGTERM; the partial output was removed")


def _unlink_quietly(path) -> None:
    """Remove path if possible: a cleanup error must not replace the error being reported."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_atomic(gf: GGUFFile, plan: Plan, out: Path, progress) -> None:
    bar = _Progress(plan, progress)
    partial = None
    try:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
        partial = Path(name)
        with os.fdopen(fd, "wb") as dst, contextlib.closing(_Source(gf.path)) as src:
            os.chmod(dst.fileno(), 0o644)  # mkstemp makes it 0600; this is an ordinary output file
            dst.write(plan.header)
            scratch = _Scratch()
            for t in plan.tensors:
                bar.tensor(t)
                _write_tensor(src, dst, gf.tensors[t.name], t, plan.alignment, bar, scratch)
            dst.flush()
            os.fsync(dst.fileno())
        _check_terminated()
        size = partial.stat().st_size
        if size != plan.output_size:
            raise QuantizeError(f"{partial}: wrote {size} bytes, planned {plan.output_size}")
        open_gguf(partial).close()   # the header reads back as a valid GGUF
        os.replace(partial, out)
        partial = None
        fsync_dir(out.parent)
    except OSError as e:
        if partial is not None:
            _unlink_quietly(partial)
        raise QuantizeError(f"writing {out} failed: {e.strerror or e}") from e
    except BaseException:
        if partial is not None:
            _unlink_quietly(partial)
        raise
    finally:
        bar.close()

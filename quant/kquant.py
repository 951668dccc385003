"""What the K-quant kernels (q2_k ... q6_k) share: the KQuant driver and the vector-IR helpers.

As in llama.cpp, x is first quantized to Q8_K and each block's dot product is
exact integer arithmetic, scaled in float32 by d * d8 (ggml's vec_dot_*_q8_K).
The block kernels are numba intrinsics emitting LLVM vector IR: numba types
every integer op as int64, so plain numba loops vectorize on 64-bit lanes.

Two styles of block kernel:
- `block_dot`/`block_decode`: generic IR, weights widened to int16 chunks
  (LLVM emits vpmullw + vpdpwssd or the equivalent on another target);
- `Vec.maddubs`/`Vec.madd`: ggml's AVX2 scheme, unsigned quant bytes times
  Q8_K bytes summed in pairs to int16 (vpmaddubsw), then times the scales in
  pairs to int32 (vpmaddwd): half the instructions per weight. They use x86
  intrinsics where the CPU numba compiles for has them (`SIMD`), on 64-byte
  vectors with AVX-512BW, else the same arithmetic in generic IR. With VBMI and
  GFNI too, bit fields are cut out by vpmultishiftqb / vgf2p8affineqb.
A matvec's row is one intrinsic call (`row_dot_lanes`, `row_dot_scaled`, over
`block_loop`) that loops over the blocks with its accumulators in registers and
prefetches BLOCK_PF_BYTES ahead.
"""
import numba
import numpy as np
from llvmlite import binding as ll
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .base import QuantType
from .common import QK_K, FusedExperts, FusedMatvec, c_matrix, prefetch_ptr, q8_k_activation, q8_k_serial, row_ptr

ROW_CHUNK = 16  # rows per parallel task; decoded for prefill, 16 rows of int16 stay in L2
# How far ahead the matvec rows prefetch, each block the lines this many bytes past it (block_loop's pf). From
# DRAM at 2 threads it beat one burst of the row 4 KiB ahead (common.prefetch_row, as the legacy types do) at
# every shape tried (Q4_K/Q6_K/Q3_K 14336x4096: 43/41/44 -> 48/51/45 GB/s; Q4_K 2048x768 40.7 -> 42.6) and no
# prefetch on rows over 4 KiB (4096x14336: 40/41/44 -> 48/48/50); 8 KiB beat 4 KiB at 1 thread (Q6_K
# 4096x14336: 35 -> 39 GB/s) and matched it at 2.
BLOCK_PF_BYTES = 8192


def _target_features():
    """The CPU features numba compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    flat = config.CPU_FEATURES if config.CPU_FEATURES is not None else ll.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


_FEATURES = _target_features()
# x86 instruction set of the pair-product kernels (None: generic IR); part of numba's cache key,
# since cached code is only reused on a CPU with the same features
# "avx512vbmi": AVX-512BW plus VBMI (vpmultishiftqb) and GFNI (vgf2p8affineqb), as on Ice Lake and Zen 4;
# kernels use those two to unpack bit fields in one instruction instead of shifts and masks
SIMD_LEVELS = ("avx2", "avx512bw", "avx512vbmi")
SIMD = ("avx512vbmi" if {"avx512bw", "avx512f", "avx512vbmi", "avx512vl", "gfni"} <= _FEATURES
        else "avx512bw" if {"avx512bw", "avx512f"} <= _FEATURES else "avx2" if "avx2" in _FEATURES else None)
_PAIR_OPS = {  # (bytes per vector) -> (u8 x s8 -> i16 pairs, i16 x i16 -> i32 pairs)
    32: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
    64: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
}

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def vec(t, n):
    return ir.VectorType(t, n)


def splat(t, n, v):
    return ir.Constant(vec(t, n), [v] * n)


class Vec:
    """A few IRBuilder shorthands for target-independent vector code."""

    def __init__(self, builder, simd=None):
        """simd: the x86 instruction set the kernels may use (one of SIMD_LEVELS; None: generic IR);
        it also sets `width`, the bytes per vector the pair-product kernels work on."""
        self.b, self.simd = builder, simd
        self.avx512 = simd in ("avx512bw", "avx512vbmi")
        self.vbmi = simd == "avx512vbmi"  # with vpmultishiftqb and vgf2p8affineqb
        self.width = 64 if self.avx512 else 32

    def load(self, ptr, off, n, t=I8):
        """<n x t> at ptr + off elements (unaligned)."""
        p = self.b.gep(ptr, [ir.Constant(ir.IntType(64), off)])
        return self.b.load(self.b.bitcast(p, vec(t, n).as_pointer()), align=1, typ=vec(t, n))

    def const(self, x, v):
        n = x.type.count
        return ir.Constant(x.type, list(v) if isinstance(v, (list, tuple)) else [v] * n)

    def shr(self, x, s):
        return self.b.lshr(x, self.const(x, s))

    def shl(self, x, s):
        return self.b.shl(x, self.const(x, s))

    def mask(self, x, m):
        return self.b.and_(x, self.const(x, m))

    def sub(self, x, c):
        return self.b.sub(x, self.const(x, c))

    def sext(self, x, t):
        return self.b.sext(x, vec(t, x.type.count))

    def zext(self, x, t):
        return self.b.zext(x, vec(t, x.type.count))

    def shuffle(self, x, y, idx):
        return self.b.shuffle_vector(x, y, ir.Constant(vec(I32, len(idx)), idx))

    def reduce_add(self, x):
        n, t = x.type.count, x.type.element
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(t, [x.type]), f"llvm.vector.reduce.add.v{n}i{t.width}")
        return self.b.call(fn, [x])

    def dot_acc(self, acc, w16, q8, off, q8_dtype):
        """acc <32 x i32> += w16 <32 x i16> * q8[off:off+32], lane by lane.

        Reduced once at the end with reduce_add, LLVM may pair lanes freely:
        this is what becomes vpmaddwd/vpdpwssd. q8 may be int8 or int16
        (see KQuant.prepare for the trade-off).
        """
        q = self.load(q8, off, 32, I16) if q8_dtype == types.int16 else self.sext(self.load(q8, off, 32), I16)
        return self.b.add(acc, self.b.mul(self.sext(w16, I32), self.sext(q, I32)))

    def rep(self, x, k):
        """x repeated k times: <k * n x t>."""
        n = x.type.count
        return x if k == 1 else self.shuffle(x, x, list(range(n)) * k)

    def shr16(self, x, amounts):
        """Bytes x shifted right within 16-bit lanes, by amounts[i] in the i-th 32-byte chunk: after a
        mask that keeps fewer than 8 - amount bits, the same as a per-byte shift (x86 has no byte shifts)."""
        w = self.b.bitcast(x, vec(I16, x.type.count // 2))
        w = self.b.lshr(w, self.const(w, [a for a in amounts for _ in range(16)]))
        return self.b.bitcast(w, x.type)

    def shl16(self, x, s):
        """Bytes x shifted left by s within 16-bit lanes: bit k of a byte lands at bit k + s of it or
        of the next byte up (what shr16 by up to s takes back, byte by byte). s: one amount, or one per
        32-byte chunk as in shr16."""
        w = self.b.bitcast(x, vec(I16, x.type.count // 2))
        amounts = [a for a in s for _ in range(16)] if isinstance(s, (list, tuple)) else s
        return self.b.bitcast(self.b.shl(w, self.const(w, amounts)), x.type)

    def opaque(self, x):
        """x through an empty inline asm on AVX-512 (else x itself): LLVM cannot see into the result, so
        it keeps x computed as it is. Its shuffles of a sign-extended vector become one vpermw each
        instead of a byte shuffle plus a vpmovsxbw each (Q3_K: 8% fewer ns per block)."""
        if not self.avx512:
            return x
        return self.b.call(ir.InlineAsm(ir.FunctionType(x.type, [x.type]), "", "=v,0"), [x])

    def _x86(self, name, ret, *args):
        fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return self.b.call(fn, list(args))

    def bit_select(self, x, srcs):
        """Bytes x with bit i of each byte taken from bit srcs[q][i] of the same byte (None: 0), srcs[q] for
        the q-th 64-bit lane (cycled): one vgf2p8affineqb (self.vbmi only). Its matrix row for result bit
        i is byte 7 - i of the lane's qword."""
        rows = []
        for q in range(x.type.count // 8):
            m = [0] * 8
            for i, s in enumerate(srcs[q % len(srcs)]):
                if s is not None:
                    m[7 - i] = 1 << s
            rows += m
        return self._x86(f"llvm.x86.vgf2p8affineqb.{x.type.count * 8}", x.type, x, self.const(x, rows),
                         ir.Constant(I8, 0))

    def multishift(self, offsets, data):
        """Byte i <- the 8 bits of data's 64-bit lane i // 8 from bit offsets[i] up (mod 64): vpmultishiftqb
        (self.vbmi only)."""
        return self._x86(f"llvm.x86.avx512.pmultishift.qb.{data.type.count * 8}", data.type,
                         self.const(data, offsets), data)

    def f16(self, ptr, off):
        """The fp16 at byte ptr + off as float32 (vcvtph2ps)."""
        p = self.b.bitcast(self.b.gep(ptr, [ir.Constant(ir.IntType(64), off)]), ir.HalfType().as_pointer())
        return self.b.fpext(self.b.load(p, align=1, typ=ir.HalfType()), ir.FloatType())

    def fold8(self, x):
        """<8k x i32> -> <8 x i32>, lane i the sum of lanes i, i + 8, ...: ggml's AVX2 lanes from wider vectors."""
        lanes = self.shuffle(x, x, list(range(8)))
        for k in range(8, x.type.count, 8):
            lanes = self.b.add(lanes, self.shuffle(x, x, list(range(k, k + 8))))
        return lanes

    def load_q8(self, qp, off, n, q8_dtype):
        """<n x i8> Q8_K quants at qp + off, whether qs is stored as int8 or int16."""
        if q8_dtype == types.int16:
            return self.b.trunc(self.load(qp, off, n, I16), vec(I8, n))
        return self.load(qp, off, n)

    def _pairs(self, x, y, t, name):
        """x * y (widened to t), adjacent lanes summed: the x86 instruction `name` where SIMD allows.
        Without saturation: the callers' sums fit int16 (vpmaddubsw saturates)."""
        n = x.type.count
        if self.simd is not None and n * t.width // 16 == self.width:  # avx512*: the 512-bit forms
            fn = cgutils.get_or_insert_function(
                self.b.module, ir.FunctionType(vec(t, n // 2), [x.type, y.type]), name)
            return self.b.call(fn, [x, y])
        p = self.b.mul((self.zext if t == I16 else self.sext)(x, t), self.sext(y, t))
        return self.b.add(self.shuffle(p, p, list(range(0, n, 2))), self.shuffle(p, p, list(range(1, n, 2))))

    def maddubs(self, u, s):
        """<n x i8> unsigned u times signed s -> <n/2 x i16>, pairs summed (vpmaddubsw)."""
        return self._pairs(u, s, I16, _PAIR_OPS[self.width][0])

    def madd(self, a, b):
        """<n x i16> a times b -> <n/2 x i32>, pairs summed (vpmaddwd)."""
        return self._pairs(a, b, I32, _PAIR_OPS[self.width][1])


@intrinsic
def f16_at(typingctx, w, r, o):
    """The fp16 at w[r, o:o+2] as float32, converted by the hardware (vcvtph2ps), not a table:
    the 256 KiB table lookups cost cache misses in the hot loop."""
    def codegen(context, builder, sig, args):
        return Vec(builder).f16(row_ptr(context, builder, sig, args, 0), 0)
    if c_matrix(w):
        return types.float32(w, r, o), codegen


def group_scales(v, sc16, j):
    """<32 x i16> with scale j in lanes 0-15 and scale j + 1 in lanes 16-31."""
    return v.shuffle(sc16, sc16, [j] * 16 + [j + 1] * 16)


def block_dot(weights, shift=0, w_dtype=None):
    """Intrinsic dot(w, r, o, qs, t, qo): exact int32 sum of weight * q8 over the block at
    w[r, o:] and the Q8_K quants qs[t, qo:qo+256] (int8 or int16), fused: no weights in memory.

    `weights(v, wp)` emits the block's eight <32 x i16> chunks of integer weights.
    `shift` scales them up first when they are so small that LLVM would otherwise
    narrow the products to bytes and lose the 16-bit pair instructions.
    `w_dtype`: the only element type w may have (None: any).
    Callers guarantee the indices are in range: nothing is checked.
    """
    @intrinsic
    def dot(typingctx, w, r, o, qs, t, qo):
        def codegen(context, builder, sig, args):
            v = Vec(builder)
            wp, qp = row_ptr(context, builder, sig, args, 0), row_ptr(context, builder, sig, args, 3)
            acc = splat(I32, 32, 0)
            for i, w16 in enumerate(weights(v, wp)):
                acc = v.dot_acc(acc, v.shl(w16, shift) if shift else w16, qp, 32 * i, sig.args[3].dtype)
            isum = v.reduce_add(acc)
            return builder.ashr(isum, ir.Constant(I32, shift)) if shift else isum
        if c_matrix(w, qs) and w_dtype in (None, w.dtype):
            return types.int32(w, r, o, qs, t, qo), codegen
    return dot


def block_decode(weights):
    """Intrinsic decode(ws, i, wo, w, r, o): ws[i, wo:wo+256] (int16) <- the integer weights
    of the block at w[r, o:], for `ws_dot` to reuse over many tokens. Unchecked indices."""
    @intrinsic
    def decode(typingctx, ws, i, wo, w, r, o):
        def codegen(context, builder, sig, args):
            v = Vec(builder)
            dst = row_ptr(context, builder, sig, args, 0)
            for k, w16 in enumerate(weights(v, row_ptr(context, builder, sig, args, 3))):
                p = builder.gep(dst, [ir.Constant(ir.IntType(64), 32 * k)])
                builder.store(w16, builder.bitcast(p, w16.type.as_pointer()), align=1)
            return context.get_dummy_value()
        if c_matrix(ws, w) and ws.dtype == types.int16:
            return types.void(ws, i, wo, w, r, o), codegen
    return decode


def _decoded(v, wp):
    """The eight <32 x i16> chunks block_decode stored at wp."""
    return [v.load(wp, 32 * k, 32, I16) for k in range(QK_K // 32)]


# ws_dot(ws, i, wo, qs, t, qo): exact int32 dot of decoded weights ws[i, wo:wo+256] (int16) with
# qs[t, qo:qo+256]. Unchecked indices.
ws_dot = block_dot(_decoded, w_dtype=types.int16)


def block_loop(context, builder, sig, args, type_size, arrays, block, pf=0):
    """Emit `for b in range(n_blocks): block(wp, ptrs)` over the blocks of row args[1] of the weights args[0]
    (type_size bytes each; n_blocks = the second dim of args[arrays[-1][0]]): wp points at block b, ptrs[i]
    at element [args[row], step * b] of args[a] for (a, row, step) = arrays[i]. pf > 0: each block also
    prefetches the lines pf bytes past its own."""
    i64 = ir.IntType(64)
    zero = context.get_constant(types.intp, 0)

    def start(a, row):  # pointer to element [row, 0] of args[a]
        return row_ptr(context, builder, types.void(sig.args[a], types.intp, types.intp), [args[a], row, zero], 0)
    w0 = start(0, context.cast(builder, args[1], sig.args[1], types.intp))
    starts = [start(a, context.cast(builder, args[row], sig.args[row], types.intp)) for a, row, _ in arrays]
    last = arrays[-1][0]
    nb = cgutils.unpack_tuple(builder, context.make_array(sig.args[last])(context, builder, args[last]).shape)[1]
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        wp = builder.gep(w0, [builder.mul(b, ir.Constant(i64, type_size))])
        for k in range(0, type_size, 64) if pf else ():
            prefetch_ptr(builder, builder.gep(wp, [ir.Constant(i64, pf + k)]))
        block(wp, [builder.gep(p, [builder.mul(b, ir.Constant(i64, step))]) for p, (_, _, step) in zip(starts, arrays)])


def row_dot_lanes(lanes, type_size, d_off, simd=SIMD, pf=0):
    """Intrinsic dot(w, r, qs, d8, t) -> f32: row r of w (blocks of type_size bytes, fp16 d at byte d_off)
    dotted with token t of the Q8_K activation (qs i8|i16, d8), in ggml's AVX2 float steps: per block
    acc = fma(d8 * d, lanes, acc) on 8 float lanes, then ggml's hsum_float_8. `lanes(v, wp, qp, q8_dtype)`
    emits the <8 x i32> exact integer lanes of the block at wp. The block loop is emitted here, acc in
    registers: accumulated in a scratch array by a numba loop instead, the same block code ran 20-25%
    slower in some loop nests (Q3_K at 1 thread). pf: see block_loop. Unchecked indices."""
    @intrinsic
    def dot(typingctx, w, r, qs, d8, t):
        def codegen(context, builder, sig, args):
            v = Vec(builder, simd)
            acc = cgutils.alloca_once_value(builder, ir.Constant(vec(ir.FloatType(), 8), [0.0] * 8))

            def block(wp, ptrs):
                qp, dp = ptrs
                ints = lanes(v, wp, qp, sig.args[2].dtype)
                d = builder.fmul(builder.load(dp), v.f16(wp, d_off))
                builder.store(fma_lanes(builder, d, ints, builder.load(acc)), acc)
            block_loop(context, builder, sig, args, type_size, [(2, 4, QK_K), (3, 4, 1)], block, pf)
            a = builder.load(acc)
            e = [builder.extract_element(a, ir.Constant(I32, k)) for k in range(8)]
            r0, r1, r2, r3 = (builder.fadd(e[k + 4], e[k]) for k in range(4))  # ggml's hsum_float_8 order
            return builder.fadd(builder.fadd(r0, r2), builder.fadd(r1, r3))
        if c_matrix(w, qs, d8) and w.dtype == types.uint8 and d8.dtype == types.float32:
            return types.float32(w, r, qs, d8, t), codegen
    return dot


def reduce_lanes(v, vecs):
    """<m x i32>, lane i the sum of the lanes of vecs[i] (m = len(vecs) a power of 2; lane counts powers of 2):
    one transposed reduction, each shuffle and add serving several vectors, instead of m horizontal sums."""
    m = len(vecs)
    n = max(m, min(x.type.count for x in vecs))

    def fit(x):  # halves added down to n lanes, or zeros appended up to n
        while x.type.count > n:
            k = x.type.count // 2
            x = v.b.add(v.shuffle(x, x, list(range(k))), v.shuffle(x, x, list(range(k, 2 * k))))
        c = x.type.count
        return x if c == n else v.shuffle(x, ir.Constant(x.type, None), list(range(c)) + [c] * (n - c))

    vecs, s = [fit(x) for x in vecs], n  # s: lanes per group; group k of a vector: partial sums of one input
    while len(vecs) > 1:  # pairs of vectors -> one with each group's halves added, a's groups then b's
        lo = [k * s + j for k in range(n // s) for j in range(s // 2)]
        hi = [i + s // 2 for i in lo]
        vecs = [v.b.add(v.shuffle(a, b, lo + [n + i for i in lo]), v.shuffle(a, b, hi + [n + i for i in hi]))
                for a, b in zip(vecs[::2], vecs[1::2])]
        s //= 2
    x = vecs[0]
    while s > 1:
        lo = [k * s + j for k in range(m) for j in range(s // 2)]
        x = v.b.add(v.shuffle(x, x, lo), v.shuffle(x, x, [i + s // 2 for i in lo]))
        s //= 2
    return x


def row_dot_scaled(sums, type_size, d_off, signs, bs_step, simd=SIMD, pf=0):
    """Intrinsic dot(w, r, qs, bsums, d8, t) -> f32: row r of w (blocks of type_size bytes) dotted with token t
    of a Q8_K activation (qs i8|i16, bsums: bs_step sums per block, d8). Per block and term i (fp16 scale d_i
    at byte d_off + 2 i, negated where signs[i] < 0): acc_i += (d8 * d_i) * float(isum_i)
    in float32 without fma, all terms in one float vector; the result is acc_0 + acc_1 + ... `sums(v, wp, qp,
    bp, q8_dtype)` emits one int32 lane vector per term, whose lanes sum exactly to isum_i; they are reduced
    together (`reduce_lanes`). pf: see block_loop. Unchecked indices."""
    m = len(signs)
    fv = vec(ir.FloatType(), m)

    @intrinsic
    def dot(typingctx, w, r, qs, bsums, d8, t):
        def codegen(context, builder, sig, args):
            v = Vec(builder, simd)
            acc = cgutils.alloca_once_value(builder, ir.Constant(fv, [0.0] * m))

            def block(wp, ptrs):
                qp, bp, dp = ptrs
                isums = builder.sitofp(reduce_lanes(v, sums(v, wp, qp, bp, sig.args[2].dtype)), fv)
                ds = builder.fpext(v.load(wp, d_off, m, ir.HalfType()), fv)  # one load, one vcvtph2ps
                d8v = builder.insert_element(ir.Constant(fv, ir.Undefined), builder.load(dp), ir.Constant(I32, 0))
                d8v = builder.shuffle_vector(d8v, d8v, ir.Constant(vec(I32, m), [0] * m))
                d8v = builder.fmul(d8v, ir.Constant(fv, [float(sg) for sg in signs]))  # exact: +-d8
                term = builder.fmul(builder.fmul(d8v, ds), isums)  # -d8 * dmin: ggml's order
                builder.store(builder.fadd(builder.load(acc), term), acc)
            block_loop(context, builder, sig, args, type_size, [(2, 5, QK_K), (3, 5, bs_step), (4, 5, 1)], block, pf)
            a = builder.load(acc)
            y = builder.extract_element(a, ir.Constant(I32, 0))
            for i in range(1, m):
                y = builder.fadd(y, builder.extract_element(a, ir.Constant(I32, i)))
            return y
        if (c_matrix(w, qs, bsums, d8) and bsums.dtype == types.int32 and d8.dtype == types.float32
                and w.dtype == types.uint8):
            return types.float32(w, r, qs, bsums, d8, t), codegen
    return dot


def fma_lanes(builder, d, ints, acc):
    """fma(d, float(ints), acc): float d broadcast, ints <n x i32>, acc <n x float>."""
    n = ints.type.count
    fv = vec(ir.FloatType(), n)
    dv = builder.insert_element(ir.Constant(fv, ir.Undefined), d, ir.Constant(I32, 0))
    dv = builder.shuffle_vector(dv, dv, ir.Constant(vec(I32, n), [0] * n))
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv] * 3), f"llvm.fma.v{n}f32")
    return builder.call(fma, [dv, builder.sitofp(ints, fv), acc])


@njit(inline="always")
def decode_scratch(n_tok, nb):
    """int16 rows for the decoded weights of one row chunk (none needed for one token)."""
    return np.empty((ROW_CHUNK if n_tok > 1 else 0, nb * QK_K), np.int16)


@njit(inline="always")
def q8_k16(x):  # x f32[n_tok, n] -> KQuant's prepared activation, on this thread
    return q8_k_serial(x, 16)


class KQuant(FusedMatvec, FusedExperts, QuantType):
    """Shared driver for the K-quants: x -> Q8_K once (`prepare`), then the integer kernels.

    Subclasses set `_dequantize(out, w)`, `_kernel(out, qs, d8, bsums, w, n_par)`, for a
    fused MoE decode step `_experts` (a `make_matvec_experts` kernel), and `_matvec_x =
    fuse_matvec(q8_k16, _kernel, name, qtype)`.
    The kernels trust their shapes (the dot intrinsics do no bounds checks), so
    everything is checked here.
    """

    act_format = "q8_k"

    def _check_weights(self, w, n_rows, n_cols):
        rb = self.row_bytes(n_cols)
        if not (isinstance(w, np.ndarray) and w.dtype == np.uint8 and w.flags.c_contiguous and w.shape == (n_rows, rb)):
            got = f"{w.dtype}{list(w.shape)}" if isinstance(w, np.ndarray) else type(w).__name__
            raise ValueError(f"{self.qtype.name}: weights must be C-contiguous uint8[{n_rows}, {rb}], got {got}")

    def dequantize_into(self, out, w):
        self._check_weights(w, *out.shape)
        self._dequantize(out, w)

    def prepare(self, x):
        """x f32[n_tok, n_cols] -> Q8_K (qs i8[n_tok, n_cols], d8 f32[n_tok, nb], bsums i32[n_tok, n_cols // 16]).

        The kernels also take qs widened to int16 (Q4_K's format): that skips
        the sign extensions but doubles what must stay in L1, which is slower
        for long rows (Q6_K 4096x14336: 13 vs 21 GB/s at one thread).
        """
        if x.ndim != 2 or x.shape[1] % QK_K:
            raise ValueError(f"{self.qtype.name}: activations must be [n_tok, k * {QK_K}], got {x.shape}")
        return q8_k_activation(x)

    def matmul_prepared_into(self, out, act, w):
        """out f32[n_tok, n_rows] = W @ x for x prepared by `prepare`."""
        qs, d8, bsums = act
        n_tok, n_cols = qs.shape
        shapes_ok = out.shape[0] == n_tok and d8.shape == (n_tok, n_cols // QK_K) and bsums.shape == (n_tok, n_cols // 16)
        if qs.dtype not in (np.int8, np.int16) or not shapes_ok:
            raise ValueError(f"{self.qtype.name}: out {out.shape} / activation shapes do not match")
        self._check_weights(w, out.shape[1], n_cols)
        self._kernel(out, qs, d8, bsums, w, numba.get_num_threads())


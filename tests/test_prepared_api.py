"""The shared activation API of every quant type (QuantType.prepare / matmul_prepared_into /
matvec_experts_into) and the runtime's use of it (weights.Activation, moe's one-token path):
converting x once and reusing it must give bit-identical results to converting it per call."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from localmoe.quant import quant_type, supported_types
from localmoe.weights import Activation, Linear
from quant_helpers import F16_FIELDS  # K-quants: random bytes there could be inf/nan

N_COLS = 512


def weights(qtype, shape, seed):
    """u8[..., n_rows, row_bytes]: gguf-py's quantizer where it has one, else random blocks with sane scales."""
    rng = np.random.default_rng(seed)
    qt = quant_type(qtype)
    if qtype not in F16_FIELDS:
        raw = gguf_quantize(rng.standard_normal(shape).astype(np.float32), qtype)
        return np.ascontiguousarray(raw).view(np.uint8).reshape(shape[:-1] + (-1,))
    nb = shape[-1] // qt.block_size
    raw = rng.integers(0, 256, shape[:-1] + (nb, qt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = np.float16(rng.uniform(0.001, 0.02, shape[:-1] + (nb,))).view(np.uint8).reshape(
            shape[:-1] + (nb, 2))
    return raw.reshape(shape[:-1] + (nb * qt.type_size,))


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("qtype", supported_types(), ids=lambda t: t.name)
def test_prepared_activation_reused(qtype):
    """One prepare(x), several weights and token subsets == matmul_into from float x (bit-identical)."""
    qt = quant_type(qtype)
    x = np.random.default_rng(1).standard_normal((3, N_COLS)).astype(np.float32)
    act = qt.prepare(x)
    for seed in (2, 3):
        w = weights(qtype, (5, N_COLS), seed)
        want = np.empty((3, 5), np.float32)
        qt.matmul_into(want, x, w)
        got = np.empty((3, 5), np.float32)
        qt.matmul_prepared_into(got, act, w)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"{qtype.name}: prepared vs matmul_into")
        for t in range(3):
            one = np.empty(5, np.float32)
            qt.matvec_into(one, x[t], w)
            row = np.empty((1, 5), np.float32)
            qt.matmul_prepared_into(row, qt.take_rows(act, slice(t, t + 1)), w)
            np.testing.assert_array_equal(bits(row[0]), bits(one), err_msg=f"{qtype.name}: token {t} vs matvec_into")


@pytest.mark.parametrize("qtype", supported_types(), ids=lambda t: t.name)
def test_matvec_experts_equals_matvecs(qtype):
    """matvec_experts_into (one fused kernel for the K-quants and legacy types) == one matvec_into per (matrix,
    expert), bit for bit."""
    qt = quant_type(qtype)
    n_rows, k = 136, 3  # 136 rows: two work items of MATVEC_CHUNK rows each, the second short
    stacks = (weights(qtype, (6, n_rows, N_COLS), 4), weights(qtype, (6, n_rows, N_COLS), 5))
    x = np.random.default_rng(6).standard_normal((k, N_COLS)).astype(np.float32)
    sel, xrow = np.array([5, 0, 5], np.int64), np.array([2, 0, 1], np.int64)
    got = np.empty((2, k, n_rows), np.float32)
    qt.matvec_experts_into(got, qt.prepare(x), stacks, sel, xrow)
    for m in range(2):
        for s in range(k):
            want = np.empty(n_rows, np.float32)
            qt.matvec_into(want, x[xrow[s]], stacks[m][sel[s]])
            np.testing.assert_array_equal(bits(got[m, s]), bits(want), err_msg=f"{qtype.name} matrix {m} slot {s}")


def test_matvec_experts_rejects_bad_shapes():
    qt = quant_type(T.Q4_K)
    stack = weights(T.Q4_K, (2, 16, N_COLS), 7)
    act = qt.prepare(np.ones((1, N_COLS), np.float32))
    with pytest.raises(ValueError):  # expert 2 of a 2-expert stack
        qt.matvec_experts_into(np.empty((1, 1, 16), np.float32), act, (stack,), np.array([2]), np.array([0]))


def test_activation_shared_between_types_of_one_format():
    """q/k/v-style sharing: Q6_K and Q3_K read the same Q8_K conversion; Q4_K gets its own."""
    x = np.random.default_rng(8).standard_normal((2, N_COLS)).astype(np.float32)
    xa = Activation(x)
    lins = [Linear(t.name, t, (8, N_COLS), weights(t, (8, N_COLS), 9)) for t in (T.Q6_K, T.Q3_K, T.Q4_K, T.Q8_0)]
    for lin in lins:
        np.testing.assert_array_equal(bits(lin(xa)), bits(lin(x)), err_msg=f"{lin.qtype.name} via Activation")
    assert xa.prepared(lins[0].qt) is xa.prepared(lins[1].qt)
    assert xa.prepared(lins[0].qt) is not xa.prepared(lins[2].qt)
    sub = xa.take_rows(np.array([1]))
    for lin in lins:
        np.testing.assert_array_equal(bits(lin(sub)), bits(lin(x[1:])), err_msg=f"{lin.qtype.name} rows of an Activation")

"""Attention runs over query rows in tiles (layers.ATTN_TILE) so its scratch does not grow with
batch x context: the tiles must give bit-identical output to one whole-batch pass."""
import numpy as np
import pytest

from localmoe import layers


def _inputs(n_tok, pos0, n_head=4, n_head_kv=2, hd=64, n_ctx=96, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_tok, n_head, hd), dtype=np.float32)
    kc = rng.standard_normal((n_ctx, n_head_kv, hd)).astype(np.float16)
    vc = rng.standard_normal((n_ctx, n_head_kv, hd)).astype(np.float16)
    return q, kc, vc, pos0


@pytest.mark.parametrize("n_tok,pos0", [(1, 40), (17, 0), (33, 20), (64, 32)])
def test_tiles_bit_identical(monkeypatch, n_tok, pos0):
    q, kc, vc, pos0 = _inputs(n_tok, pos0)
    whole = layers.attention(q, kc, vc, pos0, 0.125).copy()
    monkeypatch.setattr(layers, "ATTN_TILE", 3 * 4 * 96)  # 3 query rows a tile
    assert layers.attn_tile_rows(4, 96, n_tok) == min(3, n_tok)
    tiled = layers.attention(q, kc, vc, pos0, 0.125)
    np.testing.assert_array_equal(tiled, whole)  # tolerance 0: rows are independent


def test_tiles_through_run_buffers(monkeypatch):
    """With RunBuffers sized for tiles, the model's buffers hold one tile and give the same output."""
    from types import SimpleNamespace
    monkeypatch.setattr(layers, "ATTN_TILE", 5 * 4 * 96)
    args = SimpleNamespace(n_head=4, n_head_kv=2, head_dim_k=64, head_dim_v=64, n_expert=8)
    buf = layers.RunBuffers.allocate(args, 96, 32)
    assert buf.probs.size == 5 * 4 * 96
    q, kc, vc, pos0 = _inputs(32, 10)
    got = layers.attention(q, kc, vc, pos0, 0.125, buf).copy()
    monkeypatch.setattr(layers, "ATTN_TILE", 1 << 30)
    np.testing.assert_array_equal(got, layers.attention(q, kc, vc, pos0, 0.125))


def test_probs_scratch_bounded():
    """Qwen3-30B-A3B attention (32 heads) with 512-token micro-batches: the probabilities' scratch
    stays within ATTN_TILE elements at any context (512 x 32 x 32768 would be 2 GiB in f32)."""
    from types import SimpleNamespace
    args = SimpleNamespace(n_head=32, n_head_kv=4, head_dim_k=128, head_dim_v=128, n_expert=128)
    for n_ctx in (512, 4096, 32768):
        assert layers.RunBuffers.shapes(args, n_ctx, 512)["probs"][0][0] <= layers.ATTN_TILE
    # all run buffers: 42 MiB at any context (the kernels read the fp16 cache as it is: no f32 copy
    # of it grows with n_ctx)
    sizes = {layers.RunBuffers.nbytes(args, n_ctx, 512) for n_ctx in (512, 4096, 32768)}
    assert len(sizes) == 1 and sizes.pop() < 43 << 20

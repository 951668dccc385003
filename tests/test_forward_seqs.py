"""Model.forward_seqs: several sequences, each with its own KV cache, in one batch. A sequence
gets exactly (bit for bit) the logits it gets alone through forward, so that a server batching
concurrent requests gives each the reply it would get by itself. The files cover F32 routers,
F16 experts (whose llama.cpp kernels depend on the row count, see localmoe.weights.ROW_SEQ),
Q8_0 and K-quants, MLA and a shared-expert gate."""
import numpy as np
import pytest

from localmoe.errors import LocalMoEError
from localmoe.model import load
from localmoe.shipped import default_model_path
from reference import model_file

PROMPTS = [[5, 17, 99, 3, 42, 8], [7], [11, 12, 13], [200, 201, 202, 203, 204, 205, 206, 207, 208, 209]]


def alone(m, prompt, steps):
    """Logits of the prompt's last token, then of each greedy step, from a fresh cache."""
    m.reset()
    out = [m.forward(prompt, all_logits=False)[-1]]
    for _ in range(steps):
        out.append(m.forward([int(np.argmax(out[-1]))], all_logits=False)[-1])
    return out


def batched(m, prompts, steps):
    """The same through forward_seqs: all prompts in one batch, then one token each per step."""
    caches = [m.new_cache() for _ in prompts]
    rows = m.forward_seqs(list(zip(caches, prompts)))
    out = [[r] for r in rows]
    for _ in range(steps):
        rows = m.forward_seqs([(c, [int(np.argmax(o[-1]))]) for c, o in zip(caches, out)])
        for o, r in zip(out, rows):
            o.append(r)
    return out


@pytest.mark.parametrize("path", [
    pytest.param(lambda: default_model_path(), id="shipped"),
    pytest.param(lambda: model_file("deepseek2", "Q8_0", "v3"), id="deepseek2-v3-q8_0"),
    pytest.param(lambda: model_file("qwen2moe", "Q4_K_M"), id="qwen2moe-q4_k_m"),
    pytest.param(lambda: model_file("llama"), id="llama-f16"),
    pytest.param(lambda: model_file("deepseek2", "F16", "v2"), id="deepseek2-v2-f16"),
])
def test_each_sequence_gets_its_own_logits_bit_for_bit(path):
    with load(path(), n_ctx=64, n_threads=1) as m:
        want = [alone(m, p, 4) for p in PROMPTS]
        got = batched(m, PROMPTS, 4)
    for w, g in zip(want, got):
        assert [int(np.argmax(a)) for a in w] == [int(np.argmax(b)) for b in g]
        for a, b in zip(w, g):
            np.testing.assert_array_equal(a, b)  # tolerance: none


def test_bad_batches_are_refused():
    with load(default_model_path(), n_ctx=16, n_threads=1) as m:
        c = m.new_cache()
        with pytest.raises(LocalMoEError, match="own"):
            m.forward_seqs([(c, [1]), (c, [2])])
        with pytest.raises(LocalMoEError, match="tokens in all"):
            m.forward_seqs([])
        with pytest.raises(LocalMoEError, match="context overflow"):
            m.forward_seqs([(c, list(range(17)))])
        assert c.n_past == 0

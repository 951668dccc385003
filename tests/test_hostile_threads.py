"""Threads on one Model (finding 8): calls are serialised, never interleaved; chat sessions
sharing a model re-evaluate what another user overwrote in the KV cache."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import localmoe
from localmoe.chat import ChatSession

from hostile_common import SHIPPED

PROMPTS = ["ROMEO.\nWhat light", "JULIET.\nO Romeo", "HAMLET.\nTo be", "KING.\nNow is"]
N = 12


def _gen(m, prompt):
    return "".join(m.generate(prompt, max_tokens=N, temperature=0))


@pytest.fixture(scope="module", params=[None, "30M"], ids=["resident", "ram-budget"])
def model(request):
    with localmoe.load(SHIPPED, n_ctx=128, ram_budget=request.param) as m:
        yield m


@pytest.fixture(scope="module")
def solo(model):
    return {p: _gen(model, p) for p in PROMPTS}


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_generating_on_one_model_get_their_own_output(model, solo, n_threads):
    barrier = threading.Barrier(n_threads)

    def work(p):
        barrier.wait()
        return p, _gen(model, p)
    with ThreadPoolExecutor(n_threads) as ex:
        got = dict(ex.map(work, PROMPTS[:n_threads]))
    assert got == {p: solo[p] for p in PROMPTS[:n_threads]}


def test_forward_and_eval_interleaved_with_generation(model, solo):
    import numpy as np
    ids = model.tokenize(PROMPTS[1])
    ref = model.eval(ids)
    stop = threading.Event()
    errors = []

    def evals():
        while not stop.is_set():
            if not np.array_equal(model.eval(ids), ref):
                errors.append("eval changed")
    t = threading.Thread(target=evals)
    t.start()
    try:
        for p in PROMPTS[:1]:
            assert _gen(model, p) == solo[p]
    finally:
        stop.set()
        t.join()
    assert not errors


def test_generators_stepped_from_different_threads(model, solo):
    """As a server's worker pool does: each step of one generation may run on another thread."""
    g = model.generate(PROMPTS[0], max_tokens=N, temperature=0)
    with ThreadPoolExecutor(3) as ex:
        pieces = []
        while True:
            piece = ex.submit(next, g, None).result()
            if piece is None:
                break
            pieces.append(piece)
    assert "".join(pieces) == solo[PROMPTS[0]]


def test_closing_a_generation_midway_frees_the_model(model, solo):
    g = model.generate(PROMPTS[0], max_tokens=N, temperature=0)
    next(g)
    g.close()
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(_gen, model, PROMPTS[1]).result(timeout=120) == solo[PROMPTS[1]]
    g = model.generate(PROMPTS[2], max_tokens=N, temperature=0)
    next(g)
    del g  # dropped: garbage collection closes it
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(_gen, model, PROMPTS[3]).result(timeout=120) == solo[PROMPTS[3]]


def _turns(session, texts):
    return ["".join(session.send(t)) for t in texts]


A = ["ROMEO.\nWhat light", "And then?"]
B = ["HAMLET.\nTo be or not", "Speak on."]


def _session(m):
    return ChatSession(m, system="Speak as Shakespeare.", max_tokens=12, temperature=0)


def test_two_sessions_taking_turns_on_one_model(model):
    alone_a, alone_b = _turns(_session(model), A), _turns(_session(model), B)
    sa, sb = _session(model), _session(model)
    got_a, got_b = [], []
    for ta, tb in zip(A, B):  # a, b, a, b: each turn finds the other's tokens in the cache
        got_a += _turns(sa, [ta])
        got_b += _turns(sb, [tb])
    assert (got_a, got_b) == (alone_a, alone_b)
    assert sa.last.n_reused == 0, "the cache held the other session's tokens: nothing can be reused"
    more = ["Go on.", "More."]
    got = _turns(sa, more)  # the second turn follows sa's own: its prefix comes from the cache
    assert sa.last.n_reused > 0
    assert got_a + got == _turns(_session(model), A + more)


def test_two_sessions_in_two_threads(model):
    alone = {id(x): _turns(_session(model), x) for x in (A, B)}
    barrier = threading.Barrier(2)

    def work(texts):
        s = _session(model)
        barrier.wait()
        return id(texts), _turns(s, texts)
    with ThreadPoolExecutor(2) as ex:
        got = dict(ex.map(work, (A, B)))
    assert got == alone

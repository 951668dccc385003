import numpy as np
import pytest

from localmoe.sampling import Sampler, SamplingError, StopStrings

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))


def freqs(s: Sampler, logits, n=20000, history=()):
    draws = np.array([s.sample(logits, history) for _ in range(n)])
    return np.bincount(draws, minlength=len(logits)) / n


def test_greedy_is_argmax_lowest_id_on_ties():
    lg = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    assert Sampler(temperature=0).sample(lg) == 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        lg = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(temperature=0).sample(lg) == int(np.argmax(lg))


def test_top_k_1_is_greedy_at_any_temperature():
    rng = np.random.default_rng(1)
    lg = rng.standard_normal(50000).astype(np.float32)
    s = Sampler(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3)
    assert {s.sample(lg) for _ in range(50)} == {int(np.argmax(lg))}


def test_plain_distribution_matches_softmax():
    # 20000 draws: binomial std <= 0.0036, tolerance 0.015 is > 4 sigma
    f = freqs(Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), LOGITS)
    np.testing.assert_allclose(f, np.exp(LOGITS), atol=0.015)


def test_top_k_top_p_min_p_and_temperature_renormalise():
    p = np.exp(LOGITS.astype(np.float64))
    # top_k=3 -> {0,1,2}
    f = freqs(Sampler(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=2), LOGITS)
    np.testing.assert_allclose(f, np.r_[p[:3] / p[:3].sum(), 0, 0], atol=0.015)
    # top_p=0.7 keeps the minimal prefix with cumulative p >= 0.7: {0, 1}
    f = freqs(Sampler(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=2), LOGITS)
    np.testing.assert_allclose(f, np.r_[p[:2] / p[:2].sum(), 0, 0, 0], atol=0.015)
    # min_p=0.25 keeps p >= 0.125: {0, 1, 2}
    f = freqs(Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=2), LOGITS)
    np.testing.assert_allclose(f, np.r_[p[:3] / p[:3].sum(), 0, 0], atol=0.015)
    # temperature 2 flattens what survives: p^(1/2) renormalised
    q = p ** 0.5
    f = freqs(Sampler(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=2), LOGITS)
    np.testing.assert_allclose(f, q / q.sum(), atol=0.015)


def test_top_p_and_min_p_see_temperature_one_probabilities():
    # at temperature 10 nearly uniform, but min_p still filters on the t=1 probabilities
    ids, p = Sampler(temperature=10.0, top_k=0, top_p=1.0, min_p=0.25).candidates(LOGITS)
    assert ids.tolist() == [0, 1, 2]
    assert p.max() - p.min() < 0.05


def test_seed_reproducible_and_distinct():
    lg = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    s1, s2, s3 = (Sampler(temperature=1.5, top_k=0, top_p=1, min_p=0, seed=x) for x in (42, 42, 43))
    seq1 = [s1.sample(lg) for _ in range(30)]
    assert seq1 == [s2.sample(lg) for _ in range(30)]
    assert seq1 != [s3.sample(lg) for _ in range(30)]
    s1.reset()
    assert [s1.sample(lg) for _ in range(30)] == seq1


def test_repeat_penalty_llama_semantics():
    lg = np.array([2.0, 1.9, -1.0, -1.1], np.float32)
    s = Sampler(temperature=0, repeat_penalty=1.5)
    assert s.sample(lg, history=[]) == 0
    assert s.sample(lg, history=[0]) == 1          # 2.0 / 1.5 < 1.9
    out = s.penalize(lg, [0, 2, 2])
    np.testing.assert_array_equal(out, np.array([2.0 / 1.5, 1.9, -1.5, -1.1], np.float32))
    # only the last repeat_last_n tokens count
    s = Sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=1)
    assert s.sample(lg, history=[0, 3]) == 0


def test_nan_and_inf_logits():
    lg = np.array([np.nan, 1.0, 0.5], np.float32)
    assert Sampler(temperature=0).sample(lg) == 1
    assert Sampler(temperature=1.0, seed=0).sample(lg) in (1, 2)
    lg = np.array([0.0, np.inf, 3.0, np.inf], np.float32)
    s = Sampler(temperature=1.0, seed=0, top_k=0, top_p=1, min_p=0)
    assert {s.sample(lg) for _ in range(100)} == {1, 3}


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0),
                                dict(temperature=float("nan")), dict(repeat_last_n=-1), dict(top_k=1.5)])
def test_bad_parameters_raise_clear_errors(kw):
    with pytest.raises(SamplingError, match=next(iter(kw))):
        Sampler(**kw)


def test_large_vocab_is_fast_enough_to_use_argpartition():
    lg = np.random.default_rng(0).standard_normal(152064).astype(np.float32)
    ids, p = Sampler(temperature=0.8, top_k=40).candidates(lg)
    assert len(ids) <= 40 and set(ids) <= set(np.argsort(-lg)[:40].tolist())
    assert abs(p.sum() - 1) < 1e-9 and np.all(np.diff(p) <= 0)


def stream(stops, pieces):
    s, out, stopped = StopStrings(stops), [], False
    for piece in pieces:
        text, stopped = s.feed(piece)
        out.append(text)
        if stopped:
            break
    out.append(s.flush())
    return "".join(out), stopped


def test_stop_string_spanning_pieces():
    assert stream(["</s>"], ["Hello <", "/", "s> world"]) == ("Hello ", True)


def test_partial_prefix_is_held_back_then_released():
    s = StopStrings(["STOP"])
    assert s.feed("abc ST") == ("abc ", False)
    assert s.feed("ART") == ("START", False)
    assert s.flush() == ""
    assert stream(["STOP"], ["abc", " ST"]) == ("abc ST", False)


def test_multiple_stops_earliest_wins_and_stop_at_start():
    assert stream(["world", "lo w"], ["Hello world"]) == ("Hel", True)
    assert stream(["\n\n"], ["\n\nafter"]) == ("", True)
    assert stream([], ["a", "b"]) == ("ab", False)
    s = StopStrings(["x"])
    s.feed("x")
    assert s.feed("more") == ("", True)

"""Context size and the small API/CLI findings of the hostile-input issue (findings 3 and 9)."""
import warnings

import numpy as np
import pytest

import localmoe
from localmoe.errors import LocalMoEError

from hostile_common import SHIPPED, assert_clean_error, assert_ok, cli


@pytest.fixture(scope="module")
def model():
    with localmoe.load(SHIPPED, n_ctx=64) as m:
        yield m


def test_huge_context_is_refused_with_the_memory_it_needs():
    p = cli("run", "--ctx", "10000000", "-n", "1", "-p", "hi", timeout=120)
    err = assert_clean_error(p, "a context of 10000000 tokens needs", "GiB", "available")
    assert "MemoryError" not in err and "Unable to allocate" not in err


def test_huge_context_in_the_api_names_the_numbers(model):
    from localmoe.model import check_context, context_bytes
    with pytest.raises(LocalMoEError, match=r"a context of 10000000 tokens needs [\d.]+ GiB"):
        localmoe.load(SHIPPED, n_ctx=10**7)
    need = context_bytes(model.args, 200)["total"]
    with pytest.raises(LocalMoEError, match="but 1.0 MiB is available"):
        check_context(model.args, 200, available=2**20)
    check_context(model.args, 200, available=need)  # exactly enough is enough


def test_context_past_training_warns():
    from localmoe.model import ContextLengthWarning
    with pytest.warns(ContextLengthWarning, match="training context"):
        localmoe.load(SHIPPED, n_ctx=512).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        localmoe.load(SHIPPED, n_ctx=256).close()
    err = assert_ok(cli("run", "--ctx", "512", "-n", "1", "-p", "hi", "--seed", "1"))
    assert "warning: n_ctx=512 is larger than the model's training context (256)" in err


def test_load_none_and_bad_context_type():
    with pytest.raises(LocalMoEError, match="path of a GGUF file"):
        localmoe.load(None)
    with pytest.raises(LocalMoEError, match="n_ctx must be an integer"):
        localmoe.load(SHIPPED, n_ctx=1.5)


@pytest.mark.parametrize("ids, why", [
    ([1.7], "must be integers"), ([1, 2.0], "must be integers"), (["1"], "must be integers"),
    ([True], "must be integers"), ([10**30], "token id 1000000000000000000000000000000 is outside"),
    (np.array([2**63], np.uint64), "token id 9223372036854775808 is outside"),
    ([2**64 - 1], "token id 18446744073709551615 is outside"), ([-1], "token id -1 is outside"),
    ([[1, 2], [3]], "flat sequence"),
])
def test_bad_token_ids(model, ids, why):
    with pytest.raises(LocalMoEError, match=why):
        model.eval(ids)
    with pytest.raises(LocalMoEError, match=why):
        model.generate_tokens(ids, 2)
    assert model.eval([1, 2]).shape == (2, model.n_vocab)  # the model still works


def test_run_says_when_the_context_filled():
    p = cli("run", "--ctx", "24", "-n", "100", "--temp", "0", "-p", "ROMEO.\nWhat light", "--stop", "@@")
    err = assert_ok(p)
    assert "the context of 24 tokens is full" in err


def test_run_is_silent_when_it_stops_for_another_reason():
    err = assert_ok(cli("run", "-n", "3", "--temp", "0", "-p", "ROMEO.\nWhat light"))
    assert "is full" not in err

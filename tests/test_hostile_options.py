"""Options and saved state from users (finding 4): seed -1, bad /set and /load, expert profiles."""
import json

import numpy as np
import pytest

import localmoe
from localmoe.chat import ChatError, ChatSession
from localmoe.errors import LocalMoEError
from localmoe.planner.stats import load_profile
from localmoe.sampling import Sampler, SamplingError

from hostile_common import SHIPPED, assert_clean_error, assert_ok, cli

DEEP = "[" * 100000 + "]" * 100000


def _saved(**options):
    return {"format": "localmoe-chat", "version": 1, "messages": [{"role": "user", "content": "hi"}],
            "options": options}


BAD_FILES = {
    "seed-float": json.dumps(_saved(seed=1.5)),
    "seed-negative": json.dumps(_saved(seed=-7)),
    "top_k-inf": json.dumps(_saved(top_k=1)).replace('"top_k": 1', '"top_k": 1e400'),
    "top_k-huge-int": json.dumps(_saved(top_k=10**400)),
    "temperature-huge-int": json.dumps(_saved(temperature=10**400)),
    "deep": DEEP,
    "deep-messages": '{"format": "localmoe-chat", "version": 1, "messages": ' + DEEP + "}",
}


def test_seed_minus_one_is_random():
    draws = {Sampler(seed=-1, temperature=1.0).sample(np.zeros(1000, np.float32)) for _ in range(20)}
    assert len(draws) > 1
    assert Sampler(seed=-1).seed == -1  # kept as given, so a saved chat stays "random"
    for bad in (-2, 1.5, "1", True):
        with pytest.raises(SamplingError, match="seed"):
            Sampler(seed=bad)


@pytest.mark.parametrize("kw", [{"top_k": float("inf")}, {"top_k": 10**400}, {"temperature": 10**400},
                                {"top_p": "0.5"}, {"min_p": None}, {"repeat_penalty": [1]}])
def test_sampler_rejects_non_numbers_cleanly(kw):
    with pytest.raises(SamplingError):
        Sampler(**kw)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_saved_chat_is_refused_and_the_session_kept(tmp_path, name):
    with localmoe.load(SHIPPED, n_ctx=64) as m:
        s = ChatSession(m, system="Be brief.", temperature=0, seed=3)
        s.messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        before = s.to_json()
        f = tmp_path / f"{name}.json"
        f.write_text(BAD_FILES[name])
        with pytest.raises(ChatError):
            s.load(f)
        assert s.to_json() == before


def test_chat_survives_bad_set_and_load(tmp_path):
    for name, text in BAD_FILES.items():
        (tmp_path / f"{name}.json").write_text(text)
    lines = ["/set seed -1", "/set seed 1.5", "/set top_k 1e400", "/set temperature inf", "/set seed -5",
             "/set top_k 99999999999999999999999999"]
    lines += [f"/load {tmp_path / name}.json" for name in BAD_FILES]
    lines += ["/set temperature 0", "ROMEO.", "/bye"]
    p = cli("chat", "-n", "4", "--seed", "-1", stdin="\n".join(lines).encode() + b"\n")
    err = assert_ok(p)
    assert "Set seed to -1." in p.stdout.decode()
    assert err.count("error:") == 4 + len(BAD_FILES), err
    assert p.stdout.decode().strip().splitlines()[-1].strip(), "the chat must still reply after the errors"


def test_run_seed_minus_one():
    assert_ok(cli("run", "-n", "2", "-p", "hi", "--seed", "-1"))
    assert_clean_error(cli("run", "-n", "2", "-p", "hi", "--seed", "-2"), "seed")


@pytest.mark.parametrize("content", [DEEP, '{"counts": ' + DEEP + "}", '{"counts": [[1.5]]}',
                                     '{"counts": "x"}', '{"counts": [[1e400]]}', '{"counts": [[%d]]}' % 10**30,
                                     '{"counts": [[1, 2], [3]]}', '{"counts": [["1"]]}', "[]", ""])
def test_bad_expert_profile(tmp_path, content):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(LocalMoEError, match="expert profile"):
        load_profile(f, 6, 8)


def test_expert_profile_cli(tmp_path):
    f = tmp_path / "deep.json"
    f.write_text(DEEP)
    assert_clean_error(cli("run", "-n", "1", "-p", "hi", "--ram-budget", "30M", "--expert-profile", str(f)),
                       "expert profile")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1, "counts": [[1] * 8] * 6}))
    assert_ok(cli("run", "-n", "1", "-p", "hi", "--ram-budget", "30M", "--expert-profile", str(good)))

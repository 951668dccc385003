"""`localmoe serve` end to end: the real server in a subprocess, driven by the real openai and
ollama clients and by raw HTTP (httpx) for the hostile cases.

Two servers are started once per session: `server` with the default options, and `guarded`
with --api-key, --cors-origin, --max-queue 1, a small --max-body and a --models-dir that
holds the shipped model and a copy whose chat template refuses every conversation.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import ollama
import openai
import pytest

from serve_util import SHIPPED, SHIPPED_DS, Server, port_free

KEY = "test-key-123"
TIMEOUT = 60  # seconds; generous: the machine may be shared
post = functools.partial(httpx.post, timeout=TIMEOUT)
get = functools.partial(httpx.get, timeout=TIMEOUT)
options = functools.partial(httpx.options, timeout=TIMEOUT)
ALLOWED = "http://allowed.example"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = Server(str(SHIPPED), "--ctx", "1024", log=tmp_path_factory.mktemp("serve") / "server.log").wait_ready()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="session")
def serial(tmp_path_factory):
    """One request at a time (--parallel 1): the FIFO order is the completion order."""
    s = Server(str(SHIPPED), "--ctx", "1024", "--parallel", "1",
               log=tmp_path_factory.mktemp("serial") / "server.log").wait_ready()
    yield s
    assert s.stop() == 0, s.log()


def _with_template(dst, template: str):
    """A copy of the shipped model with another chat template, padded to the old one's length
    by a jinja comment (so that every offset in the file stays the same)."""
    data = SHIPPED.read_bytes()
    from localmoe.gguf_file import open_gguf
    with open_gguf(SHIPPED) as f:
        old = f.metadata["tokenizer.chat_template"].encode()
    new = template.encode()
    assert data.count(old) == 1 and len(new) + 4 <= len(old)
    dst.write_bytes(data.replace(old, new + b"{#" + b" " * (len(old) - len(new) - 4) + b"#}"))


REFUSES = "{{ raise_exception('test template says no') }}"
# opens the reply with <think>, as Qwen3's and DeepSeek-R1's templates can
THINKS = ("{% for m in messages %}{{ m['content'] + '\\n\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'SHAKESPEARE.\\n<think>\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def guarded(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    os.symlink(SHIPPED, d / SHIPPED.name)
    _with_template(d / "refuses.gguf", REFUSES)
    _with_template(d / "thinks.gguf", THINKS)
    s = Server("--api-key", KEY, "--cors-origin", ALLOWED, "--max-queue", "1", "--max-body", "64K", "--ctx", "2048",
               "--models-dir", str(d), "--parallel", "1", log=d / "server.log").wait_ready()
    yield s
    assert s.stop() == 0, s.log()


def oai(s: Server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def chat_msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- openai client -------------------------------------------------------------

def test_openai_chat_stream_and_not(server):
    c = oai(server)
    r = c.chat.completions.create(model="any", messages=chat_msgs("Who art thou?"), **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 1
    chunks = list(c.chat.completions.create(model="any", messages=chat_msgs("Who art thou?"), stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [ch for ch in chunks if ch.choices]
    assert body[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    assert text == r.choices[0].message.content  # greedy: the same reply, streamed or not


def test_openai_completions_stream_and_not(server):
    c = oai(server)
    r = c.completions.create(model="any", prompt="ROMEO:", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    parts = list(c.completions.create(model="any", prompt="ROMEO:", max_tokens=6, temperature=0, stream=True,
                                      stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
    assert parts[-1].usage.completion_tokens == 6


def test_openai_errors_map_to_bad_request(server):
    c = oai(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="any", messages=chat_msgs("hi"), n=2)
    assert "'n'" in e.value.message and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="any", messages=chat_msgs("hi"),
                                  tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "tools" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="any", messages=chat_msgs("hi"),
                                  response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    assert "response_format" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="any", messages=chat_msgs("hi"), logprobs=True)
    assert "logprobs" in e.value.message
    long = "thou art a villain " * 400
    n_prompt = len(post(server.url + "/tokenize", json={"content": long}).json()["tokens"])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="any", messages=chat_msgs(long), stream=True)
    assert e.value.code == "context_length_exceeded"
    msg = e.value.message
    assert "1024" in msg and any(str(n) in msg for n in range(n_prompt, n_prompt + 20))


# --- ollama client -----------------------------------------------------------

def test_ollama_chat_and_generate(server):
    c = ollama.Client(host=server.url)
    opts = {"temperature": 0, "num_predict": 4}
    r = c.chat(model="shakespeare", messages=chat_msgs("Who art thou?"), options=opts)
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count >= 1 and r.eval_duration > 0 and r.prompt_eval_count >= 1 and r.total_duration > 0
    parts = list(c.chat(model="shakespeare", messages=chat_msgs("Who art thou?"), options=opts, stream=True))
    assert parts[-1].done and parts[-1].eval_count == r.eval_count
    assert "".join(p.message.content for p in parts) == r.message.content
    g = c.generate(model="shakespeare", prompt="ROMEO:", raw=True, options=opts)
    assert g.done and g.response and g.eval_count == 4 and g.done_reason == "length"
    gs = list(c.generate(model="shakespeare", prompt="ROMEO:", raw=True, options=opts, stream=True))
    assert "".join(p.response for p in gs) == g.response and gs[-1].done
    assert c.generate(model="shakespeare", prompt="Speak.", options=opts).response
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="shakespeare", messages=chat_msgs("hi"), options={"mirostat": 2})
    assert e.value.status_code == 400 and "mirostat" in e.value.error


def test_ollama_listings(server):
    c = ollama.Client(host=server.url)
    names = [m.model for m in c.list().models]
    assert names == ["shakespeare-moe-Q8_0"]
    ps = c.ps().models
    assert ps[0].model == "shakespeare-moe-Q8_0" and ps[0].details.quantization_level == "Q8_0"
    show = c.show("shakespeare-moe-Q8_0")
    assert show.modelinfo["general.architecture"] == "qwen3moe" and "SHAKESPEARE" in show.template
    assert get(server.url + "/api/version").json()["version"]


# --- other llama-server routes ---------------------------------------------------

def test_health_props_models_tokenize(server):
    assert get(server.url + "/health").json() == {"status": "ok"}
    p = get(server.url + "/props").json()
    assert (p["arch"], p["quant"], p["n_expert"], p["n_expert_used"], p["n_ctx"]) == ("qwen3moe", "Q8_0", 8, 2, 1024)
    assert p["model"] == SHIPPED.name and p["has_chat_template"] and p["n_params"] > 1e6
    assert [m.id for m in oai(server).models.list()] == ["shakespeare-moe-Q8_0"]
    toks = post(server.url + "/tokenize", json={"content": "Good morrow", "with_pieces": True}).json()["tokens"]
    assert "".join(t["piece"] for t in toks) == "Good morrow"
    back = post(server.url + "/detokenize", json={"tokens": [t["id"] for t in toks]}).json()
    assert back == {"content": "Good morrow"}
    assert get(server.url + "/").status_code == 200


# --- hostile requests (point 6) -------------------------------------------------

@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": chat_msgs("hi"), "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": chat_msgs("hi"), "max_tokens": 1.5}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "unknown role"),
    (json.dumps({"messages": [{"role": "tool", "content": "hi"}]}).encode(), 400, "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
    (json.dumps({"messages": chat_msgs("hi"), "frobnicate": 1}).encode(), 400, "frobnicate"),
    (json.dumps({"messages": chat_msgs("hi"), "top_p": 7}).encode(), 400, "top_p"),
])
def test_bad_requests_get_400(server, body, status, needle):
    r = post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_ollama_bad_request_shape(server):
    r = post(server.url + "/api/chat", content=b"{oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_body_limit_413(guarded):
    h = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"messages": chat_msgs("a" * 70_000)}).encode()
    r = post(guarded.url + "/v1/chat/completions", content=big, headers=h)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit must hold while the body is read
        for _ in range(1000):
            yield b" " * 1024
    r = post(guarded.url + "/v1/chat/completions", content=chunked(), headers=h)
    assert r.status_code == 413
    assert get(guarded.url + "/health").status_code == 200


def test_api_key_401(guarded):
    url = guarded.url + "/v1/models"
    assert get(url).status_code == 401
    r = get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(guarded.url + "/api/chat", json={}).status_code == 401
    assert get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert get(guarded.url + "/health").status_code == 200  # public, as llama-server's
    with pytest.raises(openai.AuthenticationError):
        oai(guarded, api_key="wrong").models.list()


def test_template_error_400_and_model_swap(guarded):
    c = oai(guarded, api_key=KEY)
    assert sorted(m.id for m in c.models.list()) == ["refuses", "shakespeare-moe-Q8_0", "thinks"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="refuses", messages=chat_msgs("hi"), max_tokens=2)
    assert "test template says no" in e.value.message and e.value.code == "chat_template_error"
    ps = get(guarded.url + "/api/ps", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["name"] for m in ps["models"]] == ["refuses"]  # it was loaded in place of the other
    r = c.chat.completions.create(model="shakespeare-moe-Q8_0", messages=chat_msgs("hi"), **GREEDY)
    assert r.choices[0].message.content is not None and r.model == "shakespeare-moe-Q8_0"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=chat_msgs("hi"), max_tokens=2)


def test_reasoning_content(guarded):
    """The template opened <think> and the model never closes it: the whole reply is reasoning."""
    c = oai(guarded, api_key=KEY)
    r = c.chat.completions.create(model="thinks", messages=chat_msgs("Who art thou?"), **GREEDY)
    msg = r.choices[0].message
    assert msg.content == "" and msg.reasoning_content and "<think>" not in msg.reasoning_content
    chunks = list(c.chat.completions.create(model="thinks", messages=chat_msgs("Who art thou?"), stream=True,
                                            **GREEDY))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
    assert not "".join(d.content or "" for d in deltas)
    inline = c.chat.completions.create(model="thinks", messages=chat_msgs("Who art thou?"),
                                       extra_body={"reasoning_format": "none"}, **GREEDY).choices[0].message
    assert inline.content == msg.reasoning_content and getattr(inline, "reasoning_content", None) is None


def test_cors_off_by_default(server):
    pre = options(server.url + "/v1/chat/completions",
                        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    r = get(server.url + "/v1/models", headers={"Origin": ALLOWED})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_named(guarded):
    def pre(origin):
        return options(guarded.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
    ok = pre(ALLOWED)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    assert pre("http://evil.example").headers.get("access-control-allow-origin") != "http://evil.example"


# --- one model, many clients ------------------------------------------------------

SLOW = {"prompt": "ROMEO:", "max_tokens": 200, "temperature": 1.0, "seed": 1}  # runs all 200 tokens
BLOCK = {**SLOW, "max_tokens": 1000}  # on `server` (--ctx 1024): all 1000 tokens, 10-40 s here
# on `guarded` (--ctx 2048): runs all 2000 tokens, 20-70 s on this machine
LONG = {"prompt": "ROMEO:", "max_tokens": 2000, "temperature": 1.0, "seed": 1,
        "model": "shakespeare-moe-Q8_0"}
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_disconnect_mid_stream_then_next_request(guarded):
    with httpx.Client(timeout=TIMEOUT, headers=AUTH) as h:
        with h.stream("POST", guarded.url + "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            next(l for l in lines if l.startswith("data: "))
            next(l for l in lines if l.startswith("data: "))
        t0 = time.monotonic()
        r = h.post(guarded.url + "/v1/completions", json={**LONG, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    # not behind the abandoned request's 2000 tokens (20 s or more): 3 tokens take well under
    # 1 s alone; the bound leaves room for a loaded machine
    assert time.monotonic() - t0 < 8


def test_disconnect_stops_within_a_token(server):
    with httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", server.url + "/v1/completions", json={**SLOW, "seed": 2, "stream": True}) as r:
            got = 0
            lines = r.iter_lines()  # kept: closing the iterator would close the stream
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        rid = json.loads(line[6:])["id"]
                        break
            before = get(server.url + "/v1/experts").json()["request"]
            assert before["id"] == rid and before["active"]
    deadline = time.monotonic() + 10
    while True:
        ex = get(server.url + "/v1/experts").json()["request"]
        if ex["id"] == rid and not ex["active"]:
            break
        assert time.monotonic() < deadline, ex
        time.sleep(0.02)
    # tokens evaluated after the last look and the close: one once the server sees the
    # disconnect; the tolerance (10) covers the time it takes to see it (~10 ms a token here)
    assert ex["n_tokens"] - before["n_tokens"] <= 10, (before, ex)
    assert ex["n_tokens"] < 100  # far from the 200 it asked for


PROMPTS8 = [f"Speak, {who}!" for who in ("Romeo", "Juliet", "Hamlet", "Lear", "Puck", "Portia", "Iago", "Viola")]


def test_concurrent_clients_fifo_and_identical(serial):
    server, prompts = serial, PROMPTS8
    c = oai(server, timeout=120)

    def ask(p):
        r = c.chat.completions.create(model="any", messages=chat_msgs(p), temperature=0, max_tokens=4, seed=0)
        return r.id, r.choices[0].message.content
    alone = [ask(p)[1] for p in prompts]
    results, finished, lock = [None] * 8, [], threading.Lock()

    def client(i):
        rid, text = ask(prompts[i])
        with lock:
            finished.append(int(rid.split("-")[1]))  # ids count requests in the order they arrived
        results[i] = text
    with httpx.Client(timeout=TIMEOUT) as h:
        # a long request holds the model, so that all 8 clients are waiting at once
        with h.stream("POST", server.url + "/v1/completions", json={**BLOCK, "stream": True}) as r:
            lines = r.iter_lines()  # kept: closing the iterator would close the stream
            next(l for l in lines if l.startswith("data: "))
            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while get(server.url + "/props").json()["n_waiting"] < 8:
                assert time.monotonic() < deadline, "the 8 requests did not queue up"
                time.sleep(0.02)
        # closing the long request's stream cancels it; the 8 are then served in turn
    for t in threads:
        t.join(120)
    assert results == alone
    assert len(finished) == 8 and finished == sorted(finished)


def test_parallel_clients_share_batches_and_get_their_own_replies(server):
    """8 clients at once on 4 slots: every reply is the one its request gets alone, requests
    really ran together, and each one's expert counts are its own tokens."""
    c = oai(server, timeout=120)
    req = dict(temperature=0, max_tokens=12, seed=0, extra_body={"cache_prompt": False})
    alone = [c.chat.completions.create(model="any", messages=chat_msgs(p), **req).choices[0].message.content
             for p in PROMPTS8]
    results, ids, running = [None] * 8, [None] * 8, []

    def client(i):
        r = c.chat.completions.create(model="any", messages=chat_msgs(PROMPTS8[i]), **req)
        results[i], ids[i] = r.choices[0].message.content, (r.id, r.usage)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        running.append(get(server.url + "/props").json()["n_running"])
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert results == alone
    assert max(running) > 1 and max(running) <= 4, running
    for rid, usage in ids:
        ex = get(server.url + "/v1/experts", params={"id": rid}).json()
        k, req_c = ex["n_expert_used"], ex["request"]
        assert req_c["id"] == rid and not req_c["active"]
        # its whole prompt and each generated token but the last went through every MoE layer
        assert req_c["n_tokens"] == usage.prompt_tokens + usage.completion_tokens - 1
        assert all(sum(req_c["counts"][il]) == req_c["n_tokens"] * k for il in ex["moe_layers"])
    assert get(server.url + "/v1/experts", params={"id": "nope"}).status_code == 404


def test_deepseek2_model_serves_parallel_clients(tmp_path):
    """The fine-grained shipped model (deepseek2: MLA, a leading dense layer, 32 experts, top-6 +
    2 shared): 4 clients at once get the replies each gets alone, and the expert counts cover the
    MoE layers only."""
    s = Server(str(SHIPPED_DS), "--parallel", "4", log=tmp_path / "server.log").wait_ready()
    try:
        c = oai(s, timeout=120)
        assert [m.id for m in c.models.list()] == ["shakespeare-ds-Q8_0"]
        req = dict(temperature=0, max_tokens=12, seed=0, extra_body={"cache_prompt": False})
        alone = [c.chat.completions.create(model="any", messages=chat_msgs(p), **req).choices[0].message.content
                 for p in PROMPTS8[:4]]
        results = [None] * 4

        def client(i):
            results[i] = c.chat.completions.create(model="any", messages=chat_msgs(PROMPTS8[i]), **req
                                                   ).choices[0].message.content
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone and all(alone)
        ex = get(s.url + "/v1/experts").json()
        assert (ex["n_expert"], ex["n_expert_used"]) == (32, 6)
        assert ex["moe_layers"] == list(range(1, ex["n_layer"]))  # layer 0 is dense
        total = ex["total"]
        assert sum(map(sum, total["counts"])) == total["n_tokens"] * 6 * len(ex["moe_layers"]) > 0
    finally:
        assert s.stop() == 0, s.log()


def test_queue_full_503(guarded):
    h = {"Authorization": f"Bearer {KEY}"}
    slow = LONG
    with httpx.Client(timeout=TIMEOUT, headers=h) as cl:
        with cl.stream("POST", guarded.url + "/v1/completions", json={**slow, "stream": True}) as r1:
            lines = r1.iter_lines()  # kept: closing the iterator would close the stream
            next(l for l in lines if l.startswith("data: "))  # running now
            waiting = threading.Thread(target=lambda: post(guarded.url + "/v1/completions",
                                                           json={**slow, "max_tokens": 2}, headers=h))
            waiting.start()
            deadline = time.monotonic() + 30
            while get(guarded.url + "/props", headers=h).json()["n_waiting"] < 1:  # it queues behind the first
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r3 = post(guarded.url + "/v1/completions", json={**slow, "max_tokens": 2}, headers=h)
            assert r3.status_code == 503 and r3.headers["retry-after"].isdigit()
            assert r3.json()["error"]["code"] == "queue_full"
    waiting.join(60)


def test_prompt_cache_second_turn_evaluates_only_new_tokens(server):
    c = oai(server)
    m1 = chat_msgs("What say you of love?")
    r1 = c.chat.completions.create(model="any", messages=m1, temperature=0, max_tokens=8)
    m2 = m1 + [{"role": "assistant", "content": r1.choices[0].message.content}] + chat_msgs("And of death?")
    raw = post(server.url + "/v1/chat/completions",
                     json={"messages": m2, "temperature": 0, "max_tokens": 4}).json()
    u, t = raw["usage"], raw["timings"]
    cached = u["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1.usage.prompt_tokens  # the whole first turn came from the cache
    assert t["prompt_n"] == u["prompt_tokens"] - cached  # and only the rest was evaluated
    # with the cache off, the same request evaluates everything
    raw = post(server.url + "/v1/chat/completions",
                     json={"messages": m2, "temperature": 0, "max_tokens": 4, "cache_prompt": False}).json()
    assert raw["timings"]["prompt_n"] == raw["usage"]["prompt_tokens"]


def test_expert_counts(server):
    r = post(server.url + "/v1/chat/completions",
                   json={"messages": chat_msgs("Good morrow!"), "temperature": 0, "max_tokens": 5,
                         "cache_prompt": False}).json()
    ex = get(server.url + "/v1/experts").json()
    req = ex["request"]
    assert req["id"] == r["id"] and not req["active"]
    # every token evaluated: the whole prompt and each generated token but the last
    assert req["n_tokens"] == r["timings"]["prompt_n"] + r["usage"]["completion_tokens"] - 1
    k = ex["n_expert_used"]
    assert ex["moe_layers"] == list(range(ex["n_layer"]))
    for il in range(ex["n_layer"]):
        assert sum(req["counts"][il]) == req["n_tokens"] * k
        assert len(req["counts"][il]) == ex["n_expert"]
    assert sum(map(sum, ex["total"]["counts"])) == ex["total"]["n_tokens"] * k * len(ex["moe_layers"])


# --- shutdown ---------------------------------------------------------------------

def test_sigterm_during_stream_exits_0(tmp_path):
    s = Server("--ctx", "1024", log=tmp_path / "server.log").wait_ready()
    # /health said 503 while the model loaded (the socket listens before the load starts)
    assert s.health_seen[0][0] == 503 and s.health_seen[0][1]["status"] == "loading", s.health_seen
    assert s.health_seen[-1] == (200, {"status": "ok"})
    lines = []
    with httpx.stream("POST", s.url + "/v1/completions", json={**BLOCK, "stream": True}, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            lines.append(line)
            if sum(l.startswith("data: ") for l in lines) == 3:
                s.proc.send_signal(signal.SIGTERM)
    data = [l for l in lines if l]
    assert data[-1] == "data: [DONE]" and '"finish_reason": "stop"' in data[-2]  # the stream ended properly
    assert s.proc.wait(30) == 0, s.log()
    assert port_free(s.port)
    s.stop()


def _serve_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from localmoe.cli import main; sys.argv[0] = 'localmoe'; main()",
           "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_errors_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = _serve_cli("--port", str(busy.getsockname()[1]))
    assert r.returncode == 1 and "error: cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    # an address of no interface here (TEST-NET-1): the warning about a non-loopback address
    # without a key, then a clean error; nothing is bound
    r = _serve_cli("--host", "192.0.2.1", "--port", "8080")
    assert "warning: listening on 192.0.2.1 without --api-key" in r.stderr
    assert r.returncode == 1 and "error: cannot listen on 192.0.2.1:8080" in r.stderr
    r = _serve_cli("--max-body", "lots")
    assert r.returncode == 1 and "error: cannot read memory size 'lots'" in r.stderr


def test_ram_budget_holds_every_slot_kv_cache(tmp_path):
    """--parallel N with --ram-budget plans N KV caches: a budget that fits one slot's cache
    but not four is refused with the planner's minimum, which states the sequences."""
    from localmoe.gguf_file import open_gguf
    from localmoe.arch import arch_module
    from localmoe.planner.plan import footprint
    with open_gguf(SHIPPED) as g:
        args = arch_module(g.arch).ModelArgs.from_gguf(g)
        one, four = footprint(g, args, 1024).minimum_bytes, footprint(g, args, 1024, 4).minimum_bytes
    assert four > one
    budget = str((one + four) // 2)
    s = Server("--ctx", "1024", "--ram-budget", budget, log=tmp_path / "server.log")
    assert s.proc.wait(120) != 0
    assert "4 sequences" in s.log() and "below this model's minimum" in s.log(), s.log()
    s = Server("--ctx", "1024", "--ram-budget", budget, "--parallel", "1", log=tmp_path / "server1.log").wait_ready()
    assert s.stop() == 0, s.log()

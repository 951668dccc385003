"""The chat page at `/` in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), against a real `localmoe serve` of the shipped model. Nothing is stubbed: the replies, the
timings and the expert counts come from the model."""
import contextlib
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver  # a test dependency: missing is a failure, not a skip
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_util import Server

CHROMIUM = "/usr/bin/chromium"          # apt: chromium
CHROMEDRIVER = "/usr/bin/chromedriver"  # apt: chromium-driver (the same version)
MODEL = Path(__file__).resolve().parents[1] / "models" / "shipped" / "shakespeare-moe-Q8_0.gguf"
XSS = "<img src=x onerror=alert(1)>"
REPLY_TIMEOUT = 120  # s: a busy 2-core machine decodes this model at ~15 tokens/s

# Records alert() calls instead of blocking on them; installed before any page script runs.
ALERT_HOOK = "window.__alerts = []; window.alert = (m) => { window.__alerts.push(String(m)); };"


def get_json(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REPLY_TIMEOUT) as r:
        return json.load(r)


def slow_link(driver, bytes_per_s: int = -1):
    """The shipped model writes a 10-40 token reply in about 0.1-0.4 s. Through a slow link (an SSE
    chunk is about 230 bytes) the page receives it over seconds, so partial text and Stop land
    mid-reply on any machine. The server and the model are untouched. -1: full speed."""
    driver.set_network_conditions(offline=False, latency=0, download_throughput=bytes_per_s,
                                  upload_throughput=-1)


def complete(server, messages, max_tokens):
    """A whole reply at temperature 0 from the server, without the page: (text, tokens)."""
    r = get_json(server + "/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                   "max_tokens": max_tokens})
    return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]


def stored_messages(driver):
    return driver.execute_script(
        "const id = JSON.parse(localStorage.getItem('localmoe.current'));"
        "return JSON.parse(localStorage.getItem('localmoe.chats')).find(c => c.id === id).messages;")


@contextlib.contextmanager
def serving(log_dir: Path, *options, model: Path = MODEL):
    """A real `localmoe serve` on a free local port (tests/serve_util.Server); yields its URL."""
    srv = Server(str(model), "--threads", "2", *options, log=log_dir / "serve.log")
    try:
        yield srv.wait_ready().url
    finally:
        srv.stop(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: the browser test needs `apt-get install chromium chromium-driver` "
                        f"(package {package})")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    # an explicit driver path: Selenium Manager is never asked to download anything
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ALERT_HOOK})
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, cond, timeout=30, what="condition"):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: cond(d), message=what)


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-prop="architecture"]'), what="model info")


def set_field(driver, field_id, value):
    el = driver.find_element(By.ID, field_id)
    el.clear()
    el.send_keys(str(value))


def send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: d.find_element(By.ID, "stop").is_enabled(), what="the reply to start")


def wait_idle(driver):
    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled(), REPLY_TIMEOUT, "the reply to end")


def last_reply(driver):
    return driver.find_elements(By.CSS_SELECTOR, '#messages .msg[data-role="assistant"]')[-1]


def heatmap(driver):
    """{(layer, expert): count} as the page shows it."""
    cells = driver.execute_script(
        "return [...document.querySelectorAll('#heatmap .cell')]"
        ".map(c => [+c.dataset.layer, +c.dataset.expert, +c.dataset.count]);")
    return {(l, e): n for l, e, n in cells}


# While a reply streams: on every DOM change, the length of its text and the tokens in the heatmap.
RECORD_STREAMING = """
window.__seen = [];
new MutationObserver(() => {
  const m = [...document.querySelectorAll('#messages .msg[data-role="assistant"]')].pop();
  if (!m || !m.classList.contains('streaming')) return;
  const heat = [...document.querySelectorAll('#heatmap .cell')].reduce((a, c) => a + +c.dataset.count, 0);
  window.__seen.push([m.querySelector('.content').textContent.length, heat]);
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def test_chat_streams_stops_persists_and_counts_experts(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    props = get_json(server + "/props")
    info = {el.get_attribute("data-prop"): el.text for el in d.find_elements(By.CSS_SELECTOR, "#model-props dd")}
    assert info["architecture"] == props["arch"] == "qwen3moe"
    assert info["quant type"] == props["quant"] == "Q8_0"
    assert info["experts per layer"] == "8" and info["active experts"] == "2"
    assert info["parameters"] == "24.3M"
    assert "RAM budget" in info

    # 1. a reply streams in: the page shows partial text, and expert counts, before the whole
    set_field(d, "temperature", 0)
    set_field(d, "max_tokens", 40)
    d.execute_script(RECORD_STREAMING)
    slow_link(d, 2000)
    send(d, "Who art thou, and whence com'st thou?")
    wait_idle(d)
    slow_link(d)
    reply = last_reply(d)
    text = reply.find_element(By.CSS_SELECTOR, ".content").text
    meta = reply.find_element(By.CSS_SELECTOR, ".meta").text
    assert text.strip(), f"no reply; under it: {meta!r}"
    seen = d.execute_script("return window.__seen;")
    assert any(0 < n < len(text) for n, _ in seen), f"no partial reply shown while streaming: {seen}"
    # (the heatmap while a reply streams: test_heatmap_updates_while_streaming)
    m = re.search(r"prompt (\d+) tok, [\d.]+ tok/s · decode (\d+) tok, [\d.]+ tok/s", meta)
    assert m, f"no tokens/s under the reply: {meta!r}"
    assert 1 <= int(m.group(2)) <= 40

    # 2. the heatmap: this chat's counts are the server's counts for that one request, non-zero
    ex = get_json(server + "/v1/experts")
    assert not ex["request"]["active"]
    shown = heatmap(d)
    assert len(shown) == ex["n_layer"] * ex["n_expert"] == 6 * 8
    assert shown == {(l, e): n for l, row in enumerate(ex["request"]["counts"]) for e, n in enumerate(row)}
    assert sum(n > 0 for n in shown.values()) >= 8, shown
    for layer in ex["moe_layers"]:  # every evaluated token went to k experts in each MoE layer
        assert sum(shown[layer, e] for e in range(8)) == 2 * ex["request"]["n_tokens"]

    # 3. Stop mid-reply, once the reply's first text shows. The whole reply, asked of the server first,
    # is long enough that the rest takes seconds through the slow link.
    ask = [{"role": m["role"], "content": m["content"]} for m in stored_messages(d)]
    ask.append({"role": "user", "content": "What news from Rome?"})
    full, n_full = complete(server, ask, 40)
    assert n_full >= 16, f"the Stop check needs a longer reply than {full!r}: change the question"
    slow_link(d, 2000)
    send(d, ask[-1]["content"])
    wait(d, lambda d: last_reply(d).find_element(By.CSS_SELECTOR, ".content").text, what="first text")
    stop = d.find_element(By.ID, "stop")
    assert stop.is_enabled(), "the reply ended before Stop could be clicked"
    stop.click()
    wait_idle(d)
    slow_link(d)
    assert "stopped" in last_reply(d).find_element(By.CSS_SELECTOR, ".meta").text
    stopped_text = last_reply(d).find_element(By.CSS_SELECTOR, ".content").text
    time.sleep(1)
    assert last_reply(d).find_element(By.CSS_SELECTOR, ".content").text == stopped_text, "text grew after Stop"
    assert not get_json(server + "/v1/experts")["request"]["active"], "the server still generates after Stop"
    stored = stored_messages(d)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"] and stored[3]["stopped"]
    kept = stored[3]["content"]
    assert kept and full.startswith(kept) and len(kept) < len(full), (kept, full)  # a strict prefix
    totals = heatmap(d)
    assert sum(totals.values()) > sum(shown.values()), "the stopped reply's experts were added to the chat"

    # 4. reload: the chat is listed, opens with its messages and its expert totals
    d.refresh()
    open_page(d, server)
    items = d.find_elements(By.CSS_SELECTOR, "#chat-list li")
    assert len(items) == 1 and items[0].text.startswith("Who art thou")
    assert "active" in items[0].get_attribute("class")
    roles = [el.get_attribute("data-role") for el in d.find_elements(By.CSS_SELECTOR, "#messages .msg")]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert last_reply(d).find_element(By.CSS_SELECTOR, ".content").text == stopped_text
    assert heatmap(d) == totals
    d.save_screenshot(str(tmp_path / "chat.png"))

    # 5. a new chat starts with an empty heatmap and counts its own tokens
    d.find_element(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    assert not any(heatmap(d).values())
    set_field(d, "max_tokens", 8)
    send(d, "Good night.")
    wait_idle(d)
    assert len(d.find_elements(By.CSS_SELECTOR, "#chat-list li")) == 2
    assert any(heatmap(d).values())
    d.save_screenshot(str(tmp_path / "new-chat.png"))
    assert d.execute_script("return window.__alerts;") == []


def test_markup_in_messages_shows_as_text_and_runs_nothing(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    # the hook sees an alert when the payload does reach the DOM as HTML (src=x fails to load)
    d.execute_script(f"document.body.insertAdjacentHTML('beforeend', {json.dumps(XSS)});")
    wait(d, lambda d: d.execute_script("return window.__alerts.length;") == 1, 10, "the control alert")
    d.execute_script("localStorage.setItem('localmoe.chats', '{\"not\": \"a list\"}');")
    d.refresh()
    open_page(d, server)  # stored junk is dropped, the page still starts
    assert not d.find_elements(By.CSS_SELECTOR, "#chat-list li")

    # the user's own message, sent to the real server
    set_field(d, "max_tokens", 4)
    send(d, XSS)
    wait_idle(d)
    user = d.find_element(By.CSS_SELECTOR, '#messages .msg[data-role="user"] .content')
    assert user.text == XSS

    # a reply with that text, stored as the page stores replies, then rendered on reload
    reply = f"Here is markup: {XSS} and **bold** and `{XSS}`\n```\n{XSS}\n```"
    d.execute_script("""
        const chats = JSON.parse(localStorage.getItem('localmoe.chats'));
        chats[0].messages.push({role: 'assistant', content: arguments[0], reasoning: arguments[1]});
        localStorage.setItem('localmoe.chats', JSON.stringify(chats));""", reply, XSS)
    d.refresh()
    open_page(d, server)
    shown = last_reply(d)
    text = shown.find_element(By.CSS_SELECTOR, ".content").text
    assert text.count(XSS) == 3 and "**" not in text  # markdown applied, the markup kept as text
    assert shown.find_element(By.CSS_SELECTOR, ".content strong").text == "bold"
    assert shown.find_element(By.CSS_SELECTOR, ".reasoning-text").get_attribute("textContent") == XSS
    assert not d.find_elements(By.TAG_NAME, "img")
    time.sleep(1)  # an <img src=x> would have failed to load by now
    assert d.execute_script("return window.__alerts;") == []
    # the page's renderer escapes what it is given
    html = d.execute_script("return window.localmoe.renderMarkdown(arguments[0]);", XSS)
    assert "<img" not in html and "&lt;img" in html
    d.save_screenshot(str(tmp_path / "xss.png"))


def test_api_key_entered_in_settings(browser, tmp_path):
    d = browser
    with serving(tmp_path, "--api-key", "sesame") as url:
        d.get(url + "/")  # the page itself needs no key; the API does
        wait(d, lambda d: "API key" in d.find_element(By.ID, "model-status").text, what="the 401 shown")
        set_field(d, "api-key", "sesame")  # the page's next try of /props sends it
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-prop="architecture"]'), what="model info")
        set_field(d, "max_tokens", 2)
        send(d, "Hail!")
        wait_idle(d)
        assert last_reply(d).find_element(By.CSS_SELECTOR, ".content").text
        assert any(heatmap(d).values())


def test_reasoning_shows_in_a_collapsible_block(browser, tmp_path):
    from test_server import THINKS, _with_template  # the shipped model, its template opening <think>
    d = browser
    model = tmp_path / "thinks.gguf"
    _with_template(model, THINKS)
    with serving(tmp_path, model=model) as url:
        open_page(d, url)
        set_field(d, "temperature", 0)
        set_field(d, "max_tokens", 12)
        send(d, "Who art thou?")
        wait_idle(d)
        want = get_json(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Who art thou?"}],
                                                        "temperature": 0, "max_tokens": 12})
        assert want["choices"][0]["message"]["reasoning_content"]
        assert stored_messages(d)[1]["reasoning"] == want["choices"][0]["message"]["reasoning_content"]
        block = last_reply(d).find_element(By.CSS_SELECTOR, "details.reasoning")
        text = block.find_element(By.CSS_SELECTOR, ".reasoning-text")
        assert block.is_displayed() and not text.is_displayed()  # collapsed
        block.find_element(By.TAG_NAME, "summary").click()
        assert text.is_displayed() and text.text.strip()
        d.save_screenshot(str(tmp_path / "reasoning.png"))


def test_heatmap_updates_while_streaming(browser, tmp_path):
    """The heatmap grows while a reply streams, not only at its end. The shipped model's replies are
    over in a fraction of a second (and a throttled link queues the counts' poll behind the reply's
    bytes), so this streams a long reply from a random-weight model, which rarely ends by itself."""
    from models.build import cached_model
    d = browser
    with serving(tmp_path, "--ctx", "1024", model=cached_model("qwen3moe", "tiny", "f16")) as url:
        open_page(d, url)
        set_field(d, "temperature", 0)
        set_field(d, "max_tokens", 600)
        d.execute_script(RECORD_STREAMING)
        send(d, "Tell me a long story.")
        wait_idle(d)
        seen = d.execute_script("return window.__seen;")
        n_moe = len(get_json(url + "/v1/experts")["moe_layers"])
        k = get_json(url + "/props")["n_expert_used"]
        final = sum(heatmap(d).values())
    live = [heat for _, heat in seen if 0 < heat]
    assert live, f"the heatmap did not change while the reply streamed: {seen[:20]}"
    assert min(live) < final, "the heatmap showed only the final counts while streaming"
    assert final % (n_moe * k) == 0 and final > 0  # every token routed to k experts in every MoE layer

"""The chat page at `/` in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), against a real `localmoe serve` of the shipped model. Nothing is stubbed: the replies, the
timings and the expert counts come from the model."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver  # a test dependency: missing is a failure, not a skip
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"          # apt: chromium
CHROMEDRIVER = "/usr/bin/chromedriver"  # apt: chromium-driver (the same version)
MODEL = Path(__file__).resolve().parents[1] / "models" / "shipped" / "shakespeare-moe-Q8_0.gguf"
XSS = "<img src=x onerror=alert(1)>"
START_TIMEOUT = 300  # s: a fresh checkout compiles the numba kernels before /health says ok
REPLY_TIMEOUT = 120  # s: a busy 2-core machine decodes this model at ~15 tokens/s

# Records alert() calls instead of blocking on them; installed before any page script runs.
ALERT_HOOK = "window.__alerts = []; window.alert = (m) => { window.__alerts.push(String(m)); };"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exe = shutil.which("localmoe")
    assert exe, "the localmoe command is not installed (pip install -e .)"
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
                                 "--threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"localmoe serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if get_json(url + "/health").get("status") == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"localmoe serve not healthy after {START_TIMEOUT} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# Lengths of the streaming reply's text, recorded on every DOM change.
RECORD_LENGTHS = """
window.__lengths = [];
new MutationObserver(() => {
  const m = [...document.querySelectorAll('#messages .msg[data-role="assistant"]')].pop();
  if (m && m.classList.contains('streaming')) window.__lengths.push(m.querySelector('.content').textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
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

    # 1. a reply streams in: the page shows partial text before the whole
    set_field(d, "temperature", 0)
    set_field(d, "max_tokens", 40)
    d.execute_script(RECORD_LENGTHS)
    send(d, "Who art thou, and whence com'st thou?")
    wait_idle(d)
    reply = last_reply(d)
    text = reply.find_element(By.CSS_SELECTOR, ".content").text
    assert text.strip(), "the model replied"
    lengths = d.execute_script("return window.__lengths;")
    partial = {n for n in lengths if 0 < n < len(text)}
    assert partial, f"no partial reply was shown while streaming (lengths seen: {lengths})"
    meta = reply.find_element(By.CSS_SELECTOR, ".meta").text
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

    # 3. Stop mid-reply: a long, random reply, stopped once its first text shows. A reply that ends
    # on its own before the click is retried (a fast machine may finish a short one first).
    set_field(d, "temperature", 1.5)
    set_field(d, "max_tokens", 150)
    for attempt in range(3):
        send(d, "Speak on, and tell me all thy tale.")
        wait(d, lambda d: last_reply(d).find_element(By.CSS_SELECTOR, ".content").text, what="first text")
        stop = d.find_element(By.ID, "stop")
        if stop.is_enabled():
            stop.click()
        wait_idle(d)
        if "stopped" in last_reply(d).find_element(By.CSS_SELECTOR, ".meta").text:
            break
    else:
        pytest.fail("every reply ended before Stop was clicked")
    stopped_text = last_reply(d).find_element(By.CSS_SELECTOR, ".content").text
    assert stopped_text
    time.sleep(1)
    assert last_reply(d).find_element(By.CSS_SELECTOR, ".content").text == stopped_text, "text grew after Stop"
    assert not get_json(server + "/v1/experts")["request"]["active"], "the server still generates after Stop"
    totals = heatmap(d)
    assert sum(totals.values()) > sum(shown.values()), "the stopped reply's experts were added to the chat"

    # 4. reload: the chat is listed, opens with its messages and its expert totals
    d.refresh()
    open_page(d, server)
    items = d.find_elements(By.CSS_SELECTOR, "#chat-list li")
    assert len(items) == 1 and items[0].text.startswith("Who art thou")
    assert "active" in items[0].get_attribute("class")
    roles = [el.get_attribute("data-role") for el in d.find_elements(By.CSS_SELECTOR, "#messages .msg")]
    assert roles[:2] == ["user", "assistant"] and len(roles) == 2 * (attempt + 2)
    assert last_reply(d).find_element(By.CSS_SELECTOR, ".content").text == stopped_text
    assert heatmap(d) == totals

    # 5. new chat: empty messages and heatmap; the next request is served at once after the stop
    d.find_element(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    assert not any(heatmap(d).values())
    set_field(d, "max_tokens", 8)
    send(d, "Good night.")
    wait_idle(d)
    assert len(d.find_elements(By.CSS_SELECTOR, "#chat-list li")) == 2
    assert any(heatmap(d).values())
    d.save_screenshot(str(tmp_path / "chat.png"))
    assert d.execute_script("return window.__alerts;") == []


def test_markup_in_messages_shows_as_text_and_runs_nothing(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    # the hook sees an alert when the payload does reach the DOM as HTML (src=x fails to load)
    d.execute_script(f"document.body.insertAdjacentHTML('beforeend', {json.dumps(XSS)});")
    wait(d, lambda d: d.execute_script("return window.__alerts.length;") == 1, 10, "the control alert")
    d.refresh()
    open_page(d, server)

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

"""Serving latency: `localmoe serve` beside llama-cpp-python's server, same GGUF, same threads,
through the same `openai` client.

    python -m benchmarks.serve [--model X.gguf] [--threads 2] [--tokens 32] [--turns 10]

Needs llama-cpp-python's [server] extra (`python -m llama_cpp.server`). Each server runs
alone (one at a time) on a free loopback port; an untimed request warms each up first.
Reported, per server:
- 1 client: time to first token (TTFT) and decode tokens/s of a streamed completion of
  --tokens tokens (seeded sampling that runs to the limit on the shipped model), median of
  --repeats runs;
- 4 clients at once (medians of --repeats rounds): mean and worst TTFT, the summed decode tokens/s, and the tokens the
  clients received (4 x --tokens when every reply completes);
- a --turns-turn chat (each turn adds the reply and a new user message): TTFT per turn,
  localmoe with its prompt cache on and off (`cache_prompt`), llama-cpp-python as it
  comes (its Llama object reuses the longest cached prefix of the previous prompt).
localmoe runs with its defaults (--parallel 4: concurrent requests share each forward pass).
llama-cpp-python's server runs twice: with `--interrupt_requests False` (every request is
served to its end, one at a time), and with its default `interrupt_requests=True`, under
which a new request ends the stream in flight (that client gets [DONE] early: see the
tokens received).
Decode tokens are counted as streamed chunks with text (one token each on both servers).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_util import SHIPPED, free_port  # noqa: E402

from benchmarks._common import print_table  # noqa: E402

PROMPT = "ROMEO:"
USER_TURNS = ["Who art thou?", "Whence comest thou?", "What news?", "Speak of love.", "And of war?",
              "Where is the king?", "Why weep'st thou?", "Is this a dagger?", "Shall we go?", "Farewell."]


@contextlib.contextmanager
def running(cmd: list[str], url: str, log: Path, timeout: float = 600):
    import httpx
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited with {p.returncode}; see {log}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[:4]} not ready after {timeout} s; see {log}")
                time.sleep(0.3)
            yield
        finally:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def stream_completion(client, seed: int, tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode seconds after the first token, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for ch in client.completions.create(model="m", prompt=PROMPT, max_tokens=tokens, temperature=1.0,
                                        seed=seed, stream=True):
        if ch.choices and ch.choices[0].text:
            last = time.perf_counter()
            first = first or last
            n += 1
    if first is None:  # no text at all (an interrupted stream)
        return float("nan"), float("nan"), 0
    return first - t0, last - first, n


def stream_chat(client, messages, tokens: int, extra: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    for ch in client.chat.completions.create(model="m", messages=messages, max_tokens=tokens, temperature=0,
                                             stream=True, extra_body=extra):
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(ch.choices[0].delta.content)
    return (first or time.perf_counter()) - t0, "".join(text)


def measure(url: str, args, chat_modes: dict[str, dict]) -> dict:
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    stream_completion(client, 0, 4)  # warm-up, untimed
    one_client = [stream_completion(client, 1 + i, args.tokens) for i in range(args.repeats)]
    out = {"1 client TTFT ms": statistics.median(r[0] for r in one_client) * 1e3,
           "1 client decode tok/s": statistics.median((r[2] - 1) / r[1] for r in one_client)}
    rows = []
    for rep in range(args.repeats):
        res = [None] * 4

        def one(i):
            res[i] = stream_completion(client, 10 + 4 * rep + i, args.tokens)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        got = [r[0] for r in res if r[2]]  # clients that received text
        rows.append((statistics.mean(got), max(got), sum(r[2] for r in res) / wall, sum(r[2] for r in res)))
    for j, key in enumerate(("4 clients TTFT mean ms", "4 clients TTFT max ms")):
        out[key] = statistics.median(r[j] for r in rows) * 1e3
    out["4 clients decode tok/s (sum)"] = statistics.median(r[2] for r in rows)
    out["4 clients tokens received"] = statistics.median(r[3] for r in rows)
    for mode, extra in chat_modes.items():
        msgs, turns = [], []
        for text in USER_TURNS[:args.turns]:
            msgs.append({"role": "user", "content": text})
            try:
                t, reply = stream_chat(client, msgs, args.chat_tokens, extra)
            except openai.APIError as e:  # e.g. the context is full: the rest of the turns are blank
                print(f"{mode}: turn {len(turns) + 1} failed: {e}", file=sys.stderr)
                break
            msgs.append({"role": "assistant", "content": reply})
            turns.append(t * 1e3)
        out[f"chat TTFT ms per turn ({mode})"] = turns
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512, help="context of both servers (room for the 10-turn chat)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per completion")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="runs of the 1- and 4-client rows (medians)")
    ap.add_argument("--chat-tokens", type=int, default=8, help="reply tokens per chat turn")
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args(argv)
    results = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from localmoe.cli import main; sys.argv[0] = 'localmoe'; main()",
           "serve", args.model, "--port", str(port), "--threads", str(args.threads), "--ctx", str(args.ctx)]
    with running(cmd, url, Path(args.log_dir) / "bench-serve-localmoe.log"):
        results["localmoe"] = measure(url, args, {"cache on": {"cache_prompt": True},
                                                  "cache off": {"cache_prompt": False}})
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        print(f"llama-cpp-python's server is not importable ({e}): pip install 'llama-cpp-python[server]'",
              file=sys.stderr)
    else:
        for name, interrupt in (("llama-cpp-python", "False"), ("llama-cpp-python, interrupting", "True")):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host", "127.0.0.1",
                   "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                   "--n_ctx", str(args.ctx), "--verbose", "False", "--interrupt_requests", interrupt]
            with running(cmd, url, Path(args.log_dir) / "bench-serve-llama-cpp.log"):
                results[name] = measure(url, args, {"its default": {}})
    keys = [k for k in results["localmoe"] if not k.startswith("chat")]
    print_table(["metric", *results], [[k, *(results[s][k] for s in results)] for k in keys],
                title=f"{Path(args.model).name}, {args.threads} threads, {args.tokens} decode tokens, "
                      f"os.cpu_count()={os.cpu_count()}")
    print()
    rows = []
    for side, res in results.items():
        for k, v in res.items():
            if k.startswith("chat"):
                rows.append([f"{side} {k[len('chat TTFT ms per turn '):]}", *v, *[""] * (args.turns - len(v))])
    print_table(["chat TTFT ms", *(f"turn {i + 1}" for i in range(args.turns))], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

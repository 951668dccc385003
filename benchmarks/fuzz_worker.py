"""A fuzz worker: reads one JSON case per line on stdin, runs it, answers one JSON
line on the protocol pipe (fd given by --fd; its stdout goes to stderr so that
nothing a target prints can break the protocol).

Outcome: "ok", "expected" (a LocalMoEError subclass) or "error" (any other
exception: a bug). A signal, an abort or a hang ends the process; the parent
(benchmarks/fuzz.py) sees that and starts a new worker.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Context:
    """Per-worker state that costs seconds to build: scratch dir, shipped tokenizer, a chat model."""

    def __init__(self, scratch_dir: str):
        self.dir = scratch_dir       # made (and removed, even after a crash) by the parent
        self._cache = {}

    def scratch(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def shipped_model(self):
        from benchmarks.fuzz_targets import base_path
        from localmoe.model import load
        return self.cached("model", lambda: load(base_path("shipped"), n_threads=1, n_ctx=256))

    def shipped_tokenizer(self):
        return self.shipped_model().tokenizer

    def chat_session(self):
        from localmoe.chat import ChatSession
        return ChatSession(self.shipped_model(), max_tokens=4, temperature=0)


def frame_of(tb) -> str:
    """'path:line func' of the innermost frame in localmoe (or, failing that, anywhere)."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/localmoe/" in f.filename or "/quant/" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    name = f.filename
    if name.startswith(str(ROOT) + os.sep):
        name = name[len(str(ROOT)) + 1:]
    return f"{name}:{f.lineno} {f.name}"


def run_case(case: dict, ctx: Context) -> dict:
    from benchmarks.fuzz_targets import TARGETS
    from localmoe.errors import LocalMoEError
    t0 = time.perf_counter()
    try:
        TARGETS[case["target"]].run(case, ctx)
        res = {"outcome": "ok"}
    except LocalMoEError as e:
        res = {"outcome": "expected", "type": type(e).__name__, "message": str(e)[:300]}
    except (Exception, RecursionError) as e:  # noqa: B014 - a bug in localmoe (or a target)
        res = {"outcome": "error", "type": type(e).__name__, "message": str(e)[:300],
               "frame": frame_of(e.__traceback__),
               "traceback": "".join(traceback.format_exception(e))[-3000:]}
    finally:
        for name in os.listdir(ctx.dir):
            os.unlink(os.path.join(ctx.dir, name))
    gc.collect()   # frees what the case allocated now, so that a corrupted heap shows on this case
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def main() -> None:
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    out = os.fdopen(fd, "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to the log
    import benchmarks.fuzz_targets  # noqa: F401 - import cost before "ready"
    import localmoe.model  # noqa: F401
    ctx = Context(sys.argv[sys.argv.index("--dir") + 1])
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        out.write(json.dumps(run_case(json.loads(line), ctx)) + "\n")


if __name__ == "__main__":
    main()

"""Fuzz campaign: hostile inputs to every parser localmoe has, each run in a worker process.

    python -m benchmarks.fuzz --minutes 30
    python -m benchmarks.fuzz --minutes 3 --targets metadata,templates --seed 1 --jobs 1
    python -m benchmarks.fuzz --replay tests/fuzz_corpus/*.json

Targets (benchmarks/fuzz_targets.py): gguf (the reader on mutated header bytes),
metadata (wrong numbers behind a valid header: inspect, load, a batch and a one-token
forward), templates (generated jinja: loops, big ranges, string products, recursion,
attribute probes; rendered and tokenized), chat_load (/load files), profile
(--expert-profile files), server (request bodies; skipped while localmoe.server is absent).
Cases come from hypothesis strategies; the minutes are split evenly between targets.

Each case runs in a worker subprocess (benchmarks/fuzz_worker.py); a worker that dies
is replaced. Outcomes: ok, expected (a LocalMoEError subclass), or a crash: another
Python exception ("error", deduplicated by type and innermost localmoe frame), a signal
or abort, a non-zero exit, or a hang past the target's timeout. Workers run with glibc's
malloc checks (libc_malloc_debug, MALLOC_CHECK_=3) where present, so that heap
corruption aborts on the case that caused it, and under an address-space limit
(--mem-limit-mb), so that a huge allocation fails instead of taking the machine.
A process crash is replayed once in a fresh worker ("confirmed" when it recurs).
Every crashing case is saved as JSON under --crash-dir (a few hundred bytes: the
worker rebuilds files from the base model), ready for tests/fuzz_corpus/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MALLOC_DEBUG = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
START_TIMEOUT = 600.0   # imports, then the warm-up cases (kernels from numba's cache, or compiled)
REPLAY_EXTRA = 30.0     # --replay without --timeout: the target's timeout plus this for loading
FATAL = re.compile(r"Fatal Python error|panicked at")   # a worker that printed this is finished
FATAL_GRACE = 5.0


class Stop(BaseException):
    """Time is up: ends a hypothesis run from inside without counting as a failure."""


@dataclass
class Result:
    outcome: str            # ok / expected / error / signal / exit / hang
    kind: str = ""          # crash class
    detail: str = ""
    seconds: float = 0.0
    raw: dict = field(default_factory=dict)

    @property
    def crash(self) -> bool:
        return self.outcome not in ("ok", "expected")


class Worker:
    """One worker subprocess; run() restarts it after a crash."""

    def __init__(self, mem_limit_mb: int, malloc_check: bool, recycle: int = 0, warmup=()):
        """warmup: benign cases run (untimed) by every new process before the first real one, so
        that loading kernels and models is not counted against a case's timeout."""
        self.mem_limit_mb, self.malloc_check, self.recycle = mem_limit_mb, malloc_check, recycle
        self.warmup = list(warmup)
        self.proc = None
        self.n_cases = 0

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="localmoe-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                    else None)
        self.log = tempfile.TemporaryFile()
        r, w = os.pipe()
        env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        if self.malloc_check and os.path.exists(MALLOC_DEBUG):
            env.update(LD_PRELOAD=MALLOC_DEBUG, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
        limit = self.mem_limit_mb << 20

        def setup():
            os.setsid()
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fuzz_worker", "--fd", str(w), "--dir", self.dir],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=self.log, stderr=self.log,
            pass_fds=(w,), preexec_fn=setup)
        os.close(w)
        self.rfd, self.buf = r, b""
        ready = self._line(START_TIMEOUT)
        if ready is None or "ready" not in ready:
            tail = self._log_tail()
            self.stop()
            raise RuntimeError(f"fuzz worker did not start: {tail}")
        for case in self.warmup:
            res = self._send(case, START_TIMEOUT)
            if res.crash:
                raise RuntimeError(f"fuzz worker's warm-up case {case} crashed: {res.kind} {res.detail}")

    def _line(self, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                return None
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _wait(self, timeout: float, log_start: int) -> tuple[dict | None, bool]:
        """(the worker's answer or None, whether it printed a fatal error and then stayed alive)."""
        end, fatal_at = time.monotonic() + timeout, None
        while True:
            left = end - time.monotonic()
            res = self._line(min(1.0, max(left, 0.0)))
            if res is not None or self.proc.poll() is not None:
                return res, False
            if fatal_at is None:
                self.log.seek(log_start)
                if FATAL.search(self.log.read().decode("utf-8", "replace")):
                    fatal_at = time.monotonic()
            elif time.monotonic() - fatal_at > FATAL_GRACE:
                return None, True
            if left <= 0:
                return None, False

    def _log_tail(self, n: int = 4000) -> str:
        self.log.seek(0, os.SEEK_END)
        size = self.log.tell()
        self.log.seek(max(0, size - n))
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        os.close(self.rfd)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.proc = None

    def run(self, case: dict, timeout: float) -> Result:
        if self.recycle and self.n_cases >= self.recycle:
            self.stop()   # bound what one process accumulates (caches, fragmentation, unseen damage)
        if self.proc is None:
            self._start()
            self.n_cases = 0
        self.n_cases += 1
        return self._send(case, timeout)

    def _send(self, case: dict, timeout: float) -> Result:
        self.log.seek(0, os.SEEK_END)
        log_start = self.log.tell()
        try:
            self.proc.stdin.write((json.dumps(case) + "\n").encode("utf-8", "surrogatepass"))
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        t0 = time.monotonic()
        res, died_hung = self._wait(timeout, log_start)
        if res is not None:
            outcome = res["outcome"]
            kind = f"{res['type']} at {res['frame']}" if outcome == "error" else res.get("type", "")
            return Result(outcome, kind, res.get("message", ""), res["seconds"], res)
        hung = self.proc.poll() is None
        if hung:
            os.killpg(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait()
        self.log.seek(log_start)
        stderr = self.log.read().decode("utf-8", "replace")
        self.stop()
        seconds = round(time.monotonic() - t0, 3)
        if died_hung:   # aborted, then never exited (seen with glibc's abort under numba's threads)
            return Result("signal", f"SIGABRT: {_first_message(stderr)}",
                          "(it then hung until killed) " + _stack(stderr), seconds)
        if hung:
            return Result("hang", f"hang > {timeout:.0f} s", stderr[-1500:], seconds)
        if rc < 0:
            name = signal.Signals(-rc).name
            return Result("signal", f"{name}: {_first_message(stderr)}", _stack(stderr), seconds)
        return Result("exit", f"exit {rc}: {_first_message(stderr)}", _stack(stderr), seconds)


def _stack(stderr: str) -> str:
    """The glibc / panic message and the innermost Python frames faulthandler printed."""
    frames = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith('File "')]
    return f"{_first_message(stderr)}; most recent call first: " + " < ".join(frames[:4])


def _first_message(stderr: str) -> str:
    """The line that says what went wrong (glibc's, a panic, a fatal error), numbers masked."""
    for line in stderr.splitlines():
        if re.search(r"malloc|free\(\)|corrupt|invalid|panicked|Fatal Python|Segmentation|double|abort|"
                     r"MemoryError|memory allocation", line):
            line = line.split("Fatal Python error")[0] or line   # glibc writes no newline before it
            return re.sub(r"0x[0-9a-f]+|\d+", "N", line.strip())[:120]
    return "(no message)"


class Campaign:
    def __init__(self, args):
        self.args = args
        self.crash_dir = Path(args.crash_dir)
        self.stats = {}      # target -> counters
        self.classes = {}    # (target, kind) -> {"count", "files", "confirmed", "detail"}
        self.lock = threading.Lock()
        self.failures = []   # harness problems, printed under the table

    def record(self, target: str, case: dict, res: Result, worker_factory, timeout: float) -> None:
        with self.lock:
            s = self.stats[target]
            s["inputs"] += 1
            s[res.outcome if res.outcome in ("ok", "expected") else "crashes"] += 1
            if not res.crash:
                return
            key = (target, res.kind)
            c = self.classes.get(key)
            new = c is None
            if new:
                c = self.classes[key] = {"count": 0, "files": [], "confirmed": None, "detail": res.detail}
            c["count"] += 1
            if len(c["files"]) < self.args.keep:
                self.crash_dir.mkdir(parents=True, exist_ok=True)
                slug = re.sub(r"[^A-Za-z0-9]+", "-", res.kind)[:60].strip("-")
                tag = hashlib.sha1(res.kind.encode()).hexdigest()[:6]   # slugs of two classes may agree
                path = self.crash_dir / f"{target}-{slug}-{tag}-{c['count']}.json"
                path.write_text(json.dumps({**case, "_result": {"outcome": res.outcome, "kind": res.kind,
                                                                "detail": res.detail[-1500:]}}, indent=1))
                c["files"].append(str(path))
        if new and res.outcome in ("signal", "exit", "hang"):
            # a process crash may come from an earlier case's damage: replay this one alone
            w = worker_factory()
            try:
                again = w.run(case, timeout)
            finally:
                w.stop()
            with self.lock:
                c["confirmed"] = again.kind == res.kind

    def run_target(self, target, seconds: float, bases) -> None:
        from hypothesis import HealthCheck, Phase, given, seed, settings
        self.stats[target.name] = {"inputs": 0, "ok": 0, "expected": 0, "crashes": 0, "seconds": 0.0}
        t_end = time.monotonic() + seconds
        t0 = time.monotonic()
        strategy = target.strategy(bases)
        timeout = self.args.timeout or target.timeout

        def make_worker():
            return Worker(self.args.mem_limit_mb, not self.args.no_malloc_check, self.args.recycle, target.warmup)

        def driver(slot: int):
            worker = make_worker()
            round_ = 0
            try:
                while time.monotonic() < t_end:
                    @seed(self.args.seed * 1000 + slot * 100 + round_)
                    @settings(max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
                              suppress_health_check=list(HealthCheck))
                    @given(strategy)
                    def one(case):
                        if time.monotonic() >= t_end:
                            raise Stop
                        res = worker.run(case, timeout)
                        self.record(target.name, case, res, make_worker, timeout)
                    try:
                        one()
                    except Stop:
                        break
                    round_ += 1   # hypothesis ran out of ideas for this seed
            except Exception as e:   # the harness itself (a worker that cannot start): say so, go on
                with self.lock:
                    self.failures.append(f"{target.name} generator {slot} stopped: {type(e).__name__}: {e}")
            finally:
                worker.stop()

        threads = [threading.Thread(target=driver, args=(i,)) for i in range(self.args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stats[target.name]["seconds"] = time.monotonic() - t0

    def report(self, skipped: dict) -> str:
        out = ["| target | inputs | ok | expected errors | crashing inputs | crash classes | seconds |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in self.stats.items():
            n_cls = sum(1 for (t, _) in self.classes if t == name)
            out.append(f"| {name} | {s['inputs']} | {s['ok']} | {s['expected']} | {s['crashes']} | {n_cls} | "
                       f"{s['seconds']:.0f} |")
        for name, why in skipped.items():
            out.append(f"| {name} | skipped: {why} | | | | | |")
        if self.classes:
            out += ["", "| target | crash class | inputs | confirmed alone | saved as |", "|---|---|---:|---|---|"]
            for (t, kind), c in sorted(self.classes.items()):
                conf = {None: "-", True: "yes", False: "no"}[c["confirmed"]]
                kind_md = kind.replace("|", "\\|")
                out.append(f"| {t} | {kind_md} | {c['count']} | {conf} | {c['files'][0] if c['files'] else ''} |")
        out += [f"\nharness failure: {f[:500]}" for f in self.failures]
        return "\n".join(out)


def replay(paths, args) -> int:
    """Run each saved case in a fresh worker; exit status 1 if any crashes."""
    from benchmarks.fuzz_targets import TARGETS
    bad = 0
    for p in paths:
        case = json.loads(Path(p).read_text())
        case.pop("_result", None)
        w = Worker(args.mem_limit_mb, not args.no_malloc_check)   # no warm-up: one case, a cold start
        try:
            res = w.run(case, args.timeout or TARGETS[case["target"]].timeout + REPLAY_EXTRA)
        finally:
            w.stop()
        bad += res.crash
        print(f"{p}: {res.outcome}{': ' + res.kind if res.kind else ''}"
              f"{' -- ' + res.detail[-300:] if res.crash else ''}")
    return 1 if bad else 0


def main(argv=None) -> int:
    from benchmarks.fuzz_targets import DEFAULT_BASES, TARGETS
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="total time, split evenly between targets")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    p.add_argument("--bases", default=",".join(DEFAULT_BASES),
                   help="models the gguf/metadata targets mutate (shipped, tiny:ARCH; tiny ones are built "
                        "on first use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each also runs a generator thread)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default: per target)")
    p.add_argument("--crash-dir", default=os.path.join(tempfile.gettempdir(), "localmoe-fuzz-crashes"))
    p.add_argument("--keep", type=int, default=3, help="crashing cases saved per crash class")
    p.add_argument("--mem-limit-mb", type=int, default=4096, help="address-space limit of a worker (0: none)")
    p.add_argument("--recycle", type=int, default=200, help="start a fresh worker after this many cases")
    p.add_argument("--no-malloc-check", action="store_true", help="run workers without glibc's malloc checks")
    p.add_argument("--replay", nargs="+", metavar="CASE.json", help="run saved cases, one fresh worker each")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay, args)
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    skipped = {t: why for t in names if (why := TARGETS[t].available())}
    run = [TARGETS[t] for t in names if t not in skipped]
    bases = [b for b in args.bases.split(",") if b]
    camp = Campaign(args)
    t0 = time.monotonic()
    try:
        for i, target in enumerate(run):
            left = args.minutes * 60 - (time.monotonic() - t0)
            print(f"fuzz: {target.name} for {left / (len(run) - i):.0f} s", file=sys.stderr, flush=True)
            camp.run_target(target, left / (len(run) - i), bases)
    except KeyboardInterrupt:
        print("fuzz: interrupted", file=sys.stderr)
    print(f"\nfuzz campaign: seed {args.seed}, jobs {args.jobs}, {time.monotonic() - t0:.0f} s, "
          f"crashing cases in {args.crash_dir}\n")
    print(camp.report(skipped))
    return 1 if camp.failures else 0


if __name__ == "__main__":
    sys.exit(main())

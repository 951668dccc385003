"""ModelLock: one user of a Model at a time.

A user is a thread making a plain call (forward, eval, reset...) or a generation: a
generator that holds the lock from its first step until it ends, is closed, or is
garbage-collected, and that may be resumed from different threads (a server's worker
pool). So the lock belongs to a holder token, not to a thread: any thread may release
it, and calls made while a generation's step runs re-enter it through `acting`.
"""
from __future__ import annotations

import contextlib
import threading


class ModelLock:
    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._holder = None
        self._depth = 0
        self._running = 0                 # held() blocks executing now (a suspended generation: 0)
        self._local = threading.local()   # .acting: the holder whose step runs on this thread

    def _me(self):
        return getattr(self._local, "acting", None) or threading.get_ident()

    def acquire(self, holder=None):
        """Wait until the model is free (or already ours); returns the holder token."""
        holder = holder if holder is not None else self._me()
        with self._cv:
            while self._holder is not None and self._holder != holder:
                self._cv.wait()
            self._holder = holder
            self._depth += 1
        return holder

    def release(self, holder) -> None:
        with self._cv:
            if self._holder != holder:
                raise RuntimeError("releasing a model lock held by another user")
            self._depth -= 1
            if self._depth == 0:
                self._holder = None
            self._cv.notify_all()

    @contextlib.contextmanager
    def held(self, holder=None):
        """Hold the lock for a block (re-entrant for the same holder)."""
        h = self.acquire(holder)
        with self._cv:
            self._running += 1
        try:
            yield h
        finally:
            with self._cv:
                self._running -= 1
            self.release(h)

    def wait_idle(self) -> None:
        """Wait until no call of another user is executing; a generation suspended between
        steps does not count (it may never resume: close() must not wait for it)."""
        with self._cv:
            me = self._me()
            while self._holder is not None and self._holder != me and self._running > 0:
                self._cv.wait()

    @contextlib.contextmanager
    def acting(self, holder):
        """Run a block as `holder` (which holds the lock): its calls re-enter instead of waiting."""
        prev = getattr(self._local, "acting", None)
        self._local.acting = holder
        try:
            yield
        finally:
            self._local.acting = prev


def hold_while_iterating(lock: ModelLock, gen):
    """Iterate gen holding `lock` from its first step to its end (or close / garbage
    collection: the finally releases it, from whatever thread runs it)."""
    holder = object()
    lock.acquire(holder)
    try:
        while True:
            with lock.acting(holder):
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        try:
            with lock.acting(holder):
                gen.close()
        finally:
            lock.release(holder)

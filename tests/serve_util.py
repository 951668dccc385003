"""Run `localmoe serve` in a subprocess for the server tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shipped" / "shakespeare-moe-Q8_0.gguf"     # the default model
SHIPPED_DS = ROOT / "models" / "shipped" / "shakespeare-ds-Q8_0.gguf"   # the fine-grained deepseek2 one
START_TIMEOUT_S = 300  # a fresh checkout compiles the numba kernels on the first load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a new server could listen on port (SO_REUSEADDR, as servers do: a connection
    in TIME_WAIT does not hold the port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


class Server:
    def __init__(self, *args: str, log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        cmd = [sys.executable, "-c", "import sys; from localmoe.cli import main; sys.argv[0] = 'localmoe'; main()",
               "serve", "--port", str(self.port), "--host", "127.0.0.1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, headers: dict | None = None) -> "Server":
        deadline = time.monotonic() + START_TIMEOUT_S
        self.health_seen = []  # /health bodies while starting
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health_seen.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

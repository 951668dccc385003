"""Helpers for the tests/test_hostile_*.py files: the CLI in a subprocess, checked for a clean exit."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shipped" / "shakespeare-moe-Q8_0.gguf"


def cli(*args, stdin: bytes | None = None, timeout: float = 300, env: dict | None = None):
    """Run `localmoe ARGS` (bytes arguments pass as they are) -> CompletedProcess with bytes output."""
    code = "from localmoe.cli import main; main(prog_name='localmoe')"
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def assert_clean_error(p, *needles: str) -> str:
    """Exit 1 with `error: ...` on stderr, no traceback; stderr contains every needle."""
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 1, (p.returncode, err[-2000:])
    assert "error:" in err and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in err, err[-2000:]
    return err


def assert_ok(p) -> str:
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, (p.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    return err

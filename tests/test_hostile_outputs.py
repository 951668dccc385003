"""Outputs (finding 6): --stats-out checked before the run; quantize-model's temp file, single
writer, SIGTERM and the errors it reports."""
import errno
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

import localmoe
from localmoe.errors import LocalMoEError
from models.build import cached_model

from hostile_common import ROOT, assert_clean_error, cli

qmod = importlib.import_module("localmoe.quantizer")


@pytest.fixture(scope="module")
def tiny():
    return cached_model("olmoe", "tiny", "f16")


@pytest.mark.parametrize("where", ["missing/dir/s.json", "/proc/s.json"])
def test_stats_out_is_checked_before_the_generation(tmp_path, where):
    path = where if where.startswith("/") else str(tmp_path / where)
    p = cli("run", "-n", "8", "--temp", "0", "-p", "ROMEO.", "--stats-out", path)
    assert_clean_error(p, "--stats-out")
    assert p.stdout == b"", "nothing may be generated before the path is known to work"


def test_chat_stats_out_is_checked_first(tmp_path):
    p = cli("chat", "--stats-out", str(tmp_path / "no" / "s.json"), stdin=b"hello\n")
    assert_clean_error(p, "--stats-out")
    assert p.stdout == b""


def test_user_file_named_like_the_old_partial_is_untouched(tiny, tmp_path):
    mine = tmp_path / "o.gguf.partial"
    mine.write_bytes(b"the user's own file")
    localmoe.quantize(tiny, tmp_path / "o.gguf", "Q8_0", progress=False)
    assert mine.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "o.gguf.partial"]


def test_second_writer_to_the_same_output_is_refused(tiny, tmp_path):
    clean = tmp_path / "clean.gguf"
    localmoe.quantize(tiny, clean, "Q8_0", progress=False)
    out = tmp_path / "o.gguf"
    real, seen = qmod._write_tensor, []

    def write_and_race(*args):
        if len(seen) == 3:  # the first writer is half-way: a second one starts
            try:
                localmoe.quantize(tiny, out, "Q4_0", force=True, progress=False)
                seen.append("second writer ran")
            except LocalMoEError as e:
                seen.append(str(e))
        seen.append(None)
        return real(*args)
    qmod._write_tensor = write_and_race
    try:
        localmoe.quantize(tiny, out, "Q8_0", progress=False)
    finally:
        qmod._write_tensor = real
    msg = next(s for s in seen if s)
    assert "another quantize-model is writing" in msg
    assert out.read_bytes() == clean.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.gguf", "o.gguf"]


def test_sigterm_cleans_up_like_ctrl_c(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    script = (
        "import sys, time, localmoe.quantizer as q\n"
        "real = q._write_tensor\n"
        "def slow(*a):\n"
        "    print('writing', flush=True); time.sleep(0.3); return real(*a)\n"
        "q._write_tensor = slow\n"
        "from localmoe.cli import main\n"
        f"main(['quantize-model', {str(tiny)!r}, {str(out)!r}, '-t', 'Q8_0'], prog_name='localmoe')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline() == b"writing\n"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert "error:" in err and "SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == [], "the temp file (and the lock) must be gone"


def test_original_error_survives_a_failing_cleanup(tiny, tmp_path, monkeypatch):
    """A read-only directory: the write fails, and removing the temp file fails too."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(qmod, "_write_tensor", refuse)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(LocalMoEError, match="Read-only file system"):
        localmoe.quantize(tiny, tmp_path / "o.gguf", "Q8_0", progress=False)


def test_a_directory_that_takes_no_files_reports_why(tiny):
    p = cli("quantize-model", str(tiny), "/proc/o.gguf", "-t", "Q8_0")
    err = assert_clean_error(p, "/proc")
    assert "disk space" not in err

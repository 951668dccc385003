"""The real `localmoe chat MODEL` in a pseudo-terminal: streaming, commands, save/load, exits."""
import json
import os
import shutil
import signal

import pexpect  # a test dependency: missing is a failure, not a skip
import pytest

from models.build import cached_model

PROMPT = ">>> "
TIMEOUT = 60  # seconds per expect: the machine may be busy; a hang fails instead of blocking


@pytest.fixture(scope="module")
def model_path():
    return str(cached_model("qwen3moe", "tiny", "f16"))


def start(tmp_path, *argv):
    exe = shutil.which("localmoe")
    assert exe, "the localmoe command is not installed (pip install -e .)"
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}  # HOME: the readline history goes there
    return pexpect.spawn(exe, ["chat", *argv], env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200),
                         preexec_fn=default_sigint)


def default_sigint():
    """Ctrl-C as a terminal delivers it: a runner that starts the tests in the background (no job
    control) leaves SIGINT ignored, the chat inherits that, and Python then never raises
    KeyboardInterrupt (this test failed so in a backgrounded `.ci/run`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(model_path, tmp_path, *args):
    child = start(tmp_path, model_path, "--temp", "0", "--seed", "1", "--ctx", "256", *args)
    child.expect_exact(PROMPT)
    return child


def turn(child, text: str) -> str:
    """Send a message; the text shown before the next prompt."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before


def test_two_turns_commands_save_load_and_bye(model_path, tmp_path):
    child = spawn(model_path, tmp_path, "-n", "4", "--system", "Be brief.")
    out1 = turn(child, "Hello there")
    assert "Hello there" in out1  # the terminal echo
    reply1 = out1.split("Hello there", 1)[1].strip()
    assert reply1, "the reply streamed to the terminal"
    child.sendline('"""first line')
    child.expect_exact("... ")  # a multi-line message asks for more lines
    child.sendline('second line"""')
    child.expect_exact(PROMPT)
    assert child.before.split('second line"""', 1)[1].strip()
    assert "decode: 4 tokens" in turn(child, "/show stats")
    assert "Available commands" in turn(child, "/?")
    assert "max_tokens       4" in turn(child, "/show params")
    assert "qwen3moe" in turn(child, "/show info")
    assert "<|im_start|>" in turn(child, "/show template")
    assert "Set temperature to 0.5" in turn(child, "/set temperature 0.5")
    assert "Set experts to 2" in turn(child, "/set experts 2")
    assert "error:" in turn(child, "/set experts 99")
    saved = tmp_path / "chat.json"
    assert "Saved" in turn(child, f"/save {saved}")
    data = json.loads(saved.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][1]["content"] == "Hello there"
    assert data["messages"][3]["content"] == "first line\nsecond line"
    assert data["options"]["temperature"] == 0.5
    assert "Cleared" in turn(child, "/clear")
    assert "Loaded 4 message(s)" in turn(child, f"/load {saved}")
    (tmp_path / "bad.json").write_text("{oops")
    assert "error:" in turn(child, f"/load {tmp_path / 'bad.json'}")
    assert "Unknown command" in turn(child, "/nope")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / ".localmoe" / "history").exists(), "readline history is kept"


def test_ctrl_c_stops_a_reply_overlong_is_refused_ctrl_d_exits(model_path, tmp_path):
    child = spawn(model_path, tmp_path, "-n", "400")
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story")
    child.expect(r"\S")  # the first streamed text
    child.sendintr()
    child.expect_exact("(stopped; the partial reply is kept)")
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a hint, no exit
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(PROMPT)
    turn(child, "/set max_tokens 2")
    assert "context holds 256 tokens" in turn(child, "word " * 400)  # refused, the chat goes on
    assert turn(child, "Hi").split("Hi", 1)[1].strip(), "the session goes on"
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ram_budget_is_passed_to_load_and_errors_exit_cleanly(model_path, tmp_path):
    child = start(tmp_path, model_path, "--ram-budget", "8G")
    if child.expect_exact([PROMPT, pexpect.EOF]) == 0:  # a load() that accepts it (the memory planner)
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    out = child.before
    child.close()
    assert child.exitstatus == 0 or (child.exitstatus == 1 and "error:" in out), out
    assert "Traceback" not in out
    for argv in [(model_path, "--ram-budget", "lots"), (__file__,)]:
        child = start(tmp_path, *argv)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 1 and "error:" in child.before and "Traceback" not in child.before

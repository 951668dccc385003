"""Split a streamed reply into reasoning (<think>...</think>) and content, as llama-server's
`--reasoning-format deepseek` does: reasoning only at the start of a reply, either opened by
the model or already opened by the chat template's generation prompt."""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of text that starts tag (it may complete next piece)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkSplitter:
    def __init__(self, in_think: bool = False):
        self.state = "think" if in_think else "start"  # start -> think -> after -> content
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(content, reasoning) that are final after this piece."""
        self.buf += text
        content, reasoning = [], []
        while self.buf:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.buf, self.state = s[len(OPEN):], "think"
                elif OPEN.startswith(s):  # whitespace or part of the tag so far: wait
                    break
                else:
                    self.state = "content"
            elif self.state == "think":
                i = self.buf.find(CLOSE)
                if i >= 0:
                    reasoning.append(self.buf[:i])
                    self.buf, self.state = self.buf[i + len(CLOSE):], "after"
                else:
                    keep = _held(self.buf, CLOSE)
                    reasoning.append(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
            elif self.state == "after":  # the whitespace between </think> and the answer
                self.buf = self.buf.lstrip()
                if self.buf:
                    self.state = "content"
            else:
                content.append(self.buf)
                self.buf = ""
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return "", rest
        return ("" if self.state == "after" else rest), ""

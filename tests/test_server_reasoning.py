"""<think> splitting for reasoning_content (localmoe.server.reasoning), fed in every split."""
import pytest

from localmoe.server.reasoning import ThinkSplitter


def run(pieces, in_think=False):
    s = ThinkSplitter(in_think)
    content, reasoning = [], []
    for p in pieces:
        c, r = s.feed(p)
        content.append(c)
        reasoning.append(r)
    c, r = s.flush()
    return "".join(content) + c, "".join(reasoning) + r


def splits(text):
    """text cut at every position, and one character at a time."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("text, in_think, want", [
    ("<think>\nweigh it\n</think>\n\nThe answer.", False, ("The answer.", "\nweigh it\n")),
    ("  <think>a</think>b", False, ("b", "a")),
    ("plain reply", False, ("plain reply", "")),
    ("no <think> here</think>", False, ("no <think> here</think>", "")),  # only at the start
    ("already thinking</think>done", True, ("done", "already thinking")),
    ("<think>cut short", False, ("", "cut short")),
    ("<thi", False, ("<thi", "")),          # a reply that merely starts like the tag
    ("<think>x</think>", False, ("", "x")),
    ("a < b </thinking>", True, ("", "a < b </thinking>")),
])
def test_split(text, in_think, want):
    for pieces in splits(text):
        assert run(pieces, in_think) == want, pieces

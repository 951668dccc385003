"""Options shared by the commands that generate text (run, chat)."""
import re

import click

_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"'": b"'", b'"': b'"', b"\\": b"\\"}


def process_escapes(text: str) -> str:
    """llama.cpp's -e (on by default there): \\n \\r \\t \\' \\" \\\\ and \\xHH; other escapes stay as typed."""
    def one(m):
        esc = m.group(1)
        return bytes([int(esc[1:], 16)]) if len(esc) == 3 else _ESCAPES.get(esc, b"\\" + esc)
    raw = re.sub(rb"\\(x[0-9a-fA-F]{2}|.)", one, text.encode("utf-8", "surrogateescape"), flags=re.S)
    return raw.decode("utf-8", "replace")


def stack_options(f, opts):
    """Apply click options so they show in the order listed."""
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_options(f):
    """Sampling (llama-cpp-python's defaults), --threads and --experts-per-token."""
    return stack_options(f, [
        click.option("--temp", default=0.8, show_default=True, type=float, help="Temperature; 0 = greedy."),
        click.option("--top-k", default=40, show_default=True, type=int),
        click.option("--top-p", default=0.95, show_default=True, type=float),
        click.option("--min-p", default=0.05, show_default=True, type=float),
        click.option("--repeat-penalty", default=1.0, show_default=True, type=float),
        click.option("--seed", default=None, type=int, help="Sampling seed; -1 or none: random."),
        click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="Compute threads."),
        click.option("--experts-per-token", "n_expert_used", default=None, type=click.IntRange(min=1),
                     help="Override the number of active experts (ARCH.expert_used_count)."),
    ])

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


def routing_options(f):
    """The study levers (localmoe.routing): off by default, since they change the logits."""
    return stack_options(f, [
        click.option("--min-expert-weight", default=None, type=click.FloatRange(0, 1, max_open=True),
                     metavar="W", help="Skip a token's picked experts whose normalised routing weight is below "
                                       "W (the heaviest always runs; the others keep their weights). Off by default."),
        click.option("--drop-experts", default=None, type=click.FloatRange(0, 1, max_open=True), metavar="FRACTION",
                     help="Mask away this fraction of each layer's experts, least used first by --drop-profile; "
                          "the router never picks them."),
        click.option("--drop-profile", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Expert statistics (a --stats-out file) that rank the experts for --drop-experts."),
    ])


def routing_kwargs(min_expert_weight, drop_experts, drop_profile) -> dict:
    """load() keyword arguments for routing_options."""
    from localmoe.errors import LocalMoEError
    if (drop_experts is None) != (drop_profile is None):
        raise LocalMoEError("--drop-experts and --drop-profile go together (rank the experts by a --stats-out "
                            "file of a run on representative text)")
    return {k: v for k, v in (("min_expert_weight", min_expert_weight), ("drop_experts", drop_experts),
                              ("drop_profile", drop_profile)) if v is not None}


def routing_note(model) -> str | None:
    """'experts run per token: ...' when a lever is on, else None."""
    s = model.routing_stats()
    if not (s["min_expert_weight"] or s["kept_experts"]) or s["mean_experts_run"] is None:
        return None
    kept = f"; experts kept per layer: {min(s['kept_experts'].values())} of {model.args.n_expert}" \
        if s["kept_experts"] else ""
    return f"experts run per token and layer: {s['mean_experts_run']:.2f} of {s['n_expert_used']} picked{kept}"

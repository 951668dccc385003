"""Options shared by the commands that generate text (run, chat)."""
import click


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
        click.option("--seed", default=None, type=int, help="Sampling seed (default: random)."),
        click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="Compute threads."),
        click.option("--experts-per-token", "n_expert_used", default=None, type=click.IntRange(min=1),
                     help="Override the number of active experts (ARCH.expert_used_count)."),
    ])

"""`localmoe perplexity MODEL FILE`: llama.cpp's perplexity tool, same chunks, scoring and output."""
import click

from .options import routing_kwargs, routing_note, routing_options


@click.command("perplexity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--ctx", "n_ctx", default=256, show_default=True, type=click.IntRange(min=4),
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", "n_chunks", default=None, type=click.IntRange(min=1),
              help="Evaluate at most this many chunks (default: all).")
@click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="Compute threads.")
@click.option("--experts-per-token", "n_expert_used", default=None, type=click.IntRange(min=1),
              help="Override the number of active experts (ARCH.expert_used_count).")
@routing_options
def perplexity_cmd(model, file, n_ctx, n_chunks, threads, n_expert_used, **routing):
    """Perplexity of MODEL on the text in FILE, as llama.cpp's llama-perplexity computes it."""
    from localmoe.model import load
    from localmoe.perplexity import perplexity, read_text
    routing = routing_kwargs(**routing)
    text = read_text(file)
    m = load(model, n_threads=threads, n_ctx=n_ctx, n_expert_used=n_expert_used, **routing)
    try:
        def show(i, n, ppl):
            if i == 1:
                click.echo(f"perplexity: calculating perplexity over {n} chunks, n_ctx={n_ctx}", err=True)
            click.echo(f"[{i}]{ppl:.4f},", nl=False)
        r = perplexity(m, text, n_ctx=n_ctx, n_chunks=n_chunks, progress=show)
        note = routing_note(m)
    finally:
        m.close()
    click.echo()
    click.echo(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    if note:
        click.echo(note, err=True)

"""`localmoe perplexity MODEL FILE`: llama.cpp's perplexity tool, same chunks, scoring and output."""
import click


@click.command("perplexity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--ctx", "n_ctx", default=256, show_default=True, type=click.IntRange(min=4),
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", "n_chunks", default=None, type=click.IntRange(min=1),
              help="Evaluate at most this many chunks (default: all).")
@click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="Compute threads.")
def perplexity_cmd(model, file, n_ctx, n_chunks, threads):
    """Perplexity of MODEL on the text in FILE, as llama.cpp's llama-perplexity computes it."""
    from localmoe.model import load
    from localmoe.perplexity import perplexity, read_text
    text = read_text(file)
    m = load(model, n_threads=threads, n_ctx=n_ctx)
    try:
        def show(i, n, ppl):
            if i == 1:
                click.echo(f"perplexity: calculating perplexity over {n} chunks, n_ctx={n_ctx}", err=True)
            click.echo(f"[{i}]{ppl:.4f},", nl=False)
        r = perplexity(m, text, n_ctx=n_ctx, n_chunks=n_chunks, progress=show)
    finally:
        m.close()
    click.echo()
    click.echo(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")

"""`localmoe run [MODEL] -p TEXT`: stream a completion to stdout, speeds to stderr."""
import click

from .options import process_escapes, routing_kwargs, routing_note, routing_options, sampling_options
from .plan import check_output, offload_kwargs, offload_options, report_stats


@click.command("run")
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("-p", "--prompt", required=True, help="Text to complete.")
@click.option("-e/-E", "--escape/--no-escape", default=True, show_default=True,
              help="Turn \\n, \\t, \\xHH ... in the prompt and stop strings into characters, as llama.cpp does.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, type=click.IntRange(min=0),
              help="Maximum number of tokens to generate.")
@sampling_options
@click.option("--ctx", "n_ctx", default=None, type=click.IntRange(min=1),
              help="Context length (default: min(training context, 4096)).")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable).")
@offload_options
@routing_options
def run_cmd(model, prompt, escape, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, threads,
            n_expert_used, n_ctx, stop, ram_budget, cache_policy, expert_profile, no_prefetch, show_stats,
            stats_out, gpu_budget, device, **routing):
    """Generate text from MODEL (default: the shipped Shakespeare model), streaming tokens as they come."""
    from localmoe.model import load
    from localmoe.shipped import default_model_path
    from localmoe.tokenizer.text import clean_text
    model = model or default_model_path()
    routing = routing_kwargs(**routing)
    if stats_out:
        check_output(stats_out)  # before the generation, not after it
    if escape:
        prompt, stop = process_escapes(prompt), [process_escapes(s) for s in stop]
    prompt, stop = clean_text(prompt), [clean_text(s) for s in stop]
    m = load(model, n_threads=threads, n_ctx=n_ctx, n_expert_used=n_expert_used,
             **offload_kwargs(ram_budget, cache_policy, expert_profile, no_prefetch, gpu_budget, device), **routing)
    for piece in m.generate(prompt, max_tokens=n_predict, temperature=temp, top_k=top_k, top_p=top_p,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=list(stop)):
        click.echo(piece, nl=False)
    click.echo()
    t = m.timings
    if t.stop == "context":
        click.echo(f"(stopped: the context of {m.n_ctx} tokens is full; use a larger --ctx)", err=True)
    click.echo(f"prompt: {t.n_prompt} tokens, {_rate(t.n_prompt, t.t_prompt)} | "
               f"decode: {t.n_decode} tokens, {_rate(t.n_decode, t.t_decode)}", err=True)
    note = routing_note(m)
    if note:
        click.echo(note, err=True)
    report_stats(m, show_stats, stats_out)
    m.close()


def _rate(n: int, secs: float) -> str:
    return f"{n / secs:.2f} tokens/s" if secs > 0 and n else "n/a"

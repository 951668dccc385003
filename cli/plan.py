"""`localmoe plan MODEL --ram-budget SIZE`: the memory plan, without loading the weights.

Also the options `run` and `chat` share for running under a budget
(`offload_options`) and the end-of-run statistics (`report_stats`).
"""
import json

import click

from .options import stack_options


def offload_options(f):
    """--ram-budget, --cache-policy, --expert-profile, --no-prefetch, --stats, --stats-out."""
    return stack_options(f, [
        click.option("--ram-budget", default=None, metavar="SIZE",
                     help="Keep the model within SIZE of RAM (e.g. 6G, 512M): hot experts stay "
                          "resident, cold ones are read from disk. See `localmoe plan`."),
        click.option("--cache-policy", default=None, type=click.Choice(["lru", "lfu"]),
                     help="Expert cache eviction with --ram-budget (default: lfu, with decay)."),
        click.option("--expert-profile", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Warm-start the expert cache from a --stats-out file of an earlier run."),
        click.option("--no-prefetch", is_flag=True,
                     help="With --ram-budget: do not guess and pre-read the next layer's experts."),
        click.option("--stats", "show_stats", is_flag=True,
                     help="Print per-expert hit counts, cache hit rate and prefetch accuracy at the end."),
        click.option("--stats-out", default=None, type=click.Path(dir_okay=False, writable=True),
                     help="Save the expert statistics as JSON (usable as --expert-profile)."),
    ])


def offload_kwargs(ram_budget, cache_policy, expert_profile, no_prefetch) -> dict:
    """load() keyword arguments for the options above."""
    return {k: v for k, v in (("ram_budget", ram_budget), ("policy", cache_policy),
                              ("expert_profile", expert_profile), ("prefetch", False if no_prefetch else None))
            if v is not None}


def check_output(path) -> None:
    """Fail now, not after the run, if --stats-out cannot be written."""
    from localmoe.atomic import check_writable
    check_writable(path, "--stats-out")


def report_stats(model, show_stats: bool, stats_out) -> None:
    if not (show_stats or stats_out):
        return
    from localmoe.planner import format_stats, save_stats
    stats = model.store.stats()
    if show_stats:
        click.echo(format_stats(stats), err=True)
    if stats_out:
        save_stats(stats_out, stats)


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--ram-budget", required=True, metavar="SIZE", help="RAM to plan for, e.g. 6G or 512M.")
@click.option("--hit-rate", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Expert cache hit rate assumed for the disk traffic estimate.")
@click.option("--ctx", "n_ctx", default=None, type=click.IntRange(min=1),
              help="Context length (default: as `run`, min(training context, 4096)).")
@click.option("--experts-per-token", "n_expert_used", default=None, type=click.IntRange(min=1),
              help="Override the number of active experts.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, ram_budget, hit_rate, n_ctx, n_expert_used, as_json):
    """Show what stays resident under a RAM budget, the expert slots per layer and the
    expected disk reads per token; fail if the budget is below the model's minimum."""
    from localmoe.arch import arch_module
    from localmoe.gguf_file import open_gguf
    from localmoe.model import DEFAULT_MAX_CTX
    from localmoe.planner import parse_size, plan_for
    budget = parse_size(ram_budget)
    with open_gguf(model) as gf:
        args = arch_module(gf.arch).ModelArgs.from_gguf(gf, n_expert_used)
        ctx = n_ctx or min(args.n_ctx_train, DEFAULT_MAX_CTX)
        d = plan_for(gf, args, ctx, budget).describe(hit_rate)
    click.echo(json.dumps(d, indent=1) if as_json else format_plan(d))


def format_plan(d: dict) -> str:
    from localmoe.planner import format_size as fs
    r = d["resident"]
    lines = [f"RAM budget {fs(d['budget_bytes'])}; minimum workable budget {fs(d['minimum_bytes'])} "
             f"({d['minimum_bytes']} bytes)",
             "resident (anonymous memory):",
             f"  non-expert weights  {fs(r['non_expert_bytes'])}",
             f"  KV cache (fp16)     {fs(r['kv_cache_bytes'])}  n_ctx={d['n_ctx']}",
             f"  run buffers         {fs(r['run_buffer_bytes'])}",
             f"  expert cache        {fs(r['expert_cache_bytes'])}  of {fs(d['all_experts_bytes'])} of experts",
             f"  total               {fs(r['total_bytes'])}",
             f"expert slots per MoE layer ({d['n_expert']} experts, {d['n_expert_used']} active per token):"]
    for le in d["layers"]:
        lines.append(f"  layer {le['layer']:3d}: {le['slots']:4d} slots x {fs(le['expert_bytes'])}"
                     f"  (hit rate if routing were uniform: {le['uniform_hit_rate']:.0%})")
    if d["shared_slots"]:
        lines.append(f"  shared streaming pool: {d['shared_slots']} slots for layers with none")
    lines.append(f"expected disk reads per token at a {d['hit_rate']:.0%} hit rate: "
                 f"{fs(d['disk_bytes_per_token'])}")
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)

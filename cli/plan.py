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
        click.option("--gpu-budget", default=None, metavar="SIZE",
                     help="VRAM for the GPU tier (e.g. 8G, or 50% = the dense part plus half the expert "
                          "bytes): the dense part and the hottest experts on the GPU, the rest on the CPU. "
                          "Implies --device cuda."),
        click.option("--device", default=None, type=click.Choice(["cpu", "cuda", "auto"]),
                     help="Where to run: cpu (default), cuda (numba-cuda; all experts in VRAM unless "
                          "--gpu-budget), auto (cuda when numba-cuda finds a GPU)."),
    ])


def offload_kwargs(ram_budget, cache_policy, expert_profile, no_prefetch, gpu_budget=None, device=None) -> dict:
    """load() keyword arguments for the options above."""
    return {k: v for k, v in (("ram_budget", ram_budget), ("policy", cache_policy),
                              ("expert_profile", expert_profile), ("prefetch", False if no_prefetch else None),
                              ("gpu_budget", gpu_budget), ("device", device))
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
    gpu = getattr(model, "gpu", None)
    if gpu is not None:
        stats["gpu"] = g = gpu.stats()
    if show_stats:
        click.echo(format_stats(stats), err=True)
        if gpu is not None:
            click.echo(f"GPU tier: {g['gpu_pairs']} expert selections on the device, {g['cpu_pairs']} on the CPU, "
                       f"{g['gpu_expert_moves']} experts moved into VRAM", err=True)
    if stats_out:
        save_stats(stats_out, stats)


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--ram-budget", default=None, metavar="SIZE", help="RAM to plan for, e.g. 6G or 512M.")
@click.option("--gpu-budget", default=None, metavar="SIZE",
              help="VRAM to plan for (e.g. 8G, or 50%: the dense part plus half the expert bytes).")
@click.option("--hit-rate", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Expert cache hit rate assumed for the disk traffic estimate.")
@click.option("--ctx", "n_ctx", default=None, type=click.IntRange(min=1),
              help="Context length (default: as `run`, min(training context, 4096)).")
@click.option("--experts-per-token", "n_expert_used", default=None, type=click.IntRange(min=1),
              help="Override the number of active experts.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, ram_budget, gpu_budget, hit_rate, n_ctx, n_expert_used, as_json):
    """Show what stays resident under a RAM budget, the expert slots per layer and the
    expected disk reads per token; fail if the budget is below the model's minimum.
    With --gpu-budget, also what goes to VRAM (GPU column); fail below the dense part."""
    from localmoe.arch import arch_module
    from localmoe.gguf_file import open_gguf
    from localmoe.model import DEFAULT_MAX_CTX
    from localmoe.planner import parse_size, plan_for
    if ram_budget is None and gpu_budget is None:
        raise click.UsageError("give --ram-budget, --gpu-budget or both")
    with open_gguf(model) as gf:
        args = arch_module(gf.arch).ModelArgs.from_gguf(gf, n_expert_used)
        ctx = n_ctx or min(args.n_ctx_train, DEFAULT_MAX_CTX)
        d = {} if ram_budget is None else plan_for(gf, args, ctx, parse_size(ram_budget)).describe(hit_rate)
        if gpu_budget is not None:
            from localmoe.planner.gpu import gpu_plan
            d["gpu"] = gpu_plan(gf, args, ctx, gpu_budget).describe()
            d.setdefault("n_expert", args.n_expert)
    click.echo(json.dumps(d, indent=1) if as_json else format_plan(d))


def format_plan(d: dict) -> str:
    from localmoe.planner import format_size as fs
    g = d.get("gpu")
    lines = [] if g is None else _format_gpu(g, d["n_expert"])
    if "resident" not in d:
        return "\n".join(lines)
    r = d["resident"]
    lines += [f"RAM budget {fs(d['budget_bytes'])}; minimum workable budget {fs(d['minimum_bytes'])} "
             f"({d['minimum_bytes']} bytes)",
             "resident (anonymous memory):",
             f"  non-expert weights  {fs(r['non_expert_bytes'])}",
             f"  KV cache (fp16)     {fs(r['kv_cache_bytes'])}  n_ctx={d['n_ctx']}",
             f"  run buffers         {fs(r['run_buffer_bytes'])}",
             f"  expert cache        {fs(r['expert_cache_bytes'])}  of {fs(d['all_experts_bytes'])} of experts",
             f"  total               {fs(r['total_bytes'])}",
             f"expert slots per MoE layer ({d['n_expert']} experts, {d['n_expert_used']} active per token):"]
    for le in d["layers"]:
        gpu = "" if g is None else f"  GPU {g['slots'][str(le['layer'])]:4d}"
        lines.append(f"  layer {le['layer']:3d}: {le['slots']:4d} slots x {fs(le['expert_bytes'])}{gpu}"
                     f"  (hit rate if routing were uniform: {le['uniform_hit_rate']:.0%})")
    if d["shared_slots"]:
        lines.append(f"  shared streaming pool: {d['shared_slots']} slots for layers with none")
    lines.append(f"expected disk reads per token at a {d['hit_rate']:.0%} hit rate: "
                 f"{fs(d['disk_bytes_per_token'])}")
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)


def _format_gpu(g: dict, n_expert: int) -> list[str]:
    from localmoe.planner import format_size as fs
    lines = [f"GPU budget {fs(g['budget_bytes'])}; minimum (the dense part) {fs(g['minimum_bytes'])} "
             f"({g['minimum_bytes']} bytes)",
             "in VRAM:",
             f"  non-expert weights  {fs(g['dense_weight_bytes'])}  (token embeddings stay on the host)",
             f"  KV cache (fp16)     {fs(g['kv_cache_bytes'])}",
             f"  device buffers      {fs(g['scratch_bytes'])}",
             f"  expert slots        {fs(g['expert_bytes'])}  ({g['expert_fraction']:.0%} of expert bytes)",
             f"  total               {fs(g['total_bytes'])}",
             f"GPU expert slots per MoE layer ({n_expert} experts; the others run on the CPU):"]
    lines += [f"  layer {int(il):3d}: GPU {n:4d}" for il, n in g["slots"].items()]
    return lines

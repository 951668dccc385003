"""`localmoe quantize-model IN OUT --type Q4_K_M`: formats localmoe.quantize (no logic here)."""
import time

import click

from localmoe.quant_mix import MIXES

from .inspect import human_bytes


def format_plan(plan) -> str:
    width = max((len(t.name) for t in plan.tensors), default=0)
    lines = []
    for t in plan.tensors:
        conv = f"{t.old.name:>5} -> {t.new.name:<5}" if t.converts else f"{t.old.name:>5}    (copy)"
        lines.append(f"{t.name:<{width}}  {str(list(t.shape)):<22} {conv}  "
                     f"{human_bytes(t.n_bytes_in):>11} -> {human_bytes(t.n_bytes_out):>11}")
    lines.append(f"{len(plan.tensors)} tensors, {human_bytes(plan.input_bytes)} of tensor data -> "
                 f"output file {human_bytes(plan.output_size)} ({plan.output_size} bytes)")
    return "\n".join(lines)


@click.command("quantize-model")
@click.argument("in_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT.gguf", type=click.Path(dir_okay=False))
@click.option("--type", "-t", "qtype", required=True, type=click.Choice(list(MIXES), case_sensitive=False),
              help="Quantization mix, as in llama-quantize.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and the output size; write nothing.")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an already quantized input (dequantized, then quantized again: lower quality).")
def quantize_model_cmd(in_path, out_path, qtype, threads, force, dry_run, allow_requantize):
    """Quantize the GGUF model IN.gguf into OUT.gguf, byte for byte as llama-quantize does."""
    from localmoe.quantizer import quantize
    t0 = time.perf_counter()
    plan = quantize(in_path, out_path, qtype.upper(), threads=threads, force=force, dry_run=dry_run,
                    allow_requantize=allow_requantize)
    if dry_run:
        click.echo(format_plan(plan))
        return
    dt = time.perf_counter() - t0
    click.echo(f"wrote {out_path}: {human_bytes(plan.output_size)} ({qtype.upper()}) from "
               f"{human_bytes(plan.input_bytes)} of tensors in {dt:.1f} s "
               f"({plan.input_bytes / 2**20 / max(dt, 1e-9):.0f} MiB/s)")

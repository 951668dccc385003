"""`localmoe inspect MODEL`: formats localmoe.summary.summarize (no logic here)."""
import json

import click


def human_bytes(n) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"


def human_count(n) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def layer_ranges(layers) -> str:
    """[0, 1, 2, 5] -> '0-2, 5 (4)'."""
    if not layers:
        return "none"
    runs = [[layers[0], layers[0]]]
    for i in layers[1:]:
        if i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return f"{', '.join(parts)} ({len(layers)})"


def _pct(part, whole) -> str:
    return f"{100 * part / whole:5.1f}%" if part is not None and whole else ""


def _share(n, whole) -> str:
    """'  1.50 MiB  12.3%': a byte count and its share of `whole`."""
    return f"{human_bytes(n):>11} {_pct(n, whole)}"


def _kv(rows, indent=2):
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{' ' * indent}{k:<{width}}  {v}" for k, v in rows]


def format_text(s: dict, show_tensors: bool) -> str:
    ex, dec = s["experts"], s["decode"]
    out = _kv([
        ("model", f"{s['name'] or '(no general.name)'}  [{s['architecture']}]"),
        ("file", f"{s['file']}  ({human_bytes(s['file_bytes'])})"),
        ("file type", f"{s['file_type'] or '?'}  (quantization version {s['quantization_version'] or '?'})"),
        ("tokenizer", f"{s['tokenizer_model'] or '?'}, vocab {s['vocab_size'] or '?'}"),
        ("parameters", f"{human_count(s['n_params'])} in {len(s['tensors'])} tensors, {human_bytes(s['total_bytes'])}"),
    ], indent=0)

    out += ["", f"hyperparameters ({s['architecture']}.*):"]
    out += _kv([(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(s["hyperparameters"].items())])

    shared = ex["expert_shared_count"] if ex["expert_shared_count"] is not None else (
        "yes (count not in metadata)" if ex["has_shared_experts"] else "none")
    total = s["total_bytes"]
    out += ["", "experts:"]
    out += _kv([
        ("routed experts per layer", ex["expert_count"] if ex["expert_count"] is not None else "-"),
        ("active per token", ex["expert_used_count"] if ex["expert_used_count"] is not None else "-"),
        ("shared experts", shared),
        ("MoE layers", layer_ranges(ex["moe_layers"])),
        ("dense layers", layer_ranges(ex["dense_layers"])
         + (f"  (leading_dense_block_count {ex['leading_dense_block_count']})"
            if ex["leading_dense_block_count"] is not None else "")),
        ("routed expert weights", _share(ex["routed_expert_bytes"], total)),
        ("shared expert weights", _share(ex["shared_expert_bytes"], total)),
        ("everything else", _share(ex["other_bytes"], total)),
    ])
    if ex["nextn_predict_layers"]:
        out += [f"  ({ex['nextn_predict_layers']} MTP/nextn layer(s) at the end: not run at decode)"]

    used = f"{ex['expert_used_count']}/{ex['expert_count']}" if ex["expert_count"] else "-"
    per_tok = dec["bytes_per_token"]
    out += ["", "decode: weight bytes read per token (bounds tokens/s by memory bandwidth):"]
    out += _kv([
        (f"routed experts ({used})", _share(dec["routed_expert_bytes"], per_tok)),
        ("shared experts", _share(dec["shared_expert_bytes"], per_tok)),
        ("non-expert (attn, dense FFN, router, output)", _share(dec["other_bytes"], per_tok)),
        ("token_embd" + (" (tied output: all)" if dec["tied_output"] else " (1 row)"),
         _share(dec["token_embd_bytes"], per_tok)),
        ("total", f"{human_bytes(per_tok):>11}  ({_pct(per_tok, total).strip() or '?'} of the file's weights)"),
    ])

    if show_tensors:
        rows = [(t["name"], t["type"], "x".join(map(str, t["shape"])), f"{t['bytes']:,}") for t in s["tensors"]]
        head = ("name", "type", "shape (numpy order)", "bytes")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        fmt = "  {:<%d}  {:<%d}  {:<%d}  {:>%d}" % tuple(widths)
        out += ["", "tensors:", fmt.format(*head)] + [fmt.format(*r) for r in rows]
    out += ["", "totals by type:"]
    out += [f"  {q:<6} {v['count']:>5} tensors  {human_count(v['n_elements']):>8} params  {_share(v['bytes'], total)}"
            for q, v in s["totals_by_type"].items()]
    return "\n".join(out)


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (keys: see localmoe.summary).")
@click.option("--no-tensors", is_flag=True, help="Leave out the per-tensor table.")
def inspect_cmd(model, as_json, no_tensors):
    """Show a GGUF model's architecture, tensors and expert layout."""
    from localmoe.summary import summarize
    s = summarize(model)
    if as_json:
        if no_tensors:
            del s["tensors"]
        click.echo(json.dumps(s, indent=2))
    else:
        click.echo(format_text(s, show_tensors=not no_tensors))

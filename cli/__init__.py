"""The `localmoe` command: a thin click group, one module per subcommand.

Subcommand modules are imported only when that subcommand runs, so that
`localmoe --help` stays fast (no numba import).
"""
import importlib
import sys

import click

# name -> (module under localmoe.cli, attribute, one-line help)
COMMANDS = {
    "chat": ("chat", "chat_cmd", "Chat with a model interactively."),
    "inspect": ("inspect", "inspect_cmd", "Show a GGUF model's architecture, tensors and expert layout."),
    "quantize-model": ("quantize_model", "quantize_model_cmd", "Quantize an F16/BF16/F32 model as llama-quantize does."),
    "perplexity": ("perplexity", "perplexity_cmd", "Perplexity on a text file, computed as llama.cpp does."),
    "plan": ("plan", "plan_cmd", "Plan memory for running a model under a RAM budget (--ram-budget)."),
    "run": ("run", "run_cmd", "Generate text from a model, streaming tokens to stdout."),
    "serve": ("serve", "serve_cmd", "Serve a model over HTTP: OpenAI and Ollama APIs and a chat page."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{mod}"), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        import warnings
        from localmoe.errors import LocalMoEError
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except LocalMoEError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """localmoe's warnings as one `warning: ...` line on stderr (no source location)."""
    click.echo(f"warning: {message}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="localmoe")
def main():
    """localmoe: run and quantize Mixture-of-Experts GGUF models on your CPU."""

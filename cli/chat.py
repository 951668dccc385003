"""`localmoe chat [MODEL]`: an interactive chat in the terminal (the REPL around ChatSession)."""
import os
import sys
from pathlib import Path

import click

from .options import routing_kwargs, routing_options, sampling_options
from .plan import check_output, offload_kwargs, offload_options, report_stats

HELP = """Available commands:
  /set system TEXT       set the system prompt (empty TEXT removes it)
  /set temperature X     also: top_p, top_k, min_p, repeat_penalty, seed (-1: random), max_tokens
  /set experts K         active experts per token, applied at once (the context is re-evaluated;
                         with --ram-budget at most the count the plan was made for)
  /set verbose|quiet     show or hide stats after each reply
  /show info|template|params|stats
  /clear                 forget the conversation
  /save FILE             save the conversation as JSON
  /load FILE             load a conversation saved with /save
  /bye                   exit (or Ctrl-D)
  /?                     this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply (the partial reply stays in the history)."""
SET_NAMES = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float}
HISTORY = Path("~/.localmoe/history")


@click.command("chat")
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--system", default=None, help="System prompt.")
@click.option("--ctx", "n_ctx", default=None, type=click.IntRange(min=16),
              help="Context length in tokens (default: min(training context, 4096)).")
@click.option("-n", "--n-predict", "n_predict", default=-1, show_default=True, type=click.IntRange(min=-1),
              help="Maximum tokens per reply; -1 = until the model ends its turn or the context is full.")
@sampling_options
@click.option("--verbose", is_flag=True, help="Show speeds, expert hits and memory after each reply.")
@offload_options
@routing_options
def chat_cmd(model, system, n_ctx, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, threads,
             n_expert_used, verbose, show_stats, stats_out, min_expert_weight, drop_experts, drop_profile, **offload):
    """Chat with MODEL (a GGUF file; default: the shipped Shakespeare model) in the terminal.

    Type /? in the chat for its commands; /bye or Ctrl-D exits."""
    from localmoe.chat import ChatSession
    from localmoe.shipped import default_model_path
    model = model or str(default_model_path())
    if stats_out:
        check_output(stats_out)  # before the chat, not after it
    routing = routing_kwargs(min_expert_weight, drop_experts, drop_profile)
    model_ = _load(model, threads, n_ctx, n_expert_used, {**offload_kwargs(**offload), **routing})
    try:
        session = ChatSession(model_, system=system, max_tokens=n_predict, temperature=temp, top_k=top_k,
                              top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    except BaseException:
        model_.close()
        raise
    session.warm_up_async()
    try:
        Repl(session, verbose).run()
        report_stats(model_, show_stats, stats_out)
    finally:
        session.close()


def _load(path, threads, n_ctx, n_expert_used, opts):
    """load() and the tokenizer behind a progress bar that appears only if they take a while."""
    from tqdm import tqdm
    with tqdm(total=2, desc=f"loading {os.path.basename(path)}", delay=0.5, leave=False, file=sys.stderr,
              disable=not sys.stderr.isatty(), bar_format="{desc}: {bar} {n}/{total} [{elapsed}]") as bar:
        from localmoe.model import load
        m = load(path, n_threads=threads, n_ctx=n_ctx, n_expert_used=n_expert_used, **opts)
        bar.update()
        bar.set_description_str("loading the tokenizer")
        m.tokenizer
        bar.update()
    return m


class Repl:
    def __init__(self, session, verbose: bool):
        self.s, self.verbose = session, verbose
        self.tty = sys.stdin.isatty()
        if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 typed or piped in becomes U+FFFD
            sys.stdin.reconfigure(errors="replace")
        self.readline = None
        if self.tty:
            self._init_readline()

    def _init_readline(self) -> None:
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: plain input()
            return
        self.readline = readline
        try:
            readline.read_history_file(HISTORY.expanduser())
        except OSError:
            pass
        readline.set_history_length(1000)

    def _save_history(self) -> None:
        if self.readline is None:
            return
        try:
            HISTORY.expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(HISTORY.expanduser())
        except OSError:
            pass

    def run(self) -> None:
        if self.tty:
            info = self.s.info()
            click.echo(f"{info['name'] or info['architecture']}: context {info['context']} tokens. "
                       "/? for help, /bye or Ctrl-D to exit.")
        try:
            while True:
                try:
                    line = self._read()
                except KeyboardInterrupt:
                    click.echo("\nUse Ctrl + d or /bye to exit.")
                    continue
                if line is None or line.strip() == "/bye":
                    break
                try:
                    if line.lstrip().startswith("/"):
                        self._command(line.strip())
                    elif line.strip():
                        self._turn(line)
                except KeyboardInterrupt:  # e.g. while the first turn waits for the warm-up
                    click.echo("\n(stopped)", err=True)
        finally:
            self._save_history()
        if self.tty:
            click.echo()

    def _read(self):
        """One message; None at end of input. \"\"\" starts and ends a multi-line message."""
        from localmoe.tokenizer.text import clean_text
        text = self._read_raw()
        return None if text is None else clean_text(text)

    def _read_raw(self):
        try:
            line = input(">>> " if self.tty else "")
        except EOFError:
            return None
        if not line.lstrip().startswith('"""'):
            return line
        text = line.lstrip()[3:]
        while not text.rstrip().endswith('"""'):
            try:
                text += "\n" + input("... " if self.tty else "")
            except EOFError:
                break
        text = text.rstrip()
        return text[:-3] if text.endswith('"""') else text

    def _turn(self, text: str) -> None:
        from localmoe.errors import LocalMoEError
        try:
            reply = self.s.send(text)
        except LocalMoEError as e:
            click.echo(f"error: {e}", err=True)
            return
        if reply.dropped:
            click.echo(f"(context full: the {reply.dropped} oldest message(s) left the context)", err=True)
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            reply.close()
        except LocalMoEError as e:
            click.echo(f"\nerror: {e}", err=True)
            return
        click.echo()
        if reply.stop_reason == "interrupted":
            click.echo("(stopped; the partial reply is kept)", err=True)
        elif reply.stop_reason == "context":
            click.echo("(the context is full; older messages will leave it next turn)", err=True)
        if self.verbose:
            self._stats()

    def _command(self, line: str) -> None:
        from localmoe.errors import LocalMoEError
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("/?", "/help"):
                click.echo(HELP)
            elif cmd == "/set":
                self._set(arg)
            elif cmd == "/show":
                self._show(arg)
            elif cmd == "/clear":
                self.s.clear()
                click.echo("Cleared the conversation.")
            elif cmd == "/save" and arg:
                self.s.save(arg)
                click.echo(f"Saved the conversation to {arg}")
            elif cmd == "/load" and arg:
                self.s.load(arg)
                click.echo(f"Loaded {len(self.s.messages)} message(s) from {arg}")
            elif cmd in ("/save", "/load"):
                click.echo(f"Usage: {cmd} FILE")
            else:
                click.echo(f"Unknown command {cmd!r}. Type /? for help.")
        except LocalMoEError as e:
            click.echo(f"error: {e}", err=True)
        except Exception as e:  # a bad command never ends the chat (the conversation would be lost)
            click.echo(f"error: {cmd} failed: {type(e).__name__}: {e}", err=True)

    def _set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if name == "parameter":  # Ollama's spelling: /set parameter NAME VALUE
            name, _, value = value.strip().partition(" ")
        value = value.strip()
        if name == "system":
            self.s.set_system(value)
            click.echo("Set the system prompt." if value else "Removed the system prompt.")
        elif name in ("verbose", "quiet"):
            self.verbose = name == "verbose"
            click.echo(f"Stats after each reply: {'on' if self.verbose else 'off'}.")
        elif name in SET_NAMES or name in ("seed", "max_tokens", "experts"):
            try:
                v = SET_NAMES.get(name, int)(value)
            except (ValueError, OverflowError):
                click.echo(f"error: /set {name} needs a number, got {value!r}", err=True)
                return
            if name == "seed":
                self.s.set_params(seed=v)
            elif name == "max_tokens":
                self.s.set_max_tokens(v)
            elif name == "experts":
                self.s.set_experts(v)
            else:
                self.s.set_params(**{name: v})
            click.echo(f"Set {name} to {v}.")
        else:
            click.echo("Usage: /set system TEXT | temperature X | top_p X | top_k N | min_p X | "
                       "repeat_penalty X | seed N | max_tokens N | experts K | verbose | quiet")

    def _show(self, what: str) -> None:
        s = self.s
        if what == "info":
            for k, v in s.info().items():
                click.echo(f"  {k:<18} {v}")
        elif what == "template":
            click.echo(s.template.source)
        elif what == "params":
            rows = {**s.params, "max_tokens": s.max_tokens, "experts": s.model.args.n_expert_used,
                    "context": s.model.n_ctx, "system": s.system}
            for k, v in rows.items():
                click.echo(f"  {k:<16} {v}")
        elif what == "stats":
            self._stats()
        else:
            click.echo("Usage: /show info | template | params | stats")

    def _stats(self) -> None:
        from localmoe.chat import rss_bytes
        r = self.s.last
        if r is None:
            click.echo("No reply yet.", err=True)
            return
        a = self.s.model.args
        hits = (r.expert_hits > 0).sum(axis=1)
        lines = [
            f"prompt: {r.n_prompt} new tokens ({r.n_reused} reused from the cache), {_rate(r.n_prompt, r.t_prompt)}",
            f"decode: {r.n_decode} tokens, {_rate(r.n_decode, r.t_decode)}; stopped: {r.stop_reason}",
            f"experts hit per layer (of {a.n_expert}, {a.n_expert_used} per token): "
            + " ".join(str(int(h)) for h in hits),
            f"context: {self.s.n_cached}/{self.s.model.n_ctx} tokens; memory (RSS): {rss_bytes() / 2**20:.0f} MiB",
        ]
        click.echo("\n".join(lines), err=True)


def _rate(n: int, secs: float) -> str:
    return f"{n / secs:.2f} tokens/s" if secs > 0 and n else "n/a"

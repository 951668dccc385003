"""`localmoe serve [MODEL]`: an OpenAI- and Ollama-compatible HTTP server with a chat page.
(Imported only when `serve` runs, so uvicorn loads only then.)"""
import ipaddress
import signal
import socket
import sys

import click
import uvicorn

from .options import routing_kwargs, routing_options, sampling_options
from .plan import offload_kwargs, offload_options, report_stats


@click.command("serve")
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="LOCALMOE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every API request (also $LOCALMOE_API_KEY).")
@click.option("--models-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="List every GGUF here; a request naming one loads it in place of the resident model.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait for the model; more get 503 with Retry-After.")
@click.option("--parallel", "n_parallel", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Requests run at once, batched into each forward pass; each has a KV cache of --ctx "
                   "tokens, whose memory is committed as it fills. Further requests wait (--max-queue).")
@click.option("--max-body", default="4M", show_default=True, metavar="SIZE",
              help="Largest request body (e.g. 4M); larger ones get 413.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the API; "
                   "repeatable, '*' for any. Default: same origin only.")
@click.option("--reasoning-format", default="deepseek", show_default=True, type=click.Choice(["deepseek", "none"]),
              help="deepseek: <think>...</think> goes to reasoning_content; none: kept in the content.")
@click.option("--ctx", "n_ctx", default=None, type=click.IntRange(min=16),
              help="Context length in tokens (default: min(training context, 4096)).")
@sampling_options
@offload_options
@routing_options
def serve_cmd(model, host, port, api_key, models_dir, max_queue, n_parallel, max_body, cors_origins, reasoning_format,
              n_ctx, temp, top_k, top_p, min_p, repeat_penalty, seed, threads, n_expert_used, show_stats,
              stats_out, min_expert_weight, drop_experts, drop_profile, **offload):
    """Serve MODEL (default: the shipped Shakespeare model) over HTTP: the OpenAI API under /v1,
    the Ollama API under /api, and a chat page at /. Ctrl-C stops it."""
    from localmoe.errors import LocalMoEError
    from localmoe.planner.budget import parse_size
    from localmoe.sampling import Sampler, SamplingError
    from localmoe.server import Engine, create_app
    from localmoe.shipped import default_model_path

    sampling = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                    seed=seed)
    try:
        Sampler(**sampling)
    except SamplingError as e:
        raise LocalMoEError(str(e)) from None
    routing = routing_kwargs(min_expert_weight, drop_experts, drop_profile)
    limit = parse_size(max_body)
    if not api_key and not _loopback(host):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this "
                   "address can use the model", err=True)
    sock = _listen(host, port)
    load_opts = dict(n_threads=threads, n_ctx=n_ctx, n_expert_used=n_expert_used, **offload_kwargs(**offload),
                     **routing)
    engine = Engine(model or default_model_path(), models_dir, load_opts, max_queue,
                    reasoning=reasoning_format == "deepseek", n_parallel=n_parallel)
    engine.on_exit = lambda m: report_stats(m, show_stats, stats_out)
    app = create_app(engine, sampling, api_key=api_key, max_body=limit, cors_origins=cors_origins)
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10,
                                    lifespan="off"), engine)
    engine.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises a caught SIGINT/SIGTERM after its graceful shutdown; with these
    # handlers in place that is a no-op and the command exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"localmoe serve: http://{shown}:{sock.getsockname()[1]}/ (loading the model; "
               "/health says ok when it is ready)", err=True)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    if engine.fatal is not None:
        raise LocalMoEError(engine.error)
    click.echo("localmoe serve: stopped", err=True)


class _Server(uvicorn.Server):
    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.cancel_all()  # running streams end at their next token, so shutdown is quick
        super().handle_exit(sig, frame)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    from localmoe.errors import LocalMoEError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise LocalMoEError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    if sys.platform != "win32":
        sock.setblocking(False)
    return sock

"""`showo serve`: load the model once and serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from ..cli_common import QBitsOption, QGroupSizeOption, QHeadBitsOption, QuantizeOption, handle_errors, quantize_spec
from ..cli_sources import current_sources, model_sources
from ..errors import ShowoError


class ServerError(ShowoError):
    """The server cannot start (missing extra, port in use, bad option)."""


def register(app: typer.Typer) -> None:
    """Add `showo serve` to the `showo` app. The model options (--model, --dtype, -q, --low-ram) and
    the loader are the other commands' own, so the server loads a model exactly as they do."""
    from .. import cli as commands  # being initialised: the shared options are defined by now

    def serve(
        model: str = commands.Model,
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network (default 127.0.0.1: this machine only)."),
        port: int = typer.Option(8080, "--port", "-p", help="TCP port; 0 = any free port, the chosen one is printed (default 8080)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SHOWO_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on every endpoint (env SHOWO_API_KEY; default: no key)."),
        max_queue: int = typer.Option(8, "--max-queue", help="Requests waiting for the model besides the running one; more get 429 (default 8)."),
        max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body in MB, uploads included; more get 413 (default 32)."),
        max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", help="Largest input image, width × height (default 4096 × 4096)."),
        allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Let chat messages reference http(s) image URLs; off by default."),
        output_dir: Path = typer.Option(Path("showo-outputs"), "--output-dir", help="Where PNGs of response_format=url are written (default ./showo-outputs)."),
        dtype: Optional[str] = commands.Dtype,
        quantize: bool = QuantizeOption,
        q_bits: Optional[int] = QBitsOption,
        q_group_size: Optional[int] = QGroupSizeOption,
        q_head_bits: Optional[int] = QHeadBitsOption,
        low_ram: bool = commands.LowRam,
    ):
        """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/images/...) with a browser page at /."""
        spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
        model = model or commands.DEFAULT_MODEL
        sources = current_sources()  # --adapter-path/--vq/...: read here, the model loads on the worker thread
        run_server(lambda: commands.load_pipeline(model, dtype, spec, low_ram, sources), model=model, host=host, port=port,
                   api_key=api_key, max_queue=max_queue, max_body_mb=max_body_mb, max_image_pixels=max_image_pixels,
                   allow_remote_images=allow_remote_images, output_dir=output_dir)

    app.command("serve", epilog=EXAMPLES)(handle_errors(model_sources(serve), interrupted="stopped"))


EXAMPLES = (  # shown at the end of `showo serve -h`
    "Examples:\n\n"
    "  showo serve --model showlab/show-o\n\n"
    "  showo serve --model showlab/show-o --port 9000 --api-key secret\n\n"
    "  showo serve --model ./show-o-4bit --max-queue 2 --low-ram\n\n"
    "  showo serve --model showlab/show-o --adapter-path runs/my_lora/adapters\n"
)


def run_server(load_model: Callable[[], object], *, model: str, host: str, port: int, api_key: str | None, max_queue: int,
               max_body_mb: float, max_image_pixels: int, allow_remote_images: bool, output_dir: Path) -> None:
    """Bind, load the model on the worker thread, serve until Ctrl-C."""
    try:
        import uvicorn

        from .app import ServerOptions, create_app
        from .work_queue import WorkQueue
    except ImportError as e:
        raise ServerError(f"showo serve needs the server extra ({e.name} is missing): pip install 'showo-mlx[server]'") from None
    if max_queue < 0 or max_body_mb <= 0 or max_image_pixels < 1:
        raise ServerError("--max-queue must be >= 0, --max-body-mb > 0 and --max-image-pixels >= 1")
    sock = _bind(host, port)  # before loading gigabytes: a busy port fails at once
    log = _logger()
    start = time.perf_counter()
    log(f"loading {model} …")
    work = WorkQueue(load_model, max_queue=max_queue, log=log)
    try:
        pipe = work.start()
    except BaseException:
        sock.close()
        raise
    log(f"loaded {pipe.name} ({pipe.resolution}x{pipe.resolution} images, {pipe.cfg.num_hidden_layers} layers) "
        f"in {time.perf_counter() - start:.1f} s")
    options = ServerOptions(
        model_id=model, api_key=api_key, max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels,
        allow_remote_images=allow_remote_images, output_dir=output_dir.expanduser().resolve(), log=log)
    app = create_app(work, options)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log(f"serving {model} on http://{shown}:{bound_port} (page: /, API: /v1; queue {max_queue}"
        f"{', API key required' if api_key else ''}); Ctrl-C stops")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        work.close()
        sock.close()
    log("stopped")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _logger():
    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    return log

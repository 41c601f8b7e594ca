"""`poetgen serve`: the HTTP API and the web page (poetgen.serving)."""

from __future__ import annotations

from typing import List, Optional

import typer

from poetgen.cli.common import handles_errors


@handles_errors
def serve(
    checkpoint: Optional[List[str]] = typer.Option(
        None, "--checkpoint", "-c",
        help="A model to serve: checkpoint file, run directory or shipped name; repeat for more (requests pick one "
        "by name, the first of its kind is the default). A pair (对句) model, trained on a `prepare --pairs` "
        "dataset, answers POST /v1/couplets (it runs in torch). Default: the shipped tang model, else the newest "
        "run in ./checkpoints.",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    max_batch: int = typer.Option(
        64, "--max-batch", help="Most poems decoded together in one model step; for a couplet request, its first "
        "lines x n (or x beam)."
    ),
    queue: int = typer.Option(64, "--queue", help="Requests that may wait per model; more are answered 503."),
    max_n: int = typer.Option(
        16, "--max-n", help="Most poems (couplets: answers per first line) one request may ask for (n)."
    ),
    max_length: int = typer.Option(
        1000, "--max-length", help="Most characters per poem (couplets: per first line) a request may ask for."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds a request may take; then it is stopped (503)."),
    max_body: int = typer.Option(16384, "--max-body", help="Bytes a request body may have; more are refused (413)."),
    cors: Optional[List[str]] = typer.Option(
        None, "--cors", metavar="ORIGIN", help="Let web pages from ORIGIN call the API (repeatable). Default: none."
    ),
    threads: int = typer.Option(
        1, "--threads",
        help="CPU threads for the matrix products (default 1: HTTP needs a core too, and beside other work more "
        "threads stall); 0: chosen while serving by timing the steps.",
    ),
) -> None:
    """Serve poems over HTTP: a JSON API (POST /v1/poems, streamed GET /v1/poems/stream, POST /v1/couplets with a
    pair model, GET /v1/models) and a web page at /. Models are loaded once; poem requests that arrive together are
    decoded together, one batch per step.

    Example:

        poetgen serve -c tang -c checkpoints/couplets --port 8000
    """
    for flag, value in (("--max-batch", max_batch), ("--queue", queue), ("--max-n", max_n),
                        ("--max-length", max_length), ("--max-body", max_body)):
        if value < 1:
            raise typer.BadParameter(f"{flag} must be at least 1, got {value}")
    if threads < 0:
        raise typer.BadParameter(f"--threads must be 0 (tuned) or more, got {threads}")
    if not timeout > 0:
        raise typer.BadParameter(f"--timeout must be positive, got {timeout}")
    from poetgen.serving.batcher import Limits
    from poetgen.serving.server import run

    run(list(checkpoint or []), host, port, Limits(max_batch, queue, max_n, max_length, timeout), max_body,
        list(cors or []), threads or None)

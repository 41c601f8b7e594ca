"""`poetgen serve`'s library side: load the models, build the app, run uvicorn until interrupted.

Why FastAPI on uvicorn: request models that pydantic validates before a handler sees them (and an OpenAPI schema
from the same declarations), Server-Sent Events through Starlette's StreamingResponse, and uvicorn's single-process
asyncio server, which is what a server around one batching thread per model wants (workers in several processes
would each hold the models and batch apart).
"""

from __future__ import annotations

import logging
import sys

from poetgen.serving.batcher import Limits

log = logging.getLogger("poetgen.serve")


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run(checkpoints: list[str], host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
        max_body: int = 16384, cors: list[str] | None = None, threads: int | None = None) -> None:
    """Serve until interrupted. ``checkpoints``: paths, run directories or shipped names, each loaded once (none:
    the shipped tang model, else the newest run); a pair (对句) checkpoint answers POST /v1/couplets. Errors loading
    them are raised before anything listens."""
    import uvicorn

    from poetgen.serving.app import create_app
    from poetgen.serving.models import load_models

    _log_to_stderr()
    models, notes = load_models(checkpoints, limits or Limits(), threads)
    for note in notes:
        log.info("%s", note)
    for m in models:
        log.info("Model %s (%s): %s (vocabulary %d)", m.name, m.kind, m.path, len(m.opened.vocab))
    app = create_app(models, max_body=max_body, cors=cors)
    log.info("Serving on http://%s:%d/ (Ctrl-C stops)", host if ":" not in host else f"[{host}]", port)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=2, lifespan="off")
    try:
        uvicorn.Server(config).run()
    finally:
        for m in models:
            m.batcher.stop()

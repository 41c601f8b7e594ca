"""The HTTP API and the web page as an ASGI app: FastAPI (request models validated by pydantic, an OpenAPI schema at
/openapi.json) on Starlette; uvicorn runs it (poetgen.serving.server).

Routes: ``POST /v1/poems`` (JSON options -> poems), ``GET /v1/poems/stream`` (the same options as query parameters
-> one poem as Server-Sent Events, a character per event), ``POST /v1/couplets`` (first lines -> answering lines, from
a pair model), ``GET /v1/models``, ``GET /v1/stats``, ``GET /healthz`` and the page at ``/``. Every error is JSON
``{"error": message}`` with its status: 400 a bad option (the words of `poetgen sample`'s ``Error:``) or a model of
the other kind, 404 an unknown model or route (or no model of the kind asked for), 413 a body over the cap, 503 a
full queue or a request past its time limit, 500 a bug (its traceback goes to the log only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from poetgen.errors import PoetgenError, SampleError
from poetgen.generation.couplet import CoupletOptions
from poetgen.generation.sample import SampleOptions, SampleResult
from poetgen.serving.batcher import Overloaded, TimedOut
from poetgen.serving.couplets import CoupletResult
from poetgen.serving.models import COUPLET, POEM, ServedModel

log = logging.getLogger("poetgen.serve")
PAGE = Path(__file__).with_name("page.html")
GRACE = 5.0  # seconds past --timeout after which a handler stops waiting for the batcher
DRAIN_BYTES = 4 * 2**20  # an oversized body up to this size is read and dropped before the 413 (see BodyLimit)


class PoemRequest(BaseModel):
    """The options of `poetgen sample`, by the same names (flags' dashes as underscores; -n is ``n``) and meanings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="A loaded model's name (GET /v1/models); default: the first")
    prime: str = Field("", description="Text to start from")
    form: str | None = Field(None, description="五绝 七绝 五律 七律 (or wujue qijue wulv qilv)")
    acrostic: str | None = Field(None, description="藏头诗: line i starts with the i-th character")
    line_length: int | None = Field(None, description="5 or 7, for an acrostic without a form")
    style: str | None = Field(None, description="Hidden prefix: sets the mood, is not printed")
    rhyme: bool = Field(False, description="Even lines end in level characters of one rhyme group")
    rhyme_book: str = Field("pingshui", description="pingshui (平水韵) or xinyun (中华新韵)")
    rhyme_group: str | None = Field(None, description="Rhyme in this level group (东, 上平一东)")
    tones: bool = Field(False, description="Follow one of the form's regulated tone patterns (格律)")
    pattern: str | None = Field(None, description="With tones, this pattern (仄起首句不入韵 ...)")
    temperature: float = Field(0.8, description="Higher is bolder; 0 is greedy")
    top_k: int | None = Field(None, description="Sample among the k likeliest symbols only")
    top_p: float | None = Field(None, description="Nucleus sampling")
    repetition_penalty: float = Field(1.0, description="Divide the probability of characters already used")
    seed: int | None = Field(None, description="Same seed and options, same poem; default: random, reported")
    n: int = Field(1, description="Poems to write")
    best_of: int = Field(1, description="Draw this many candidates per poem, keep the best")
    beam: int = Field(0, description="Beam search with this many hypotheses; 0: sample")
    output_script: str | None = Field(None, description="simplified or traditional")
    length: int | None = Field(None, description="Most characters per poem (a form sets its own)")

    def options(self) -> SampleOptions:
        blank = lambda v: v or None  # noqa: E731 - a form field left empty on the page means "none"
        return SampleOptions(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, length=self.length, num_samples=self.n, seed=self.seed,
            form=blank(self.form), acrostic=blank(self.acrostic), line_length=self.line_length, rhyme=self.rhyme,
            rhyme_book=self.rhyme_book, rhyme_group=blank(self.rhyme_group), tones=self.tones,
            pattern=blank(self.pattern), style=blank(self.style), output_script=blank(self.output_script),
            best_of=self.best_of, beam=self.beam)


class CoupletRequest(BaseModel):
    """The options of `poetgen sample -c PAIR_CKPT` (an encoder-decoder answers each first line), by the same names
    and meanings; ``primes`` stands for --primes-file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="A loaded pair model's name (GET /v1/models); default: the first")
    prime: str | None = Field(None, description="The first line (出句 / 上联) to answer, e.g. 白日依山尽")
    primes: list[str] | None = Field(None, description="Several first lines, answered together (instead of prime)")
    temperature: float = Field(0.8, description="Higher is bolder; 0 is greedy")
    top_k: int | None = Field(None, description="Sample among the k likeliest characters only")
    top_p: float | None = Field(None, description="Nucleus sampling")
    seed: int | None = Field(None, description="Same seed and options, same answers; default: random, reported")
    n: int = Field(1, description="Answers per first line (with beam: the n best hypotheses)")
    beam: int = Field(0, description="Beam search with this many hypotheses per first line; 0: sample")
    tones: bool = Field(False, description="Tones opposed at positions 2, 4, 6 and a level (平) end")
    rhyme_book: str = Field("pingshui", description="pingshui (平水韵) or xinyun (中华新韵), for tones")

    def first_lines(self) -> list[str]:
        if self.prime is not None and self.primes is not None:
            raise SampleError("give prime or primes, not both")
        return list(self.primes) if self.primes is not None else [] if self.prime is None else [self.prime]

    def options(self) -> CoupletOptions:
        return CoupletOptions(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, num_samples=self.n,
                              seed=self.seed, beam=self.beam, tones=self.tones, rhyme_book=self.rhyme_book)


class UnknownModel(PoetgenError):
    """404."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status(e: Exception) -> int:
    if isinstance(e, UnknownModel):
        return 404
    if isinstance(e, (Overloaded, TimedOut)):
        return 503
    if isinstance(e, PoetgenError):
        return 400
    return 500


def _validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one line: ``temperature: Input should be a valid number``; ``unknown option 'x'``."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query")]
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown option {'.'.join(loc)!r}")
        elif e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "model_attributes_type":
            parts.append("the body must be a JSON object of options")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "bad request"


def couplet_json(served: ServedModel, result: CoupletResult) -> dict:
    """The answer of POST /v1/couplets: per first line, its answers as `poetgen sample --json` writes them."""
    return {"model": served.name, "seed": result.seed,
            "answers": [[{**a.record(), "rank": k} for k, a in enumerate(group)] for group in result.answers],
            "notes": result.notes, "seconds": round(result.seconds, 4)}


def poem_json(served: ServedModel, result: SampleResult) -> dict:
    """The answer of POST /v1/poems (and the ``done`` event of the stream)."""
    records = result.records()
    poems = [{"prime": r["prime"], "text": r["text"], "generated": s.generated, "mean_logprob": r["mean_logprob"],
              "tokens": r["tokens"], "ended": r["ended"]} for r, s in zip(records, result.samples)]
    return {"model": served.name, "seed": result.seed, "poems": poems,
            "settings": records[0]["settings"] if records else {}, "notes": result.notes,
            "seconds": round(result.seconds, 4)}


def create_app(models: list[ServedModel], max_body: int = 16384, cors: list[str] | None = None) -> Any:
    """The ASGI app over models already loaded (the first is the default). ``max_body``: bytes a request body may
    have (413 past it); ``cors``: origins allowed to call the API from a browser (none by default)."""
    app = FastAPI(title="poetgen", version="1", docs_url=None, redoc_url=None,  # /docs would load assets off-site
                  description="Poems and couplets (对句) from poetgen's models. Errors are {\"error\": message}.")
    by_name = {m.name: m for m in models}
    default = {kind: next((m for m in models if m.kind == kind), None) for kind in (POEM, COUPLET)}

    def pick(name: str | None, kind: str) -> ServedModel:
        """The model a request names (default: the first of the endpoint's kind)."""
        if not name:
            if default[kind] is None:
                raise UnknownModel(_none_of(kind))
            return default[kind]  # type: ignore[return-value]
        if name not in by_name:
            raise UnknownModel(f"no model named {name!r} on this server (loaded: {', '.join(by_name)})")
        if by_name[name].kind != kind:
            raise SampleError(_other_kind(name, kind))
        return by_name[name]

    @app.exception_handler(PoetgenError)
    async def _library_error(request: Request, e: PoetgenError) -> JSONResponse:
        return error(_status(e), str(e), {"Retry-After": "1"} if isinstance(e, Overloaded) else None)

    @app.exception_handler(asyncio.TimeoutError)
    async def _late_answer(request: Request, e: asyncio.TimeoutError) -> JSONResponse:
        return error(503, _late())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, _validation_message(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such page: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error(e.status_code, message.get(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, ClientDisconnect):  # gone, or cut off by BodyLimit: nobody reads this answer
            return error(400, "the client went away")
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(e).__name__}); the server's log has the details")

    async def submit(served: ServedModel, req: PoemRequest, on_piece: Any = None) -> tuple[Any, asyncio.Future]:
        future, done = _answer_slot()
        options = req.options()
        if served.batcher.plans_quickly(req.prime, options):  # the common case: no hop to a worker thread
            return served.batcher.submit(req.prime, options, done, on_piece), future
        # Planning builds the form's masks (milliseconds, more on a first rhyme book): off the event loop.
        job = await run_in_threadpool(served.batcher.submit, req.prime, options, done, on_piece)
        return job, future

    @app.post("/v1/poems", summary="Write poems", openapi_extra=_body_schema(PoemRequest))
    async def poems(request: Request) -> dict:
        req = await _options(request, PoemRequest)
        served = pick(req.model, POEM)
        job, future = await submit(served, req)
        return poem_json(served, await _answer(served, job, future))

    @app.get("/v1/poems/stream", summary="Write one poem, streamed as Server-Sent Events")
    async def stream(req: Annotated[PoemRequest, Query()]) -> StreamingResponse:
        if req.n != 1 or req.best_of != 1 or req.beam:
            raise SampleError("the stream writes one poem as it is drawn: use it without n, best_of or beam")
        served = pick(req.model, POEM)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job, future = await submit(served, req, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        future.add_done_callback(lambda f: pieces.put_nowait(None))

        async def events():
            try:
                yield _event("start", {"model": served.name, "seed": job.seed})
                deadline = loop.time() + served.batcher.limits.timeout + GRACE
                while True:
                    try:
                        text = await asyncio.wait_for(pieces.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        yield _event("error", {"error": _late()})
                        return
                    if text is None:
                        break
                    if text:  # (an empty prime)
                        yield _event(None, {"text": text})
                e = future.exception()
                yield _event("error", {"error": str(e)}) if e else _event("done", poem_json(served, future.result()))
            finally:
                job.cancel()  # the client went away mid-poem; nothing once the job is over

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", summary="The models this server holds")
    async def list_models() -> dict:
        # default: what POST /v1/poems uses without a model; default_couplet: what POST /v1/couplets uses.
        return {"default": getattr(default[POEM], "name", None),
                "default_couplet": getattr(default[COUPLET], "name", None),
                "models": [m.describe() for m in models]}

    @app.get("/v1/stats", summary="Batching counters per model")
    async def stats() -> dict:
        return {"models": {m.name: {**m.batcher.stats.to_dict(), "waiting": m.batcher.waiting(),
                                    "active_rows": m.batcher.active_rows()} for m in models}}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok", "models": [m.name for m in models]}

    @app.post("/v1/couplets", summary="Answer first lines (对句) with a pair model",
              openapi_extra=_body_schema(CoupletRequest))
    async def couplets(request: Request) -> dict:
        req = await _options(request, CoupletRequest)
        served = pick(req.model, COUPLET)
        future, done = _answer_slot()
        # Checking is cheap (no masks built yet): on the event loop. Decoding runs in the model's worker thread.
        job = served.batcher.submit(req.first_lines(), req.options(), done)
        return couplet_json(served, await _answer(served, job, future))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    asgi: Any = app
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        asgi = CORSMiddleware(asgi, allow_origins=list(cors), allow_methods=["GET", "POST"],
                              allow_headers=["Content-Type"])
    return AccessLog(BodyLimit(asgi, max_body))


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _answer_slot() -> tuple[asyncio.Future, Any]:
    """A future on this event loop, and the ``on_done(result, error)`` that settles it once from any thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, e: Exception | None) -> None:
        if not future.done():
            future.set_exception(e) if e is not None else future.set_result(result)

    return future, lambda result, e: loop.call_soon_threadsafe(settle, result, e)


async def _answer(served: ServedModel, job: Any, future: asyncio.Future) -> Any:
    """The request's result (or its error, raised). Its decoder answers by its own --timeout; a little later than
    that, the handler stops waiting anyway; a client gone or a handler that gave up cancels the job."""
    try:
        return await asyncio.wait_for(future, served.batcher.limits.timeout + GRACE)
    except (asyncio.CancelledError, asyncio.TimeoutError):
        job.cancel()
        raise


async def _options(request: Request, model: type[BaseModel]) -> Any:
    """A request body as ``model``: read here rather than declared, so that it is JSON whatever its Content-Type
    says (curl -d). SampleError (400) with pydantic's complaint in one line."""
    try:
        raw = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError(f"the body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SampleError("the body must be a JSON object of options")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise SampleError(_validation_message(list(e.errors()))) from None


def _none_of(kind: str) -> str:
    if kind == COUPLET:
        return ("no pair (对句) model on this server: start poetgen serve with -c PAIR_CKPT (a checkpoint trained on a "
                "pair dataset, see poetgen prepare --pairs) to answer first lines; write poems with POST /v1/poems")
    return ("no poem model on this server, only pair (对句) models: answer first lines with POST /v1/couplets, or "
            "start poetgen serve with -c for a poem model too")


def _other_kind(name: str, kind: str) -> str:
    if kind == COUPLET:
        return f"model {name!r} writes poems, not couplets: ask it with POST /v1/poems (or GET /v1/poems/stream)"
    return f"model {name!r} is a pair (对句) model, which answers a first line: ask it with POST /v1/couplets"


def _late() -> str:
    return "the request took longer than the server's --timeout and was stopped"


def _event(name: str | None, data: dict) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


class BodyLimit:
    """413 for a request body over ``max_bytes``: by its Content-Length before anything is read, else (chunked) as
    soon as the bytes read pass it."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_long = f"the request body is over {self.max_bytes:,} bytes (--max-body)"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                # Read (and drop) the body first: closing on a client still sending makes its kernel reset the
                # connection, and the client may never read the answer.
                message = {"more_body": True}
                while message.get("more_body") and message.get("type") != "http.disconnect":
                    message = await receive()
            return await _send_json(send, 413 if length.isdigit() else 400,
                                    too_long if length.isdigit() else "bad Content-Length")
        total, started, refused = 0, False, False

        async def limited() -> dict:
            # Past the cap: answer 413 now, and tell the app the client has gone (it stops reading; what it would
            # still send is dropped).
            nonlocal total, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    refused = True
                    if not started:
                        await _send_json(send, 413, too_long)
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, watched)


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One log line per request when its answer ends: method, path, status, milliseconds."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, 1000 * (time.perf_counter() - t0))

"""The REST API of ``seq2seq serve`` and its page, on FastAPI; ``run_server`` runs it on uvicorn.

    GET  /                       the page (``page.html``): translate, n-best, attention heatmap
    GET  /health                 200 once the models are loaded, 503 before
    GET  /v1/models              each model's languages, architecture and decoding defaults
    POST /v1/translate           {"model"?, "text": str | [str], "beam"?, "n_best"?,
                                  "return_attention"?, "return_tokens"?}
    POST /translator/translate   OpenNMT-py's request and response shape
    GET  /openapi.json           the OpenAPI description (no /docs: Swagger UI would load from a CDN)

Each model has one ``worker.DecodingWorker``: sentences of concurrent requests are decoded
together. Errors are ``{"error": {"code", "message"}}`` with 400 (malformed, unknown Host),
401 (key), 404 (unknown model or path), 408 (body too slow), 413 (over a limit, naming the
flag), 503 (loading, queue full, worker stopped, shutting down) or 504 (timed out); a fault of
the server is a 500 whose body names no internals.

Each request is bounded before it is decoded (``settings.ServeConfig``: sentences, characters,
decoding cost, attention cells, beam, n-best), and while it runs: a request that times out
(504) or whose client hangs up is cancelled, and its batch stops at the next step when no live
request is left in it. Results are built in a thread pool, off the event loop. Every response
carries a Content-Security-Policy (the page's inline script and style by hash), nosniff and
frame headers; a request whose Host is not allowed (``--allowed-hosts``) gets 400. Connections
that send their headers or body too slowly are closed (``--header-timeout``, 408 after
``--body-timeout``), and SIGTERM answers what is left after ``--drain-timeout``.

FastAPI and uvicorn come with the ``serve`` extra; without them ``settings.require_extra``
says what to install.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from seq2seq.config import ConfigError
from seq2seq.decoding.translator import Translator
from seq2seq.serving.results import content_security_policy, json_score, page_html, sentence_result
from seq2seq.serving.settings import ServeConfig
from seq2seq.serving.worker import DecodeOptions, DecodingWorker, Job, QueueFull, WorkerStopped

log = logging.getLogger("seq2seq.serving")

OPEN_PATHS = frozenset({"/health", "/", "/openapi.json"})


class ApiError(Exception):
    """An error response: HTTP ``status``, a short ``code`` and a message naming the field or limit."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# -- request bodies ---------------------------------------------------------------------------
class TranslateRequest(BaseModel):
    """POST /v1/translate. A string ``text`` is split into lines, one result each."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = Field(None, description="a served model's name (default: the first)")
    text: StrictStr | list[StrictStr] = Field(description="one sentence a line, or a list of sentences")
    beam: StrictInt | None = Field(None, description="beam size; 1 is greedy (default: the model's)")
    n_best: StrictInt | None = Field(None, description="alternatives per sentence, at most beam")
    return_attention: StrictBool = Field(False, description="one row per target token, one column per "
                                                            "source token, eos included")
    return_tokens: StrictBool = Field(False, description="source_tokens and target_tokens")


class OpenNMTItem(BaseModel):
    """One element of OpenNMT-py's request: ``src`` text and the model ``id``."""

    model_config = ConfigDict(extra="ignore")
    src: StrictStr
    id: StrictInt | StrictStr | None = None


# -- the served models ------------------------------------------------------------------------
@dataclass
class Served:
    """One served model: its name, its translator and the worker that decodes for it."""

    name: str
    translator: Translator
    worker: DecodingWorker

    def info(self) -> dict[str, Any]:
        config = self.translator.config
        decode, rnn = config.decode, config.model.arch == "rnn"
        return {"name": self.name, "source_language": config.data.src_lang,
                "target_language": config.data.tgt_lang, "arch": config.model.arch,
                "cell": config.model.cell if rnn else "transformer",
                "attention": config.model.attention if rnn else "multi-head",
                "parameters": self.translator.model.num_parameters(),
                # an ensemble (Translator.load_ensemble): its members' folders, in order
                **({"ensemble": [str(d) for d in self.translator.model_dirs]}
                   if hasattr(self.translator, "model_dirs") else {}),
                "decode": {"beam": decode.beam, "n_best": decode.n_best,  # validated <= beam
                           "length_penalty": decode.length_penalty, "max_len_ratio": decode.max_len_ratio,
                           "precision": config.decode.precision, "quantize": decode.quantize,
                           "device": str(self.translator.device)}}


class Models:
    """The served models, loaded in a background thread so that /health can say 503 meanwhile."""

    def __init__(self, loaders: dict[str, Callable[[], Translator]], config: ServeConfig,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        if not loaders:
            raise ValueError("no model to serve")
        self.loaders, self.config, self.on_error = loaders, config, on_error
        self.served: dict[str, Served] = {}
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.default = next(iter(loaders))

    def load(self) -> None:
        try:
            for name, loader in self.loaders.items():
                translator = loader()
                if translator.config.decode.beam > self.config.max_beam:
                    raise ConfigError(f"model {name!r}: its beam ({translator.config.decode.beam}) is "
                                      f"more than --max-beam ({self.config.max_beam})")
                worker = DecodingWorker(translator, max_batch=translator.config.decode.batch_size,
                                        max_wait_ms=self.config.max_wait_ms,
                                        max_queue=self.config.max_queue, name=name,
                                        max_attention_cells=self.config.max_attention_cells).start()
                self.served[name] = Served(name, translator, worker)
                log.info("model %r loaded", name)
        except BaseException as error:  # reported by /health and the command
            self.error = error
            log.error("seq2seq serve: loading failed: %s", error)
            if self.on_error is not None:
                self.on_error(error)
            return
        self.ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers: what is queued is decoded, unless its requests are gone (then the
        batch stops at its next step); a worker still busy after ``timeout`` (in an encoder
        pass, which cannot be cut) is left running, and ``run_server`` ends the process."""
        deadline = time.monotonic() + timeout
        for served in self.served.values():
            served.worker.stop(timeout=max(0.0, deadline - time.monotonic()))
            if served.worker.busy:
                log.warning("model %r: its decoding worker was still busy at exit", served.name)

    def get(self, name: str | None, field: str = "model") -> Served:
        if not self.ready.is_set():
            raise ApiError(503, "loading", "the models are still loading" if self.error is None
                           else f"the models failed to load: {self.error}", {"Retry-After": "1"})
        name = self.default if name is None else name
        if name not in self.served:
            raise ApiError(404, "unknown_model", f"{field}: no model named {name!r}; served: "
                           f"{', '.join(self.served)}")
        return self.served[name]


# -- checks of one request --------------------------------------------------------------------
def _sentences(text: str | list[str], config: ServeConfig, translator: Translator,
               field: str = "text") -> tuple[list[str], list[list[int]]]:
    """A request's sentences, checked against the limits, and their source ids (encoded once,
    here: the token limit is checked on them, and the worker decodes them)."""
    lines = _lines(text) if isinstance(text, str) else text
    if not lines:
        raise ApiError(400, "invalid_request", f"{field}: an empty list; give at least one sentence")
    if len(lines) > config.max_sentences:
        raise ApiError(413, "over_limit", f"{field}: {len(lines)} sentences, more than the limit of "
                       f"{config.max_sentences} per request (--max-sentences)")
    sources = []
    for n, line in enumerate(lines):
        where = f"{field}[{n}]" if isinstance(text, list) else f"{field} line {n + 1}"
        _check_text(line, where)
        if len(line) > config.max_chars:
            raise ApiError(413, "over_limit", f"{where}: {len(line)} characters, more than the limit "
                           f"of {config.max_chars} (--max-chars)")
        try:
            sources.append(translator.encode_source(line, where))
        except ValueError as error:  # more tokens than the model's decode.max_input_len
            raise ApiError(413, "over_limit", str(error)) from None
    return lines, sources


def _lines(text: str) -> list[str]:
    """A text's lines, split at "\n" alone (a final one ends the last line); "" is one line."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _check_text(line: str, where: str) -> None:
    if "\x00" in line:
        raise ApiError(400, "invalid_text", f"{where}: contains a NUL character")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, "invalid_text", f"{where}: a lone surrogate at character {error.start} "
                       f"(\\u{ord(line[error.start]):04x}) is not text") from None


def _options(served: Served, beam: int | None, n_best: int | None, attention: bool,
             config: ServeConfig) -> DecodeOptions:
    decode = served.translator.config.decode
    beam = decode.beam if beam is None else beam
    if beam < 1:
        raise ApiError(400, "invalid_request", f"beam: must be >= 1, got {beam}")
    if beam > config.max_beam:
        raise ApiError(413, "over_limit", f"beam: {beam} is more than the limit of {config.max_beam} "
                       f"(--max-beam)")
    n_best = min(decode.n_best, beam, config.max_n_best) if n_best is None else n_best
    if not 1 <= n_best <= beam:
        raise ApiError(400, "invalid_request", f"n_best: must be between 1 and beam ({beam}), got {n_best}")
    if n_best > config.max_n_best:
        raise ApiError(413, "over_limit", f"n_best: {n_best} is more than the limit of "
                       f"{config.max_n_best} (--max-n-best)")
    if attention and served.translator.config.model.attention is None:
        raise ApiError(400, "invalid_request", f"return_attention: model {served.name!r} has no attention")
    return DecodeOptions(beam=beam, n_best=n_best, attention=attention)


def _check_cost(served: Served, sources: list[list[int]], options: DecodeOptions, config: ServeConfig,
                field: str = "text") -> None:
    """413 naming the flag when decoding ``sources`` could cost more than the server allows:
    target tokens (output-length limit x beam, summed over the sentences) and, when the
    attention is returned, its cells (output-length limit x source tokens, summed). The
    output-length limit is ``search.max_output_lengths``'s: ratio x source tokens + 5, eos included."""
    ratio = served.translator.config.decode.max_len_ratio
    decoded = [ids for ids in sources if len(ids) > 1]  # eos alone is answered without decoding
    limits = [math.ceil(len(ids) * ratio) + 5 for ids in decoded]
    tokens = options.beam * sum(limits)
    what = f"{len(sources)} sentence{'s' if len(sources) != 1 else ''}"
    if tokens > config.max_decode_tokens:
        raise ApiError(413, "over_limit", f"{field}: decoding these {what} may take {tokens:,} target "
                       f"tokens (output-length limit x beam {options.beam}, summed), more than the "
                       f"limit of {config.max_decode_tokens:,} (--max-decode-tokens); send fewer or "
                       f"shorter sentences, or a smaller beam")
    if options.attention:
        cells = sum(limit * len(ids) for limit, ids in zip(limits, decoded))
        if cells > config.max_attention_cells:
            raise ApiError(413, "over_limit", f"return_attention: the attention of these {what} may "
                           f"take {cells:,} cells (output-length limit x source tokens, summed), more "
                           f"than the limit of {config.max_attention_cells:,} (--max-attention-cells); "
                           f"ask for it with fewer or shorter sentences")


async def _decode(request: Request, served: Served, sources: list[list[int]], options: DecodeOptions,
                  config: ServeConfig) -> Job:
    """Queue the sentences (their ids) on the model's worker and wait for their hypotheses,
    until the timeout (504), the client hangs up, or the drain deadline of a SIGTERM (503).
    Whichever comes first, a request that gets no result is cancelled in the worker."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Job] = loop.create_future()

    def resolve(job: Job) -> None:
        if not future.done():
            future.set_result(job)

    try:
        job = served.worker.submit(sources, options, lambda job: loop.call_soon_threadsafe(resolve, job),
                                   timeout=config.timeout)
    except QueueFull as error:
        raise ApiError(503, "queue_full", f"{error} (--max-queue); retry later",
                       {"Retry-After": "1"}) from None
    except WorkerStopped as error:
        raise ApiError(503, "shutting_down", str(error)) from None
    drain: Drain = request.app.state.drain
    hung_up = asyncio.ensure_future(_hung_up(request))
    draining = asyncio.ensure_future(drain.answer_now.wait())
    try:
        await asyncio.wait({future, hung_up, draining}, timeout=config.timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up.cancel()
        draining.cancel()
        if not future.done():  # timed out, hung up, draining, or this task was cancelled
            served.worker.cancel(job)
            log.info("model %r: a request of %d sentences cancelled (%s)", served.name, len(sources),
                     "client hung up" if hung_up.done() and not hung_up.cancelled() else "no result in time")
    if not future.done():
        if hung_up.done() and not hung_up.cancelled():
            raise ApiError(400, "disconnected", "the client hung up before the result")
        if drain.answer_now.is_set():
            raise ApiError(503, "shutting_down", f"the server is shutting down: no result within its "
                           f"drain time ({config.drain_timeout:g} s, --drain-timeout)")
        raise ApiError(504, "timeout", f"no result within {config.timeout:g} s (--timeout)")
    if job.error is not None:
        if isinstance(job.error, WorkerStopped):
            raise ApiError(503, "worker_stopped", str(job.error))
        log.error("decoding failed", exc_info=job.error)
        raise ApiError(500, "internal", "decoding failed; see the server's log")
    return job


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects. The body was read (``RequestGuard``), so the next
    message the server gives is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Drain:
    """SIGTERM's deadline: ``start`` (from the signal handler) sets ``answer_now`` after the
    drain time less a second, and cuts the bodies still being read to it, so that every
    request is answered before uvicorn's graceful shutdown would cancel it (with a traceback)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.answer_now = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.at: float | None = None  # loop time of the deadline, once draining
        self.reading: set[asyncio.Timeout] = set()  # bodies being read (RequestGuard)

    def start(self) -> None:
        """Thread- and signal-safe: schedules the deadline on the server's loop."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        if self.at is not None or self.loop is None:
            return
        self.at = self.loop.time() + max(self.seconds - 1.0, self.seconds / 2)
        self.loop.call_at(self.at, self.answer_now.set)
        for reading in self.reading:
            self.cut(reading)

    def seconds_left(self, otherwise: float = 5.0) -> float:
        """Seconds to the end of the drain time once draining (half a second at least), else
        ``otherwise``."""
        if self.at is None or self.loop is None:
            return otherwise
        return max(0.5, self.at + 1.0 - self.loop.time())

    def cut(self, reading: asyncio.Timeout) -> None:
        """Bring a body read's deadline forward to the drain deadline."""
        if self.at is not None and (reading.when() is None or reading.when() > self.at):
            reading.reschedule(self.at)


def _json_bytes(value: Any) -> bytes:
    """What JSONResponse sends, built by the caller's thread."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


# -- the application --------------------------------------------------------------------------
def create_app(loaders: dict[str, Callable[[], Translator]], config: ServeConfig | None = None,
               api_key: str | None = None,
               on_load_error: Callable[[BaseException], None] | None = None,
               host: str = "127.0.0.1", security_headers: bool = True) -> FastAPI:
    """The app serving ``loaders`` (name -> a function that loads that model). Loading starts
    in a background thread at startup; the first name is the default model.

    ``host``: the address the server binds, for the default of ``--allowed-hosts``.
    ``security_headers``: add them to every response here (``run_server`` has uvicorn add them
    instead, so that its own answers carry them too); ``headers(app)`` lists them.
    """
    config = (config or ServeConfig()).validate()
    models = Models(loaders, config, on_load_error)
    page = page_html()
    drain = Drain(config.drain_timeout)
    results_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="results")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        drain.loop = asyncio.get_running_loop()
        threading.Thread(target=models.load, name="load-models", daemon=True).start()
        yield
        models.stop(timeout=drain.seconds_left())
        results_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="seq2seq", summary="Translate with RNN encoder-decoder models", version="1",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.models, app.state.drain, app.state.config = models, drain, config
    app.state.headers = [("Content-Security-Policy", content_security_policy(page)),
                         ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                         ("Referrer-Policy", "no-referrer")]
    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=api_key,
                       allowed_hosts=config.hosts_for(host), body_timeout=config.body_timeout, drain=drain)
    if security_headers:
        app.add_middleware(SecurityHeaders, headers=app.state.headers)
    _error_handlers(app)

    async def off_the_loop(build: Callable[[], Any]) -> Response:
        """``build()``'s JSON, made in the results pool: a large result does not stall the loop."""
        body = await asyncio.get_running_loop().run_in_executor(results_pool, lambda: _json_bytes(build()))
        return Response(body, media_type="application/json")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once every model is loaded and its decoding worker runs; 503 before, if loading
        failed, or if a worker stopped. ``workers``: each worker's batch counts."""
        models.get(None)
        for served in models.served.values():
            if not served.worker.alive:
                raise ApiError(503, "worker_stopped", f"model {served.name!r}: its decoding worker "
                               f"stopped ({served.worker.error}); restart the server")
        workers = {name: served.worker.stats() for name, served in models.served.items()}
        return JSONResponse({"status": "ok", "models": list(models.served), "workers": workers})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """Each model's name, languages, cell, attention, parameter count and decoding defaults,
        and the server's limits."""
        models.get(None)
        return {"models": [served.info() for served in models.served.values()], "limits": asdict(config)}

    @app.post("/v1/translate")
    async def translate(body: TranslateRequest, request: Request) -> Response:
        """One result per sentence, in order: translation and score; n_best alternatives;
        source and target tokens and the attention matrix on request."""
        start = time.perf_counter()
        served = models.get(body.model)
        sentences, sources = _sentences(body.text, config, served.translator)
        options = _options(served, body.beam, body.n_best, body.return_attention, config)
        _check_cost(served, sources, options, config)
        job = await _decode(request, served, sources, options, config)

        def build() -> dict[str, Any]:  # not FastAPI's encoder: it would walk every weight again
            results = [sentence_result(served.translator, text, hyps, tokens=body.return_tokens,
                                       attention=body.return_attention)
                       for text, hyps in zip(sentences, job.results)]
            seconds = round(time.perf_counter() - start, 4)
            return {"model": served.name, "results": results, "seconds": seconds}

        return await off_the_loop(build)

    @app.post("/translator/translate")
    async def opennmt_translate(body: list[OpenNMTItem], request: Request) -> Response:
        """OpenNMT-py's REST shape: ``[{"src": text, "id": model}]`` in; one list per n-best rank
        of ``{"src", "tgt", "n_best", "pred_score"}`` out. ``id`` names a served model
        (``--model 100=DIR`` serves one as id 100); without it, the default model."""
        if not body:
            raise ApiError(400, "invalid_request", "body: an empty list; give at least one {\"src\": ...}")
        ids = {item.id for item in body}
        if len(ids) > 1:
            raise ApiError(400, "invalid_request", "id: all items of one request must name the same model")
        model_id = ids.pop()
        served = models.get(None if model_id is None else str(model_id), field="id")
        sentences, sources = _sentences([item.src for item in body], config, served.translator,
                                        field="src")
        options = _options(served, None, None, False, config)
        _check_cost(served, sources, options, config, field="src")
        job = await _decode(request, served, sources, options, config)
        decode = served.translator.tgt_tok.decode
        return await off_the_loop(lambda: [
            [{"src": text, "tgt": decode(hyps[rank].tokens), "n_best": options.n_best,
              "pred_score": json_score(hyps[rank].score)} for text, hyps in zip(sentences, job.results)]
            for rank in range(options.n_best)])

    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", describe_validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal", "internal error; see the server's log")


def describe_validation_error(errors: list[dict[str, Any]]) -> str:
    """One line naming the field: ``text[2]: Input should be a valid string``."""
    if not errors:
        return "invalid request"
    if errors[0]["type"] == "json_invalid":
        position = errors[0]["loc"][-1]
        return f"malformed JSON at character {position}: {errors[0].get('ctx', {}).get('error', 'invalid')}"
    if errors[0]["type"] == "missing" and tuple(errors[0]["loc"]) == ("body",):
        return "body: missing; send a JSON document"

    def where(error: dict[str, Any]) -> tuple[str, int]:
        parts = [p for p in error["loc"][1:] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
        text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        return text or "body", len(parts)

    located = [(where(e), e["msg"]) for e in errors]
    deepest = max(depth for (_, depth), _ in located)  # text[0] says more than text
    field = next(name for (name, depth), _ in located if depth == deepest)
    messages = list(dict.fromkeys(msg for place, msg in located if place == (field, deepest)))
    # a union's alternatives: "Input should be a valid string or a valid list"
    rest = [m.removeprefix("Input should be ") for m in messages[1:]]
    return f"{field}: {' or '.join([messages[0], *rest])}"


_UNION_TAGS = frozenset({"str", "int", "bool", "float", "none", "list", "dict", "function-after"})


class RequestGuard:
    """ASGI middleware run before any route: the Host, the API key, then the body's size, type
    and pace.

    The body is read here in chunks and refused with 413 as soon as it passes
    ``max_body_bytes`` (at once when Content-Length says so), so a huge body is never held;
    one not all sent within ``body_timeout`` seconds gets 408 (503 once SIGTERM's drain
    deadline passes), and the connection is closed.
    """

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None, allowed_hosts: list[str],
                 body_timeout: float, drain: Drain) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.drain = drain
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        refusal = (self._check_host(headers) or self._check_key(scope, headers)
                   or self._check_headers(scope, headers))
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive)
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_host(self, headers: dict[str, bytes]) -> JSONResponse | None:
        if "*" in self.allowed_hosts:
            return None
        given = headers.get("host", b"").decode("latin-1")
        if host_allowed(given, self.allowed_hosts):
            return None
        shown = repr(given[:100]) if given else "missing"
        return error_response(400, "invalid_host", f"Host: {shown} is not a name this server answers to "
                              f"({', '.join(self.allowed_hosts)}); see --allowed-hosts")

    def _check_key(self, scope: dict, headers: dict[str, bytes]) -> JSONResponse | None:
        if self.expected is None or scope["path"] in OPEN_PATHS:
            return None
        given = headers.get("authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return None
        what = "a wrong key" if given else "no Authorization header"
        return error_response(401, "unauthorized", f"Authorization: {what}; send 'Authorization: Bearer "
                              f"<key>' with the key from the server's --api-key-env variable",
                              {"WWW-Authenticate": "Bearer"})

    def _check_headers(self, scope: dict, headers: dict[str, bytes]) -> JSONResponse | None:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid_request", "Content-Length: not a number")
            if int(length) > self.max_body_bytes:
                return self._too_large(int(length))
        kind = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if kind != "application/json":
            return error_response(400, "invalid_content_type", f"Content-Type: {kind or 'missing'}; "
                                  f"send the body as application/json")
        return None

    async def _read_body(self, receive: Callable) -> tuple[bytes, JSONResponse | None]:
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout) as deadline:
                self.drain.reading.add(deadline)
                self.drain.cut(deadline)  # a body begun while draining
                try:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return b"", _DISCONNECTED
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > self.max_body_bytes:
                            return b"", self._too_large(None)
                        chunks.append(chunk)
                        if not message.get("more_body", False):
                            return b"".join(chunks), None
                finally:
                    self.drain.reading.discard(deadline)
        except TimeoutError:
            if self.drain.at is not None:
                return b"", error_response(503, "shutting_down", "body: not all received before the "
                                           "server's drain deadline (--drain-timeout)",
                                           {"Connection": "close"})
            return b"", error_response(408, "timeout", f"body: {size:,} bytes received, not all of it, "
                                       f"within {self.body_timeout:g} s (--body-timeout)",
                                       {"Connection": "close"})

    def _too_large(self, length: int | None) -> JSONResponse:
        size = f"{length:,} bytes, more" if length is not None else "more"
        return error_response(413, "over_limit", f"body: {size} than the limit of {self.max_body_bytes:,} "
                              f"bytes (--max-body-bytes)", {"Connection": "close"})


def host_allowed(host_header: str, allowed: list[str]) -> bool:
    """Whether a Host header (``name``, ``name:port``, ``[v6]:port``) names an allowed host:
    equal to one, or under a ``*.domain`` one; "*" allows any."""
    if "*" in allowed:
        return True
    value = host_header.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        name = value[1:value.find("]")] if "]" in value else ""
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    if not name:
        return False
    return any(name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
               for pattern in allowed)


class SecurityHeaders:
    """ASGI middleware adding ``headers`` (name, value) to every response that lacks them."""

    def __init__(self, app: Any, headers: list[tuple[str, str]]) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in self.headers if h[0] not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _disconnected(scope: dict, receive: Callable, send: Callable) -> None:
    """The client left while sending its body: nobody to answer."""


_DISCONNECTED: Any = _disconnected


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that gives the body already read, then the client's own messages (its
    disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# -- the command ------------------------------------------------------------------------------
def run_server(loaders: dict[str, Callable[[], Translator]], config: ServeConfig, host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, log_level: str = "info") -> None:
    """Serve ``loaders`` (name -> a function that loads that model) until SIGTERM or Ctrl+C.

    SIGTERM stops taking connections and lets the requests in flight finish; those still
    waiting a second before ``config.drain_timeout`` get 503, and it returns (uvicorn's
    graceful shutdown, bounded by the same time, then finds nothing to cancel). A model that
    fails to load stops the server and raises its error.
    """
    import uvicorn

    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(loaders, config, api_key, on_load_error=stop, host=host, security_headers=False)
    drain: Drain = app.state.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=header_timeout_protocol(config.header_timeout),
        timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]  # a float works
        headers=app.state.headers,  # on uvicorn's own answers (a malformed request's 400) too
        server_header=False))
    # uvicorn passes a SIGTERM it caught on to the previous handler once it has shut down; the
    # default handler would then end a clean shutdown with status 143, this one lets it exit 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if app.state.models.error is not None:
        raise app.state.models.error
    if any(served.worker.busy for served in app.state.models.served.values()):
        # a batch still in a step that cannot be cut (an encoder pass) at the drain deadline:
        # its requests are answered, and letting the interpreter finalize under a running
        # torch thread would abort the process, so it ends here
        logging.shutdown()
        os._exit(0)


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools, else h11) that closes a connection which has not sent
    a complete request head within ``seconds`` of opening, or of its previous response.

    uvicorn has no such timeout (its ``timeout_keep_alive`` starts only after a response, and
    any byte resets it; uvicorn issue #157), so a client sending half a header line would hold
    a connection open for ever.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _head_late(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request under way
            if waiting and not self.transport.is_closing():
                log.info("closed a connection that sent no complete request head within %g s "
                         "(--header-timeout)", seconds)
                self.transport.close()

    return Protocol

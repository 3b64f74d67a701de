"""The REST API of ``seq2seq serve`` and its page, on FastAPI; ``run_server`` runs it on uvicorn.

    GET  /                       the page (``page.html``): translate, n-best, attention heatmap
    GET  /health                 200 once the models are loaded, 503 before
    GET  /v1/models              each model's languages, architecture and decoding defaults
    POST /v1/translate           {"model"?, "text": str | [str], "beam"?, "n_best"?,
                                  "return_attention"?, "return_tokens"?}
    POST /translator/translate   OpenNMT-py's request and response shape
    GET  /docs                   the OpenAPI documentation (FastAPI's)

Each model has one ``batching.DecodingWorker``: sentences of concurrent requests are decoded
together. Errors are ``{"error": {"code", "message"}}`` with 400 (malformed), 401 (key),
404 (unknown model or path), 413 (over a limit), 503 (loading, queue full) or 504 (timed out);
a fault of the server is a 500 whose body names no internals.

The limits are ``serve.ServeConfig``. FastAPI and uvicorn come with the ``serve`` extra;
without them ``serve.require_extra`` says what to install.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from seq2seq.config import ConfigError
from seq2seq.decoding.translator import Translator
from seq2seq.serving.results import json_score, page_html, sentence_result
from seq2seq.serving.settings import ServeConfig
from seq2seq.serving.worker import DecodeOptions, DecodingWorker, Job, QueueFull, WorkerStopped

log = logging.getLogger("seq2seq.serving.settings")

OPEN_PATHS = frozenset({"/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


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
        decode = config.decode
        return {"name": self.name, "source_language": config.data.src_lang,
                "target_language": config.data.tgt_lang, "cell": config.model.cell,
                "attention": config.model.attention, "parameters": self.translator.model.num_parameters(),
                "decode": {"beam": decode.beam, "n_best": decode.n_best,  # validated <= beam
                           "length_penalty": decode.length_penalty, "max_len_ratio": decode.max_len_ratio,
                           "precision": config.train.precision, "quantize": decode.quantize,
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
                                        max_queue=self.config.max_queue, name=name).start()
                self.served[name] = Served(name, translator, worker)
                log.info("model %r loaded", name)
        except BaseException as error:  # reported by /health and the command
            self.error = error
            log.error("seq2seq serve: loading failed: %s", error)
            if self.on_error is not None:
                self.on_error(error)
            return
        self.ready.set()

    def stop(self) -> None:
        for served in self.served.values():
            served.worker.stop(timeout=30)

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
    n_best = min(decode.n_best, beam) if n_best is None else n_best
    if not 1 <= n_best <= beam:
        raise ApiError(400, "invalid_request", f"n_best: must be between 1 and beam ({beam}), got {n_best}")
    if attention and served.translator.config.model.attention is None:
        raise ApiError(400, "invalid_request", f"return_attention: model {served.name!r} has no attention")
    return DecodeOptions(beam=beam, n_best=n_best, attention=attention)


async def _decode(served: Served, sources: list[list[int]], options: DecodeOptions,
                  config: ServeConfig) -> Job:
    """Queue the sentences (their ids) on the model's worker and wait for their hypotheses."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Job] = loop.create_future()

    def resolve(job: Job) -> None:
        if not future.done():
            future.set_result(job)

    try:
        job = served.worker.submit(sources, options, lambda job: loop.call_soon_threadsafe(resolve, job))
    except QueueFull as error:
        raise ApiError(503, "queue_full", f"{error} (--max-queue); retry later",
                       {"Retry-After": "1"}) from None
    except WorkerStopped as error:
        raise ApiError(503, "shutting_down", str(error)) from None
    try:
        await asyncio.wait_for(future, timeout=config.timeout)
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
        served.worker.cancel(job)
        raise ApiError(504, "timeout", f"no result within {config.timeout:g} s (--timeout)") from None
    if job.error is not None:
        log.error("decoding failed", exc_info=job.error)
        raise ApiError(500, "internal", "decoding failed; see the server's log")
    return job


# -- the application --------------------------------------------------------------------------
def create_app(loaders: dict[str, Callable[[], Translator]], config: ServeConfig | None = None,
               api_key: str | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app serving ``loaders`` (name -> a function that loads that model). Loading starts
    in a background thread at startup; the first name is the default model."""
    config = (config or ServeConfig()).validate()
    models = Models(loaders, config, on_load_error)
    page = page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=models.load, name="load-models", daemon=True).start()
        yield
        models.stop()

    app = FastAPI(title="seq2seq", summary="Translate with RNN encoder-decoder models", version="1",
                  lifespan=lifespan, redoc_url=None)
    app.state.models = models
    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=api_key)
    _error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once every model is loaded; 503 before (or if loading failed)."""
        models.get(None)
        return JSONResponse({"status": "ok", "models": list(models.served)})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """Each model's name, languages, cell, attention, parameter count and decoding defaults,
        and the server's limits."""
        models.get(None)
        return {"models": [served.info() for served in models.served.values()], "limits": asdict(config)}

    @app.post("/v1/translate")
    async def translate(body: TranslateRequest) -> JSONResponse:
        """One result per sentence, in order: translation and score; n_best alternatives;
        source and target tokens and the attention matrix on request."""
        start = time.perf_counter()
        served = models.get(body.model)
        sentences, sources = _sentences(body.text, config, served.translator)
        options = _options(served, body.beam, body.n_best, body.return_attention, config)
        job = await _decode(served, sources, options, config)
        results = [sentence_result(served.translator, text, hyps, tokens=body.return_tokens,
                                   attention=body.return_attention)
                   for text, hyps in zip(sentences, job.results)]
        # JSONResponse as it is: FastAPI's encoder would walk every attention weight again
        return JSONResponse({"model": served.name, "results": results,
                             "seconds": round(time.perf_counter() - start, 4)})

    @app.post("/translator/translate")
    async def opennmt_translate(body: list[OpenNMTItem]) -> JSONResponse:
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
        job = await _decode(served, sources, options, config)
        decode = served.translator.tgt_tok.decode
        return JSONResponse([[{"src": text, "tgt": decode(hyps[rank].tokens), "n_best": options.n_best,
                               "pred_score": json_score(hyps[rank].score)}
                              for text, hyps in zip(sentences, job.results)]
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
    """ASGI middleware run before any route: the API key, then the body's size and type.

    The body is read here in chunks and refused with 413 as soon as it passes
    ``max_body_bytes`` (at once when Content-Length says so), so a huge body is never held.
    """

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        refusal = self._check_key(scope, headers) or self._check_headers(scope, headers)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive)
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

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

    def _too_large(self, length: int | None) -> JSONResponse:
        size = f"{length:,} bytes, more" if length is not None else "more"
        return error_response(413, "over_limit", f"body: {size} than the limit of {self.max_body_bytes:,} "
                              f"bytes (--max-body-bytes)", {"Connection": "close"})


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

    SIGTERM stops taking connections, lets the requests in flight finish (uvicorn's graceful
    shutdown), then returns. A model that fails to load stops the server and raises its error.
    """
    import uvicorn

    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(loaders, config, api_key, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=max(60.0, 2 * config.timeout)))
    # uvicorn passes a SIGTERM it caught on to the previous handler once it has shut down; the
    # default handler would then end a clean shutdown with status 143, this one lets it exit 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if app.state.models.error is not None:
        raise app.state.models.error

"""The HTTP service behind serve.py: OpenAI's chat-completions API and an extraction endpoint over the generation
engine, with the prompt built by the same function as training and predict.py, so a served answer is predict.py's.

    app = create_app(engine, settings)  # then uvicorn.run(app, host=..., port=...)

Requests and responses are the pydantic models of protocol.py, which FastAPI validates; the routes below are
module-level, and reach the engine's worker and the settings through `app.state` (dependencies `WorkerDep`,
`SettingsDep`). Every /v1 route is a `V1Route`: the API key is checked, then the body read (no further than
--max_body_bytes) as JSON, before FastAPI validates it.

The engine runs on one thread of its own (the model is not thread-safe), fed by a queue: `Engine.run` admits what
waits whenever a row is free, so requests that arrive together are generated together, up to the engine's batch
size, and a long answer never holds the others beyond its own row. The handlers build each request (tokens and
grammar; a grammar compile takes milliseconds to seconds) on a preparation thread, hand it to the engine thread, and
await its text and result through an asyncio queue (`answering`). A client that goes away has its request
cancelled: it leaves the queue, or its row, at the next step.

Grammars, as vLLM takes them: `response_format {"type": "json_object"}` is the `schema` answer grammar (grammar.py),
and `structured_outputs: {"grammar": EBNF}` any xgrammar EBNF grammar (root rule `root`), which must compile (400
otherwise). A client grammar is not closable: a budget cut ends it with finish_reason "length", mid-answer. The one
exception is the answer grammar itself: a grammar that is exactly `grammar.build_ebnf(dialogue, "grounded" or
"schema")` for the dialogue of an extraction prompt (training's system prompt, then `utils.INSTRUCTION` + dialogue)
is recognised as such, so the answer is generated as predict.py's --constraint would generate it: closed if the
budget cuts it, and with list items from the part of a long dialogue the cut prompt keeps.

Errors are JSON in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with a 4xx code for anything
the client sent (a validation error names its field as `param`); the API key is compared in constant time and never
logged or echoed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answer import extraction_request
from .api import span_offsets
from .engine import Decoding, Engine, Request, Result
from .grammar import AnswerGrammar, build_ebnf, check_ebnf
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChunkChoice, Delta, ErrorInfo, ErrorResponse, ExtractRequest,
                       ExtractResponse, GroundedItem, Health, ModelCard, ModelList, Usage, validation_error)
from utils import INSTRUCTION, SYSTEM_PROMPT, build_chatml_ids, one_line, parse_output

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")  # the repo's
POLL_SECONDS = 0.25  # how often a waiting handler looks whether its client is still there


@dataclass(frozen=True)
class ServiceSettings:
    """What the service needs besides the engine: its name, the request defaults and limits, the key."""
    served_model_name: str
    decoding: Decoding  # a request's defaults: serve.py's generation flags
    max_len: int  # how training cut prompts (predict.py's --max_len, --max_src_len, --truncation)
    max_src_len: int
    truncation: str
    capacity: int  # cache slots per request: prompt + max_tokens must fit
    max_body_bytes: int = 1_000_000
    api_key: str | None = None  # None: no key asked for


class APIError(Exception):
    """A request refused, as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.error = status, ErrorInfo(message=message, type=kind, param=param, code=code)


def error_response(status: int, error: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error).model_dump(), status)


# --------------------------------------------------------------------------------------------------------------
# The engine thread
# --------------------------------------------------------------------------------------------------------------


class Job:
    """One request on its way through the engine: what the engine thread reports comes back on the event loop's
    queue as ("text", new text) and, last, ("done", Result)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, stream: bool = False):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.request = replace(request, cancelled=self.cancelled.is_set,
                               on_text=self._text if stream else None)

    def _post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is stopping): nobody waits for it
            pass

    def _text(self, text: str) -> None:
        self._post(("text", text))

    def done(self, result: Result) -> None:
        self._post(("done", result))


class EngineWorker:
    """The engine's thread: `Engine.run` pulls jobs from a queue, a new batch starting whenever the engine was
    idle; counts what it did for /health."""

    def __init__(self, engine: Engine, capacity: int):
        self.engine, self.capacity = engine, capacity
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.active: set[Job] = set()
        self.stopping = False
        self.counts = {"batches": 0, "requests": 0, "cancelled": 0, "errors": 0}
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(None)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _pull(self, block: bool):
        while not self.stopping:
            try:
                job = self.jobs.get() if block else self.jobs.get_nowait()
            except queue.Empty:
                return None
            if job is None:
                continue
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                job.done(Result([], "", "cancelled", False, len(job.request.prompt)))
                continue
            if block:  # the engine was idle: this request opens a batch, joined by whatever arrives while it runs
                self.counts["batches"] += 1
            self.counts["requests"] += 1
            self.active.add(job)
            return job, job.request
        return None

    def _loop(self) -> None:
        while not self.stopping:
            try:
                for job, result in self.engine.run(self._pull, self.capacity):
                    self.active.discard(job)
                    self.counts["cancelled"] += result.finish_reason == "cancelled"
                    self.counts["errors"] += result.finish_reason == "error"
                    job.done(result)
            except Exception as e:  # the loop itself (out of memory, say): its answers fail, the service goes on
                print(f"engine: {type(e).__name__}: {one_line(e)}; {len(self.active)} answers failed",
                      file=sys.stderr, flush=True)
                for job in list(self.active):
                    self.counts["errors"] += 1
                    job.done(Result([], f"generation failed: {one_line(e)}", "error", False, len(job.request.prompt)))
                self.active.clear()

    def status(self) -> dict:
        return {**self.counts, "running": len(self.active), "waiting": self.jobs.qsize()}


# --------------------------------------------------------------------------------------------------------------
# Building the engine's request (on the preparation thread)
# --------------------------------------------------------------------------------------------------------------


def request_decoding(call: ChatCompletionRequest, settings: ServiceSettings) -> Decoding:
    """A chat request's decoding: what it sets, serve.py's flags for the rest. Temperature 0 (or none, with greedy
    flags) is greedy, as predict.py."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(call, name)
        if value is not None and value > settings.capacity:
            raise APIError(400, f"'{name}' must be between 1 and {settings.capacity}, got {value}", name)
    defaults = settings.decoding
    temperature = call.temperature
    return Decoding(max_new_tokens=call.max_tokens or call.max_completion_tokens or defaults.max_new_tokens,
                    do_sample=defaults.do_sample if temperature is None else temperature > 0,
                    temperature=defaults.temperature if temperature in (None, 0.0) else temperature,
                    top_p=defaults.top_p if call.top_p is None else call.top_p,
                    repetition_penalty=(defaults.repetition_penalty if call.repetition_penalty is None
                                        else call.repetition_penalty),
                    seed=defaults.seed if call.seed is None else call.seed)


def compiled(request: Request) -> Request:
    """The request with its grammar compiled now, off the engine thread, so admitting it costs the batch nothing."""
    if request.grammar is None:
        return request
    grammar = request.grammar()
    return replace(request, grammar=lambda: grammar)


def answer_constraint(grammar: str, dialogue: str) -> str | None:
    """"grounded" or "schema" when `grammar` is exactly that answer grammar of `dialogue`, else None."""
    head = build_ebnf("", "schema").split("\n", 1)[0]  # the root rule, the same in every answer grammar
    if not grammar.startswith(head):
        return None
    for constraint in ("schema", "grounded"):
        if grammar == build_ebnf(dialogue, constraint):
            return constraint
    return None


def chat_request(engine: Engine, settings: ServiceSettings, call: ChatCompletionRequest) -> Request:
    """The engine request of a chat completion: the prompt exactly as training lays out (and cuts) this exchange."""
    tokenizer, decoding = engine.tokenizer, request_decoding(call, settings)
    system, user_text, client_grammar = call.system, call.user_text, call.grammar
    instruction_chars = len(INSTRUCTION) if user_text.startswith(INSTRUCTION) else 0
    dialogue = user_text[instruction_chars:]
    constraint = "schema" if call.json_object else None
    if client_grammar is not None and instruction_chars and system == SYSTEM_PROMPT:
        constraint = answer_constraint(client_grammar, dialogue)
    if constraint is not None and system == SYSTEM_PROMPT:  # predict.py's request, token for token
        request, _ = extraction_request(tokenizer, user_text, dialogue, decoding, constraint, engine.vocabulary,
                                        settings.max_len, settings.max_src_len, settings.truncation,
                                        instruction_chars)
    else:
        ids = build_chatml_ids(tokenizer, user_text, None, settings.max_len, settings.max_src_len, system=system,
                               truncation=settings.truncation, instruction_chars=instruction_chars).input_ids
        request = Request(ids, decoding)
        if constraint is not None:  # json_object under another system prompt: the format alone
            request = replace(request, grammar=lambda: AnswerGrammar.for_dialogue(engine.vocabulary, "", "schema"),
                              closable=True)
        elif client_grammar is not None:
            try:
                grammar = check_ebnf(engine.vocabulary, client_grammar)
            except ValueError as e:  # xgrammar's reason, without its time stamp and source line
                reason = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e))
                raise APIError(400, f"structured_outputs.grammar: {reason}", "structured_outputs.grammar",
                               "invalid_grammar") from None
            request = replace(request, grammar=lambda: grammar)
    check_fits(engine, settings, request)
    return compiled(request)


def extract_request(engine: Engine, settings: ServiceSettings, dialogue: str) -> tuple[Request, bool]:
    """predict.py's request for `dialogue` under the grounded grammar, and whether its prompt was cut."""
    request, cut = extraction_request(engine.tokenizer, INSTRUCTION + dialogue, dialogue, settings.decoding,
                                      "grounded", engine.vocabulary, settings.max_len, settings.max_src_len,
                                      settings.truncation, len(INSTRUCTION))
    check_fits(engine, settings, request)
    return compiled(request), cut


def check_fits(engine: Engine, settings: ServiceSettings, request: Request) -> None:
    budget = request.decoding.max_new_tokens
    if request.slots() > settings.capacity:
        raise APIError(400, f"the prompt ({len(request.prompt)} tokens) and max_tokens ({budget}) exceed the "
                            f"{settings.capacity} tokens this server gives a request; lower max_tokens or shorten "
                            f"the system message", "max_tokens", "context_length_exceeded")
    if request.closable and budget < engine.empty_answer_tokens():
        raise APIError(400, f"max_tokens {budget} is below the {engine.empty_answer_tokens()} tokens the shortest "
                            f"answer in the trained format takes (every field empty)", "max_tokens")


def grounded_fields(fields: dict, dialogue: str) -> dict[str, list[GroundedItem] | str]:
    """The fields with each list item located in `dialogue` as the Python API locates them (api.span_offsets)."""
    return {key: [GroundedItem(text=s.text, start=s.start, end=s.end) for s in value] if isinstance(value, list)
            else value for key, value in span_offsets(fields, dialogue).items()}


def usage(result: Result) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens),
                 total_tokens=result.prompt_tokens + len(result.tokens))


def finish_reason(result: Result) -> str:
    """OpenAI's: "length" when the budget ended the answer (closed or not), else "stop"."""
    return "length" if result.truncated or result.finish_reason == "length" else "stop"




# --------------------------------------------------------------------------------------------------------------
# Waiting for an answer
# --------------------------------------------------------------------------------------------------------------


@asynccontextmanager
async def answering(worker: EngineWorker, request: Request, http: HTTPRequest,
                    stream: bool = False) -> AsyncIterator[AsyncIterator[str | Result]]:
    """Hands `request` to the engine thread; the `async with` block iterates over what comes back: the text as it
    grows (with `stream`), then the Result, or nothing more once the client has gone away. Leaving the block cancels
    the answer (a no-op for one that ended), however it is left, so a client that goes away frees its row."""
    job = Job(request, asyncio.get_running_loop(), stream)
    worker.submit(job)
    try:
        yield answer_events(job, http)
    finally:
        job.cancelled.set()


async def answer_events(job: Job, http: HTTPRequest) -> AsyncIterator[str | Result]:
    """What the engine thread reports on `job` until its Result, looking every POLL_SECONDS whether the client left."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                return
            continue
        yield value
        if kind == "done":
            return


async def complete(worker: EngineWorker, request: Request, http: HTTPRequest) -> Result:
    """The result; APIError 499 if the client went away first (the answer is then cancelled), 500 if it failed."""
    async with answering(worker, request, http) as events:
        async for result in events:
            if result.finish_reason == "error":
                raise APIError(500, f"generation failed: {result.text}", kind="server_error")
            return result
    raise APIError(499, "the client closed the request")


async def prepare(http: HTTPRequest, build: Callable, *args) -> Any:
    """`build(*args)` on the preparation thread: one xgrammar compiler, and the event loop stays free."""
    return await asyncio.get_running_loop().run_in_executor(http.app.state.prepare_pool, build, *args)


# --------------------------------------------------------------------------------------------------------------
# The routes
# --------------------------------------------------------------------------------------------------------------


def settings_of(http: HTTPRequest) -> ServiceSettings:
    return http.app.state.settings


def worker_of(http: HTTPRequest) -> EngineWorker:
    return http.app.state.worker


SettingsDep = Annotated[ServiceSettings, Depends(settings_of)]
WorkerDep = Annotated[EngineWorker, Depends(worker_of)]


class ReadRequest(HTTPRequest):
    """A request whose body was read, and parsed as JSON, already: what FastAPI validates."""

    def __init__(self, http: HTTPRequest, body: bytes, value: Any):
        super().__init__(http.scope, http.receive)
        self.read_body, self.read_value = body, value

    async def body(self) -> bytes:
        return self.read_body

    async def json(self) -> Any:
        return self.read_value


class V1Route(APIRoute):
    """A /v1 route: the API key first, then the body, read no further than --max_body_bytes and parsed as JSON
    whatever its Content-Type says (curl -d sends a form's), each refused with its own message, before FastAPI
    validates the body against the endpoint's model."""

    def get_route_handler(self) -> Callable:
        validate_and_run = super().get_route_handler()

        async def handler(http: HTTPRequest) -> Response:
            settings = settings_of(http)
            check_key(http, settings.api_key)
            if http.method != "POST":
                return await validate_and_run(http)
            body = await read_body(http, settings.max_body_bytes)
            value = parse_json(body)
            # FastAPI hands the body to the endpoint's model only from a request that says it is JSON
            http.scope["headers"] = [header for header in http.scope["headers"] if header[0] != b"content-type"] \
                + [(b"content-type", b"application/json")]
            return await validate_and_run(ReadRequest(http, body, value))
        return handler


def check_key(http: HTTPRequest, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or incorrect API key: send the header Authorization: Bearer <key>",
                       code="invalid_api_key")


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    length = http.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body is larger than this server takes ({limit} bytes)", code="too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                           code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to read") from None


router = APIRouter()
v1 = APIRouter(prefix="/v1", route_class=V1Route)


@router.get("/health")
async def health(settings: SettingsDep, worker: WorkerDep) -> Health:
    return Health(model=settings.served_model_name, **worker.status())


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")


@v1.get("/models")
async def models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.served_model_name)])


@v1.get("/models/{name:path}")
async def model(name: str, settings: SettingsDep) -> ModelCard:
    if name != settings.served_model_name:
        raise APIError(404, f"the model {name[:200]!r} does not exist", "model", "model_not_found")
    return ModelCard(id=name)


@v1.post("/extract")
async def extract(body: ExtractRequest, http: HTTPRequest, settings: SettingsDep,
                  worker: WorkerDep) -> ExtractResponse:
    request, cut = await prepare(http, extract_request, worker.engine, settings, body.dialogue)
    result = await complete(worker, request, http)
    fields, valid = parse_output(result.text)
    return ExtractResponse(fields=grounded_fields(fields, body.dialogue), valid=valid, truncated=result.truncated,
                           dialogue_cut=cut, output=result.text, finish_reason=finish_reason(result),
                           usage=usage(result))


@v1.post("/chat/completions", response_model=ChatCompletion)  # or, with stream, server-sent chunks
async def chat(call: ChatCompletionRequest, http: HTTPRequest, settings: SettingsDep,
               worker: WorkerDep) -> ChatCompletion | StreamingResponse:
    name = settings.served_model_name
    if call.model is not None and call.model != name:
        raise APIError(404, f"the model {call.model[:200]!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")
    request = await prepare(http, chat_request, worker.engine, settings, call)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if call.stream:
        chunks = stream_chat(worker, request, http, ChatCompletionChunk(id=ident, created=created, model=name,
                                                                         choices=[]), call.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await complete(worker, request, http)
    message = AssistantMessage(content=result.text)
    return ChatCompletion(id=ident, created=created, model=name, usage=usage(result),
                          choices=[ChatCompletionChoice(message=message, finish_reason=finish_reason(result))])


async def stream_chat(worker: EngineWorker, request: Request, http: HTTPRequest, head: ChatCompletionChunk,
                      include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks as server-sent events: the role, the text as it grows, the finish reason (then, with
    include_usage, the usage), [DONE]; a failed answer ends in an error event instead."""
    def chunk(delta: Delta, reason: str | None = None) -> str:
        return event(head.model_copy(update={"choices": [ChunkChoice(delta=delta, finish_reason=reason)]}))

    async with answering(worker, request, http, stream=True) as events:
        yield chunk(Delta(role="assistant", content=""))
        async for value in events:
            if isinstance(value, str):
                yield chunk(Delta(content=value))
                continue
            if value.finish_reason == "error":
                yield event(ErrorResponse(error=ErrorInfo(message=f"generation failed: {value.text}",
                                                          type="server_error")))
            else:
                yield chunk(Delta(), finish_reason(value))
                if include_usage:
                    yield event(head.model_copy(update={"usage": usage(value)}))
            yield "data: [DONE]\n\n"


def event(body: BaseModel) -> str:
    return f"data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------


async def api_error(http: HTTPRequest, e: APIError) -> JSONResponse:
    return error_response(e.status, e.error)


async def http_error(http: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(e.status_code, ErrorInfo(message=str(e.detail), code=code))


async def invalid_request(http: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    return error_response(400, validation_error(e.errors()))


async def internal_error(http: HTTPRequest, e: Exception) -> JSONResponse:  # a bug, never the client's input: said once
    print(f"error: {http.method} {http.url.path}: {type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
    return error_response(500, ErrorInfo(message="internal server error", type="server_error"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.worker.start()
    yield
    app.state.worker.stop()
    app.state.prepare_pool.shutdown(wait=False, cancel_futures=True)


def create_app(engine: Engine, settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving `engine`; its engine thread starts with the app and stops with it."""
    app = FastAPI(title="Medical dialogue extraction", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, exception_handlers={APIError: api_error, StarletteHTTPException: http_error,
                                                        RequestValidationError: invalid_request,
                                                        Exception: internal_error})
    app.state.settings = settings
    app.state.worker = EngineWorker(engine, settings.capacity)
    app.state.prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")  # one xgrammar compiler
    app.include_router(router)
    app.include_router(v1)
    return app

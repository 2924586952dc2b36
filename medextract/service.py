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
grammar) on one of PREPARE_THREADS preparation threads, hand it to the engine thread, and await its text and result
through an asyncio queue (`answering`). A client that goes away (`watching`: the ASGI disconnect, at once) has its
request cancelled: it leaves the queue, or its row, at the next step.

Grammars, as vLLM takes them: `response_format {"type": "json_object"}` is the `schema` answer grammar (grammar.py),
and `structured_outputs: {"grammar": EBNF}` any xgrammar EBNF grammar (root rule `root`) that compiles and admits an
answer (400 otherwise). A client's grammar is bounded in size, compile time and memory and vetted in a worker
process first, so that no grammar stalls the others (grammar_pool.py). A client grammar is not closable: a budget
cut ends it with finish_reason "length", mid-answer. The one exception is the answer grammar itself: a grammar that
is exactly `grammar.build_ebnf(dialogue, "grounded" or "schema", fields)` for the dialogue of an extraction prompt
(training's system prompt, then the schema's instruction + dialogue) is recognised as such, so the answer is
generated as predict.py's --constraint would generate it: closed if the budget cuts it, and with list items from the
part of a long dialogue the cut prompt keeps (the only part whose grammar is built).

The fields are the served schema's (`ServiceSettings.schema`: the model's schema.json, serve.py --schema, else the
chapter's eight): the prompt of /v1/extract (the schema's instruction + dialogue), its grammar, parser and offsets,
json_object's grammar, the answer grammar a client's grammar is recognised as, and the shortest answer a closable
request must leave room for. GET /health names them in order, `"fields": [{"name", "kind"}, …]` (not the
instruction), as it names the model, with no key asked, so that the page (static/index.html) builds its rows from
them before a key is typed.

Errors are JSON in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with a 4xx code for anything
the client sent (a validation error names its field as `param`); a 405 says what is allowed (`Allow`), and every GET
route answers HEAD. The API key is compared in constant time and never logged or echoed: uvicorn's access log is kept
free of query strings (`QueryRedaction`), where a key sent as `?api_key=` would be, and no header is ever logged. A
client that leaves in the middle of its body is said in one line.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import queue
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
from starlette.requests import ClientDisconnect

from .answer import extraction_request
from .api import span_offsets
from .engine import Decoding, Engine, Request, Result
from .grammar import AnswerGrammar, Vocabulary
from .grammar_pool import GrammarAbandoned, GrammarBounds, GrammarRefused, Grammars, WorkersBusy
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChunkChoice, Delta, ErrorInfo, ErrorResponse, ExtractRequest,
                       ExtractResponse, GroundedItem, Health, ModelCard, ModelList, SchemaField, Usage,
                       validation_error)
from .schema import CHAPTER_SCHEMA, Schema
from utils import SYSTEM_PROMPT, Fields, build_chatml_ids, one_line, parse_output

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")  # the repo's
# requests prepared at a time (tokens, and an answer grammar of at most --max_grammar_bytes); a client's grammar is
# compiled on threads of its own (grammar_pool.Grammars.compile_pool), so that it never holds these
PREPARE_THREADS = 4


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
    grammar: GrammarBounds = GrammarBounds()  # what a grammar may cost
    random_weights: bool = False  # a make_tiny model: /health, /v1/extract and the page say its answers are noise
    schema: Schema = CHAPTER_SCHEMA  # the fields answered and the instruction that asks for them


class APIError(Exception):
    """A request refused, as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.error = status, ErrorInfo(message=message, type=kind, param=param, code=code)


def error_response(status: int, error: ErrorInfo, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error).model_dump(), status, headers=headers)


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
# Building the engine's request (its grammar first, then the rest on a preparation thread)
# --------------------------------------------------------------------------------------------------------------


def request_decoding(call: ChatCompletionRequest, settings: ServiceSettings) -> Decoding:
    """A chat request's decoding: what it sets, serve.py's flags for the rest. Temperature 0 (or none, with greedy
    flags) is greedy, as predict.py. --max_tgt_len is the largest max_tokens: more is a 400, as OpenAI answers a
    max_tokens past the model's output limit."""
    defaults = settings.decoding
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(call, name)
        if value is not None and value > defaults.max_new_tokens:
            raise APIError(400, f"'{name}' must be at most {defaults.max_new_tokens}, the largest answer this server "
                                f"generates (serve.py --max_tgt_len), got {value}", name)
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


def instruction_chars_of(user_text: str, instruction: str) -> int:
    """The length of the schema's `instruction` where a chat's user message starts with it (an extraction prompt,
    cut as training cuts it), else 0."""
    return len(instruction) if user_text.startswith(instruction) else 0


async def chat_request(http: HTTPRequest, gone: asyncio.Future, engine: Engine, grammars: Grammars,
                       settings: ServiceSettings, call: ChatCompletionRequest) -> Request:
    """The engine request of a chat completion: a client's grammar through `grammars` first (vetted in a worker,
    within the bounds; recognised when it is the answer grammar of an extraction prompt's dialogue), then the rest
    on a preparation thread (`build_chat_request`)."""
    decoding = request_decoding(call, settings)  # what costs nothing is refused first
    constraint, grammar = ("schema" if call.json_object else None), None
    if call.grammar is not None:
        user_text = call.user_text
        instruction_chars = instruction_chars_of(user_text, settings.schema.instruction)
        dialogue = user_text[instruction_chars:] if instruction_chars and call.system == SYSTEM_PROMPT else None
        try:
            found = await grammars.client_grammar(call.grammar, dialogue, gone)
        except GrammarRefused as e:
            raise APIError(400, f"structured_outputs.grammar: {e}", "structured_outputs.grammar", e.code) from None
        constraint, grammar = (found, None) if isinstance(found, str) else (None, found)
    try:
        return await prepare(http, build_chat_request, engine, grammars.vocabulary, settings, call, decoding,
                             constraint, grammar)
    except GrammarRefused as e:  # the answer grammar of what the model reads of the dialogue
        raise APIError(400, f"messages: the answer grammar of the dialogue: {e}", "messages", e.code) from None


def build_chat_request(engine: Engine, vocabulary: Vocabulary, settings: ServiceSettings,
                       call: ChatCompletionRequest, decoding: Decoding, constraint: str | None,
                       grammar: AnswerGrammar | None) -> Request:
    """The engine request of a chat completion: the prompt exactly as training lays out (and cuts) this exchange,
    under the answer grammar `constraint` names (with the schema's fields) or the client's compiled `grammar`."""
    tokenizer, fields = engine.tokenizer, settings.schema.fields
    system, user_text = call.system, call.user_text
    instruction_chars = instruction_chars_of(user_text, settings.schema.instruction)
    dialogue = user_text[instruction_chars:]
    if constraint is not None and system == SYSTEM_PROMPT:  # predict.py's request, token for token
        request, _ = extraction_request(tokenizer, user_text, dialogue, decoding, constraint, vocabulary,
                                        settings.max_len, settings.max_src_len, settings.truncation,
                                        instruction_chars, fields)
    else:
        ids = build_chatml_ids(tokenizer, user_text, None, settings.max_len, settings.max_src_len, system=system,
                               truncation=settings.truncation, instruction_chars=instruction_chars).input_ids
        request = Request(ids, decoding)
        if constraint is not None:  # json_object under another system prompt: the format alone
            request = replace(request, grammar=lambda: AnswerGrammar.for_dialogue(vocabulary, "", "schema", fields),
                              closable=True, fields=tuple(fields))
        elif grammar is not None:
            request = replace(request, grammar=lambda: grammar)
    check_fits(engine, settings, request)
    return compiled(request)


def extract_request(engine: Engine, vocabulary: Vocabulary, settings: ServiceSettings,
                    dialogue: str) -> tuple[Request, bool]:
    """predict.py's request for `dialogue` under the grounded grammar, and whether its prompt was cut: the grammar
    holds only the part of the dialogue the cut prompt keeps, so its cost is bounded by --max_src_len."""
    instruction = settings.schema.instruction
    request, cut = extraction_request(engine.tokenizer, instruction + dialogue, dialogue, settings.decoding,
                                      "grounded", vocabulary, settings.max_len, settings.max_src_len,
                                      settings.truncation, len(instruction), settings.schema.fields)
    check_fits(engine, settings, request)
    return compiled(request), cut


def check_fits(engine: Engine, settings: ServiceSettings, request: Request) -> None:
    budget = request.decoding.max_new_tokens
    if request.slots() > settings.capacity:
        raise APIError(400, f"the prompt ({len(request.prompt)} tokens) and max_tokens ({budget}) exceed the "
                            f"{settings.capacity} tokens this server gives a request; lower max_tokens or shorten "
                            f"the system message", "max_tokens", "context_length_exceeded")
    shortest = engine.empty_answer_tokens(request.fields) if request.closable else 0  # the schema's, every field empty
    if budget < shortest:
        raise APIError(400, f"max_tokens {budget} is below the {shortest} tokens the shortest answer in the trained "
                            f"format takes (every field empty)", "max_tokens")


def grounded_fields(fields: dict, dialogue: str, kinds: Fields) -> dict[str, list[GroundedItem] | str]:
    """The fields with each item of a span field (`kinds`: the schema's) located in `dialogue` as the Python API
    locates them (api.span_offsets)."""
    return {key: [GroundedItem(text=s.text, start=s.start, end=s.end) for s in value] if isinstance(value, list)
            else value for key, value in span_offsets(fields, dialogue, kinds).items()}


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
async def watching(http: HTTPRequest) -> AsyncIterator[asyncio.Future]:
    """A future that completes when the client disconnects, for the `async with` block. Its body has been read, so
    the next ASGI message is the disconnect (uvicorn hands it to every receive() that waits, starlette's own
    included)."""
    async def until_gone() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(until_gone())
    try:
        yield gone
    finally:
        gone.cancel()


@asynccontextmanager
async def answering(worker: EngineWorker, request: Request, http: HTTPRequest,
                    stream: bool = False) -> AsyncIterator[AsyncIterator[str | Result]]:
    """Hands `request` to the engine thread; the `async with` block iterates over what comes back: the text as it
    grows (with `stream`), then the Result, or nothing more once the client has gone away. Leaving the block cancels
    the answer (a no-op for one that ended), however it is left, so a client that goes away frees its row."""
    job = Job(request, asyncio.get_running_loop(), stream)
    worker.submit(job)
    try:
        async with watching(http) as gone:
            yield answer_events(job, gone)
    finally:
        job.cancelled.set()


async def answer_events(job: Job, gone: asyncio.Future) -> AsyncIterator[str | Result]:
    """What the engine thread reports on `job` until its Result, or until `gone` (the client left)."""
    while True:
        reported = asyncio.ensure_future(job.events.get())
        try:
            await asyncio.wait({reported, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # however the wait ends (the client gone, the stream cancelled), no task is left pending
            if not reported.done():
                reported.cancel()
        if not reported.done():  # the client left (cancelling takes effect later)
            return
        kind, value = reported.result()
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
    """`build(*args)` on a preparation thread, so that the event loop stays free."""
    state = http.app.state
    state.preparing += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, build, *args)
    finally:
        state.preparing -= 1


# --------------------------------------------------------------------------------------------------------------
# The routes
# --------------------------------------------------------------------------------------------------------------


def settings_of(http: HTTPRequest) -> ServiceSettings:
    return http.app.state.settings


def worker_of(http: HTTPRequest) -> EngineWorker:
    return http.app.state.worker


def grammars_of(http: HTTPRequest) -> Grammars:
    return http.app.state.grammars


SettingsDep = Annotated[ServiceSettings, Depends(settings_of)]
WorkerDep = Annotated[EngineWorker, Depends(worker_of)]
GrammarsDep = Annotated[Grammars, Depends(grammars_of)]


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
    try:
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                               code="too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer: said in one line, not an ASGI traceback
        print(f"{http.method} {http.url.path}: the client left after {size} of "
              f"{length if length is not None else 'its'} body bytes", file=sys.stderr, flush=True)
        raise APIError(400, "the client closed the connection before sending its whole body") from None
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


READ = ["GET", "HEAD"]  # every GET route answers HEAD too (uvicorn sends no body)


@router.api_route("/health", methods=READ)
async def health(http: HTTPRequest, settings: SettingsDep, worker: WorkerDep, grammars: GrammarsDep) -> Health:
    return Health(model=settings.served_model_name, random_weights=settings.random_weights,
                  fields=[SchemaField(name=f.name, kind=f.kind) for f in settings.schema.fields], **worker.status(),
                  preparing=http.app.state.preparing, **grammars.status())


@router.api_route("/", methods=READ)
async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")


@v1.api_route("/models", methods=READ)
async def models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.served_model_name)])


@v1.api_route("/models/{name:path}", methods=READ)
async def model(name: str, settings: SettingsDep) -> ModelCard:
    if name != settings.served_model_name:
        raise APIError(404, f"the model {name[:200]!r} does not exist", "model", "model_not_found")
    return ModelCard(id=name)


@v1.post("/extract")
async def extract(body: ExtractRequest, http: HTTPRequest, settings: SettingsDep, worker: WorkerDep,
                  grammars: GrammarsDep) -> ExtractResponse:
    try:
        request, cut = await prepare(http, extract_request, worker.engine, grammars.vocabulary, settings,
                                     body.dialogue)
    except GrammarRefused as e:
        raise APIError(400, f"dialogue: its answer grammar (of the part the model reads): {e}", "dialogue",
                       e.code) from None
    result = await complete(worker, request, http)
    schema = settings.schema
    fields, valid = parse_output(result.text, schema.fields)
    return ExtractResponse(fields=grounded_fields(fields, body.dialogue, schema.fields), valid=valid,
                           truncated=result.truncated, dialogue_cut=cut, output=result.text, finish_reason=finish_reason(result),
                           usage=usage(result), random_weights=settings.random_weights)


@v1.post("/chat/completions", response_model=ChatCompletion)  # or, with stream, server-sent chunks
async def chat(call: ChatCompletionRequest, http: HTTPRequest, settings: SettingsDep, worker: WorkerDep,
               grammars: GrammarsDep) -> ChatCompletion | StreamingResponse:
    name = settings.served_model_name
    if call.model is not None and call.model != name:
        raise APIError(404, f"the model {call.model[:200]!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")
    async with watching(http) as gone:
        request = await chat_request(http, gone, worker.engine, grammars, settings, call)
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
    return error_response(e.status_code, ErrorInfo(message=str(e.detail), code=code), e.headers)  # 405: Allow


async def grammar_abandoned(http: HTTPRequest, e: GrammarAbandoned) -> JSONResponse:
    return error_response(499, ErrorInfo(message=str(e)))


async def workers_busy(http: HTTPRequest, e: WorkersBusy) -> JSONResponse:
    return error_response(503, ErrorInfo(message=str(e), type="server_error", code="grammar_workers_busy"))


async def invalid_request(http: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    return error_response(400, validation_error(e.errors()))


async def internal_error(http: HTTPRequest, e: Exception) -> JSONResponse:  # a bug, never the client's input: said once
    print(f"error: {http.method} {http.url.path}: {type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
    return error_response(500, ErrorInfo(message="internal server error", type="server_error"))


class QueryRedaction(logging.Filter):
    """uvicorn's access log line with the query string left out (`/v1/models?<query left out>`): a key sent as
    `?api_key=...` never reaches the log. No endpoint here reads a query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<query left out>", *args[3:])
        return True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    access_log, redaction = logging.getLogger("uvicorn.access"), QueryRedaction()
    access_log.addFilter(redaction)
    app.state.worker.start()
    await app.state.grammars.start()
    try:
        yield
    finally:
        app.state.worker.stop()
        await app.state.grammars.close()
        app.state.prepare_pool.shutdown(wait=False, cancel_futures=True)
        access_log.removeFilter(redaction)


def create_app(engine: Engine, settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving `engine`; its engine thread and grammar workers start with the app and stop with
    it."""
    app = FastAPI(title="Medical dialogue extraction", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, exception_handlers={APIError: api_error, StarletteHTTPException: http_error,
                                                        RequestValidationError: invalid_request,
                                                        GrammarAbandoned: grammar_abandoned,
                                                        WorkersBusy: workers_busy, Exception: internal_error})
    app.state.settings = settings
    app.state.worker = EngineWorker(engine, settings.capacity)
    app.state.grammars = Grammars(engine.vocabulary, settings.grammar, settings.schema.fields)
    app.state.prepare_pool = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="prepare")
    app.state.preparing = 0
    app.include_router(router)
    app.include_router(v1)
    return app

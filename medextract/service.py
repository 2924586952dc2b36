"""The HTTP service behind serve.py: OpenAI's chat-completions API and an extraction endpoint over the generation
engine, with the prompt built by the same function as training and predict.py, so a served answer is predict.py's.

    app = create_app(engine, settings)  # then uvicorn.run(app, host=..., port=...)

The engine runs on one thread of its own (the model is not thread-safe), fed by a queue: `Engine.run` admits what
waits whenever a row is free, so requests that arrive together are generated together, up to the engine's batch
size, and a long answer never holds the others beyond its own row. The handlers build each request (tokens and
grammar; a grammar compile takes milliseconds to seconds) on a preparation thread, hand it to the engine thread, and
await its text and result through an asyncio queue. A client that goes away has its request cancelled: it leaves the
queue, or its row, at the next step.

Grammars, as vLLM takes them: `response_format {"type": "json_object"}` is the `schema` answer grammar (grammar.py),
and `structured_outputs: {"grammar": EBNF}` any xgrammar EBNF grammar (root rule `root`), which must compile (400
otherwise). A client grammar is not closable: a budget cut ends it with finish_reason "length", mid-answer. The one
exception is the answer grammar itself: a grammar that is exactly `grammar.build_ebnf(dialogue, "grounded" or
"schema")` for the dialogue of an extraction prompt (training's system prompt, then `utils.INSTRUCTION` + dialogue)
is recognised as such, so the answer is generated as predict.py's --constraint would generate it: closed if the
budget cuts it, and with list items from the part of a long dialogue the cut prompt keeps.

Errors are JSON in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with a 4xx code for anything
the client sent; the API key is compared in constant time and never logged or echoed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import queue
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answer import extraction_request
from .engine import Decoding, Engine, Request, Result
from .grammar import AnswerGrammar, build_ebnf, check_ebnf
from utils import INSTRUCTION, LIST_KEYS, SYSTEM_PROMPT, build_chatml_ids, one_line, parse_output

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")  # the repository's static/
POLL_SECONDS = 0.25  # how often a waiting handler looks whether its client is still there
MAX_SEED = 2 ** 63 - 1


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
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


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
# Reading a request
# --------------------------------------------------------------------------------------------------------------


async def read_json(request: HTTPRequest, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body is larger than this server takes ({limit} bytes)", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                           code="too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to read") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def text_value(value: Any, param: str) -> str:
    """A string that is text: a JSON "\\ud800" escape without its pair is none."""
    if not isinstance(value, str):
        raise APIError(400, f"'{param}' must be a string, got {json_type(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{param}' holds a lone surrogate at character {e.start + 1}, which is not text",
                       param) from None
    return value


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def int_value(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json_type(value)}", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def number_value(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {json_type(value)}", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"above {low}" if low_open else f"at least {low}"
        raise APIError(400, f"'{name}' must be {bound} and at most {high}, got {value}", name)
    return float(value)


def message_text(content: Any, param: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, f"'{param}[{i}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                    f"this model reads text only", f"{param}[{i}]")
            parts.append(text_value(part.get("text"), f"{param}[{i}].text"))
        return "".join(parts)
    return text_value(content, param)


def chat_messages(body: dict) -> tuple[str, str]:
    """(system, user) of `messages`: training's layout is one exchange, an optional system message then the user's
    (training's system prompt when there is none)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content}", "messages")
    roles, texts = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"'messages[{i}]' must be an object with 'role' and 'content'", f"messages[{i}]")
        roles.append(message.get("role"))
        texts.append(message_text(message.get("content"), f"messages[{i}].content"))
    if roles == ["user"]:
        return SYSTEM_PROMPT, texts[0]
    if roles == ["system", "user"]:
        return texts[0], texts[1]
    raise APIError(400, f"this model was trained on one exchange: an optional system message, then one user "
                        f"message; got the roles {roles}", "messages")


@dataclass
class ChatCall:
    """A checked chat-completions request."""
    system: str
    user_text: str
    decoding: Decoding
    grammar: str | None  # structured_outputs.grammar
    json_object: bool  # response_format json_object
    stream: bool
    include_usage: bool


def parse_chat(body: dict, settings: ServiceSettings) -> ChatCall:
    model = body.get("model")
    if model is not None and model != settings.served_model_name:
        raise APIError(404, f"the model {str(model)[:200]!r} does not exist; this server serves "
                            f"{settings.served_model_name!r}", "model", "model_not_found")
    system, user_text = chat_messages(body)
    for name in ("n",):
        if body.get(name) not in (None, 1):
            raise APIError(400, f"'{name}' must be 1: this server generates one answer per request", name)
    for name in ("stop", "tools", "logprobs", "functions"):
        if body.get(name) not in (None, False, [], ""):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    defaults = settings.decoding
    top = settings.capacity
    max_tokens = int_value(body, "max_completion_tokens", None, 1, top)
    max_tokens = int_value(body, "max_tokens", max_tokens or defaults.max_new_tokens, 1, top)
    temperature = number_value(body, "temperature", 0.0, 2.0)
    top_p = number_value(body, "top_p", 0.0, 1.0, low_open=True)
    penalty = number_value(body, "repetition_penalty", 0.0, 100.0, low_open=True)
    seed = int_value(body, "seed", defaults.seed, 0, MAX_SEED)
    do_sample = defaults.do_sample if temperature is None else temperature > 0
    decoding = Decoding(max_new_tokens=max_tokens, do_sample=do_sample,
                        temperature=defaults.temperature if temperature in (None, 0.0) else temperature,
                        top_p=defaults.top_p if top_p is None else top_p,
                        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty, seed=seed)
    json_object = False
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object"):
            raise APIError(400, "'response_format' must be {\"type\": \"text\"} or {\"type\": \"json_object\"} (the "
                                "trained answer format); use structured_outputs.grammar for other structures",
                           "response_format")
        json_object = kind == "json_object"
    grammar = None
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict) or set(structured) - {"grammar"} or "grammar" not in structured:
            raise APIError(400, "'structured_outputs' must be {\"grammar\": EBNF}: this server takes grammars "
                                "only", "structured_outputs")
        grammar = text_value(structured["grammar"], "structured_outputs.grammar")
    if grammar is not None and json_object:
        raise APIError(400, "give response_format json_object or structured_outputs.grammar, not both",
                       "structured_outputs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {json_type(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return ChatCall(system, user_text, decoding, grammar, json_object, stream, bool(options.get("include_usage")))


# --------------------------------------------------------------------------------------------------------------
# Building the engine's request (on the preparation thread)
# --------------------------------------------------------------------------------------------------------------


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


def chat_request(engine: Engine, settings: ServiceSettings, call: ChatCall) -> Request:
    """The engine request of a chat completion: the prompt exactly as training lays out (and cuts) this exchange."""
    tokenizer = engine.tokenizer
    instruction_chars = len(INSTRUCTION) if call.user_text.startswith(INSTRUCTION) else 0
    dialogue = call.user_text[instruction_chars:]
    constraint = "schema" if call.json_object else None
    if call.grammar is not None and instruction_chars and call.system == SYSTEM_PROMPT:
        constraint = answer_constraint(call.grammar, dialogue)
    if constraint is not None and call.system == SYSTEM_PROMPT:  # predict.py's request, token for token
        request, _ = extraction_request(tokenizer, call.user_text, dialogue, call.decoding, constraint,
                                        engine.vocabulary, settings.max_len, settings.max_src_len,
                                        settings.truncation, instruction_chars)
    else:
        ids = build_chatml_ids(tokenizer, call.user_text, None, settings.max_len, settings.max_src_len,
                               system=call.system, truncation=settings.truncation,
                               instruction_chars=instruction_chars).input_ids
        request = Request(ids, call.decoding)
        if constraint is not None:  # json_object under another system prompt: the format alone
            request = replace(request, grammar=lambda: AnswerGrammar.for_dialogue(engine.vocabulary, "", "schema"),
                              closable=True)
        elif call.grammar is not None:
            try:
                grammar = check_ebnf(engine.vocabulary, call.grammar)
            except ValueError as e:  # xgrammar's reason, without its time stamp and source line
                reason = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e))
                raise APIError(400, f"structured_outputs.grammar: {reason}", "structured_outputs.grammar",
                               "invalid_grammar") from None
            request = replace(request, grammar=lambda: grammar)
    check_fits(engine, settings, request)
    return compiled(request)


def check_fits(engine: Engine, settings: ServiceSettings, request: Request) -> None:
    budget = request.decoding.max_new_tokens
    if request.slots() > settings.capacity:
        raise APIError(400, f"the prompt ({len(request.prompt)} tokens) and max_tokens ({budget}) exceed the "
                            f"{settings.capacity} tokens this server gives a request; lower max_tokens or shorten "
                            f"the system message", "max_tokens", "context_length_exceeded")
    if request.closable and budget < engine.empty_answer_tokens():
        raise APIError(400, f"max_tokens {budget} is below the {engine.empty_answer_tokens()} tokens the shortest "
                            f"answer in the trained format takes (every field empty)", "max_tokens")


def grounded_fields(fields: dict, dialogue: str) -> dict:
    """Each list item as {text, start, end}, the offsets of its first occurrence in `dialogue`
    (dialogue[start:end] == text); an item the dialogue does not hold (never, under the grounded grammar) gets
    null offsets."""
    out = {}
    for key, value in fields.items():
        if key in LIST_KEYS:
            items = []
            for text in value:
                start = dialogue.find(text) if text else -1
                items.append({"text": text, "start": start if start >= 0 else None,
                              "end": start + len(text) if start >= 0 else None})
            out[key] = items
        else:
            out[key] = value
    return out


def usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def finish_reason(result: Result) -> str:
    """OpenAI's: "length" when the budget ended the answer (closed or not), else "stop"."""
    return "length" if result.truncated or result.finish_reason == "length" else "stop"


# --------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------


def create_app(engine: Engine, settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving `engine`; its engine thread starts with the app and stops with it."""
    worker = EngineWorker(engine, settings.capacity)
    prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")  # one xgrammar compiler

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()
        prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Medical dialogue extraction", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, e: RequestValidationError):
        return error_response(400, f"invalid request: {one_line(e)}")

    @app.exception_handler(Exception)
    async def internal_error(request: HTTPRequest, e: Exception):  # a bug, never the client's input: said once
        print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {one_line(e)}", file=sys.stderr,
              flush=True)
        return error_response(500, "internal server error", kind="server_error")

    def check_key(request: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    async def prepare(build, *args) -> Request:
        return await asyncio.get_running_loop().run_in_executor(prepare_pool, build, *args)

    async def generate(request: Request, http: HTTPRequest) -> Result | None:
        """The result, or None if the client went away first (the answer is then cancelled)."""
        job = Job(request, asyncio.get_running_loop())
        worker.submit(job)
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None
                    continue
                if kind == "done":
                    return value
        finally:
            job.cancelled.set()  # a no-op for an answer that ended

    def failed(result: Result) -> APIError:
        return APIError(500, f"generation failed: {result.text}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_model_name, **worker.status()}

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        return {"object": "list", "data": [model_card(settings.served_model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: HTTPRequest):
        check_key(request)
        if name != settings.served_model_name:
            raise APIError(404, f"the model {name[:200]!r} does not exist", "model", "model_not_found")
        return model_card(name)

    @app.post("/v1/extract")
    async def extract(request: HTTPRequest):
        check_key(request)
        body = await read_json(request, settings.max_body_bytes)
        dialogue = text_value(body.get("dialogue"), "dialogue")
        if not dialogue.strip():
            raise APIError(400, "'dialogue' is empty", "dialogue")

        def build() -> tuple[Request, bool]:
            built, cut = extraction_request(engine.tokenizer, INSTRUCTION + dialogue, dialogue, settings.decoding,
                                            "grounded", engine.vocabulary, settings.max_len, settings.max_src_len,
                                            settings.truncation, len(INSTRUCTION))
            check_fits(engine, settings, built)
            return compiled(built), cut

        built, cut = await prepare(build)
        result = await generate(built, request)
        if result is None:
            return error_response(499, "the client closed the request")
        if result.finish_reason == "error":
            raise failed(result)
        fields, valid = parse_output(result.text)
        return {"fields": grounded_fields(fields, dialogue), "valid": valid, "truncated": result.truncated,
                "dialogue_cut": cut, "output": result.text, "finish_reason": finish_reason(result),
                "usage": usage(result)}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        check_key(request)
        body = await read_json(request, settings.max_body_bytes)
        call = parse_chat(body, settings)
        built = await prepare(chat_request, engine, settings, call)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if call.stream:
            return StreamingResponse(stream_chat(built, request, ident, created, call.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await generate(built, request)
        if result is None:
            return error_response(499, "the client closed the request")
        if result.finish_reason == "error":
            raise failed(result)
        return {"id": ident, "object": "chat.completion", "created": created, "model": settings.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": finish_reason(result)}],
                "usage": usage(result)}

    async def stream_chat(built: Request, http: HTTPRequest, ident: str, created: int,
                          include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's chunks as server-sent events: the role, the text as it grows, the finish reason, [DONE]."""
        def chunk(delta: dict, reason: str | None = None, **extra) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": settings.served_model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        job = Job(built, asyncio.get_running_loop(), stream=True)
        worker.submit(job)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if kind == "text":
                    yield chunk({"content": value})
                    continue
                if value.finish_reason == "error":
                    error = {"message": f"generation failed: {value.text}", "type": "server_error", "param": None,
                             "code": None}
                    yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
                else:
                    yield chunk({}, finish_reason(value))
                    if include_usage:  # OpenAI's last chunk: no choices, the usage
                        last = json.loads(chunk({})[len("data: "):])
                        yield f"data: {json.dumps({**last, 'choices': [], 'usage': usage(value)})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (the generator is closed), or the answer ended: either way its row is free
            job.cancelled.set()

    return app


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "serve.py"}

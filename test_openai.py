"""Baseline: an OpenAI-compatible chat model (OpenAI itself, or a local vLLM / llama.cpp / Ollama server) on the same
extraction task, with the same system prompt and instruction as the fine-tuned model.

The key is read from the environment only (OPENAI_API_KEY; a local server that ignores keys still needs some value)
and is never printed or written anywhere. --base_url defaults to OPENAI_BASE_URL, else OpenAI's own endpoint.

Batch: one request per record of data_helper's test.json (or of lines holding just {"input": dialogue}), a few at a
time, each retried with exponential backoff on HTTP 429 / 5xx, timeouts and connection errors. Every answer is
appended to --output_file as `{"id", "output", "model", "finish_reason", "input_digest"}` as soon as it arrives, so a
rerun with the same file only asks for what is missing, including requests that failed; any failure makes the exit
status 1. Ctrl-C waits for the requests already sent and writes their answers; a second Ctrl-C leaves at once.

    export OPENAI_API_KEY=...
    python test_openai.py --model gpt-4o-mini --input_file data/test.json --output_file predictions_openai.jsonl
    python evaluate.py --gold data/test.json --pred predictions_openai.jsonl

Interactive, as the chapter does it: paste a dialogue, end it with an empty line, read the answer (pretty-printed
when it holds JSON); quit, exit, Ctrl-D or Ctrl-C leave.

    python test_openai.py --model gpt-4o-mini

`--constraint grounded` (or `schema`) sends each dialogue's answer grammar (grammar.py) the way vLLM (0.12 and later)
and serve.py take one, `extra_body={"structured_outputs": {"grammar": ...}}`; OpenAI itself takes no grammar, hence
the default `none`. A server may ignore a field it does not know and still answer, so every answer is checked against
the grammar it was sent: its record says `follows_grammar`, and the run ends by counting the answers that broke it.

    python test_openai.py --base_url http://127.0.0.1:8000/v1 --model merged --constraint grounded \\
        --input_file data/test.json --output_file predictions_vllm.jsonl

Fields of your own: `--schema my_schema.json` puts its instruction before each dialogue (records without one of
their own), builds the grammar for its fields and reads the answers with them; the settings file records it, so
evaluate.py scores the predictions on its fields by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Sequence

import openai
from tqdm import tqdm

from medextract.cli import add_schema_argument
from medextract.decoding import Decoding
from medextract.grammar import CONSTRAINTS
from medextract.inference import Example, implied_schema, read_examples, schema_setting
from medextract.schema import CHAPTER_SCHEMA, Schema, load_schema
from medextract.terminal import interactive, show_answer
from utils import (SYSTEM_PROMPT, HelpFormatter, append_jsonl, check_output_path, check_run_settings,
                   count_records, exclusive_output, fail, input_digest, pending)

PROG = "test_openai.py"
API_KEY_ENV = "OPENAI_API_KEY"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--model", type=str, default="gpt-4o-mini",
                          help="model name on the endpoint (the chapter's gpt-3.5-turbo-1106 is retired)")
    endpoint.add_argument("--base_url", type=str, default=os.environ.get("OPENAI_BASE_URL"),
                          help="API root of any OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                               "(default: $OPENAI_BASE_URL, else OpenAI's endpoint)")
    endpoint.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for one request")
    endpoint.add_argument("--max_retries", type=int, default=5,
                          help="retries of one request after HTTP 408/409/429/5xx, a timeout or a connection error")
    endpoint.add_argument("--retry_base_delay", type=float, default=1.0,
                          help="seconds before the first retry, doubled for each further one, with jitter; at least "
                               "the server's Retry-After, at most 60 s")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: near-deterministic)")
    gen.add_argument("--max_tokens", "--max_tgt_len", type=int, default=Decoding().max_new_tokens,
                     help="most tokens in one answer (the API's name; predict.py's --max_tgt_len is the same "
                          "setting)")
    gen.add_argument("--json_mode", action="store_true",
                     help='ask for response_format {"type": "json_object"} (not every compatible server has it)')
    gen.add_argument("--constraint", choices=CONSTRAINTS, default="none",
                     help="send each dialogue's answer grammar as vLLM takes it (structured_outputs.grammar; vLLM "
                          ">= 0.12, serve.py) and count the answers that break it; grounded: list items copied from "
                          "the dialogue; schema: the format only; none: no grammar (OpenAI takes none)")
    add_schema_argument(gen, help="a schema file (JSON: {\"fields\": [{\"name\", \"kind\": \"spans\" or \"text\"}, "
                                  "…], \"instruction\"}) naming the fields to ask for: its instruction, grammar and "
                                  "parser; recorded with the results; default: the chapter's eight fields")

    batch = parser.add_argument_group("batch mode")
    batch.add_argument("--input_file", type=str, default=None,
                       help="JSON Lines with {instruction, input[, output]} (data_helper's test.json) or just {input}; "
                            "without it the script is interactive")
    batch.add_argument("--output_file", type=str, default="predictions_openai.jsonl",
                       help="answers, one JSON line per record; ids already in it are skipped (resume)")
    batch.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    args = parser.parse_args(argv)

    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.max_retries < 0:
        parser.error(f"--max_retries must be 0 or more, got {args.max_retries}")
    if args.retry_base_delay < 0:
        parser.error(f"--retry_base_delay must be 0 or more, got {args.retry_base_delay}")
    if args.max_tokens < 1:
        parser.error(f"--max_tokens must be at least 1, got {args.max_tokens}")
    if args.json_mode and args.constraint != "none":
        parser.error("--json_mode and --constraint both ask for structured output; a server takes one: give one")
    if args.base_url and not is_http_url(args.base_url):  # not echoed: a URL may carry user:password@
        parser.error("--base_url (or $OPENAI_BASE_URL): not an http:// or https:// URL with a host and a valid port")
    if args.input_file is not None and not os.path.isfile(args.input_file):
        parser.error(f"--input_file {args.input_file}: no such file")
    if args.input_file is not None:
        if os.path.realpath(args.output_file) == os.path.realpath(args.input_file):
            parser.error(f"--output_file {args.output_file} is the --input_file: the answers would be appended to the "
                         f"dialogues; give another --output_file")
        try:
            for path, flag in ((args.output_file, "--output_file"),
                               (args.output_file + ".settings.json", "the settings file of --output_file")):
                check_output_path(path, flag)
        except ValueError as e:
            parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        schema = load_schema(args.schema) if args.schema else CHAPTER_SCHEMA
    except ValueError as e:
        fail(PROG, e)
    client = build_client(args.base_url, args.timeout)
    settings = Settings(model=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
                        json_mode=args.json_mode, max_retries=args.max_retries,
                        retry_base_delay=args.retry_base_delay, constraint=args.constraint)
    checker = GrammarChecker(args.constraint, schema) if args.constraint != "none" else None
    if args.input_file is None:
        return interactive(lambda dialogue: answer_or_none(client, schema.instruction + dialogue, dialogue, settings,
                                                           checker),
                           lambda text: show(text, schema))
    try:
        with exclusive_output(args.output_file):  # one writer per results file, from its first read to the end
            examples = read_examples(args.input_file, schema)
            pending(examples, args.output_file, args.input_file)  # a bad or foreign results file stops here
            # the schema is recorded for evaluate.py; a file that records none was made with the chapter's
            check_run_settings(args.output_file, {"endpoint": endpoint(client), "model": args.model,
                                                  "temperature": args.temperature, "max_tokens": args.max_tokens,
                                                  "json_mode": args.json_mode, "constraint": args.constraint,
                                                  **schema_setting(schema)},
                               implied={"constraint": "none", **implied_schema(schema)})
            failures = request_file(client, examples, args.output_file, settings, args.concurrency,
                                    source=args.input_file, checker=checker)
    except ValueError as e:
        fail(PROG, e)
    except OSError as e:  # a full disk, say: every record written is whole, and a rerun resumes
        fail(PROG, f"{e.filename or args.output_file}: cannot write it ({e.strerror}); the "
                   f"{count_records(args.output_file)} whole answers written before are kept, and a rerun resumes")
    except KeyboardInterrupt:
        print(f"\ninterrupted: the {count_records(args.output_file)} answers in {args.output_file} are kept; rerun "
              f"the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 1 if failures else 0


def is_http_url(url: str) -> bool:
    """Whether the client could send requests to `url` (it fails with a traceback on, say, a bad port)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def endpoint(client) -> str:
    """The server the answers come from, as recorded with a results file: scheme, host, port and path only, so
    credentials a URL may carry (user:password@, ?key=) are never written."""
    url = urllib.parse.urlsplit(str(client.base_url))
    host = url.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((url.scheme, host + (f":{url.port}" if url.port else ""), url.path, "", ""))


# --------------------------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: str
    temperature: float = 0.0
    max_tokens: int = Decoding().max_new_tokens  # predict.py's --max_tgt_len
    json_mode: bool = False
    max_retries: int = 5
    retry_base_delay: float = 1.0
    max_retry_delay: float = 60.0
    constraint: str = "none"


class RequestFailed(Exception):
    """A request that got no usable answer, retries included; the message says why (never the key)."""


RETRY_STATUS = (408, 409, 429)  # and every 5xx


def build_client(base_url: str | None, timeout: float) -> openai.OpenAI:
    """A client whose own retries are off (`ask` retries, visibly and boundedly). Fails before any request when
    the key is missing; the key is handed over as is and never shown."""
    api_key = os.environ.get(API_KEY_ENV, "")
    if not api_key.strip():
        raise SystemExit(f"error: the environment variable {API_KEY_ENV} is not set; export your API key there "
                         f"(a local server that ignores keys still needs some value, e.g. {API_KEY_ENV}=none)")
    return openai.OpenAI(api_key=api_key, base_url=base_url or None, timeout=timeout, max_retries=0)


# A bearer token as an Authorization header carries it, wherever a server or proxy echoes one
BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;}\]]+")
MIN_SECRET_LEN = 8  # shorter values are the placeholders keyless local servers take (none, EMPTY), not secrets


def scrub(text: str, api_key: str | None) -> str:
    """`text` with the API key and any `Bearer <token>` replaced, for everything this script prints or writes:
    a server's error message, or even its answer, may quote the request's Authorization header."""
    text = BEARER.sub("Bearer [redacted]", text)
    if api_key and len(api_key) >= MIN_SECRET_LEN:
        text = text.replace(api_key, "[API key]")
    return text


def build_messages(user_text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]


def ask(client: openai.OpenAI, user_text: str, settings: Settings, sleep: Callable[[float], object] = time.sleep,
        stop: threading.Event | None = None, grammar: str | None = None) -> tuple[str, str | None]:
    """(answer text, finish_reason) for one user message, under `grammar` (EBNF, sent as vLLM's structured_outputs)
    if given. At most `settings.max_retries + 1` attempts; raises RequestFailed when the last one fails, when the
    server refuses for good (other 4xx), when the body is not a chat completion, or when `stop` is set before the next
    attempt."""
    extra = {"response_format": {"type": "json_object"}} if settings.json_mode else {}
    if grammar is not None:
        extra["extra_body"] = {"structured_outputs": {"grammar": grammar}}
    error: Exception | None = None
    for attempt in range(settings.max_retries + 1):
        if attempt:
            sleep(backoff_delay(attempt - 1, settings, retry_after(error)))
        if stop is not None and stop.is_set():
            raise RequestFailed("cancelled")
        try:
            response = client.chat.completions.create(
                model=settings.model, messages=build_messages(user_text), temperature=settings.temperature,
                max_tokens=settings.max_tokens, **extra)
        except openai.APIStatusError as e:
            if e.status_code not in RETRY_STATUS and e.status_code < 500:
                raise RequestFailed(f"HTTP {e.status_code}: {e.message}") from None
            error = e
        except openai.APIConnectionError as e:  # includes timeouts
            error = e
        except (openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestFailed(f"malformed response body (not a chat completion): {e}") from None
        except openai.OpenAIError as e:  # anything else the client rejects: this id fails, the run goes on
            raise RequestFailed(f"{type(e).__name__}: {e}") from None
        else:
            return answer_of(response)
    raise RequestFailed(f"gave up after {settings.max_retries + 1} attempts; last error: {describe(error)}")


LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def answer_of(response) -> tuple[str, str | None]:
    """The first choice's text, checked: a body without choices or content is a failure, not a crash."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise RequestFailed("malformed response body: no 'choices'")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise RequestFailed("malformed response body: choice 0 has no message content")
    finish_reason = getattr(choices[0], "finish_reason", None)
    # a JSON "\ud800" escape without its pair: no UTF-8 file or terminal takes it, so it becomes U+FFFD, as an
    # invalid byte does in predict.py's decoded answers
    content = LONE_SURROGATE.sub("\ufffd", content)
    return content, finish_reason if isinstance(finish_reason, str) else None


def backoff_delay(retry: int, settings: Settings, server_hint: float | None = None) -> float:
    """Seconds before retry number `retry` (0-based): base·2^retry with jitter (so parallel workers do not retry in
    step), at least the server's Retry-After, never more than max_retry_delay."""
    delay = settings.retry_base_delay * 2 ** retry * random.uniform(0.5, 1.0)
    if server_hint is not None:
        delay = max(delay, server_hint)
    return min(delay, settings.max_retry_delay)


def retry_after(error: Exception | None) -> float | None:
    """The Retry-After header of an HTTP error, in seconds, when it is a plain number."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def describe(error: Exception | None) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message}"
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------


def request_file(client: openai.OpenAI, examples: Sequence[Example], output_file: str, settings: Settings,
                 concurrency: int = 4, source: str = "input",
                 checker: "GrammarChecker | None" = None) -> list[tuple[int, str]]:
    """Ask for every example whose id is not yet in `output_file`, `concurrency` at a time, appending each answer as
    it arrives; with `checker`, under its grammar, each answer checked against it. Returns the (id, error) of the
    requests that failed; they are left out of the file."""
    todo, done = pending(examples, output_file, source)
    print(f"{source}: {len(examples)} records, {done} already in {output_file}, "
          f"{len(todo)} to request from {settings.model}", flush=True)
    failures: list[tuple[int, str]] = []
    if not todo:
        return failures
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    start = time.perf_counter()
    digests = {e.id: input_digest(e.user_text) for e in todo}
    grammars = {e.id: checker.ebnf(e.user_text[e.instruction_chars:]) if checker else None for e in todo}
    broke: list[int] = []
    stop = threading.Event()  # set on the way out, so that after Ctrl-C no worker starts another attempt
    pool = ThreadPoolExecutor(max_workers=concurrency)
    recorded: set = set()

    def record(future, bar) -> None:
        recorded.add(future)
        i = futures[future]
        try:
            content, finish_reason = future.result()
        except RequestFailed as e:
            failures.append((i, scrub(str(e), client.api_key)))
            bar.write(f"id {i}: failed: {failures[-1][1]}", file=sys.stderr)
        else:
            content = scrub(content, client.api_key)
            extra = {}
            if checker is not None:
                extra["follows_grammar"] = checker.follows(grammars[i], content)
                if not extra["follows_grammar"]:
                    broke.append(i)
            append_jsonl(output_file, [{"id": i, "output": content, "model": settings.model,
                                        "finish_reason": finish_reason, **extra, "input_digest": digests[i]}])
        bar.update(1)

    try:
        futures = {pool.submit(ask, client, e.user_text, settings, stop.wait, stop, grammars[e.id]): e.id
                   for e in todo}
        with tqdm(total=len(todo), desc=settings.model, unit="request") as bar:
            try:
                for future in as_completed(futures):
                    record(future, bar)
            except KeyboardInterrupt:
                stop.set()
                pool.shutdown(wait=False, cancel_futures=True)  # drop what has not started
                keep_in_flight([f for f in futures if f not in recorded and not f.cancelled()], record, bar,
                               output_file)
                raise
    finally:  # what was written stays, and a rerun resumes
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - start
    print(f"wrote {len(todo) - len(failures)} answers to {output_file} | {len(failures)} failed | {seconds:.1f} s",
          flush=True)
    if checker is not None:
        print(f"{len(broke)} of {len(todo) - len(failures)} answers broke the {settings.constraint} grammar they "
              f"were sent" + (" (the server ignored it, or cut answers at --max_tokens): ids "
                              + ", ".join(map(str, sorted(broke))) if broke else ""), flush=True)
    if failures:
        print(f"{len(failures)} requests failed (rerun the same command to retry them): "
              + ", ".join(str(i) for i, _ in sorted(failures)), file=sys.stderr, flush=True)
    return failures


def keep_in_flight(in_flight: list, record: Callable, bar, output_file: str) -> None:
    """After Ctrl-C: the requests already sent are paid for, so wait for them (each at most --timeout seconds) and
    write their answers. A second Ctrl-C leaves at once without them; everything written before stays."""
    if not in_flight:
        return
    try:
        bar.write(f"interrupted: waiting for the {len(in_flight)} requests in flight to write their answers (at "
                  f"most --timeout seconds); Ctrl-C again leaves without them", file=sys.stderr)
        for future in as_completed(in_flight):
            record(future, bar)
    except KeyboardInterrupt:
        print(f"\nleft without them: the answers so far are in {output_file}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # the worker threads still wait on their requests, and a normal exit would join them


# --------------------------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------------------------


def answer_or_none(client: openai.OpenAI, user_text: str, dialogue: str, settings: Settings,
                   checker: "GrammarChecker | None" = None) -> str | None:
    """The answer, or None after printing why the request failed (the loop goes on); under a constraint, a warning
    when the answer breaks the grammar it was sent."""
    ebnf = checker.ebnf(dialogue) if checker else None
    try:
        answer = scrub(ask(client, user_text, settings, grammar=ebnf)[0], client.api_key)
    except RequestFailed as e:
        print(f"request failed: {scrub(str(e), client.api_key)}", file=sys.stderr, flush=True)
        return None
    if checker is not None and not checker.follows(ebnf, answer):
        print(f"(this answer breaks the {settings.constraint} grammar it was sent: the server ignored it, or cut "
              f"the answer)", flush=True)
    return answer


class GrammarChecker:
    """The answer grammar of a dialogue with the schema's fields (grammar.build_ebnf) and the check that an answer
    follows it, through xgrammar with Qwen's vocabulary (the packaged qwen.tiktoken: no model is needed)."""

    def __init__(self, constraint: str, schema: Schema = CHAPTER_SCHEMA):
        from medextract.grammar import build_vocabulary
        from qwen1_8.tokenization_qwen import QWenTokenizer, packaged_vocab_file

        self.constraint = constraint
        self.fields = schema.fields
        self.vocabulary = build_vocabulary(QWenTokenizer(vocab_file=packaged_vocab_file()))
        self.lock = threading.Lock()  # answers arrive on worker threads

    def ebnf(self, dialogue: str) -> str:
        from medextract.grammar import build_ebnf

        return build_ebnf(dialogue, self.constraint, self.fields)

    def follows(self, ebnf: str, answer: str) -> bool:
        """Whether the whole answer is one the grammar produces (the text, complete; the end token is the server's)."""
        from medextract.grammar import AnswerGrammar

        with self.lock:
            try:
                matcher = AnswerGrammar(self.vocabulary, ebnf).matcher
                return bool(matcher.accept_string(answer)) and matcher.is_completed()
            except (RuntimeError, ValueError):  # xgrammar refused the grammar or the text: it is not followed
                return False


def show(text: str | None, schema: Schema = CHAPTER_SCHEMA) -> None:
    if text is not None:
        show_answer(text, schema.fields)


if __name__ == "__main__":
    sys.exit(main())

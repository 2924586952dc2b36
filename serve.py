"""Serve the fine-tuned (merged) model over HTTP: OpenAI's chat-completions API, an extraction endpoint and a page.

    python serve.py --model_path output_dir_qlora/merged              # http://127.0.0.1:8000
    SERVE_API_KEY=... python serve.py --model_path output_dir_qlora/merged --api_key_env SERVE_API_KEY

The model is loaded once; service.py has the endpoints:

- GET  /v1/models: the served name (the model directory's name unless --served_model_name);
- POST /v1/chat/completions: OpenAI's request and response (stream: true as server-sent events), the prompt laid
  out and cut as training does; max_tokens, temperature (0 or absent: greedy, as predict.py), top_p, seed, vLLM's
  repetition_penalty (default --repetition_penalty), response_format json_object (the trained format) and vLLM's
  structured_outputs {"grammar": EBNF}, so `test_openai.py --base_url http://127.0.0.1:8000/v1` scores this server
  as it scores vLLM;
- POST /v1/extract {"dialogue": ...}: the schema's fields under the grounded grammar, each item of a span field with
  its character offsets in the dialogue;
- GET /health (the schema's fields among what it says), and GET /: a page to paste a dialogue into and see the
  fields, highlighted in it.

The fields are the schema the model was trained with (the schema.json train.py saves with each checkpoint and
merge_params.py copies), else --schema (for a model trained elsewhere), else the chapter's eight; the prompts it
recognises as extractions are that schema's instruction + dialogue. A --schema other than the model's own is
refused.

Requests that arrive together are generated together, up to --max_batch_size; it listens on 127.0.0.1 unless --host
says otherwise, and with --api_key_env every /v1 request needs `Authorization: Bearer <key>`. What one client sends
cannot stall the others: a client's grammar is compiled first in one of --grammar_workers processes, within
--grammar_timeout seconds and --grammar_memory_mb (the process is killed past them, or when its client leaves), no
grammar over --max_grammar_bytes is compiled, and a request waits for no other's grammar.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from typing import Sequence

from medextract.cli import (add_generation_arguments, add_model_arguments, add_schema_argument, check_generation_args,
                            decoding_of, dtype_of, schema_of)
from medextract.errors import ConfigError, MedextractError
from medextract.grammar_pool import GrammarBounds
from medextract.inference import (DEFAULT_MODEL_PATH, PROMPT_OVERHEAD, Interrupted, check_model_dir_files, dtype_note,
                                  load_engine)
from medextract.model_files import RANDOM_WEIGHTS_NOTE, has_random_weights
from utils import (HelpFormatter, fail, resolve_device, return_freed_memory, set_random_seed,
                   silence_library_deprecations)

PROG = "serve.py"

MIN_BODY_BYTES = 4096
MIN_GRAMMAR_BYTES = 4096  # json_object's grammar takes 600
MIN_GRAMMAR_MEMORY_MB = 128
MAX_GRAMMAR_WORKERS = 64


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_schema_argument(add_model_arguments(parser, DEFAULT_MODEL_PATH))  # the fields come with the model
    add_generation_arguments(parser, constraint=False,
                             max_tgt_len_help="most new tokens per answer: a request's max_tokens when it gives none, "
                                              "and the largest it may ask; with --max_src_len what the cache holds "
                                              "per request")
    server = parser.add_argument_group("server")
    server.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on; 127.0.0.1 keeps it to this machine (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    server.add_argument("--api_key_env", type=str, default=None,
                        help="name of an environment variable holding the API key every /v1 request must send as "
                             "'Authorization: Bearer <key>' (the key itself is never a flag, never logged); without "
                             "it no key is asked")
    server.add_argument("--max_batch_size", type=int, default=8, help="answers generated together at most")
    server.add_argument("--served_model_name", type=str, default=None,
                        help="the model's name in the API (default: the --model_path directory's name)")
    server.add_argument("--max_body_bytes", type=int, default=1_000_000,
                        help="largest request body taken; a larger one gets HTTP 413")
    bounds = GrammarBounds()
    grammars = parser.add_argument_group("grammars (what one request's grammar may cost)")
    grammars.add_argument("--grammar_workers", type=int, default=bounds.workers,
                          help="processes that compile clients' structured_outputs grammars, one each at a time "
                               "(about 300 MB each; a grammar waits for a free one)")
    grammars.add_argument("--grammar_timeout", type=float, default=bounds.timeout,
                          help="seconds a client's grammar may take to compile; past it its process is killed and "
                               "the request gets HTTP 400")
    grammars.add_argument("--max_grammar_bytes", type=int, default=bounds.max_bytes,
                          help="largest grammar compiled, a client's or the answer grammar of what the model reads "
                               "of a dialogue (that of ordinary text stays under 100 KB); larger: HTTP 400")
    grammars.add_argument("--grammar_memory_mb", type=int, default=bounds.memory_mb,
                          help="memory a client's grammar may take to compile, in its process; more: HTTP 400")
    args = parser.parse_args(argv)
    try:
        schema_of(args)  # the model's schema.json, or a --schema file, at fault: one line, as predict.py says it
    except MedextractError as e:
        fail(PROG, e)
    try:
        check_flags(args)
    except MedextractError as e:
        parser.error(str(e))
    return args


def check_flags(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_batch_size < 1:
        raise ConfigError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    if args.max_body_bytes < MIN_BODY_BYTES:
        raise ConfigError(f"--max_body_bytes must be at least {MIN_BODY_BYTES}, got {args.max_body_bytes}")
    if not 1 <= args.grammar_workers <= MAX_GRAMMAR_WORKERS:
        raise ConfigError(f"--grammar_workers must be between 1 and {MAX_GRAMMAR_WORKERS}, got {args.grammar_workers}")
    if not (math.isfinite(args.grammar_timeout) and args.grammar_timeout > 0):
        raise ConfigError(f"--grammar_timeout must be a number of seconds above 0, got {args.grammar_timeout}")
    if args.max_grammar_bytes < MIN_GRAMMAR_BYTES:
        raise ConfigError(f"--max_grammar_bytes must be at least {MIN_GRAMMAR_BYTES}, got {args.max_grammar_bytes}")
    if args.grammar_memory_mb < MIN_GRAMMAR_MEMORY_MB:
        raise ConfigError(f"--grammar_memory_mb must be at least {MIN_GRAMMAR_MEMORY_MB}, got "
                          f"{args.grammar_memory_mb}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ConfigError("--served_model_name is empty")
    if args.api_key_env is not None and not os.environ.get(args.api_key_env, "").strip():
        raise ConfigError(f"--api_key_env {args.api_key_env}: that environment variable is not set or empty; export "
                         f"the API key there first")
    check_generation_args(args, "grounded")  # /v1/extract answers under the grounded grammar
    check_address(args.host, args.port)


def check_address(host: str, port: int) -> None:
    """That --host:--port can be listened on, before the model loads for minutes (a port another server holds, an
    address that is not this machine's)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(args.model_path)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    silence_library_deprecations()
    set_random_seed(args.seed)
    try:
        device = resolve_device(args.device)
        return_freed_memory(device)  # prompts of every length, for as long as it runs
        check_model_dir_files(args.model_path)
        print(dtype_note(args.dtype, device), flush=True)
        engine = load_engine(args.model_path, device, dtype_of(args, device), args.max_batch_size, True)
    except (MedextractError, ValueError) as e:
        fail(PROG, e)
    except KeyboardInterrupt:  # Ctrl-C while the model loads: one line, the shell's status
        fail(PROG, Interrupted(f"{PROG}: interrupted while loading {args.model_path}; nothing was served"))
    import uvicorn

    from medextract.service import ServiceSettings, create_app

    api_key = os.environ[args.api_key_env].strip() if args.api_key_env else None
    settings = ServiceSettings(served_model_name=served_name(args), decoding=decoding_of(args),
                               max_len=args.max_len, max_src_len=args.max_src_len, truncation=args.truncation,
                               capacity=args.max_src_len + PROMPT_OVERHEAD + args.max_tgt_len,
                               max_body_bytes=args.max_body_bytes, api_key=api_key,
                               grammar=GrammarBounds(workers=args.grammar_workers, timeout=args.grammar_timeout,
                                                     max_bytes=args.max_grammar_bytes,
                                                     memory_mb=args.grammar_memory_mb),
                               random_weights=has_random_weights(args.model_path), schema=schema_of(args))
    if settings.random_weights:
        print(RANDOM_WEIGHTS_NOTE, flush=True)
    print(f"serving {settings.served_model_name} on http://{args.host}:{args.port} | {device} | batch "
          f"{args.max_batch_size} | {settings.capacity} tokens per request"
          + (f" | API key from ${args.api_key_env}" if api_key else " | no API key")
          + f" | grammars: {args.grammar_workers} workers, {args.grammar_timeout:g} s, {args.max_grammar_bytes} "
            f"bytes, {args.grammar_memory_mb} MB", flush=True)
    try:
        uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info")
    except OSError as e:  # the port is taken, the address is not this machine's
        fail(PROG, f"cannot listen on {args.host}:{args.port} ({e.strerror})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The flags that several scripts share, and what they turn into: predict.py, test_qwen.py and serve.py take the
same model and generation flags, and train.py and bench/bench_train.py the same LoRA flags, so each is defined here
once. The scripts parse argv; this module only adds argument groups to a parser and reads the parsed values into the
library's settings."""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterator

import torch

from utils import (DTYPES, TRUNCATIONS, HelpFormatter, check_output_path, exclusive_output, resolve_device,
                   return_freed_memory, set_random_seed, silence_library_deprecations)

from .engine import Decoding
from .errors import ConfigError, MedextractError, OutputError
from .grammar import CONSTRAINTS
from .inference import (DEFAULT_MODEL_PATH, Interrupted, Truncation, answer_dialogue, check_generation, dtype_note,
                        predict_file, prepare_engine, resolve_dtype, trained_truncation)
from .model_files import RANDOM_WEIGHTS_NOTE, has_random_weights
from .qlora import QLoRASettings
from .schema import SCHEMA_FILE, Schema, resolve_schema
from .terminal import interactive, show_answer


MODEL_PATH_HELP = ("checkpoint directory (weights, config.json and the tokenizer's qwen.tiktoken); a train.py "
                   "checkpoint also works, its adapter put unmerged on the base it names")


def add_model_arguments(parser: argparse.ArgumentParser, model_path: str = DEFAULT_MODEL_PATH,
                        model_path_help: str = MODEL_PATH_HELP) -> argparse._ArgumentGroup:
    """--model_path, --device, --dtype; the group, for flags that go with them."""
    model = parser.add_argument_group("model")
    model.add_argument("--model_path", type=str, default=model_path, help=model_path_help)
    model.add_argument("--device", type=str, default="auto",
                       help="'auto' (a GPU if one is visible, else the CPU), 'cpu', 'cuda', 'cuda:N' or a bare GPU index")
    model.add_argument("--dtype", type=str, default="auto", choices=["auto", *DTYPES],
                       help="weights and compute dtype; auto = bf16 on a GPU that supports it, fp16 on other GPUs, "
                            "bf16 on a CPU that computes it natively (AVX512-BF16, AMX), else fp32")
    return model


class StoreSamplingFlag(argparse.Action):
    """Stores the value like `store`, and notes the flag in `args.sampling_flags_given`: a flag the command line
    gives, even at its default value, is told apart from one left out (the chapter's command gives --top_p 0.8
    --temperature 0.8, the defaults, and expects them to sample)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "sampling_flags_given", ())
        setattr(namespace, "sampling_flags_given", (*given, self.dest) if self.dest not in given else given)


def add_generation_arguments(parser: argparse.ArgumentParser, constraint: bool = True,
                             max_tgt_len_help: str = "most new tokens generated per answer") -> None:
    """The decoding and prompt-length flags; serve.py takes them as the defaults of its requests and has no
    --constraint (a request says which grammar it wants)."""
    defaults = Decoding()
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_tgt_len", type=int, default=defaults.max_new_tokens, help=max_tgt_len_help)
    if constraint:
        gen.add_argument("--constraint", choices=CONSTRAINTS, default="grounded",
                         help="grounded: every answer is the trained JSON format with each list item copied verbatim "
                              "from the dialogue, closed if --max_tgt_len cuts it; schema: the format, list items any "
                              "text (for labels that are not verbatim); none: free generation, the chapter's way")
    gen.add_argument("--do_sample", action="store_true",
                     help="sample with --top_p/--temperature instead of greedy decoding (greedy is reproducible)")
    gen.add_argument("--top_p", type=float, default=0.8, action=StoreSamplingFlag,
                     help="nucleus sampling mass (only with --do_sample)")
    gen.add_argument("--temperature", type=float, default=0.8, action=StoreSamplingFlag,
                     help="sampling temperature (only with --do_sample)")
    gen.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty,
                     help="penalty on tokens already in the prompt or answer; 1.0 turns it off")
    gen.add_argument("--seed", type=int, default=42, help="random seed (matters only with --do_sample)")
    gen.add_argument("--max_len", type=int, default=None,
                     help="the training --max_len; with --max_src_len it truncates prompts exactly as training did. "
                          "Default: the model's train_args.json (merge_params.py copies it), else 2048")
    gen.add_argument("--max_src_len", type=int, default=None,
                     help="the training --max_src_len: a longer user block is cut as in training. "
                          "Default: from train_args.json as --max_len, else 1560")
    gen.add_argument("--truncation", choices=TRUNCATIONS, default=None,
                     help="the training --truncation (tokens: keep a long dialogue's first tokens; turns: its leading "
                          "whole turns). Default: from train_args.json as --max_len, else tokens")


SCHEMA_HELP = ("a schema file (JSON: {\"fields\": [{\"name\", \"kind\": \"spans\" or \"text\"}, …], "
               "\"instruction\"}) naming the fields to extract; default: the schema.json a model trained here "
               "carries, else the chapter's eight fields")


def add_schema_argument(group, help: str = SCHEMA_HELP) -> None:
    """--schema, the same flag in every script."""
    group.add_argument("--schema", type=str, default=None, help=help)


def schema_of(args: argparse.Namespace, model_path: str | None = None) -> Schema:
    """The schema to answer with: the model's own schema.json, else --schema, else the chapter's; a --schema that
    differs from the model's is refused (medextract.schema.resolve_schema)."""
    model_path = args.model_path if model_path is None else model_path
    return resolve_schema(model_path if model_path and os.path.isdir(model_path) else None, args.schema)


def schema_note(schema: Schema, model_path: str | None) -> str | None:
    """One line naming a schema of the user's own and where it came from; None for the chapter's."""
    if schema.is_chapter:
        return None
    source = (os.path.join(model_path, SCHEMA_FILE)
              if model_path and os.path.isfile(os.path.join(model_path, SCHEMA_FILE)) else "--schema")
    return f"schema: {len(schema.fields)} fields from {source}: {schema.describe()}"


def add_batch_arguments(parser: argparse.ArgumentParser, output_file: str) -> None:
    io = parser.add_argument_group("batch mode")
    io.add_argument("--input_file", type=str, default=None,
                    help="JSON Lines with {instruction, input[, output]} per line (data_helper's test.json) or just "
                         "{input}; without it the script is interactive")
    io.add_argument("--output_file", type=str, default=output_file,
                    help="predictions, one JSON line per input; ids already in it are skipped (resume)")
    io.add_argument("--batch_size", type=int, default=8,
                    help="answers generated together (longest prompts first; a row whose answer ends takes the next)")


def extraction_parser(description: str, model_path: str, output_file: str,
                      model_path_help: str = MODEL_PATH_HELP) -> argparse.ArgumentParser:
    """predict.py's and test_qwen.py's flags: the model, generation and batch groups."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_schema_argument(add_model_arguments(parser, model_path, model_path_help))  # the fields come with the model
    add_generation_arguments(parser)
    add_batch_arguments(parser, output_file)
    return parser


def greedy_note(args: argparse.Namespace) -> str | None:
    """One line for a command that gives the chapter's sampling flags without --do_sample, which a reader of the
    book expects to sample: here they wait for --do_sample."""
    given = getattr(args, "sampling_flags_given", ())
    if not given or args.do_sample:
        return None
    flags = " and ".join(f"--{name}" for name in given)
    return (f"note: decoding is greedy; {flags} {'take' if len(given) > 1 else 'takes'} effect only with "
            f"--do_sample, which samples as the book did")


def add_lora_args(group) -> None:
    """The LoRA flags of train.py and bench/bench_train.py, so both build the same adapter."""
    defaults = QLoRASettings(model_name_or_path="")
    group.add_argument("--lora_dim", type=int, default=defaults.lora_dim, help="LoRA rank r")
    group.add_argument("--lora_alpha", type=int, default=defaults.lora_alpha,
                       help="LoRA alpha; the update is scaled by alpha / r")
    group.add_argument("--lora_dropout", type=float, default=defaults.lora_dropout, help="dropout on the LoRA input")


def decoding_of(args: argparse.Namespace) -> Decoding:
    return Decoding(max_new_tokens=args.max_tgt_len, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def truncation_of(args: argparse.Namespace) -> Truncation:
    return Truncation(args.max_len, args.max_src_len, args.truncation)


def check_generation_args(args: argparse.Namespace, constraint: str) -> None:
    """The model and generation flags, for answers generated under `constraint`; fills the training truncation
    (--max_len, --max_src_len, --truncation) where it was not given, and says where it came from."""
    truncation, source = trained_truncation(args.model_path, args.max_len, args.max_src_len, args.truncation) \
        if os.path.isdir(args.model_path) else (Truncation(args.max_len or 2048, args.max_src_len or 1560,
                                                           args.truncation or "tokens"), None)
    given = [key for key in ("max_len", "max_src_len", "truncation") if getattr(args, key) is None]
    args.max_len, args.max_src_len, args.truncation = truncation.max_len, truncation.max_src_len, truncation.mode
    if source is not None:
        print(f"prompt truncation: --max_len {args.max_len} --max_src_len {args.max_src_len} --truncation "
              f"{args.truncation} ({', '.join('--' + key for key in given)} from {source})", flush=True)
    check_generation(args.model_path, decoding_of(args), constraint, truncation)
    note = schema_note(schema_of(args), args.model_path)
    if note:
        print(note, flush=True)


def check_batch_args(args: argparse.Namespace) -> None:
    """predict.py's and test_qwen.py's flags (a note where sampling flags come without --do_sample)."""
    note = greedy_note(args)
    if note:
        print(note, flush=True)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_generation_args(args, args.constraint)
    if args.input_file is not None and not os.path.isfile(args.input_file):
        raise ConfigError(f"--input_file {args.input_file}: no such file")
    if args.input_file is not None and os.path.realpath(args.output_file) == os.path.realpath(args.input_file):
        raise ConfigError(f"--output_file {args.output_file} is the --input_file: the predictions would be appended "
                          f"to the dialogues; give another --output_file")


def dtype_of(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    return resolve_dtype(args.dtype, device)


def run_extraction(args: argparse.Namespace) -> int:
    """predict.py's and test_qwen.py's work once their flags are checked: interactive without --input_file, else
    every record of --input_file not yet in --output_file, answered and appended."""
    silence_library_deprecations()
    set_random_seed(args.seed)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return_freed_memory(device)
    decoding, truncation, schema = decoding_of(args), truncation_of(args), schema_of(args)
    print(dtype_note(args.dtype, device), flush=True)
    if has_random_weights(args.model_path):  # before the first answer, batch or interactive
        print(RANDOM_WEIGHTS_NOTE, flush=True)
    try:
        return extract_as_asked(args, device, decoding, truncation, schema)
    except KeyboardInterrupt:  # while the model loads, say (predict_file says what it kept itself)
        raise Interrupted("interrupted") from None


def extract_as_asked(args: argparse.Namespace, device: torch.device, decoding: Decoding, truncation: Truncation,
                     schema: Schema) -> int:
    if args.input_file is None:
        engine = prepare_engine(args.model_path, device, dtype_of(args, device), args.batch_size, args.constraint,
                                decoding, truncation, schema=schema)
        return interactive(lambda dialogue: answer_dialogue(engine, dialogue, decoding, args.constraint, truncation,
                                                            schema),
                           lambda answer: show_answer(answer, schema.fields))
    with writing(args.output_file):  # one writer per results file, from before its first read to the end
        engine = prepare_engine(args.model_path, device, dtype_of(args, device), args.batch_size, args.constraint,
                                decoding, truncation, args.input_file, args.output_file, schema)
        predict_file(engine, args.input_file, args.output_file, decoding, truncation, args.constraint, schema)
    return 0


@contextlib.contextmanager
def writing(output_file: str) -> Iterator[None]:
    """utils.exclusive_output, its refusal and file errors as the library's errors."""
    try:
        check_output_path(output_file, "--output_file")  # a folder there, no permission: named before the lock
        with exclusive_output(output_file):
            yield
    except MedextractError:  # the run's own errors, already in words
        raise
    except ValueError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"--output_file {output_file}: cannot write it ({e.strerror})") from None

"""Extract the eight medical elements from doctor–patient dialogues with the fine-tuned (merged) Qwen-1.8B-Chat.

Interactive: paste a dialogue (as many lines as it has), end it with an empty line, and the extracted JSON is printed;
`quit`, `exit`, Ctrl-D or Ctrl-C leave.

    python predict.py --model_path output_dir_qlora/merged

Batch: one JSON line per input record, `{"id", "output", "num_new_tokens", "truncated", "input_digest"}`, appended as
each answer ends, so a rerun with the same --output_file resumes where the last one stopped (refused for other
settings or another input file); `python evaluate.py` scores the file.

    python predict.py --model_path output_dir_qlora/merged \
        --input_file data/test.json --output_file predictions.jsonl --batch_size 8

The prompt is `utils.build_chatml_ids(..., output=None)`, token for token the prefix the model was trained on (the
chapter's predict.py dropped the `<|im_start|>` before `assistant`). Decoding is greedy unless --do_sample is given,
because an extraction should not change from one run to the next. Under `--constraint grounded` (the default) every
answer is valid JSON in the trained format with each list item copied from the dialogue, also when --max_tgt_len cuts
it (it is then closed, and flagged `truncated`); generation.py is the batched engine, grammar.py the grammar.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from generation import Decoding, Engine, Result, extraction_request
from grammar import CONSTRAINTS, build_vocabulary
from model_files import LOAD_ERRORS, check_adapter_files, check_model_files, check_vocabulary, read_json_object
from utils import (DTYPES, INSTRUCTION, TRUNCATIONS, WEIGHT_FILES, HelpFormatter, append_jsonl, build_chatml_ids,
                   check_output_path, check_run_settings, input_digest, iter_jsonl, load_tokenizer, native_bf16,
                   one_line, parse_output, pending, resolve_device, set_random_seed, silence_library_deprecations)

DEFAULT_MODEL_PATH = "output_dir_qlora/merged"  # merge_params.py's default --save_model_dir
# Under a constraint an answer is closed before --max_tgt_len runs out; the empty answer alone takes 46 tokens.
MIN_CONSTRAINED_TOKENS = 64
# A prompt's tokens besides its user block: the system block (10), two "\n" and "<|im_start|>assistant\n" (3)
PROMPT_OVERHEAD = 15
# How training cut prompts: the chapter's, where a checkpoint does not record it
TRAINING_TRUNCATION = {"max_len": 2048, "max_src_len": 1560, "truncation": "tokens"}


def build_arg_parser(description: str = __doc__, model_path: str = DEFAULT_MODEL_PATH,
                     output_file: str = "predictions.jsonl") -> argparse.ArgumentParser:
    """The flags of predict.py; test_qwen.py uses the same ones with its own defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_arguments(parser, model_path)
    add_generation_arguments(parser)

    io = parser.add_argument_group("batch mode")
    io.add_argument("--input_file", type=str, default=None,
                    help="JSON Lines with {instruction, input[, output]} per line (data_helper's test.json) or just "
                         "{input}; without it the script is interactive")
    io.add_argument("--output_file", type=str, default=output_file,
                    help="predictions, one JSON line per input; ids already in it are skipped (resume)")
    io.add_argument("--batch_size", type=int, default=8,
                    help="answers generated together (longest prompts first; a row whose answer ends takes the next)")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, model_path: str = DEFAULT_MODEL_PATH) -> None:
    """--model_path, --device, --dtype: predict.py's, test_qwen.py's and serve.py's."""
    model = parser.add_argument_group("model")
    model.add_argument("--model_path", type=str, default=model_path,
                       help="checkpoint directory (weights, config.json and the tokenizer's qwen.tiktoken); a "
                            "train.py checkpoint also works, its adapter put unmerged on the base it names")
    model.add_argument("--device", type=str, default="auto",
                       help="'auto' (a GPU if one is visible, else the CPU), 'cpu', 'cuda', 'cuda:N' or a bare GPU index")
    model.add_argument("--dtype", type=str, default="auto", choices=["auto", *DTYPES],
                       help="weights and compute dtype; auto = bf16 on a GPU that supports it, fp16 on other GPUs, "
                            "fp32 on the CPU")


def add_generation_arguments(parser: argparse.ArgumentParser, constraint: bool = True,
                             max_tgt_len_help: str = "most new tokens generated per answer") -> None:
    """The decoding and prompt-length flags; serve.py takes them as the defaults of its requests and has no
    --constraint (a request says which grammar it wants)."""
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_tgt_len", type=int, default=512, help=max_tgt_len_help)
    if constraint:
        gen.add_argument("--constraint", choices=CONSTRAINTS, default="grounded",
                         help="grounded: every answer is the trained JSON format with each list item copied verbatim "
                              "from the dialogue, closed if --max_tgt_len cuts it; schema: the format, list items any "
                              "text (for labels that are not verbatim); none: free generation, the chapter's way")
    gen.add_argument("--do_sample", action="store_true",
                     help="sample with --top_p/--temperature instead of greedy decoding (greedy is reproducible)")
    gen.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (only with --do_sample)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (only with --do_sample)")
    gen.add_argument("--repetition_penalty", type=float, default=1.1,
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_arg_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace, prog: str = "predict.py") -> None:
    """Every flag checked before anything loads; an error names the script, as argparse's own do."""
    try:
        check_flags(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(f"{prog}: error: {e.code}") from None
        raise


def check_flags(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size must be at least 1, got {args.batch_size}")
    check_generation_flags(args, args.constraint)
    if args.input_file is not None and not os.path.isfile(args.input_file):
        raise SystemExit(f"--input_file {args.input_file}: no such file")
    if args.input_file is not None and os.path.realpath(args.output_file) == os.path.realpath(args.input_file):
        raise SystemExit(f"--output_file {args.output_file} is the --input_file: the predictions would be appended "
                         f"to the dialogues; give another --output_file")


def check_generation_flags(args: argparse.Namespace, constraint: str) -> None:
    """The model and generation flags (add_model_arguments, add_generation_arguments), for answers generated under
    `constraint`; fills the training truncation."""
    if args.max_tgt_len < 1:
        raise SystemExit(f"--max_tgt_len must be at least 1, got {args.max_tgt_len}")
    if constraint != "none" and args.max_tgt_len < MIN_CONSTRAINED_TOKENS:
        raise SystemExit(f"--max_tgt_len {args.max_tgt_len} is too short for --constraint {constraint}: the "
                         f"empty answer alone takes 46 tokens; give at least {MIN_CONSTRAINED_TOKENS}, or "
                         f"--constraint none")
    check_model_path(args.model_path)
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise SystemExit(f"--do_sample needs --temperature > 0 and 0 < --top_p <= 1, got {args.temperature} and "
                         f"{args.top_p}")
    if not (args.repetition_penalty > 0 and math.isfinite(args.repetition_penalty)):
        raise SystemExit(f"--repetition_penalty must be a positive number (1.0 = off), got {args.repetition_penalty}")
    fill_training_truncation(args)
    if not 0 < args.max_src_len < args.max_len:
        raise SystemExit(f"--max_src_len ({args.max_src_len}) must be positive and below --max_len ({args.max_len})")
    context = model_context(args.model_path)
    if args.max_src_len + PROMPT_OVERHEAD + args.max_tgt_len > context:
        raise SystemExit(f"--max_src_len {args.max_src_len} + --max_tgt_len {args.max_tgt_len} (+ {PROMPT_OVERHEAD} "
                         f"tokens of chat markup) exceed the model's {context}-token context; lower --max_tgt_len")


def check_model_path(path: str) -> None:
    """A model directory (config.json, or a train.py checkpoint's adapter on the base it names) with the tokenizer's
    vocabulary; a run's output_dir is named as such, since it is the easy mistake after training."""
    if not os.path.isdir(path):
        raise SystemExit(f"--model_path {path}: " + ("a file, not a model directory" if os.path.exists(path)
                                                     else "no such directory"))
    has = set(os.listdir(path))
    if "best_checkpoint.json" in has and not {"config.json", "adapter_config.json"} & has:
        raise SystemExit(f"--model_path {path} is a train.py run directory, not a model: merge its best checkpoint "
                         f"first (python merge_params.py --model_dir {path} --save_model_dir {path}/merged) and pass "
                         f"the merged directory, or pass one of its checkpoints (best_checkpoint.json names the best)")
    if not {"config.json", "adapter_config.json"} & has:
        raise SystemExit(f"--model_path {path}: no config.json (not a model directory)")
    if "config.json" not in has:
        check_adapter_base(path)
    if "qwen.tiktoken" not in has:
        raise SystemExit(f"--model_path {path}: no qwen.tiktoken (the tokenizer's vocabulary; merge_params.py and "
                         f"train.py checkpoints carry it)")
    if "config.json" in has and not has & set(WEIGHT_FILES):
        raise SystemExit(f"--model_path {path}: no weights ({' / '.join(WEIGHT_FILES)})")


def check_adapter_base(checkpoint: str) -> None:
    """An unmerged train.py checkpoint loads on the base model its adapter_config.json names: train.py's
    --model_name_or_path as given, so a relative path only holds from the directory train.py ran in."""
    try:
        base = read_adapter_config(checkpoint).get("base_model_name_or_path")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        raise SystemExit(f"--model_path {checkpoint} is a train.py checkpoint whose adapter_config.json names the base "
                         f"model {base!r}, which is no model directory from {os.getcwd()} (train.py records the path "
                         f"as it was given). Run from the directory train.py ran in, or merge the checkpoint "
                         f"(python merge_params.py --model_dir {checkpoint} --ori_model_dir <base model>) and pass "
                         f"the merged directory")


def read_adapter_config(checkpoint: str) -> dict:
    """A checkpoint's adapter_config.json, which must hold a JSON object."""
    return read_json_object(os.path.join(checkpoint, "adapter_config.json"))


def fill_training_truncation(args: argparse.Namespace) -> None:
    """--max_len / --max_src_len / --truncation not given: what the model was trained with (train_args.json, which
    train.py writes into each checkpoint and merge_params.py copies into the merged model), else the chapter's."""
    missing = [key for key in TRAINING_TRUNCATION if getattr(args, key) is None]
    if not missing:
        return
    path = os.path.join(args.model_path, "train_args.json")
    if not os.path.isfile(path):
        for key in missing:
            setattr(args, key, TRAINING_TRUNCATION[key])
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = {"truncation": "tokens", **json.load(f)["args"]}  # runs older than --truncation cut by tokens
        trained = {key: saved[key] if key == "truncation" else int(saved[key]) for key in missing}
        if trained.get("truncation", "tokens") not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {trained['truncation']!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: cannot read how training cut prompts ({e}); pass "
                         f"{', '.join('--' + key for key in missing)}")
    for key in missing:
        setattr(args, key, trained[key])
    print(f"prompt truncation: --max_len {args.max_len} --max_src_len {args.max_src_len} --truncation "
          f"{args.truncation} ({', '.join('--' + key for key in missing)} from {path})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = prepare(args, "predict.py")
    if args.input_file is None:
        return interactive(lambda dialogue: answer_dialogue(engine, dialogue, args))
    predict_file(engine, args.input_file, args.output_file, decoding_from_args(args), args.max_len, args.max_src_len,
                 args.truncation, args.constraint)
    return 0


def prepare(args: argparse.Namespace, prog: str) -> Engine:
    """The generation engine (model, tokenizer and, under a constraint, the grammar vocabulary) from the flags,
    after the inputs were checked; test_qwen.py and serve.py too."""
    silence_library_deprecations()
    set_random_seed(args.seed)
    device = check_inputs(args, prog)
    return load_engine(args, device, args.batch_size, args.constraint != "none", prog)


def load_engine(args: argparse.Namespace, device: torch.device, batch_size: int, grammar: bool, prog: str) -> Engine:
    """The model and tokenizer of --model_path on `device` in --dtype, in an engine of `batch_size` rows, with the
    grammar vocabulary when answers are to follow a grammar."""
    model, tokenizer = load_model(args.model_path, device, resolve_dtype(args.dtype, device), prog)
    vocabulary = build_vocabulary(tokenizer, model.config.vocab_size) if grammar else None
    return Engine(model, tokenizer, batch_size, vocabulary)


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    return Decoding(max_new_tokens=args.max_tgt_len, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def answer_dialogue(engine: Engine, dialogue: str, args: argparse.Namespace) -> Result:
    """One dialogue typed in the terminal, answered as the batch mode answers a record."""
    request, cut = extraction_request(engine.tokenizer, INSTRUCTION + dialogue, dialogue, decoding_from_args(args),
                                      args.constraint, engine.vocabulary, args.max_len, args.max_src_len,
                                      args.truncation, len(INSTRUCTION))
    if cut:
        lost = "its last turns were left out" if args.truncation == "turns" else "its end was cut"
        print(f"The dialogue is longer than --max_src_len {args.max_src_len} tokens: {lost}, as in training.",
              flush=True)
    return engine.generate([request])[0]


def check_inputs(args: argparse.Namespace, prog: str) -> torch.device:
    """The device, after every input has been read once: a bad --device, input line or results line stops here
    with its file and line, not after minutes of loading the model."""
    try:
        device = resolve_device(args.device)
        if args.input_file is not None:
            for path, flag in ((args.output_file, "--output_file"),
                               (args.output_file + ".settings.json", "the settings file of --output_file")):
                check_output_path(path, flag)
            pending(read_examples(args.input_file), args.output_file, args.input_file)
        check_model_dir_files(args.model_path)
        if args.input_file is not None:  # last: it records the settings of a new results file
            # results begun before --constraint existed were generated freely
            check_run_settings(args.output_file, run_settings(args, device), implied={"constraint": "none"})
    except ValueError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    return device


def check_model_dir_files(model_path: str) -> None:
    """The files check_model_path found, read as far as their headers: config.json, the safetensors weights, the
    vocabulary, and for a train.py checkpoint its adapter against the base it names (which must have its shape)."""
    if os.path.isfile(os.path.join(model_path, "config.json")):
        check_model_files(model_path)
    else:  # check_adapter_base found the base
        base = read_adapter_config(model_path)["base_model_name_or_path"]
        check_adapter_files(model_path, check_model_files(base))
    check_vocabulary(model_path)


def model_context(model_path: str) -> int:
    """The tokens a model attends over (config.json's seq_length; for an unmerged checkpoint, its base's)."""
    path = model_path
    try:
        if not os.path.isfile(os.path.join(path, "config.json")):
            path = str(read_json_object(os.path.join(model_path, "adapter_config.json"))["base_model_name_or_path"])
        seq_length = read_json_object(os.path.join(path, "config.json")).get("seq_length", 8192)
    except (ValueError, KeyError):  # a bad file: named by the checks that follow, file by file
        return 8192
    return seq_length if isinstance(seq_length, int) and seq_length > 0 else 8192


def model_fingerprint(model_path: str) -> str:
    """Names, sizes and modification times of the weights, the adapter and config.json (for an unmerged
    checkpoint, its base's too): a model merged again into the same directory, or replaced there, gets another
    fingerprint (cheap: no file is read)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        if name.endswith((".safetensors", ".bin")) or name in ("config.json", "adapter_config.json"):
            stat = os.stat(os.path.join(model_path, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        base = read_json_object(os.path.join(model_path, "adapter_config.json")).get("base_model_name_or_path")
        if isinstance(base, str) and os.path.isdir(base):
            digest.update(f"base\0{model_fingerprint(base)}\n".encode())
    return digest.hexdigest()[:16]


def run_settings(args: argparse.Namespace, device: torch.device) -> dict:
    """What decides the answers in a results file (the batch size and the device do not, in greedy fp32)."""
    sampling = {"top_p": args.top_p, "temperature": args.temperature, "seed": args.seed} if args.do_sample else {}
    return {"model_path": os.path.realpath(args.model_path), "model_files": model_fingerprint(args.model_path),
            "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."), "max_new_tokens": args.max_tgt_len,
            "do_sample": args.do_sample, **sampling, "repetition_penalty": args.repetition_penalty,
            "max_len": args.max_len, "max_src_len": args.max_src_len, "truncation": args.truncation,
            "constraint": args.constraint}


# --------------------------------------------------------------------------------------------------------------
# Model and generation
# --------------------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32  # CPU half-precision matmuls are slow or missing on most CPUs
    return DTYPES[name]


def load_model(model_path: str, device: torch.device, dtype: torch.dtype, prog: str = "predict.py"):
    """The model in eval mode on `device`, and its tokenizer with the pad id set to `<|endoftext|>`; a file that
    fails to load stops the script (`prog`) with its path."""
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    # check_inputs read every header; what is left to fail here (a corrupt tensor body, a disk error) is still named
    try:
        tokenizer = load_tokenizer(model_path)
        model = QWenLMHeadModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    except LOAD_ERRORS as e:
        raise SystemExit(f"{prog}: error: --model_path {model_path}: cannot load the model ({one_line(e)})") from None
    return model, tokenizer


def prompt_ids(tokenizer, user_text: str, max_len: int, max_src_len: int, truncation: str = "tokens",
               instruction_chars: int = 0) -> list[int]:
    """The generation prompt, truncated like training: token-identical to the training prefix."""
    return build_chatml_ids(tokenizer, user_text, None, max_len, max_src_len, truncation=truncation,
                            instruction_chars=instruction_chars).input_ids


# --------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    id: int  # 0-based line number in the input file
    user_text: str  # instruction + dialogue, as in training
    instruction_chars: int = 0  # where the dialogue starts in user_text (the turns cut never keeps less than that)
    output: str | None = None  # the gold answer, where the record has one (benchmarks use its length)


def read_examples(path: str) -> list[Example]:
    """data_helper's {instruction, input, output} lines, or bare {input} lines (the chapter's instruction is used)."""
    examples = []
    for lineno, record in iter_jsonl(path):
        dialogue = record.get("input")
        if not isinstance(dialogue, str):
            raise ValueError(f"{path}:{lineno}: field 'input' (the dialogue) is missing or not a string")
        instruction = record.get("instruction", INSTRUCTION)
        if not isinstance(instruction, str):
            raise ValueError(f"{path}:{lineno}: field 'instruction' is not a string")
        for name, text in (("input", dialogue), ("instruction", instruction)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800": half of a surrogate pair is no character
                raise ValueError(f"{path}:{lineno}: field '{name}' holds a lone surrogate ({text[e.start]!r} at "
                                 f"character {e.start + 1}), which is not text") from None
        output = record.get("output")
        examples.append(Example(lineno - 1, instruction + dialogue, len(instruction),
                                output if isinstance(output, str) else None))
    if not examples:
        raise ValueError(f"{path}: no records (the file is empty)")
    return examples


def predict_file(engine: Engine, input_file: str, output_file: str, decoding: Decoding, max_len: int,
                 max_src_len: int, truncation: str = "tokens", constraint: str = "grounded") -> None:
    """Answer every record of `input_file` not yet in `output_file`, appending each answer as it ends."""
    examples = read_examples(input_file)
    todo, done = pending(examples, output_file, input_file)
    print(f"{input_file}: {len(examples)} records, {done} already in {output_file}, {len(todo)} to generate",
          flush=True)
    if not todo:
        return
    requests, cut = [], 0
    for e in todo:
        request, truncated = extraction_request(engine.tokenizer, e.user_text, e.user_text[e.instruction_chars:],
                                                decoding, constraint, engine.vocabulary, max_len, max_src_len,
                                                truncation, e.instruction_chars)
        requests.append(request)
        cut += truncated
    if cut:
        lost = "their last turns" if truncation == "turns" else "the end of their dialogue"
        print(f"{cut} prompts were longer than --max_src_len {max_src_len} and lost {lost} (as in training)",
              flush=True)
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    start, new_tokens, written, closed, failed = time.perf_counter(), 0, 0, 0, []
    try:
        with tqdm(total=len(todo), desc="predict", unit="sample") as bar:
            for index, result in engine.stream(requests):
                e = todo[index]
                if result.finish_reason == "error":  # left out of the file, so that a rerun tries it again
                    failed.append(e.id)
                    bar.write(f"id {e.id}: failed: {result.text}", file=sys.stderr)
                    bar.update(1)
                    continue
                append_jsonl(output_file, [{"id": e.id, "output": result.text, "num_new_tokens": len(result.tokens),
                                            "truncated": result.truncated, "input_digest": input_digest(e.user_text)}])
                new_tokens += len(result.tokens)
                written += 1
                closed += result.truncated
                bar.update(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the {done + written} predictions in {output_file} are kept; rerun the same "
              f"command to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as e:  # checked before the model loaded, so rare: a full disk, a folder made read-only since
        raise SystemExit(f"error: --output_file {output_file}: cannot append to it ({e.strerror}); the "
                         f"{done + written} predictions written before are kept, and a rerun resumes") from None
    seconds = time.perf_counter() - start
    if failed:
        raise SystemExit(f"error: {len(failed)} answers failed (ids {', '.join(map(str, failed))}); the {written} "
                         f"others are in {output_file}, and a rerun tries the failed ones again")
    print(f"wrote {len(todo)} predictions to {output_file} | {seconds:.1f} s | {len(todo) / seconds:.2f} samples/s | "
          f"{new_tokens / seconds:.1f} new tokens/s | {closed} reached --max_tgt_len"
          + (" (closed by the constraint, still valid)" if closed and constraint != "none" else ""), flush=True)


# --------------------------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------------------------

QUIT_WORDS = ("quit", "exit")


def read_dialogue(read_line: Callable[[str], str] | None = None) -> str | None:
    """Lines (from `input()` by default) up to an empty line, each followed by a newline as in the training data.
    None means leave: `quit`/`exit` as the first line, or Ctrl-D before any text."""
    read_line = read_line or input
    lines: list[str] = []
    while True:
        try:
            line = read_line("> " if not lines else "")
        except EOFError:
            return "".join(l + "\n" for l in lines) if lines else None
        if not lines and line.strip().lower() in QUIT_WORDS:
            return None
        if not line.strip():
            if lines:
                return "".join(l + "\n" for l in lines)
            continue
        lines.append(line.rstrip("\r"))


def show_answer(answer: Result | str) -> None:
    if isinstance(answer, Result) and answer.finish_reason == "error":
        print(f"No answer: {answer.text}")
        return
    text = answer.text if isinstance(answer, Result) else answer
    if isinstance(answer, Result) and answer.truncated:
        print("(The answer reached --max_tgt_len" + (" and was closed there.)" if answer.text.endswith("```")
                                                      else ".)"))
    fields, valid = parse_output(text)
    if valid:
        print(json.dumps(fields, ensure_ascii=False, indent=2))
    else:
        print("The answer is not valid JSON; the model wrote:")
        print(text)


def interactive(answer: Callable[[str], Any], show: Callable[[Any], None] = show_answer,
                read_line: Callable[[str], str] | None = None) -> int:
    """The terminal loop: paste a dialogue, finish with an empty line, read the extraction."""
    print("Paste a doctor–patient dialogue and finish it with an empty line. Type quit or exit (or press Ctrl-D / "
          "Ctrl-C) to leave.", flush=True)
    try:
        while True:
            dialogue = read_dialogue(read_line)
            if dialogue is None:
                break
            print("Extracting…", flush=True)
            show(answer(dialogue))
            print(flush=True)
    except KeyboardInterrupt:
        print()
    print("Bye.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

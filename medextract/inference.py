"""Inference: a model directory checked and loaded into the generation engine, the settings that decide its
answers, and extraction over a JSON Lines file (what predict.py and test_qwen.py do in batch mode).

A model directory is a merged model (config.json and weights) or a train.py checkpoint, whose adapter is put,
unmerged, on the base model its adapter_config.json names. Prompts are cut as training cut them: the settings a
checkpoint records in train_args.json (merge_params.py copies it into the merged model), else the chapter's.
Every function raises the typed errors of medextract.errors; nothing here exits the process.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from utils import (DTYPES, TRUNCATIONS, WEIGHT_FILES, append_jsonl, build_chatml_ids, check_output_path,
                   check_run_settings, count_records, cpu_computes_bf16, input_digest, iter_jsonl, load_tokenizer,
                   native_bf16, one_line, pending)

from .answer import extraction_request
from .engine import Decoding, Engine, Result
from .errors import AnswersFailed, ConfigError, InputError, MedextractError, ModelLoadError, OutputError
from .grammar import build_vocabulary
from .model_files import LOAD_ERRORS, check_adapter_files, check_model_files, check_vocabulary, read_json_object
from .schema import CHAPTER_SCHEMA, Schema

DEFAULT_MODEL_PATH = "output_dir_qlora/merged"  # merge_params.py's default --save_model_dir
# Under a constraint an answer is closed before its budget runs out; the empty answer alone takes 46 tokens.
MIN_CONSTRAINED_TOKENS = 64
# A prompt's tokens besides its user block: the system block (10), two "\n" and "<|im_start|>assistant\n" (3)
PROMPT_OVERHEAD = 15


@dataclass(frozen=True)
class Truncation:
    """How a long prompt is cut: as training cut it (train.py's --max_len, --max_src_len, --truncation)."""
    max_len: int = 2048
    max_src_len: int = 1560
    mode: str = "tokens"  # tokens: keep a long dialogue's first tokens; turns: its leading whole turns


TRAINING_TRUNCATION = Truncation()  # the chapter's, where a model does not record its own


class Interrupted(MedextractError):
    """Ctrl-C during a batch: what was written is kept, and a rerun resumes."""
    exit_status = 130


# --------------------------------------------------------------------------------------------------------------
# The model directory
# --------------------------------------------------------------------------------------------------------------


def check_model_path(path: str, flag: str = "--model_path") -> None:
    """A model directory (config.json, or a train.py checkpoint's adapter on the base it names) with the tokenizer's
    vocabulary; a run's output_dir is named as such, since it is the easy mistake after training."""
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: " + ("a file, not a model directory" if os.path.exists(path)
                                                else "no such directory"))
    has = set(os.listdir(path))
    if "best_checkpoint.json" in has and not {"config.json", "adapter_config.json"} & has:
        raise ConfigError(f"{flag} {path} is a train.py run directory, not a model: merge its best checkpoint "
                          f"first (python merge_params.py --model_dir {path} --save_model_dir {path}/merged) and pass "
                          f"the merged directory, or pass one of its checkpoints (best_checkpoint.json names the best)")
    if not {"config.json", "adapter_config.json"} & has:
        raise ConfigError(f"{flag} {path}: no config.json (not a model directory)")
    if "config.json" not in has:
        check_adapter_base(path, flag)
    if "qwen.tiktoken" not in has:
        raise ConfigError(f"{flag} {path}: no qwen.tiktoken (the tokenizer's vocabulary; merge_params.py and "
                          f"train.py checkpoints carry it)")
    if "config.json" in has and not has & set(WEIGHT_FILES):
        raise ConfigError(f"{flag} {path}: no weights ({' / '.join(WEIGHT_FILES)})")


def check_adapter_base(checkpoint: str, flag: str = "--model_path") -> None:
    """An unmerged train.py checkpoint loads on the base model its adapter_config.json names: train.py's
    --model_name_or_path as given, so a relative path only holds from the directory train.py ran in."""
    try:
        base = read_adapter_config(checkpoint).get("base_model_name_or_path")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        raise ConfigError(f"{flag} {checkpoint} is a train.py checkpoint whose adapter_config.json names the base "
                          f"model {base!r}, which is no model directory from {os.getcwd()} (train.py records the path "
                          f"as it was given). Run from the directory train.py ran in, or merge the checkpoint "
                          f"(python merge_params.py --model_dir {checkpoint} --ori_model_dir <base model>) and pass "
                          f"the merged directory")


def read_adapter_config(checkpoint: str) -> dict:
    """A checkpoint's adapter_config.json, which must hold a JSON object."""
    return read_json_object(os.path.join(checkpoint, "adapter_config.json"))


def check_model_dir_files(model_path: str) -> None:
    """The files check_model_path found, read as far as their headers: config.json, the safetensors weights, the
    vocabulary, and for a train.py checkpoint its adapter against the base it names (which must have its shape)."""
    try:
        if os.path.isfile(os.path.join(model_path, "config.json")):
            check_model_files(model_path)
        else:  # check_adapter_base found the base
            base = read_adapter_config(model_path)["base_model_name_or_path"]
            check_adapter_files(model_path, check_model_files(base))
        check_vocabulary(model_path)
    except MedextractError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def trained_truncation(model_path: str, max_len: int | None = None, max_src_len: int | None = None,
                       mode: str | None = None) -> tuple[Truncation, str | None]:
    """The truncation given, its missing parts filled with what the model was trained with (train_args.json), else
    the chapter's; and the file they came from, if any."""
    given = {"max_len": max_len, "max_src_len": max_src_len, "truncation": mode}
    missing = [key for key, value in given.items() if value is None]
    filled = dict(given)
    source = None
    if missing:
        path = os.path.join(model_path, "train_args.json")
        defaults = {"max_len": TRAINING_TRUNCATION.max_len, "max_src_len": TRAINING_TRUNCATION.max_src_len,
                    "truncation": TRAINING_TRUNCATION.mode}
        if not os.path.isfile(path):
            filled.update({key: defaults[key] for key in missing})
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    saved = {"truncation": "tokens", **json.load(f)["args"]}  # runs older than --truncation: tokens
                trained = {key: saved[key] if key == "truncation" else int(saved[key]) for key in missing}
                if trained.get("truncation", "tokens") not in TRUNCATIONS:
                    raise ValueError(f"unknown truncation {trained['truncation']!r}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}: cannot read how training cut prompts ({e}); pass "
                                  f"{', '.join('--' + key for key in missing)}") from None
            filled.update(trained)
            source = path
    return Truncation(filled["max_len"], filled["max_src_len"], filled["truncation"]), source


def check_generation(model_path: str, decoding: Decoding, constraint: str, truncation: Truncation,
                     budget_flag: str = "--max_tgt_len") -> None:
    """That answers can be generated with these settings from this model directory."""
    if decoding.max_new_tokens < 1:
        raise ConfigError(f"{budget_flag} must be at least 1, got {decoding.max_new_tokens}")
    if constraint != "none" and decoding.max_new_tokens < MIN_CONSTRAINED_TOKENS:
        raise ConfigError(f"{budget_flag} {decoding.max_new_tokens} is too short for --constraint {constraint}: "
                          f"the empty answer alone takes 46 tokens; give at least {MIN_CONSTRAINED_TOKENS}, or "
                          f"--constraint none")
    check_model_path(model_path)
    if decoding.do_sample and not (decoding.temperature > 0 and 0 < decoding.top_p <= 1):
        raise ConfigError(f"--do_sample needs --temperature > 0 and 0 < --top_p <= 1, got {decoding.temperature} "
                          f"and {decoding.top_p}")
    if not (decoding.repetition_penalty > 0 and math.isfinite(decoding.repetition_penalty)):
        raise ConfigError(f"--repetition_penalty must be a positive number (1.0 = off), got "
                          f"{decoding.repetition_penalty}")
    if not 0 < truncation.max_src_len < truncation.max_len:
        raise ConfigError(f"--max_src_len ({truncation.max_src_len}) must be positive and below --max_len "
                          f"({truncation.max_len})")
    context = model_context(model_path)
    if truncation.max_src_len + PROMPT_OVERHEAD + decoding.max_new_tokens > context:
        raise ConfigError(f"--max_src_len {truncation.max_src_len} + {budget_flag} {decoding.max_new_tokens} (+ "
                          f"{PROMPT_OVERHEAD} tokens of chat markup) exceed the model's {context}-token context; "
                          f"lower {budget_flag}")


def run_settings(model_path: str, dtype: torch.dtype, decoding: Decoding, constraint: str,
                 truncation: Truncation, schema: Schema = CHAPTER_SCHEMA) -> dict:
    """What decides the answers in a results file (the batch size and the device do not, in greedy fp32); a schema
    of the user's own is recorded too (evaluate.py reads it from there)."""
    sampling = ({"top_p": decoding.top_p, "temperature": decoding.temperature, "seed": decoding.seed}
                if decoding.do_sample else {})
    return {"model_path": os.path.realpath(model_path), "model_files": model_fingerprint(model_path),
            "dtype": str(dtype).removeprefix("torch."), "max_new_tokens": decoding.max_new_tokens,
            "do_sample": decoding.do_sample, **sampling, "repetition_penalty": decoding.repetition_penalty,
            "max_len": truncation.max_len, "max_src_len": truncation.max_src_len, "truncation": truncation.mode,
            "constraint": constraint, **schema_setting(schema)}


def schema_setting(schema: Schema) -> dict:
    """A results file's record of its schema: none for the chapter's (so its files read as before), else the
    schema whole."""
    return {} if schema.is_chapter else {"schema": schema.to_json()}


def implied_schema(schema: Schema) -> dict:
    """For utils.check_run_settings' `implied`: a results file that records no schema was made with the chapter's,
    so a run with another one is refused rather than added to it (a chapter run records none, so it implies none)."""
    return {} if schema.is_chapter else {"schema": CHAPTER_SCHEMA.to_json()}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp16 on other GPUs; on the CPU bf16 where it computes bf16 natively
    (AVX512-BF16 or AMX: about 2x fp32's speed at the 1.8B width, bench/RESULTS.md), else fp32 (emulated half
    precision is slower than fp32 there)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_computes_bf16() else torch.float32
    return DTYPES[name]


def dtype_note(name: str, device: torch.device) -> str:
    """The dtype `resolve_dtype` picks, and why, in one line for the scripts to print."""
    dtype = str(resolve_dtype(name, device)).removeprefix("torch.")
    if name != "auto":
        return f"dtype: {dtype}"
    if device.type == "cpu":
        why = "this CPU computes bf16 natively" if dtype == "bfloat16" else "this CPU has no native bf16"
        return f"dtype: {dtype} (--dtype auto: {why}; --dtype float32 for fp32)"
    return f"dtype: {dtype} (--dtype auto on {device})"


def load_model(model_path: str, device: torch.device, dtype: torch.dtype):
    """The model in eval mode on `device`, and its tokenizer with the pad id set to `<|endoftext|>`. A train.py
    checkpoint loads as its base with the adapter on it, unmerged."""
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    # check_model_dir_files read every header; what is left to fail here (a corrupt tensor body, a disk error) is
    # still named
    try:
        tokenizer = load_tokenizer(model_path)
        model = QWenLMHeadModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    except LOAD_ERRORS as e:
        raise ModelLoadError(f"--model_path {model_path}: cannot load the model ({one_line(e)})") from None
    return model, tokenizer


def load_engine(model_path: str, device: torch.device, dtype: torch.dtype, batch_size: int,
                grammar: bool) -> Engine:
    """The model and tokenizer of `model_path` on `device` in `dtype`, in an engine of `batch_size` rows, with the
    grammar vocabulary when answers are to follow a grammar."""
    model, tokenizer = load_model(model_path, device, dtype)
    vocabulary = build_vocabulary(tokenizer, model.config.vocab_size) if grammar else None
    return Engine(model, tokenizer, batch_size, vocabulary)


def prompt_ids(tokenizer, user_text: str, truncation: Truncation = TRAINING_TRUNCATION,
               instruction_chars: int = 0) -> list[int]:
    """The generation prompt, truncated like training: token-identical to the training prefix."""
    return build_chatml_ids(tokenizer, user_text, None, truncation.max_len, truncation.max_src_len,
                            truncation=truncation.mode, instruction_chars=instruction_chars).input_ids


def dialogue_request(engine: Engine, user_text: str, instruction_chars: int, decoding: Decoding, constraint: str,
                     truncation: Truncation, schema: Schema = CHAPTER_SCHEMA, **callbacks):
    """The engine request answering `user_text` (an instruction of `instruction_chars` characters, then the
    dialogue) with `schema`'s fields, and whether its prompt was cut."""
    return extraction_request(engine.tokenizer, user_text, user_text[instruction_chars:], decoding, constraint,
                              engine.vocabulary, truncation.max_len, truncation.max_src_len, truncation.mode,
                              instruction_chars, schema.fields, **callbacks)


def cut_note(truncation: Truncation, count: int | None = None) -> str:
    """What a cut prompt lost, in words."""
    if count is None:
        lost = "its last turns were left out" if truncation.mode == "turns" else "its end was cut"
        return f"The dialogue is longer than --max_src_len {truncation.max_src_len} tokens: {lost}, as in training."
    lost = "their last turns" if truncation.mode == "turns" else "the end of their dialogue"
    return f"{count} prompts were longer than --max_src_len {truncation.max_src_len} and lost {lost} (as in training)"


def answer_dialogue(engine: Engine, dialogue: str, decoding: Decoding, constraint: str,
                    truncation: Truncation, schema: Schema = CHAPTER_SCHEMA) -> Result:
    """One dialogue typed in the terminal, answered as the batch mode answers a record."""
    request, cut = dialogue_request(engine, schema.instruction + dialogue, len(schema.instruction), decoding,
                                    constraint, truncation, schema)
    if cut:
        print(cut_note(truncation), flush=True)
    return engine.generate([request])[0]


def prepare_engine(model_path: str, device: torch.device, dtype: torch.dtype, batch_size: int, constraint: str,
                   decoding: Decoding, truncation: Truncation, input_file: str | None = None,
                   output_file: str | None = None, schema: Schema = CHAPTER_SCHEMA) -> Engine:
    """The engine, after every input was read once: a bad input line or results line, or a results file of other
    settings, stops here with its file and line, not after minutes of loading the model."""
    try:
        if input_file is not None:
            for path, flag in ((output_file, "--output_file"),
                               (output_file + ".settings.json", "the settings file of --output_file")):
                check_output_path(path, flag)
            pending_examples(input_file, output_file, schema)
        check_model_dir_files(model_path)
        if input_file is not None:  # last: it records the settings of a new results file
            # results begun before --constraint existed were generated freely
            check_run_settings(output_file, run_settings(model_path, dtype, decoding, constraint, truncation, schema),
                               implied={"constraint": "none", **implied_schema(schema)})
    except MedextractError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    except OSError as e:  # the settings file beside the results (a full disk, a folder made read-only)
        raise OutputError(f"{e.filename or output_file}: cannot write it ({e.strerror})") from None
    engine = load_engine(model_path, device, dtype, batch_size, constraint != "none")
    if constraint != "none" and decoding.max_new_tokens < engine.empty_answer_tokens(schema.fields):
        raise ConfigError(f"--max_tgt_len {decoding.max_new_tokens} is below the "
                          f"{engine.empty_answer_tokens(schema.fields)} tokens the empty answer of this schema takes "
                          f"under --constraint {constraint}; give more, or --constraint none")
    return engine


# --------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    id: int  # 0-based line number in the input file
    user_text: str  # instruction + dialogue, as in training
    instruction_chars: int = 0  # where the dialogue starts in user_text (the turns cut never keeps less than that)
    output: str | None = None  # the gold answer, where the record has one (benchmarks use its length)


def read_examples(path: str, schema: Schema = CHAPTER_SCHEMA) -> list[Example]:
    """data_helper's {instruction, input, output} lines, or bare {input} lines (the schema's instruction is used)."""
    examples = []
    try:
        for lineno, record in iter_jsonl(path):
            dialogue = record.get("input")
            if not isinstance(dialogue, str):
                raise InputError(f"{path}:{lineno}: field 'input' (the dialogue) is missing or not a string")
            instruction = record.get("instruction", schema.instruction)
            if not isinstance(instruction, str):
                raise InputError(f"{path}:{lineno}: field 'instruction' is not a string")
            for name, text in (("input", dialogue), ("instruction", instruction)):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON's "\ud800": half of a surrogate pair is no character
                    raise InputError(f"{path}:{lineno}: field '{name}' holds a lone surrogate ({text[e.start]!r} "
                                     f"at character {e.start + 1}), which is not text") from None
            output = record.get("output")
            examples.append(Example(lineno - 1, instruction + dialogue, len(instruction),
                                    output if isinstance(output, str) else None))
    except MedextractError:
        raise
    except ValueError as e:  # iter_jsonl's: a line that is not JSON, not an object, not UTF-8
        raise InputError(str(e)) from None
    if not examples:
        raise InputError(f"{path}: no records (the file is empty)")
    return examples


def pending_examples(input_file: str, output_file: str,
                     schema: Schema = CHAPTER_SCHEMA) -> tuple[list[Example], list[Example], int]:
    """The records of `input_file`, those not yet answered in `output_file`, and how many are."""
    examples = read_examples(input_file, schema)
    try:
        todo, done = pending(examples, output_file, input_file)
    except ValueError as e:  # a results line that is not one, or one of another input file
        raise InputError(str(e)) from None
    return examples, todo, done


def predict_file(engine: Engine, input_file: str, output_file: str, decoding: Decoding,
                 truncation: Truncation = TRAINING_TRUNCATION, constraint: str = "grounded",
                 schema: Schema = CHAPTER_SCHEMA) -> None:
    """Answer every record of `input_file` not yet in `output_file` with `schema`'s fields, appending each answer as
    it ends."""
    examples, todo, done = pending_examples(input_file, output_file, schema)
    print(f"{input_file}: {len(examples)} records, {done} already in {output_file}, {len(todo)} to generate",
          flush=True)
    if not todo:
        return
    requests, cut = [], 0
    for e in todo:
        request, truncated = dialogue_request(engine, e.user_text, e.instruction_chars, decoding, constraint,
                                              truncation, schema)
        requests.append(request)
        cut += truncated
    if cut:
        print(cut_note(truncation, cut), flush=True)
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
        raise Interrupted(f"interrupted: the {count_records(output_file)} predictions in {output_file} are kept; "
                          f"rerun the same command to resume") from None
    except OSError as e:  # checked before the model loaded, so rare: a full disk, a folder made read-only since
        raise OutputError(f"--output_file {output_file}: cannot append to it ({e.strerror}); the "
                          f"{count_records(output_file)} whole predictions written before are kept, and a rerun "
                          f"resumes") from None
    seconds = time.perf_counter() - start
    if failed:
        raise AnswersFailed(f"{len(failed)} answers failed (ids {', '.join(map(str, failed))}); the {written} "
                            f"others are in {output_file}, and a rerun tries the failed ones again", failed)
    print(f"wrote {len(todo)} predictions to {output_file} | {seconds:.1f} s | {len(todo) / seconds:.2f} samples/s | "
          f"{new_tokens / seconds:.1f} new tokens/s | {closed} reached --max_tgt_len"
          + (" (closed by the constraint, still valid)" if closed and constraint != "none" else ""), flush=True)


def examples_of(dialogues: Sequence[str], schema: Schema = CHAPTER_SCHEMA) -> list[Example]:
    """Dialogues given as strings, as records with the schema's instruction."""
    return [Example(i, schema.instruction + d, len(schema.instruction)) for i, d in enumerate(dialogues)]

"""What two or more scripts share: the prompts, the ChatML token layout, the training dataset and collator, the
output parser, JSON Lines I/O that never leaves half-written files, seeding and rank-0 printing.

The token layout reproduces the chapter's bit for bit, with its output-truncation
off-by-one fixed, and is built by one function, `build_chatml_ids`, used by training and prediction alike.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

# --------------------------------------------------------------------------------------------------------------
# Prompts and fields
# --------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "You are a helpful assistant."

# The chapter's instruction, verbatim: six lines, each ending in "\n"; the dialogue is appended right after it.
INSTRUCTION = (
    "你现在是一个医疗对话要素抽取专家。\n"
    "请针对下面对话内容抽取出药品名称、药物类别、医疗检查、医疗操作、现病史、辅助检查、诊断结果和医疗建议等内容，"
    "并且以json格式返回，Key为上述待抽取的字段名称，Value为抽取出的文本内容。\n"
    "注意事项：（1）药品名称、药物类别、医疗检查和医疗操作的内容会在对话中存在多个，因此Value内容以List形式存放；"
    "若抽取内容为空，则为一个空的List；\n"
    "（2）抽取出的药品名称、药物类别、医疗检查和医疗操作对应内容，需要完全来自于原文，不可进行修改，内容不重复；\n"
    "（3）现病史、辅助检查、诊断结果和医疗建议的内容需要根据整个对话内容进行总结抽取，Value内容以Text形式存放。\n"
    "对话文本：\n"
)

LIST_KEYS = ("药品名称", "药物类别", "医疗检查", "医疗操作")
TEXT_KEYS = ("现病史", "辅助检查", "诊断结果", "医疗建议")
EXTRACT_KEYS = LIST_KEYS + TEXT_KEYS
# The chapter's fields as (name, kind) pairs in answer order: "spans" are lists of pieces copied from the dialogue,
# "text" a summary. A schema of the user's own (medextract.schema) gives other pairs to the same functions below.
CHAPTER_FIELDS: tuple[tuple[str, str], ...] = (tuple((k, "spans") for k in LIST_KEYS)
                                               + tuple((k, "text") for k in TEXT_KEYS))
Fields = Sequence[tuple[str, str]]

IGNORE_INDEX = -100  # labels at this value are skipped by the loss


def format_output(extract: dict, fields: Fields = CHAPTER_FIELDS) -> str:
    """The training target: a ```json fence around the fields in their order (no quote rewriting)."""
    ordered = {name: extract[name] for name, _ in fields}
    return "```json\n" + json.dumps(ordered, ensure_ascii=False) + "\n```"


_JSON_DECODER = json.JSONDecoder(strict=False)


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the '}' closing the '{' at `start`, skipping braces inside '...' or "..." strings; None if unclosed."""
    depth, quote, i = 0, None, start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _object_at(text: str, start: int) -> tuple[Any, int]:
    """The value of the object literal starting at `start` and the index after it; (None, start + 1) if none parses.

    JSON is tried first (strict=False: models put raw newlines inside strings); then the balanced span as a Python
    literal, which repairs single-quoted dict reprs and trailing commas without ever executing anything.
    """
    try:
        value, end = _JSON_DECODER.raw_decode(text, start)
        return value, end
    except (json.JSONDecodeError, RecursionError):  # RecursionError: brackets nested ~1000 deep, a degenerate answer
        pass
    end = _balanced_end(text, start)
    if end is None:
        return None, start + 1

    literal = text[start:end + 1]
    for attempt in (literal, _python_constants(literal)):
        try:
            return ast.literal_eval(attempt), end + 1
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return None, start + 1


_JSON_CONSTANT = re.compile(r"(?<![\w.])(null|true|false)(?![\w.])")
_PYTHON_CONSTANT = {"null": "None", "true": "True", "false": "False"}


def _python_constants(literal: str) -> str:
    """`literal` with JSON's null / true / false outside strings spelled the Python way, for the literal fallback
    (JSON that also has a trailing comma or single quotes needs both repairs)."""
    def python(match: re.Match) -> str:
        return _PYTHON_CONSTANT[match.group(1)]

    out, quote, plain, i = [], None, 0, 0  # literal[plain:i] is the part not yet copied
    while i < len(literal):
        ch = literal[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                out.append(literal[plain:i + 1])
                quote, plain = None, i + 1
        elif ch in "\"'":
            out.append(_JSON_CONSTANT.sub(python, literal[plain:i]))
            quote, plain = ch, i
        i += 1
    rest = literal[plain:]
    out.append(rest if quote else _JSON_CONSTANT.sub(python, rest))
    return "".join(out)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):  # a Python literal JSON cannot hold (tuple keys, sets)
            return str(value)
        except RecursionError:  # nested nearly as deep as the parser allows: no text a reader could use
            return ""
    return str(value)


def normalise_fields(obj: dict, fields: Fields = CHAPTER_FIELDS) -> dict:
    """The fields' keys, in their order, with their declared types: span fields hold lists of strings, text fields
    hold strings."""
    by_key = {str(k).strip(): v for k, v in obj.items()}
    out: dict = {}
    for key, kind in fields:
        value = by_key.get(key)
        if kind == "text":
            joined = isinstance(value, (list, tuple))  # a list where a text was asked for
            out[key] = "".join(_as_text(item) for item in value) if joined else _as_text(value)
        elif isinstance(value, (list, tuple, set)):
            # an item said twice counts once (the instruction asks for no repeats); first occurrences keep their order
            out[key] = list(dict.fromkeys(_as_text(item) for item in value if item is not None))
        elif value is None or (isinstance(value, str) and not value.strip()):
            out[key] = []
        else:  # one bare value where a list was asked for
            out[key] = [_as_text(value)]
    return out


def _keyed_object(value: Any, keys: set[str], depth: int = 0) -> dict | None:
    """`value` itself, or the first object nested in it (a few levels deep), that holds any of `keys`."""
    if isinstance(value, dict):
        if any(str(k).strip() in keys for k in value):
            return value
        children = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        return None
    if depth < 4:
        for child in children:
            found = _keyed_object(child, keys, depth + 1)
            if found is not None:
                return found
    return None


def empty_fields(fields: Fields = CHAPTER_FIELDS) -> dict:
    """The fields' keys, all empty: [] for span fields, "" for text fields."""
    return {key: "" if kind == "text" else [] for key, kind in fields}


def answer_object(text: str, fields: Fields = CHAPTER_FIELDS) -> dict | None:
    """The object a model answer gives, before its fields are normalised: the first object holding any of the fields'
    keys, also one wrapped in another (`{"result": {…}}`, `{"data": [{…}]}`), else the first object at all; None if
    the text holds no object."""
    keys = {key for key, _ in fields}
    first = None
    start = text.find("{")
    while start != -1:
        value, after = _object_at(text, start)
        if isinstance(value, dict):
            keyed = _keyed_object(value, keys)
            if keyed is not None:
                return keyed
            if first is None:
                first = value
            start = text.find("{", after)
        else:
            start = text.find("{", start + 1)
    return first


def parse_output(text: str, fields: Fields = CHAPTER_FIELDS) -> tuple[dict, bool]:
    """Parse a model answer into `fields` (the chapter's 8 by default). Returns (fields, valid).

    Accepts the ```json fence, the log run's "```\\n\\n{…}\\n\\n```" fence, no fence, chatter before or after the
    object, single-quoted Python-dict output, trailing commas and JSON constants among them. The object is
    `answer_object`'s. Missing keys are empty; a repeated list item is kept once; a string in a list field becomes a
    one-item list (a blank one, []); a
    list in a text field is joined with ""; non-string items become strings. `valid` says whether an object was
    found; when it is False every field is empty.
    """
    obj = answer_object(text, fields)
    if obj is None:
        return empty_fields(fields), False
    return normalise_fields(obj, fields), True


# --------------------------------------------------------------------------------------------------------------
# ChatML token layout (content is encoded with allowed_special=set(): "<|im_end|>" typed by a user stays text)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ChatMLIds:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the chapter's skip flag: the prompt or the answer did not fit


# How a user block longer than max_src_len is cut. tokens: keep its first max_src_len - 1 tokens (the chapter's rule,
# which cuts the dialogue mid-turn); turns: keep the longest run of leading whole lines (dialogue turns) that fits.
TRUNCATIONS = ("tokens", "turns")


def build_chatml_ids(tokenizer, user_text: str, output: str | None, max_len: int, max_src_len: int,
                     system: str = SYSTEM_PROMPT, truncation: str = "tokens",
                     instruction_chars: int = 0) -> ChatMLIds:
    """Token ids of one exchange in the chapter's layout:

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user_text}<|im_end|>\\n<|im_start|>assistant\\n{output}<|im_end|>

    With `output=None` it returns the generation prompt, which ends after `assistant\\n` and is token-identical to
    the training prefix. Labels are -100 everywhere but `assistant`, `\\n`, the answer and the final `<|im_end|>`
    (unshifted: the model shifts). A user block longer than `max_src_len` keeps its head and re-appends
    `<|im_end|>` (the chapter's rule); with `truncation="turns"` it keeps whole leading lines instead: the first
    `instruction_chars` characters of `user_text` (the instruction) and at least one line after them, else the token
    cut. An answer that does not fit is cut so the whole is exactly `max_len` long.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    # imported here so that scripts which only read and score outputs (evaluate.py) do not load transformers
    from qwen1_8.qwen_generation_utils import chatml_block, text_ids

    nl = text_ids(tokenizer, "\n")
    system_ids = chatml_block(tokenizer, "system", system)
    prompt_ids = chatml_block(tokenizer, "user", user_text)
    truncated = False
    if len(prompt_ids) > max_src_len:
        whole_lines = (leading_lines_block(tokenizer, user_text, max_src_len, instruction_chars)
                       if truncation == "turns" else None)
        prompt_ids = whole_lines or prompt_ids[: max_src_len - 1] + [prompt_ids[-1]]
        truncated = True
    head = system_ids + nl + prompt_ids + nl
    if output is None:
        ids = head + [tokenizer.im_start_id] + text_ids(tokenizer, "assistant") + nl
        return ChatMLIds(ids, [IGNORE_INDEX] * len(ids), truncated)

    output_ids = chatml_block(tokenizer, "assistant", output)
    budget = max_len - len(head)  # the chapter forgot the "\n" separator here, so its cut samples were max_len + 1
    if len(output_ids) > budget:
        output_ids = output_ids[: budget - 1] + [output_ids[-1]]
        truncated = True
    # The separator "\n" and the assistant's <|im_start|> are never trained; "assistant\n" onwards is.
    labels = [IGNORE_INDEX] * (len(head) + 1) + output_ids[1:]
    return ChatMLIds(head + output_ids, labels, truncated)


def leading_lines_block(tokenizer, user_text: str, max_src_len: int, instruction_chars: int = 0) -> list[int] | None:
    """The user block of the most leading whole lines of `user_text` that fit in `max_src_len` tokens (a binary
    search: a few encodings). It keeps at least the instruction (the first `instruction_chars` characters) and the
    first line of dialogue after it, else None: a cut to the instruction alone would leave no dialogue to read."""
    from qwen1_8.qwen_generation_utils import chatml_block

    lines = user_text.split("\n")
    best, low, high = None, user_text[:instruction_chars].count("\n") + 1, len(lines) - 1
    while low <= high:
        middle = (low + high) // 2
        ids = chatml_block(tokenizer, "user", "\n".join(lines[:middle]))
        if len(ids) <= max_src_len:
            best, low = ids, middle + 1
        else:
            high = middle - 1
    return best


def min_answer_room(max_len: int, max_src_len: int) -> int:
    """Tokens left for the answer block when the prompt is as long as allowed (system 10 + separators 2)."""
    return max_len - (max_src_len + 12)


# --------------------------------------------------------------------------------------------------------------
# JSON Lines I/O
# --------------------------------------------------------------------------------------------------------------


# Said of input that json cannot read because it nests deeper than the interpreter's recursion limit allows
TOO_DEEP = "nested too deeply to read (brackets about 1,000 levels deep)"


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, record) for each non-blank line; a bad line raises naming file and line. A
    byte-order mark at the start (as some Windows editors write) is skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); save the file "
                                 f"as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column "
                                 f"{e.colno}){_array_hint(lineno, line)}") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: {TOO_DEEP}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                                 f"{_array_hint(lineno, line)}")
            yield lineno, record


def _array_hint(lineno: int, line: str) -> str:
    """For a bad first line: a JSON array (data/all.json given for a split) is named, with the format expected."""
    if lineno != 1 or not line.lstrip().startswith("["):
        return ""
    return (" (the file starts a JSON array, like data/all.json; this takes JSON Lines, one record per line, as "
            "data_helper.py writes the splits)")


def check_output_path(path: str, flag: str, directory: bool = False, replaced: bool = False) -> None:
    """Raise ValueError, naming `flag` and `path`, when a script could not write `path`: as a file (written whole
    beside itself and renamed, or appended to), or with `directory` as a folder it creates or writes into, or with
    `replaced` too, one it builds beside it and renames into place. It fails when `path` is the other kind of thing,
    when a part of it is a regular file, or when the folder it goes into is not writable. Creates nothing, so that a
    script can check all its outputs before it writes any."""
    if not path:
        raise ValueError(f"{flag}: the path is empty")
    target = os.path.abspath(path)
    if os.path.isdir(target) and not directory:
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    if os.path.exists(target) and not os.path.isdir(target):
        if directory:
            raise ValueError(f"{flag} {path}: is a file; give a directory")
        if not os.access(target, os.W_OK):
            raise ValueError(f"{flag} {path}: no permission to write the file")
    if directory and not replaced and os.path.isdir(target):
        if not os.access(target, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: no permission to write in it")
        return
    parent = os.path.dirname(target)
    while not os.path.exists(parent):  # the folders a write would create, up to the first that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {parent}")


def current_umask() -> int:
    """The process's umask."""
    umask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(umask)
    return umask


def apply_usual_permissions(root: str) -> None:
    """Give `root` and everything under it the permissions the user's umask gives new files and folders.
    mkdtemp creates 0700 and safetensors writes 0600, which would leave a model written through a temporary
    directory readable by its owner alone, unlike every other file a script writes."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for directory, folders, files in os.walk(root):
        for name in folders:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def atomic_write_text(path: str, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same directory, then an atomic rename. An OSError
    (a full disk, say) names `path`, and no temporary file is left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def replace_dir(tmp: str, target: str) -> None:
    """Rename the finished folder `tmp` to `target`; an old `target` is moved aside first and deleted only once the
    new one is in place, or put back if that fails."""
    aside = tmp + "-old"
    if os.path.isdir(target):
        os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        if os.path.isdir(aside) and not os.path.exists(target):
            os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk, so an interrupted run keeps everything written so far. A write
    that fails (a full disk) is undone: the file is cut back to where it was, so no record is ever half on disk."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:
            os.ftruncate(fd, start)  # frees what the partial write took; needs no space
            if isinstance(e, OSError):
                raise OSError(e.errno, e.strerror, path) from None
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_output(path: str) -> Iterator[None]:
    """Be the one writer of the results file `path` while the block runs: an advisory lock (flock) on the file,
    created empty if missing and removed again if still empty at the end. A second run on the same file fails at
    once with ValueError instead of writing every answer a second time; the lock goes with the process, killed or
    not."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{path}: another run is writing to it now; wait for it to end, or give another output "
                         f"file") from None
    try:
        yield
    finally:
        if not existed and os.fstat(fd).st_size == 0:  # nothing was written: leave nothing behind
            os.unlink(path)
        os.close(fd)


def count_records(path: str) -> int:
    """Whole (newline-ended, non-blank) lines of a results file."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n") and line.strip())


def input_digest(user_text: str) -> str:
    """What a result record keeps of the prompt it answers (instruction + dialogue): a short SHA-256, so that a
    results file is never resumed, nor scored, against another input file whose line numbers happen to match."""
    return hashlib.sha256(user_text.encode("utf-8")).hexdigest()[:16]


def load_done(path: str) -> dict[int, str | None]:
    """{id: input digest (None in files written before digests were)} of the records already in a results file, for
    resuming. A run killed mid-write can leave its last line torn (no newline at the end, and not valid JSON): that
    tail is set aside in <path>.torn, with a note, and cut from the file in place (which needs no free space), so its
    answer is generated again. Any other bad line stops with its line number, so nothing already written is thrown
    away."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:  # bytes: a kill can also cut a multi-byte character in two
        lines = f.read().splitlines(keepends=True)
    done: dict[int, str | None] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            done[int(record["id"])] = record.get("input_digest")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
                RecursionError):
            if lineno == len(lines) and not line.endswith(b"\n"):
                set_aside_torn_tail(path, len(b"".join(lines[:-1])), line)
                break
            raise ValueError(f"{path}:{lineno}: not a result record with an integer 'id'; fix or remove the line "
                             f"(or pass another output file)") from None
    else:
        if lines and not lines[-1].endswith(b"\n"):  # whole but unterminated: end it, so appends start a new line
            with open(path, "ab") as f:
                f.write(b"\n")
    return done


def set_aside_torn_tail(path: str, keep: int, tail: bytes) -> None:
    """Cut a torn last line from a results file in place, keeping its bytes in <path>.torn where there is room."""
    kept = f"{path}.torn"
    try:
        with open(kept, "ab") as f:
            f.write(tail + b"\n")
    except OSError as e:
        kept = f"nowhere ({e.strerror})"
    os.truncate(path, keep)
    print(f"note: {path}: its last line was cut off by an earlier run ({len(tail)} bytes, not a whole record); set "
          f"aside in {kept}, and that answer is generated again", file=sys.stderr, flush=True)


def pending(examples: Sequence, output_file: str, source: str) -> tuple[list, int]:
    """(the examples not yet answered in `output_file`, how many are). Examples have `.id` (0-based line of
    `source`) and `.user_text`. An answered id whose recorded input is not that line's is refused: the results file
    belongs to another input file, and resuming it would mix two data sets' answers under one name."""
    done = load_done(output_file)
    for e in examples:
        recorded = done.get(e.id)
        if recorded is not None and recorded != input_digest(e.user_text):
            raise ValueError(f"{output_file}: the answer with id {e.id} was made for another dialogue than line "
                             f"{e.id + 1} of {source}; write to another output file, or delete {output_file} to "
                             f"start over")
    todo = [e for e in examples if e.id not in done]
    return todo, len(examples) - len(todo)


def check_run_settings(output_file: str, settings: dict, implied: dict | None = None) -> None:
    """Refuse to resume a results file with other settings (model, decoding, truncation) than those it was begun
    with, which would mix two runs' answers in one file. The settings live beside it, in <output_file>.settings.json,
    written when the file holds no results yet. `implied`: the value a setting had in files written before it was
    recorded (a file without `constraint` was generated freely)."""
    path = output_file + ".settings.json"
    begun = os.path.exists(output_file) and os.path.getsize(output_file) > 0
    if begun and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                before = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg}); delete it to resume with the current "
                                 f"settings") from None
        before = {**(implied or {}), **before}
        changed = [f"{key} {_setting(before[key])} -> {_setting(value)}" for key, value in settings.items()
                   if key in before and before[key] != value]
        # keys this run does not have: another program's file (predict.py's model_path, test_openai.py's endpoint)
        changed += [f"{key} {_setting(before[key])} -> (none)" for key in before if key not in settings]
        if changed:
            raise ValueError(f"{output_file} was begun with other settings ({'; '.join(changed)}); resume it with "
                             f"the same ones, or write to another output file")
        if settings.keys() - before.keys():  # recorded by an older version: it knew less, so add what it lacked
            atomic_write_text(path, json.dumps({**settings, **before}, ensure_ascii=False, indent=2) + "\n")
        return
    if begun:
        raise ValueError(f"{output_file} holds results but no {os.path.basename(path)} saying how they were made, "
                         f"so they cannot be resumed; write to another output file, or delete {output_file} to "
                         f"start over")
    atomic_write_text(path, json.dumps(settings, ensure_ascii=False, indent=2) + "\n")


def _setting(value: object, limit: int = 100) -> str:
    """A recorded setting in an error message: a long structure (a schema, with its instruction) cut to its start,
    where its fields are; a path or a name whole."""
    text = repr(value)
    return text[:limit - 3] + "..." if isinstance(value, (dict, list)) and len(text) > limit else text


# --------------------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------------------


class QwenPromptDataSet(torch.utils.data.Dataset):
    """data_helper's JSON Lines ({instruction, input, output}) as token ids and labels, tokenized eagerly."""

    def __init__(self, data_path: str, tokenizer, max_len: int, max_src_len: int, is_skip: bool, rank: int = 0,
                 truncation: str = "tokens"):
        if max_src_len >= max_len:
            raise ValueError(f"max_src_len ({max_src_len}) must be smaller than max_len ({max_len})")
        if min_answer_room(max_len, max_src_len) < 4:
            raise ValueError(f"max_len {max_len} leaves no room for an answer after max_src_len {max_src_len}")
        self.data_path = data_path
        self.items: list[dict[str, list[int]]] = []
        self.skipped = 0
        for lineno, sample in iter_jsonl(data_path):
            for field in ("instruction", "input", "output"):
                if not isinstance(sample.get(field), str):
                    raise ValueError(f"{data_path}:{lineno}: field '{field}' is missing or not a string")
            ids = build_chatml_ids(tokenizer, sample["instruction"] + sample["input"], sample["output"],
                                   max_len, max_src_len, truncation=truncation,
                                   instruction_chars=len(sample["instruction"]))
            if is_skip and ids.truncated:
                self.skipped += 1
                continue
            self.items.append({"input_ids": ids.input_ids, "labels": ids.labels})
        total = len(self.items) + self.skipped
        if total == 0:
            raise ValueError(f"{data_path}: no samples (the file is empty)")
        print_rank_0(f"{data_path}: {len(self.items)} samples kept, {self.skipped} skipped "
                     f"(proportion {self.skipped / total:.4f})", rank)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class DataCollator:
    """Right-pads a batch to a multiple of 8 with the pad id (labels with -100) and adds an attention_mask."""

    def __init__(self, tokenizer, multiple_of: int = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id; set it to tokenizer.eod_id")
        self.pad_id = tokenizer.pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in batch)
        width = math.ceil(longest / self.multiple_of) * self.multiple_of
        input_ids, labels, mask = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            input_ids.append(item["input_ids"] + [self.pad_id] * pad)
            labels.append(item["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(item["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long)}


# --------------------------------------------------------------------------------------------------------------
# Runtime helpers
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str):
    """The Qwen tokenizer of a checkpoint directory, with <|endoftext|> as its pad id: Qwen defines no pad token,
    and padding is masked out (prediction) or carries no labels and sits after every real token (training)."""
    from qwen1_8.tokenization_qwen import QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token_id = tokenizer.eod_id
    return tokenizer


# Deprecation notices that libraries raise from their own internals, on every run, about calls we do not make:
# peft reads `is_gradient_checkpointing` (transformers 5 renamed it), and DeepSpeed's ZeRO-2 gathers with
# `all_gather_into_tensor` (torch 2.13 renamed it). Matched by exact message, so any other warning still shows.
LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",
                        r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


# Log lines of the same kind, by logger and the start of the message: bitsandbytes, imported on a CPU with
# AVX512-BF16, says it could not fetch its CPU inference kernel from the Hugging Face Hub and asks for `pip install
# kernels`, a run-time download this project never makes, for a kernel train.py turns off
# (train.keep_4bit_training_kernels).
LIBRARY_LOG_NOTICES = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# one filter each, built once: Logger.addFilter skips a filter it already holds, so set-up may run twice
_LOG_NOTICE_FILTERS = tuple((name, _DropNotice(prefix)) for name, prefix in LIBRARY_LOG_NOTICES)


def silence_library_deprecations() -> None:
    """Hide LIBRARY_DEPRECATIONS and LIBRARY_LOG_NOTICES, which a user can do nothing about; scripts call it first
    thing in main()."""
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, log_filter in _LOG_NOTICE_FILTERS:
        logging.getLogger(name).addFilter(log_filter)


def fail(prog: str, message: object) -> None:
    """Stop a script with one line, `<prog>: error: <message>`, and exit status 1 (as argparse's own errors read).
    Scripts call it with the library's typed errors; the library itself never exits. An error that carries an
    `exit_status` of its own (an interrupted batch: 130, as the shell gives Ctrl-C) is printed as it is."""
    status = getattr(message, "exit_status", 1)
    if status != 1:
        print(f"\n{message}", file=sys.stderr, flush=True)
        raise SystemExit(status)
    raise SystemExit(f"{prog}: error: {message}")


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line of at most `limit` characters, for an error that names a file (a library's
    own message, such as torch's list of mismatched sizes, can run to pages)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def set_random_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def print_rank_0(msg: Any, rank: int = 0) -> None:
    if rank <= 0:
        print(msg, flush=True)


def log_rank_0(message: str, rank: int = 0) -> None:
    """One log line on rank 0 that does not tear its progress bar."""
    if rank <= 0:
        tqdm.write(message)


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for every script: the docstring as written, and each flag's default after its help, unless the help
    already speaks of its default or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default in ("", argparse.SUPPRESS) or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"


# A model directory holds one of these (transformers loads .bin with torch.load(weights_only=True)).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# --dtype spellings of predict.py and merge_params.py: torch's names and the short ones
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """Accepts 'auto', 'cpu', 'cuda', 'cuda:N', or the chapter's bare GPU index ('1'); '-1' means CPU."""
    if device in (None, "", "auto"):
        return torch.device(default_device())
    if device == "-1":
        return torch.device("cpu")
    if device.isdigit():
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: expected auto, cpu, cuda, cuda:N or a GPU index") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16, or AMX tiles: Cooper Lake, Sapphire Rapids,
    Zen 4 and later), by torch's own capability checks; elsewhere torch emulates bf16, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def return_freed_memory(device: torch.device) -> None:
    """On the CPU, have glibc's allocator give freed blocks of 1 MB and more back to the system at once.

    Left to itself, glibc raises its mmap threshold after the first large block is freed, so later activations come
    from the heap, and blocks of a new size each step (every prompt or batch length differs) are kept rather than
    returned: in bf16, where oneDNN's matmuls allocate per shape, a 2048-wide Linear grew the process by 1.6 GB over
    400 prompt lengths, and by 2.0 GB over 200 training lengths, forward and backward; with this, 0.26 and 0.29 GB
    (oneDNN's kernel cache, bounded), at the same speed (bench/RESULTS.md). A process-wide setting, like
    torch.set_num_threads, made by the scripts and Extractor.load when they run on the CPU; nothing where the C
    library is not glibc."""
    if device.type != "cpu":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl, macOS): its own policy stands
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 20)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 in hardware: CUDA GPUs of compute capability 8.0 (Ampere) and later, and ROCm.
    torch.cuda.is_bf16_supported() also says yes for older GPUs that only emulate it (slower than fp32 there), and it
    asks about the current device rather than this one."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8

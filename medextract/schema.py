"""The extraction schema: which fields an answer has, of which kind, and the instruction that asks for them.

A schema file is JSON:

    {"fields": [{"name": "药品名称", "kind": "spans"}, {"name": "现病史", "kind": "text"}],
     "instruction": "…"}

`spans`: a list of pieces copied verbatim from the dialogue (the grammar grounds them); `text`: a summary string.
`instruction` is optional: without it one is written in the chapter's words for these fields. The default schema is
the chapter's eight fields with the chapter's instruction verbatim, so its prompts and answers are the chapter's
token for token.

One schema drives everything downstream: the training data (data_helper.py), the prompt, the answer grammar, the
metrics and report, the service and its page. train.py saves it in the run and every checkpoint as `schema.json`;
merge_params.py and export_qwen2.py carry it on; a model directory that has none answers with the chapter's.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from utils import CHAPTER_FIELDS, INSTRUCTION, answer_object, iter_jsonl

from .errors import ConfigError, InputError
from .model_files import read_json_object

SCHEMA_FILE = "schema.json"  # in a run's output_dir, each checkpoint, a merged model and an export
KINDS = ("spans", "text")


class Field(NamedTuple):
    name: str
    kind: str  # "spans" or "text"


@dataclass(frozen=True)
class Schema:
    fields: tuple[Field, ...]
    instruction: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def span_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.kind == "spans")

    @property
    def text_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.kind == "text")

    @property
    def is_chapter(self) -> bool:
        return self == CHAPTER_SCHEMA

    def to_json(self) -> dict:
        """The schema as its file holds it, the instruction always written out (a generated one included), so a
        saved schema means the same prompt whatever later versions would generate."""
        return {"fields": [{"name": f.name, "kind": f.kind} for f in self.fields], "instruction": self.instruction}

    def text(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The fields in one line: `药品名称 (spans), 现病史 (text)`."""
        return ", ".join(f"{f.name} ({f.kind})" for f in self.fields)


# --------------------------------------------------------------------------------------------------------------
# The instruction, in the chapter's words
# --------------------------------------------------------------------------------------------------------------


def _enumerate(names: tuple[str, ...]) -> str:
    """甲、乙和丙: the chapter's way of listing names."""
    return names[0] if len(names) == 1 else "、".join(names[:-1]) + "和" + names[-1]


def generated_instruction(fields: tuple[Field, ...]) -> str:
    """An instruction for `fields` in the chapter's words and rules: span fields are lists copied from the dialogue
    without repeats, text fields are summaries, the answer is JSON with these keys. For the chapter's eight fields it
    is the chapter's instruction, character for character (tested)."""
    spans = tuple(f.name for f in fields if f.kind == "spans")
    texts = tuple(f.name for f in fields if f.kind == "text")
    lines = ["你现在是一个医疗对话要素抽取专家。",
             f"请针对下面对话内容抽取出{_enumerate(tuple(f.name for f in fields))}等内容，并且以json格式返回，"
             "Key为上述待抽取的字段名称，Value为抽取出的文本内容。"]
    notes = []
    if spans:
        notes.append(f"{_enumerate(spans)}的内容会在对话中存在多个，因此Value内容以List形式存放；若抽取内容为空，则为一个空的List；")
        notes.append(f"抽取出的{_enumerate(spans)}对应内容，需要完全来自于原文，不可进行修改，内容不重复；")
    if texts:
        notes.append(f"{_enumerate(texts)}的内容需要根据整个对话内容进行总结抽取，Value内容以Text形式存放。")
    notes[-1] = notes[-1].removesuffix("；") + ("" if notes[-1].endswith("。") else "。")
    numbered = [f"（{i}）{note}" for i, note in enumerate(notes, start=1)]
    lines += ["注意事项：" + numbered[0], *numbered[1:], "对话文本："]
    return "\n".join(lines) + "\n"


CHAPTER_SCHEMA = Schema(tuple(Field(*f) for f in CHAPTER_FIELDS), INSTRUCTION)


# --------------------------------------------------------------------------------------------------------------
# Reading and checking a schema
# --------------------------------------------------------------------------------------------------------------


def schema_from_json(value: Any, where: str) -> Schema:
    """The schema `value` (a schema file's JSON) describes; ConfigError naming `where` and what is wrong."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"fields\" (and optionally \"instruction\"), got a "
                          f"JSON {_json_type(value)}")
    unknown = [str(k) for k in value if k not in ("fields", "instruction")]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a schema has \"fields\" and optionally "
                          f"\"instruction\")")
    raw = value.get("fields")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: \"fields\" must be a non-empty list of {{\"name\", \"kind\"}} objects, got "
                          + ("nothing" if raw is None else f"a JSON {_json_type(raw)}" if not isinstance(raw, list)
                             else "an empty list"))
    fields, seen = [], set()
    for i, item in enumerate(raw, start=1):
        at = f"{where}: field {i}"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected an object {{\"name\": …, \"kind\": \"spans\" or \"text\"}}, got a JSON "
                              f"{_json_type(item)}")
        extra = [str(k) for k in item if k not in ("name", "kind")]
        if extra:
            raise ConfigError(f"{at}: unknown key {extra[0]!r} (a field has \"name\" and \"kind\")")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at}: \"name\" must be a non-empty string, got {json.dumps(name, ensure_ascii=False)}")
        if name != name.strip() or any(unicodedata.category(ch)[0] == "C" for ch in name):
            raise ConfigError(f"{at}: name {json.dumps(name, ensure_ascii=False)} has white space at an end or a "
                              f"control character")
        if unicodedata.normalize("NFC", name) != name:
            raise ConfigError(f"{at}: name {json.dumps(name, ensure_ascii=False)} is not in NFC form (the "
                              f"tokenizer would change it)")
        if name in seen:
            raise ConfigError(f"{at}: the name {name!r} is used twice; each field needs its own name")
        seen.add(name)
        kind = item.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{at} ({name}): unknown kind {json.dumps(kind, ensure_ascii=False)}; expected "
                              f"\"spans\" (a list of pieces copied from the dialogue) or \"text\" (a summary)")
        fields.append(Field(name, kind))
    instruction = value.get("instruction")
    if instruction is None:
        instruction = generated_instruction(tuple(fields))
    elif not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"{where}: \"instruction\" must be a non-empty string (or left out, for one written for "
                          f"these fields)")
    else:
        try:
            instruction.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{where}: \"instruction\" holds a lone surrogate at character {e.start + 1}") from None
    return Schema(tuple(fields), instruction)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def load_schema(path: str, flag: str = "--schema") -> Schema:
    """The schema in the file at `path`; ConfigError naming the file (and `flag`) and what is wrong."""
    where = f"{flag} {path}" if flag else path
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: " + ("a directory, not a schema file" if os.path.isdir(path) else "no such file"))
    try:
        value = read_json_object(path)
    except ValueError as e:  # it names the file
        raise ConfigError(f"{flag} {e}" if flag else str(e)) from None
    return schema_from_json(value, where)


def schema_file(directory: str) -> str:
    return os.path.join(directory, SCHEMA_FILE)


def model_schema(model_dir: str) -> Schema | None:
    """The schema a model directory (a checkpoint, a merged model, an export) was trained with; None where it
    records none (the chapter's, or a model never trained here)."""
    path = schema_file(model_dir)
    return load_schema(path, flag="") if os.path.isfile(path) else None


def resolve_schema(model_dir: str | None, path: str | Schema | None, flag: str = "--schema") -> Schema:
    """The schema to answer with: the model's own (`model_dir`/schema.json); else `path`, a schema file (`--schema`,
    for a model trained elsewhere) or a Schema (the Python API); else the chapter's. One that differs from the
    model's is refused: the model answers the fields it learned."""
    own = model_schema(model_dir) if model_dir else None
    given = (path if isinstance(path, Schema) else load_schema(path, flag)) if path else None
    if own is not None and given is not None and given != own:
        named = flag if isinstance(path, Schema) else f"{flag} {path}"
        raise ConfigError(f"{named} differs from the schema {os.path.join(model_dir, SCHEMA_FILE)} the model "
                          f"was trained with ({own.describe()}); leave {flag} out to use the model's")
    return own or given or CHAPTER_SCHEMA


def results_schema(results_files: Sequence[str], path: str | None = None, flag: str = "--schema") -> Schema:
    """The schema a set of results files (predictions) was made with, as the settings file beside each records it
    (predict.py, test_qwen.py and test_openai.py write `<file>.settings.json`; no "schema" there: the chapter's);
    else the file `path` (`--schema`), else the chapter's. Files made with different schemas, or a `--schema` other
    than the one recorded, are refused: their fields would be scored against the wrong keys."""
    recorded: dict[str, Schema] = {}
    for results in results_files:
        settings = results + ".settings.json"
        if not os.path.isfile(settings):
            continue  # made elsewhere: nothing recorded
        try:
            with open(settings, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError):
            continue  # the tool that wrote it names a bad settings file when it resumes; here it says nothing
        saved = value.get("schema") if isinstance(value, dict) else None
        recorded[results] = CHAPTER_SCHEMA if saved is None else schema_from_json(saved, f"{settings}: \"schema\"")
    distinct = set(recorded.values())
    if len(distinct) > 1:
        described = "; ".join(f"{name}: {schema.describe()}" for name, schema in recorded.items())
        raise ConfigError(f"the predictions were made with different schemas ({described}); score each with its own")
    given = load_schema(path, flag) if path else None
    if distinct:
        name, own = next(iter(recorded.items()))
        if given is not None and given != own:
            raise ConfigError(f"{flag} {path} differs from the schema {name} was made with ({own.describe()}, in "
                              f"{name}.settings.json); leave {flag} out to use it")
        return own
    return given or CHAPTER_SCHEMA


def check_samples(path: str, schema: Schema) -> None:
    """Training or test samples (data_helper's JSON Lines) made for `schema`: each answer holds exactly its fields.
    Data split for another schema, trained on, would teach the model keys its grammar then refuses; an answer that
    holds no object, or an empty one, is left to the loaders."""
    for lineno, record in iter_jsonl(path):
        output = record.get("output")
        answer = answer_object(output, schema.fields) if isinstance(output, str) else None
        if not answer:
            continue
        keys = [str(k).strip() for k in answer]
        if set(keys) != set(schema.keys):
            fix = ("train.py --schema names the fields of data_helper.py --schema" if schema.is_chapter
                   else "split the data with data_helper.py and the same --schema")
            raise InputError(f"{path}:{lineno}: the answer's fields ({', '.join(keys)}) are not the schema's "
                             f"({', '.join(schema.keys)}); {fix}")

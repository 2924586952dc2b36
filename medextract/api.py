"""The Python API: extraction from a program, batched through the same engine, prompts and grammar as predict.py,
so its answers are predict.py's for the same settings.

    from medextract import Extractor

    ex = Extractor.load("output_dir_qlora/merged")          # or a train.py checkpoint (its adapter, unmerged)
    for r in ex.extract(["患者：……\\n医生：……"], max_new_tokens=512):
        r.fields["药品名称"]   # [Span(text, start, end)]: offsets into the dialogue as given
        r.fields["现病史"]     # str
        r.valid, r.truncated, r.output

A model trained with a schema of its own (train.py --schema) answers its fields: `Extractor.load` reads the
schema.json the model directory carries (`ex.schema`); `schema=` gives one to a model trained elsewhere.

Errors are medextract.errors' (ConfigError for a bad setting or model directory, ModelLoadError for weights that
fail to load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

import torch

from utils import (CHAPTER_FIELDS, Fields, parse_output, resolve_device, return_freed_memory, set_random_seed,
                   silence_library_deprecations)

from .engine import Decoding, Engine, Result
from .errors import ConfigError
from .grammar import CONSTRAINTS
from .inference import (Truncation, check_generation, check_model_dir_files, dialogue_request, examples_of,
                        load_engine, resolve_dtype, trained_truncation)
from .schema import CHAPTER_SCHEMA, Schema, resolve_schema


@dataclass(frozen=True)
class Span:
    """A list item and where it stands in the dialogue: `dialogue[start:end] == text` (its first occurrence);
    None when the dialogue does not hold it (never under the grounded constraint)."""
    text: str
    start: int | None
    end: int | None


FieldValue = Union[list[Span], str]


@dataclass(frozen=True)
class Extraction:
    """One dialogue's answer: the fields (list fields as Spans, text fields as str), whether the answer was valid
    JSON, whether the budget ended it (under a constraint it was then closed, still valid), and the model's text."""
    dialogue: str
    fields: dict[str, FieldValue]
    valid: bool
    truncated: bool
    output: str
    finish_reason: str  # "stop", "length", or "error" (then `output` says why)
    num_new_tokens: int
    prompt_cut: bool  # the dialogue was longer than max_src_len and cut as training cut it


def span_offsets(fields: dict, dialogue: str, kinds: Fields = CHAPTER_FIELDS) -> dict[str, FieldValue]:
    """The parsed fields with each item of a span field (`kinds`: the schema's (name, kind) pairs) located in
    `dialogue` (its first occurrence)."""
    spans_of = {name for name, kind in kinds if kind == "spans"}
    out: dict[str, FieldValue] = {}
    for key, value in fields.items():
        if key in spans_of:
            spans = []
            for text in value:
                start = dialogue.find(text) if text else -1
                spans.append(Span(text, start, start + len(text)) if start >= 0 else Span(text, None, None))
            out[key] = spans
        else:
            out[key] = value
    return out


class Extractor:
    """A loaded model ready to extract. `Extractor.load` checks the directory and settings as predict.py does."""

    def __init__(self, engine: Engine, constraint: str = "grounded", truncation: Truncation = Truncation(),
                 schema: Schema = CHAPTER_SCHEMA):
        if constraint not in CONSTRAINTS:
            raise ConfigError(f"constraint {constraint!r}: expected one of {', '.join(CONSTRAINTS)}")
        if constraint != "none" and engine.vocabulary is None:
            raise ConfigError(f"constraint {constraint!r} needs an engine built with the grammar vocabulary")
        self.engine = engine
        self.constraint = constraint
        self.truncation = truncation
        self.schema = schema

    @classmethod
    def load(cls, model_path: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             constraint: str = "grounded", batch_size: int = 8, max_len: int | None = None,
             max_src_len: int | None = None, truncation: str | None = None,
             schema: str | Schema | None = None) -> "Extractor":
        """The model at `model_path` (a merged model or a train.py checkpoint) on `device` ('auto', 'cpu', 'cuda',
        'cuda:N'), in `dtype` ('auto', 'float32', 'bfloat16', 'float16', or a torch dtype), answering under
        `constraint` (grounded, schema or none), `batch_size` answers at a time. Prompts are cut as training cut
        them: max_len / max_src_len / truncation from the model's train_args.json unless given. The fields are the
        schema the model directory carries (schema.json), else `schema` (a Schema or a schema file's path), else the
        chapter's; a `schema` other than the model's own is refused."""
        silence_library_deprecations()
        if constraint not in CONSTRAINTS:
            raise ConfigError(f"constraint {constraint!r}: expected one of {', '.join(CONSTRAINTS)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        try:
            torch_device = device if isinstance(device, torch.device) else resolve_device(str(device))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return_freed_memory(torch_device)
        if isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        else:
            try:
                torch_dtype = resolve_dtype(dtype, torch_device)
            except KeyError:
                raise ConfigError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None
        answer_schema = resolve_schema(model_path, schema, "schema")
        cut, _ = trained_truncation(model_path, max_len, max_src_len, truncation)
        check_generation(model_path, Decoding(), constraint, cut)
        check_model_dir_files(model_path)
        engine = load_engine(model_path, torch_device, torch_dtype, batch_size, constraint != "none")
        return cls(engine, constraint, cut, answer_schema)

    def extract(self, dialogues: Iterable[str] | str, max_new_tokens: int = 512, do_sample: bool = False,
                temperature: float = 0.8, top_p: float = 0.8, repetition_penalty: float = 1.1,
                seed: int = 42) -> list[Extraction]:
        """One Extraction per dialogue, in order (generated together, longest first). Greedy unless `do_sample`;
        each sampled answer draws from its own generator seeded with `seed`, so it does not depend on the batch."""
        if isinstance(dialogues, str):
            dialogues = [dialogues]
        dialogues = list(dialogues)
        for i, dialogue in enumerate(dialogues):
            if not isinstance(dialogue, str):
                raise ConfigError(f"dialogue {i}: expected a str, got {type(dialogue).__name__}")
        decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        if do_sample:
            set_random_seed(seed)
        requests, cuts = [], []
        for example in examples_of(dialogues, self.schema):
            request, cut = dialogue_request(self.engine, example.user_text, example.instruction_chars, decoding,
                                            self.constraint, self.truncation, self.schema)
            requests.append(request)
            cuts.append(cut)
        shortest = self.engine.empty_answer_tokens(self.schema.fields) if self.constraint != "none" else 0
        if requests and max_new_tokens < shortest:
            raise ConfigError(f"max_new_tokens {max_new_tokens} is below the {shortest} tokens the shortest answer "
                              f"in the trained format takes (every field empty)")
        results = self.engine.generate(requests)
        return [self._extraction(d, r, cut) for d, r, cut in zip(dialogues, results, cuts)]

    def _extraction(self, dialogue: str, result: Result, cut: bool) -> Extraction:
        fields, valid = parse_output("" if result.finish_reason == "error" else result.text, self.schema.fields)
        return Extraction(dialogue, span_offsets(fields, dialogue, self.schema.fields), valid, result.truncated,
                          result.text, result.finish_reason, len(result.tokens), cut)

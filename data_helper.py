"""Turn data/all.json (dialogues with their extracted elements) into the training and test files, split by a seed.

Each record of all.json becomes one JSON line `{"instruction", "input", "output"}`: the chapter's instruction, the
dialogue, and the eight fields as a ```json fence around `json.dumps` (so apostrophes and quotes inside the text stay
valid JSON, unlike the chapter's quote replacement). The files keep the chapter's `.json` names but hold JSON Lines.
Everything is validated before anything is written, and each file is written whole or not at all.

    python data_helper.py --all_path data/all.json --train_path data/train.json --test_path data/test.json \\
        --test_size 50 --seed 1234

With `--schema my_schema.json` the samples hold that schema's fields instead, in its order, and carry its
instruction; give train.py the same --schema. Each record's extract_text must have every field of the schema; keys
it has beyond them are left out (said once), so a schema that keeps some of the chapter's fields needs no new data.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import reprlib

from medextract.cli import add_schema_argument
from medextract.schema import CHAPTER_SCHEMA, Schema, load_schema
from utils import TOO_DEEP, HelpFormatter, atomic_write_text, check_output_path, format_output, parse_output

# Values quoted in error messages: a few levels and items of each, so that no value (a list nested 900 deep, a long
# text) can make the message itself fail or run on for pages
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 3, 4, 4, 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    paths = parser.add_argument_group("paths")
    paths.add_argument("--all_path", default="data/all.json",
                       help="input: one JSON array of {dialogue_text, extract_text} records")
    paths.add_argument("--train_path", default="data/train.json", help="output: training samples (JSON Lines)")
    paths.add_argument("--test_path", default="data/test.json", help="output: test samples (JSON Lines)")
    split = parser.add_argument_group("split")
    split.add_argument("--test_size", type=int, default=50, help="number of records that go to the test file")
    split.add_argument("--seed", type=int, default=1234, help="seed of the shuffle; the same seed gives the same files")
    add_schema_argument(parser.add_argument_group("fields"),
                        help="a schema file naming the fields each record's extract_text holds (JSON: {\"fields\": "
                             "[{\"name\", \"kind\": \"spans\" or \"text\"}, …], \"instruction\"}); default: "
                             "the chapter's eight fields and instruction")
    return parser.parse_args(argv)


def load_records(path: str) -> list:
    """The JSON array in `path`."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not an error
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            raise ValueError(f"{path}: the file is empty (expected a JSON array of records)") from None
        hint = (" (it looks like JSON Lines, one record per line, such as a split this script wrote; --all_path takes "
                "the JSON array of all records)" if e.msg.startswith("Extra data") and e.doc.lstrip().startswith("{")
                else "")
        raise ValueError(f"{path}: not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno})"
                         f"{hint}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the array holds no records")
    return data


def parse_extract(value, where: str, schema: Schema = CHAPTER_SCHEMA, left_out: set | None = None) -> dict:
    """The schema's fields of one record's `extract_text`, given as a dict, a JSON string or a Python-literal string
    (the chapter's all.json may hold dict reprs). Strings are parsed with json, then ast.literal_eval; never eval.
    List fields are de-duplicated, keeping the first occurrence, because the instruction asks for no repeats. Keys
    beyond a schema of the user's own go into `left_out`; beyond the chapter's they are an error (a slip, or data
    for a schema not given)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise ValueError(f"{where}: extract_text is a string {TOO_DEEP}") from None
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError(f"{where}: extract_text is a string that is neither JSON nor a Python literal") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: extract_text must be an object with the {len(schema.keys)} keys, got "
                         f"{type(value).__name__}")
    whose = "" if schema.is_chapter else " (fields of the schema)"
    unknown = [str(k) for k in value if k not in schema.keys]  # first: keys of another schema are the likelier slip
    if unknown and left_out is not None and not schema.is_chapter:
        left_out.update(unknown)
    elif unknown:
        among = "the chapter's eight fields; --schema names others" if schema.is_chapter else "the schema's fields"
        raise ValueError(f"{where}: extract_text has unknown key(s) {', '.join(unknown)} (not among {among})")
    missing = [k for k in schema.keys if k not in value]
    if missing:
        raise ValueError(f"{where}: extract_text is missing key(s) {', '.join(missing)}{whose}")
    extract = {}
    for key, kind in schema.fields:  # the schema's order, which is the answer's
        if kind == "text":
            if not isinstance(value[key], str):
                raise ValueError(f"{where}: extract_text['{key}'] must be a string, got {_SHORT.repr(value[key])}")
            extract[key] = value[key]
            continue
        items = value[key]
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"{where}: extract_text['{key}'] must be a list of strings, got {_SHORT.repr(items)}")
        if not all(x.strip() for x in items):
            raise ValueError(f"{where}: extract_text['{key}'] has an empty item: {_SHORT.repr(items)}")
        extract[key] = list(dict.fromkeys(items))
    return extract


def build_samples(records: list, path: str, schema: Schema = CHAPTER_SCHEMA,
                  left_out: set | None = None) -> list[dict]:
    """One {instruction, input, output} sample per record; the first bad record raises, naming path and index. Keys
    beyond a schema of the user's own are collected in `left_out`."""
    samples = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        dialogue = record.get("dialogue_text")
        if dialogue is None:
            raise ValueError(f"{where}: missing 'dialogue_text'")
        if not isinstance(dialogue, str):
            raise ValueError(f"{where}: 'dialogue_text' must be a string, got {type(dialogue).__name__}")
        if not dialogue.strip():
            raise ValueError(f"{where}: 'dialogue_text' is empty")
        if "extract_text" not in record:
            raise ValueError(f"{where}: missing 'extract_text'")
        extract = parse_extract(record["extract_text"], where, schema, left_out)
        check_utf8(dialogue, f"{where}: 'dialogue_text'")
        for key, kind in schema.fields:
            for item in [extract[key]] if kind == "text" else extract[key]:
                check_utf8(item, f"{where}: extract_text['{key}']")
        samples.append({"instruction": schema.instruction, "input": dialogue,
                        "output": format_output(extract, schema.fields)})
    return samples


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_utf8(text: str, where: str) -> None:
    """A JSON escape such as \\ud800 without its pair decodes to a lone surrogate, which no UTF-8 file can hold: name
    it here rather than fail while writing the splits."""
    match = _LONE_SURROGATE.search(text)
    if match:
        raise ValueError(f"{where} holds a lone surrogate (\\u{ord(match.group()):04x} at character "
                         f"{match.start()}), half of a character pair that UTF-8 cannot store; fix the escape in "
                         f"the file")


def unquoted_items(samples: list[dict], schema: Schema = CHAPTER_SCHEMA) -> list[int]:
    """Indices of the samples with a list item that is not copied verbatim from the dialogue, which the instruction
    asks for (the chapter's test set has none); kept, since an annotator may have normalised a span on purpose."""
    return [index for index, sample in enumerate(samples)
            if any(item not in sample["input"] for key in schema.span_keys
                   for item in parse_output(sample["output"], schema.fields)[0][key])]


def drop_repeated_dialogues(samples: list[dict]) -> tuple[list[dict], list[int], list[int]]:
    """The samples with each dialogue kept once (its first record), the indices of the records dropped, and those of
    the dropped records whose labels differ from the kept one's. A dialogue in both splits would be tested on what
    was trained on; dialogues that differ only in white space are the same dialogue."""
    first: dict[str, dict] = {}
    kept, dropped, relabelled = [], [], []
    for index, sample in enumerate(samples):
        key = " ".join(sample["input"].split())
        if key in first:
            dropped.append(index)
            if sample["output"] != first[key]["output"]:
                relabelled.append(index)
        else:
            first[key] = sample
            kept.append(sample)
    return kept, dropped, relabelled


def split_samples(samples: list[dict], test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded shuffle of the indices; the first `test_size` go to test."""
    if not 0 < test_size < len(samples):
        raise ValueError(f"--test_size {test_size} must be at least 1 and smaller than the number of records "
                         f"({len(samples)})")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in order[test_size:]], [samples[i] for i in order[:test_size]]


def to_jsonl(samples: list[dict]) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def holds(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def write_split(files: dict[str, str]) -> None:
    """Write {path: text} all or nothing: every file goes to a temporary file first and the renames come last, so a
    failed write never leaves a new train file beside an old test file (they could share dialogues). A file that
    already holds exactly its text is left alone, so its timestamp tells `make` that the split did not change."""
    staged = []
    try:
        for path, text in files.items():
            if not holds(path, text):
                tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}")
                atomic_write_text(tmp, text)
                staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        paths = [os.path.abspath(p) for p in (args.all_path, args.train_path, args.test_path)]
        if len(set(paths)) < 3:
            raise ValueError("--all_path, --train_path and --test_path must be three different files")
        check_output_path(args.train_path, "--train_path")
        check_output_path(args.test_path, "--test_path")
        schema = load_schema(args.schema) if args.schema else CHAPTER_SCHEMA
        left_out: set[str] = set()
        all_samples = build_samples(load_records(args.all_path), args.all_path, schema, left_out)
        samples, dropped, relabelled = drop_repeated_dialogues(all_samples)
        train, test = split_samples(samples, args.test_size, args.seed)
    except ValueError as e:
        raise SystemExit(f"data_helper: error: {e}") from None
    if left_out:
        print(f"{args.all_path}: kept the {len(schema.keys)} fields of --schema {args.schema}; left out "
              f"{', '.join(sorted(left_out))}")
    if dropped:
        print(f"{args.all_path}: dropped {len(dropped)} records whose dialogue repeats an earlier record's "
              f"({records_named(dropped)})")
    if relabelled:
        print(f"{args.all_path}: warning: {len(relabelled)} of the dropped records had other labels than the record "
              f"kept ({records_named(relabelled)}); check which is right")
    unquoted = unquoted_items(all_samples, schema)
    if unquoted:
        print(f"{args.all_path}: warning: {len(unquoted)} records list an item that does not occur verbatim in their "
              f"dialogue ({records_named(unquoted)}); the model is asked to copy spans")
    try:
        write_split({args.train_path: to_jsonl(train), args.test_path: to_jsonl(test)})
    except OSError as e:  # checked above, so rare: a full disk, or a folder made read-only since
        raise SystemExit(f"data_helper: error: cannot write --train_path {args.train_path} and --test_path "
                         f"{args.test_path} ({e.strerror}); neither was replaced") from None
    print(f"read {len(samples) + len(dropped)} records from {args.all_path}; wrote {len(train)} to {args.train_path} and "
          f"{len(test)} to {args.test_path} (seed {args.seed})")


def records_named(indices: list[int]) -> str:
    return f"records {', '.join(map(str, indices[:5]))}{', ...' if len(indices) > 5 else ''}"


if __name__ == "__main__":
    main()

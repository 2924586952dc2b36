"""Extraction metrics: gold and predicted answers read with utils.parse_output and scored per field, as evaluate.py
reports them and train.py logs them at each checkpoint.

List fields compare sets of whitespace-stripped items; text fields compare characters through the longest common
subsequence, whitespace removed. Counts are pooled over all samples before dividing (micro averages); "overall"
averages each of precision, recall and F1 over the fields (macro), so its F1 is not the F1 of its precision and
recall; "list_fields_micro" pools the items of the list fields, every extracted span counting alike.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Sequence

from utils import answer_object, input_digest, iter_jsonl, normalise_fields, parse_output

from .errors import InputError
from .schema import CHAPTER_SCHEMA, Schema


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def load_gold(path: str) -> tuple[list[int], list[dict]]:
    """(0-based line index, record) of each gold line; `input` and `output` must be strings."""
    ids, records = [], []
    for lineno, record in iter_jsonl(path):
        for field in ("input", "output"):
            if not isinstance(record.get(field), str):
                raise InputError(f"{path}:{lineno}: field '{field}' is missing or not a string")
        ids.append(lineno - 1)
        records.append(record)
    if not records:
        raise InputError(f"{path}: no records (the file is empty)")
    return ids, records


def load_predictions(path: str) -> list[dict]:
    """Prediction records; `output` must be a string and `id`, where present, an integer."""
    records = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record.get("output"), str):
            raise InputError(f"{path}:{lineno}: field 'output' is missing or not a string")
        if "id" in record and not _is_int(record["id"]):
            raise InputError(f"{path}:{lineno}: field 'id' must be an integer, got {record['id']!r}")
        records.append(record)
    return records


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def align(golds: Sequence[dict], preds: Sequence[dict], gold_ids: Sequence[int] | None = None,
          gold_name: str = "gold", pred_name: str = "predictions") -> list[tuple[int, int]]:
    """(gold index, prediction index) pairs: by `id` when every prediction has one (ids unique, each naming a gold
    line), else by order. Raises ValueError when the counts differ or an id is repeated or unknown."""
    gold_ids = list(range(len(golds))) if gold_ids is None else list(gold_ids)
    if len(gold_ids) != len(golds):
        raise InputError(f"{len(gold_ids)} gold ids for {len(golds)} gold records")
    repeated = sorted(i for i, n in Counter(p["id"] for p in preds if _is_int(p.get("id"))).items() if n > 1)
    if repeated:  # before the count, whose hint ("finish the predictions") would not fit
        shown = ", ".join(map(str, repeated[:10])) + (", …" if len(repeated) > 10 else "")
        which = f"id {shown} occurs" if len(repeated) == 1 else f"ids {shown} occur"
        raise InputError(f"{pred_name}: {which} more than once: the file holds the answers of two runs (written "
                         f"at once, or appended twice); keep one answer per id, or predict again into a new file")
    if len(preds) != len(golds):
        raise InputError(f"{pred_name} has {len(preds)} predictions but {gold_name} has {len(golds)} records; "
                         f"finish the predictions (a rerun resumes) or point --gold at the file they came from")
    without = [j for j, p in enumerate(preds) if "id" not in p]
    if len(without) == len(preds):
        return [(i, i) for i in range(len(preds))]
    if without:  # order would pair the lines that have ids with the wrong gold lines
        raise InputError(f"{pred_name}: prediction {without[0]} has no 'id' but others have one; give every "
                         f"prediction its id (the 0-based gold line) or none")
    index_of = {gid: i for i, gid in enumerate(gold_ids)}
    pairs, seen = [], set()
    for j, pred in enumerate(preds):
        pid = pred["id"]
        if not _is_int(pid):
            raise InputError(f"{pred_name}: prediction {j}: field 'id' must be an integer, got {pid!r}")
        if pid in seen:
            raise InputError(f"{pred_name}: prediction {j}: id {pid} occurs more than once")
        if pid not in index_of:
            raise InputError(f"{pred_name}: prediction {j}: id {pid} matches no record of {gold_name} "
                             f"(ids are 0-based line numbers)")
        seen.add(pid)
        pairs.append((index_of[pid], j))
    return pairs


def score(golds: Sequence[dict], preds: Sequence[dict], gold_ids: Sequence[int] | None = None,
          gold_name: str = "gold", pred_name: str = "predictions", schema: Schema = CHAPTER_SCHEMA) -> dict:
    """The report for gold records ({input, output}) and prediction records ({output[, id]}), field by field of
    `schema` (the chapter's 8 by default).

    `gold_ids` are the ids the predictions refer to (default 0, 1, …: the gold line index). Returns
    {"n", "json_valid_rate", "exact_match", "grounded_rate", "truncated", "fields": {key: {"precision", "recall",
    "f1"}}, "overall": {...}, "list_fields_micro": {...}, "counts": {list key: {"hit", "extra", "missed"}}}; every
    rate is in [0, 1], except grounded_rate, which is None when no list item was extracted at all (nothing to
    check, which is not the same as all grounded); "truncated" counts the answers the token budget ended (their
    record's "truncated"); "counts" are the list fields' items predicted and gold, predicted only, gold only.
    """
    if not golds:
        raise InputError(f"{gold_name}: no records to evaluate")
    keys, span_keys, text_keys = schema.keys, schema.span_keys, schema.text_keys
    if gold_ids is not None and len(gold_ids) != len(golds):
        raise InputError(f"{len(gold_ids)} gold ids for {len(golds)} gold records")
    gold_fields = []
    for i, gold in enumerate(golds):
        where = f"{gold_name}: record {i}" if gold_ids is None else f"{gold_name}:{gold_ids[i] + 1}"
        for field in ("input", "output"):
            if not isinstance(gold.get(field), str):
                raise InputError(f"{where}: field '{field}' is missing or not a string")
        answer = answer_object(gold["output"], schema.fields)
        if answer is None:
            raise InputError(f"{where}: the gold 'output' holds no JSON object")
        missing = [k for k in keys if k not in {str(key).strip() for key in answer}]
        if missing:
            hint = "" if schema.is_chapter else " of the schema"
            raise InputError(f"{where}: the gold 'output' lacks the key(s){hint} {', '.join(missing)}"
                             + (" (made for another schema? evaluate.py takes --schema)" if len(missing) == len(keys)
                                else ""))
        gold_fields.append(normalise_fields(answer, schema.fields))
    for j, pred in enumerate(preds):
        if not isinstance(pred.get("output"), str):
            raise InputError(f"{pred_name}: prediction {j}: field 'output' is missing or not a string")

    tp = {k: 0 for k in keys}  # span fields: shared items; text fields: LCS characters
    n_pred = {k: 0 for k in keys}
    n_gold = {k: 0 for k in keys}
    valid_count = exact_count = items = grounded = 0
    # answers the token budget ended (predict.py's "truncated"; under a constraint they were closed, still valid)
    truncated = sum(bool(p.get("truncated")) for p in preds)
    pairs = align(golds, preds, gold_ids, gold_name, pred_name)
    for i, j in pairs:  # predict.py and the baselines record which prompt each answer is for
        recorded, instruction = preds[j].get("input_digest"), golds[i].get("instruction", schema.instruction)
        if recorded is not None and recorded != input_digest(f"{instruction}{golds[i]['input']}"):
            where = f"record {i}" if gold_ids is None else f"line {gold_ids[i] + 1}"
            which = f"the prediction with id {preds[j]['id']}" if "id" in preds[j] else f"prediction {j}"
            raise InputError(f"{pred_name}: {which} was made for another dialogue than {gold_name} {where}; "
                             f"point --gold at the file the predictions came from")
    for i, j in pairs:
        dialogue, gold = golds[i]["input"], gold_fields[i]
        pred, valid = parse_output(preds[j]["output"], schema.fields)
        valid_count += valid
        exact = valid
        for key in span_keys:
            p, g = item_set(pred[key]), item_set(gold[key])
            tp[key] += len(p & g)
            n_pred[key] += len(p)
            n_gold[key] += len(g)
            exact = exact and p == g
            items += len(p)
            grounded += sum(item in dialogue for item in p)
        for key in text_keys:
            p, g = squash(pred[key]), squash(gold[key])
            tp[key] += lcs_length(p, g)
            n_pred[key] += len(p)
            n_gold[key] += len(g)
            exact = exact and p == g
        exact_count += exact
    fields = {k: prf(tp[k], n_pred[k], n_gold[k]) for k in keys}
    overall = {m: sum(f[m] for f in fields.values()) / len(fields) for m in ("precision", "recall", "f1")}
    # every extracted span of the span fields counted alike, as entity-level extraction is usually scored
    spans = prf(*(sum(counts[k] for k in span_keys) for counts in (tp, n_pred, n_gold)))
    n = len(pairs)
    # the list fields' items by verdict: hit (predicted and gold), extra (predicted only), missed (gold only)
    counts = {k: {"hit": tp[k], "extra": n_pred[k] - tp[k], "missed": n_gold[k] - tp[k]} for k in span_keys}
    return {"n": n, "json_valid_rate": valid_count / n, "exact_match": exact_count / n,
            "grounded_rate": grounded / items if items else None, "truncated": truncated, "fields": fields,
            "overall": overall, "list_fields_micro": spans, "counts": counts}


def item_set(items: Sequence[str]) -> set[str]:
    """List-field items as a set, each stripped of surrounding whitespace, empty ones dropped."""
    return {s for s in (item.strip() for item in items) if s}


_WHITESPACE = re.compile(r"\s+")


def squash(text: str) -> str:
    """Text without any whitespace, so line breaks and spacing never count as content."""
    return _WHITESPACE.sub("", text)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings.

    Bit-parallel (Allison–Dix / Hyyrö): bit i of `v` is 0 where row i of the classic DP table steps up, so one
    big-integer add and a few logic operations per character of `b` replace a row of |a| cells.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def lcs_alignment(a: str, b: str) -> tuple[list[bool], list[bool]]:
    """Which characters of `a` and of `b` one longest common subsequence uses (as many as lcs_length counts), by
    the classic table and a walk back from its end; for the report's per-character marks."""
    rows = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        row, below = rows[i], rows[i + 1]
        for j in range(len(b) - 1, -1, -1):
            row[j] = below[j + 1] + 1 if a[i] == b[j] else max(below[j], row[j + 1])
    in_a, in_b = [False] * len(a), [False] * len(b)
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            in_a[i] = in_b[j] = True
            i, j = i + 1, j + 1
        elif rows[i + 1][j] >= rows[i][j + 1]:
            i += 1
        else:
            j += 1
    return in_a, in_b


def prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall and F1 from pooled counts; nothing predicted is perfect precision only if nothing was
    expected, and nothing expected is perfect recall only if nothing was predicted."""
    precision = tp / n_pred if n_pred else (1.0 if n_gold == 0 else 0.0)
    recall = tp / n_gold if n_gold else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------


def rate(value: float | None) -> str:
    """A rate to 4 decimals; n/a where there was nothing to count (grounded rate with no extracted item)."""
    return "n/a" if value is None else f"{value:.4f}"


def _ljust(text: str, width: int) -> str:
    """Left-justify by display width: CJK characters take two terminal columns."""
    shown = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(width - shown, 0)


def format_table(report: dict) -> str:
    lines = [f"{_ljust('field', 10)} {'precision':>9} {'recall':>9} {'f1':>9}"]
    # "macro avg": each of P, R and F1 averaged over the 8 fields (so its F1 is not the F1 of its P and R)
    rows = [*report["fields"].items(), ("macro avg", report["overall"]), ("list micro", report["list_fields_micro"])]
    for name, scores in rows:
        if name == "macro avg":
            lines.append("-" * 40)
        lines.append(f"{_ljust(name, 10)} {scores['precision']:>9.4f} {scores['recall']:>9.4f} {scores['f1']:>9.4f}")
    lines.append(f"samples {report['n']} | JSON valid {report['json_valid_rate']:.4f} | "
                 f"exact match {report['exact_match']:.4f} | grounded {rate(report['grounded_rate'])} | "
                 f"cut at the token budget {report.get('truncated', 0)}")
    return "\n".join(lines)


def format_comparison(reports: dict[str, dict]) -> str:
    """F1 per field for several prediction files, one column each (columns numbered; the files listed below)."""
    width = 9
    names = [f"[{k + 1}]" for k in range(len(reports))]
    lines = [f"{_ljust('F1', 10)} " + " ".join(f"{n:>{width}}" for n in names)]
    for key in next(iter(reports.values()))["fields"]:
        lines.append(f"{_ljust(key, 10)} "
                     + " ".join(f"{r['fields'][key]['f1']:>{width}.4f}" for r in reports.values()))
    lines.append("-" * (11 + (width + 1) * len(reports)))
    for label, pick in (("macro avg", lambda r: r["overall"]["f1"]),
                        ("list micro", lambda r: r["list_fields_micro"]["f1"]),
                        ("JSON valid", lambda r: r["json_valid_rate"]), ("exact", lambda r: r["exact_match"]),
                        ("grounded", lambda r: r["grounded_rate"])):
        lines.append(f"{_ljust(label, 10)} " + " ".join(f"{rate(pick(r)):>{width}}" for r in reports.values()))
    lines.append(f"{_ljust('truncated', 10)} " + " ".join(f"{r['truncated']:>{width}}" for r in reports.values()))
    lines += [f"{n} {path} ({r['n']} samples)" for n, (path, r) in zip(names, reports.items())]
    return "\n".join(lines)

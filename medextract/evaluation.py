"""Extraction F1 while training: at each evaluation point train.py answers the test set with the model as it stands
(eval mode, no grad, the adapter unmerged on the 4-bit base as trained, the grounded constraint, greedy) through the
same engine, prompts and grammar as predict.py, and scores the answers with evaluate.py's metrics. On N ranks each
answers every N-th dialogue and rank 0 gathers them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import input_digest

from .engine import Decoding, Engine
from .errors import InputError
from .inference import Example, Truncation, dialogue_request, read_examples
from .metrics import load_gold, score
from .schema import CHAPTER_SCHEMA, Schema


@dataclass
class F1Evaluation:
    """What the F1 evaluation answers and scores: the test records (their first `samples`, or all), with their gold
    answers, and how answers are generated."""
    examples: list[Example]
    golds: list[dict]
    gold_ids: list[int]
    decoding: Decoding
    truncation: Truncation
    batch_size: int
    constraint: str = "grounded"
    schema: Schema = CHAPTER_SCHEMA  # the run's fields


def load_f1_evaluation(test_path: str, samples: int, max_new_tokens: int, truncation: Truncation,
                       batch_size: int, schema: Schema = CHAPTER_SCHEMA) -> F1Evaluation:
    """The test file's records and gold answers (every record needs its 'output': the F1 is scored against it)."""
    try:
        examples = read_examples(test_path, schema)
        gold_ids, golds = load_gold(test_path)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    if samples:
        examples, golds, gold_ids = examples[:samples], golds[:samples], gold_ids[:samples]
    # predict.py's greedy decoding and repetition penalty, at the evaluation's budget
    return F1Evaluation(examples, golds, gold_ids, Decoding(max_new_tokens=max_new_tokens), truncation, batch_size,
                        schema=schema)


@torch.no_grad()
def answer_share(model, tokenizer, vocabulary, evaluation: F1Evaluation, rank: int = 0,
                 world_size: int = 1) -> list[dict]:
    """This rank's share of the test records (every `world_size`-th from `rank`), answered; records in
    predict.py's format. The caller puts the model in eval mode."""
    share = evaluation.examples[rank::world_size]
    if not share:
        return []
    engine = Engine(model, tokenizer, evaluation.batch_size, vocabulary)
    requests = [dialogue_request(engine, e.user_text, e.instruction_chars, evaluation.decoding, evaluation.constraint,
                                 evaluation.truncation, evaluation.schema)[0] for e in share]
    records = []
    for e, result in zip(share, engine.generate(requests)):
        # an answer that failed (never seen: a bug) is scored as an empty, invalid one rather than stopping training
        output = result.text if result.finish_reason != "error" else ""
        records.append({"id": e.id, "output": output, "num_new_tokens": len(result.tokens),
                        "truncated": result.truncated, "input_digest": input_digest(e.user_text)})
    return records


def gather_answers(records: list[dict], rank: int, world_size: int) -> list[dict] | None:
    """Every rank's records on rank 0, sorted by id (None on the other ranks)."""
    if world_size == 1:
        return sorted(records, key=lambda r: r["id"])
    gathered: list[list[dict] | None] = [None] * world_size
    dist.all_gather_object(gathered, records)
    if rank != 0:
        return None
    return sorted((r for part in gathered for r in part), key=lambda r: r["id"])


def score_answers(evaluation: F1Evaluation, records: list[dict]) -> dict:
    """evaluate.py's report of the gathered answers."""
    return score(evaluation.golds, records, gold_ids=evaluation.gold_ids, schema=evaluation.schema)


def f1_summary(report: dict) -> dict:
    """What the step line, TensorBoard and best_checkpoint.json keep of a report: macro F1, list micro F1 and the
    F1 of each field."""
    return {"f1": report["overall"]["f1"], "list_micro_f1": report["list_fields_micro"]["f1"],
            "fields": {key: value["f1"] for key, value in report["fields"].items()}}

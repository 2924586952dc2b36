"""Extract the eight medical elements from doctor–patient dialogues with the fine-tuned (merged) Qwen-1.8B-Chat.

Interactive: paste a dialogue (as many lines as it has), end it with an empty line, and the extracted JSON is printed;
`quit`, `exit`, Ctrl-D or Ctrl-C leave.

    python predict.py --model_path output_dir_qlora/merged

Batch: one JSON line per input record, `{"id", "output", "num_new_tokens", "truncated", "input_digest"}`, appended as
each answer ends, so a rerun with the same --output_file resumes where the last one stopped (refused for other
settings or another input file); `python evaluate.py` scores the file.

    python predict.py --model_path output_dir_qlora/merged \\
        --input_file data/test.json --output_file predictions.jsonl --batch_size 8

The prompt is `utils.build_chatml_ids(..., output=None)`, token for token the prefix the model was trained on (the
chapter's predict.py dropped the `<|im_start|>` before `assistant`). Decoding is greedy unless --do_sample is given,
because an extraction should not change from one run to the next. Under `--constraint grounded` (the default) every
answer is valid JSON in the trained format with each list item copied from the dialogue, also when --max_tgt_len cuts
it (it is then closed, and flagged `truncated`); medextract/engine.py is the batched engine, medextract/grammar.py the grammar.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from medextract.cli import check_batch_args, extraction_parser, run_extraction
from medextract.errors import MedextractError
from medextract.inference import DEFAULT_MODEL_PATH
from utils import fail

PROG = "predict.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = extraction_parser(__doc__, DEFAULT_MODEL_PATH, "predictions.jsonl").parse_args(argv)
    try:
        check_batch_args(args)
    except MedextractError as e:
        fail(PROG, e)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_extraction(args)
    except MedextractError as e:
        fail(PROG, e)


if __name__ == "__main__":
    sys.exit(main())

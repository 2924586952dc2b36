"""Baseline: the untuned Qwen-1.8B-Chat on the same extraction task, to compare with the fine-tuned model.

Batch: the same prompts and output format as predict.py, so `python evaluate.py` scores both the same way.

    python test_qwen.py --model_path Qwen-1_8-chat/ --input_file data/test.json --output_file predictions_base.jsonl

Interactive, as the chapter does it: paste a dialogue, end it with an empty line. The prompt is the one Qwen's own
`model.chat(tokenizer, instruction + dialogue)` builds (default system prompt, no history), which is token for token
the training prefix predict.py uses.

    python test_qwen.py --model_path Qwen-1_8-chat/

Decoding follows this script's flags (greedy unless --do_sample), not the checkpoint's generation_config.json, which
samples. `--constraint grounded` (the default) holds the untuned model to the answer format and to spans copied from
the dialogue too; `--constraint none` lets it answer as it would by itself.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from medextract.cli import check_batch_args, extraction_parser, run_extraction
from medextract.errors import MedextractError
from utils import fail

PROG = "test_qwen.py"
BASE_MODEL_PATH = "Qwen-1_8-chat/"
BASE_MODEL_PATH_HELP = ("the untuned base model's directory (config.json, weights and the tokenizer's "
                        "qwen.tiktoken), as downloaded: README section 1 says where from")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = extraction_parser(__doc__, BASE_MODEL_PATH, "predictions_base.jsonl", BASE_MODEL_PATH_HELP)
    args = parser.parse_args(argv)
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

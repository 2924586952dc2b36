"""Baseline: the untuned Qwen-1.8B-Chat on the same extraction task, to compare with the fine-tuned model.

Batch: the same prompts and output format as predict.py, so `python evaluate.py` scores both the same way.

    python test_qwen.py --model_path Qwen-1_8-chat/ --input_file data/test.json --output_file predictions_base.jsonl

Interactive, as the chapter does it: the dialogue goes to `model.chat(tokenizer, instruction + dialogue)` with the
default system prompt and no history.

    python test_qwen.py --model_path Qwen-1_8-chat/

Decoding follows this script's flags (greedy unless --do_sample), not the checkpoint's generation_config.json, which
samples.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from predict import build_arg_parser, check_args, interactive, predict_file, prepare, show_answer
from utils import INSTRUCTION, SYSTEM_PROMPT

BASE_MODEL_PATH = "Qwen-1_8-chat/"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_arg_parser(__doc__, model_path=BASE_MODEL_PATH, output_file="predictions_base.jsonl").parse_args(argv)
    check_args(args, "test_qwen.py")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer, generation_config = prepare(args, "test_qwen.py")
    if args.input_file is None:
        def answer(dialogue: str) -> str:
            response, _ = model.chat(tokenizer, INSTRUCTION + dialogue, history=None, system=SYSTEM_PROMPT,
                                     generation_config=generation_config)
            return response
        return interactive(answer, show_answer)
    predict_file(model, tokenizer, args.input_file, args.output_file, args.batch_size, generation_config,
                 args.max_len, args.max_src_len, args.truncation)
    return 0


if __name__ == "__main__":
    sys.exit(main())

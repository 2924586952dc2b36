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

from predict import answer_dialogue, build_arg_parser, check_args, decoding_from_args, interactive, predict_file, prepare

BASE_MODEL_PATH = "Qwen-1_8-chat/"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_arg_parser(__doc__, model_path=BASE_MODEL_PATH, output_file="predictions_base.jsonl").parse_args(argv)
    check_args(args, "test_qwen.py")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = prepare(args, "test_qwen.py")
    if args.input_file is None:
        return interactive(lambda dialogue: answer_dialogue(engine, dialogue, args))
    predict_file(engine, args.input_file, args.output_file, decoding_from_args(args), args.max_len, args.max_src_len,
                 args.truncation, args.constraint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

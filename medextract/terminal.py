"""The interactive mode of predict.py, test_qwen.py and test_openai.py: paste a dialogue, end it with an empty line,
read the extraction."""
from __future__ import annotations

import json
from typing import Any, Callable

from utils import CHAPTER_FIELDS, Fields, parse_output

from .engine import Result

QUIT_WORDS = ("quit", "exit")


def read_dialogue(read_line: Callable[[str], str] | None = None) -> str | None:
    """Lines (from `input()` by default) up to an empty line, each followed by a newline as in the training data.
    None means leave: `quit`/`exit` as the first line, or Ctrl-D before any text."""
    read_line = read_line or input
    lines: list[str] = []
    while True:
        try:
            line = read_line("> " if not lines else "")
        except EOFError:
            return "".join(l + "\n" for l in lines) if lines else None
        if not lines and line.strip().lower() in QUIT_WORDS:
            return None
        if not line.strip():
            if lines:
                return "".join(l + "\n" for l in lines)
            continue
        lines.append(line.rstrip("\r"))


def show_answer(answer: Result | str, fields: Fields = CHAPTER_FIELDS) -> None:
    if isinstance(answer, Result) and answer.finish_reason == "error":
        print(f"No answer: {answer.text}")
        return
    text = answer.text if isinstance(answer, Result) else answer
    if isinstance(answer, Result) and answer.truncated:
        print("(The answer reached --max_tgt_len" + (" and was closed there.)" if answer.text.endswith("```")
                                                      else ".)"))
    parsed, valid = parse_output(text, fields)
    if valid:
        print(json.dumps(parsed, ensure_ascii=False, indent=2))
    else:
        print("The answer is not valid JSON; the model wrote:")
        print(text)


def interactive(answer: Callable[[str], Any], show: Callable[[Any], None] = show_answer,
                read_line: Callable[[str], str] | None = None) -> int:
    """The terminal loop: paste a dialogue, finish with an empty line, read the extraction."""
    print("Paste a doctor–patient dialogue and finish it with an empty line. Type quit or exit (or press Ctrl-D / "
          "Ctrl-C) to leave.", flush=True)
    try:
        while True:
            dialogue = read_dialogue(read_line)
            if dialogue is None:
                break
            print("Extracting…", flush=True)
            show(answer(dialogue))
            print(flush=True)
    except KeyboardInterrupt:
        print()
    print("Bye.", flush=True)
    return 0

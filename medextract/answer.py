"""An extraction as a generation request, and how an answer under the answer grammar is kept closable.

`extraction_request` turns an instruction and dialogue into the engine's Request: the prompt cut as training cut it,
and under `grounded` or `schema` the answer grammar (grammar.py) over what the model reads of the dialogue.
`AnswerCloser` is the budget policy of such an answer: the engine hands it each new token, and it says when the
answer must be closed and closes it (grammar.AnswerScanner's closing text), so that a cut answer is still valid and
grounded and what was streamed is never taken back.
"""
from __future__ import annotations

import codecs
import unicodedata
from typing import Sequence

from utils import CHAPTER_FIELDS, SYSTEM_PROMPT, Fields, build_chatml_ids

from .decoding import Decoding, Request
from .grammar import AnswerGrammar, AnswerScanner, answer_layout, empty_answer


def empty_answer_tokens(tokenizer, fields: Fields = CHAPTER_FIELDS) -> int:
    """Tokens of the shortest answer with `fields` under the answer grammar, <|im_end|> included; no closing is
    longer."""
    return len(closing_ids(tokenizer, empty_answer(fields)))


def closing_ids(tokenizer, text: str) -> list[int]:
    """The tokens that close an answer with `text`: its ids, then <|im_end|>."""
    from qwen1_8.qwen_generation_utils import text_ids  # here, not at import: qwen1_8 loads transformers

    return text_ids(tokenizer, text) + [tokenizer.im_end_id]


class AnswerCloser:
    """Keeps an answer under the answer grammar closable within its `budget` of tokens: each token moves the
    scanner, every point where the answer could be closed and still fit is remembered, and when the budget is reached
    (or the answer here closes exactly at it) the answer is closed there: here, or, rolled back, at the latest point
    that fitted. A run of tokens that each end inside a character, or an item that keeps ending in white space, so
    only costs the tokens after that point. `shortest`: empty_answer_tokens, the least any budget must allow."""

    def __init__(self, tokenizer, budget: int, shortest: int, fields: Fields = CHAPTER_FIELDS):
        if budget < shortest:
            raise ValueError(f"max_new_tokens {budget} is below the {shortest} tokens an answer under the answer "
                             f"grammar takes at the least (every field empty)")
        self.tokenizer, self.budget, self.shortest = tokenizer, budget, shortest
        layout = answer_layout(fields)
        self.scanner = AnswerScanner(layout)  # where the answer stands
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # its characters so far (a token may end inside one)
        # the latest point where it can be closed within its budget: (tokens kept, the scanner there, closing ids,
        # when already encoded)
        self.fallback: tuple[int, AnswerScanner, list[int] | None] = (0, AnswerScanner(layout), None)

    @property
    def settled(self) -> int:
        """Tokens of the answer that closing it can no longer take back: what may be streamed."""
        return self.fallback[0]

    def feed(self, token: int, count: int) -> bool:
        """Follow the answer's `count`-th token, `token`; True when the answer is to be closed now (`close`)."""
        try:
            self.scanner.feed(self.decoder.decode(self.tokenizer.decoder[token]))
        except (UnicodeDecodeError, KeyError, TypeError):  # not UTF-8, or a special token: never under the grammar
            self.scanner.mode = "broken"
        closing = None if self.decoder.getstate()[0] else self.scanner.closing()
        if closing is not None:
            ids = None
            if count + self.shortest >= self.budget:  # near the budget: does the closing fit?
                ids = closing_ids(self.tokenizer, closing)
            if ids is None or count + len(ids) <= self.budget:
                self.fallback = (count, AnswerScanner(**self.scanner.__dict__), ids)
            if ids is not None and count + len(ids) >= self.budget:
                return True
        return count >= self.budget

    def close(self, tokens: list[int], matcher) -> str | None:
        """Close the answer at its fallback point: drop the tokens after it from `tokens` (in place) and `matcher`,
        then append the closing tokens; why not, where the grammar refuses one (never seen: closing_text is tested
        against the grammar)."""
        kept, scanner, ids = self.fallback
        if ids is None:
            ids = closing_ids(self.tokenizer, scanner.closing())
        matcher.rollback(len(tokens) - kept)
        del tokens[kept:]
        for t in ids:
            if not matcher.accept(t):
                return f"the grammar rejected the closing token {t}"
        tokens += ids
        return None


# --------------------------------------------------------------------------------------------------------------
# An extraction, as a request
# --------------------------------------------------------------------------------------------------------------


def extraction_request(tokenizer, user_text: str, dialogue: str, decoding: Decoding, constraint: str = "grounded",
                       vocabulary=None, max_len: int = 2048, max_src_len: int = 1560, truncation: str = "tokens",
                       instruction_chars: int = 0, fields: Fields = CHAPTER_FIELDS,
                       **callbacks) -> tuple[Request, bool]:
    """The request that answers `user_text` (instruction + `dialogue`), with the prompt cut as training cut it, and
    whether the prompt was cut. The answer has `fields` (a schema's); under `grounded`, list items come from
    `dialogue`; `schema` keeps only the format; `none` generates freely. `callbacks`: Request's on_text /
    cancelled."""
    ids = build_chatml_ids(tokenizer, user_text, None, max_len, max_src_len, truncation=truncation,
                           instruction_chars=instruction_chars)
    if constraint == "none":
        return Request(ids.input_ids, decoding, **callbacks), ids.truncated
    if vocabulary is None:
        raise ValueError(f"constraint {constraint!r} needs the grammar vocabulary (grammar.build_vocabulary)")
    if ids.truncated:  # spans only from what the model reads: the dialogue as the cut prompt holds it, as sent
        dialogue = kept_part(dialogue, visible_dialogue(tokenizer, ids.input_ids, instruction_chars))

    fields = tuple(fields)

    def build() -> AnswerGrammar:
        return AnswerGrammar.for_dialogue(vocabulary, dialogue, constraint, fields)
    return Request(ids.input_ids, decoding, build, closable=True, fields=fields, **callbacks), ids.truncated


def visible_dialogue(tokenizer, prompt: Sequence[int], instruction_chars: int) -> str:
    """The dialogue a generation prompt (utils.build_chatml_ids's) holds, after its instruction: all of it, or the
    part a cut left (a character the cut split is dropped)."""
    from qwen1_8.qwen_generation_utils import chatml_block, text_ids

    nl = text_ids(tokenizer, "\n")
    head = len(chatml_block(tokenizer, "system", SYSTEM_PROMPT)) + len(nl) + 1 + len(text_ids(tokenizer, "user")) \
        + len(nl)
    tail = 1 + len(nl) + 1 + len(text_ids(tokenizer, "assistant")) + len(nl)  # <|im_end|>\n<|im_start|>assistant\n
    content = tokenizer.decode(list(prompt[head:len(prompt) - tail]), errors="replace").rstrip("\ufffd")
    return content[instruction_chars:]


def kept_part(dialogue: str, visible: str) -> str:
    """The longest beginning of `dialogue`, as it was sent, that the cut prompt holds. `visible` is what the prompt
    decodes to, which the tokenizer NFC-normalised (so `e` + U+0301 there is `é`): a grammar built from it would
    admit spans that are not in the dialogue as sent, whose offsets then point nowhere. Compared a base character
    and its combining marks at a time; where normalising a piece alone differs from normalising it in context (rare:
    Hangul jamo, say) the part kept ends early, so every span it admits is in both."""
    if dialogue.startswith(visible):  # nothing normalised: the usual case
        return visible
    i = at = 0
    while i < len(dialogue):
        j = i + 1
        while j < len(dialogue) and unicodedata.combining(dialogue[j]):
            j += 1
        piece = unicodedata.normalize("NFC", dialogue[i:j])
        if not visible.startswith(piece, at):
            break
        at += len(piece)
        i = j
    return dialogue[:i]

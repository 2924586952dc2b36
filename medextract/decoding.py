"""What the generation engine is asked and what it answers: how an answer is decoded (`Decoding`), one answer to
generate (`Request`), its outcome (`Result`), the tokens that end an answer, and the same decoding as transformers'
GenerationConfig (the plain reference the engine is tested and benchmarked against). medextract.engine re-exports
the first four with `Engine`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from utils import CHAPTER_FIELDS


def stop_token_ids(tokenizer) -> list[int]:
    """An answer ends at `<|im_end|>`; `<|im_start|>` (a new turn) and `<|endoftext|>` end it too."""
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]


@dataclass(frozen=True)
class Decoding:
    """How one answer is generated."""
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    min_new_tokens: int = 0  # stop tokens are masked before this many (benchmarks: random weights that never stop)


@dataclass
class Request:
    """One answer to generate. `grammar` builds the answer's grammar (grammar.AnswerGrammar) when the request is
    admitted, so that a long queue holds no compiled grammars; `closable` says it is the answer grammar, whose cut
    answers can be closed (answer.AnswerCloser). `on_text` receives the answer's text as it grows (never a partial
    character); `cancelled` is polled every step (a client that went away)."""
    prompt: list[int]
    decoding: Decoding = Decoding()
    grammar: Callable[[], Any] | None = None
    closable: bool = False
    fields: tuple = CHAPTER_FIELDS  # the answer grammar's fields, which its closing text fills in
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def slots(self) -> int:
        """Cache slots the request may need: its prompt and answer."""
        return len(self.prompt) + self.decoding.max_new_tokens


@dataclass
class Result:
    tokens: list[int]  # the new tokens, the stop token included
    text: str  # decoded, special tokens left out
    # "stop" (ended by itself, or closed at the budget), "length" (budget reached), "cancelled", or "error" (the request
    # could not be admitted; `text` says why)
    finish_reason: str
    truncated: bool  # the budget ended the answer (under the answer grammar: closed, still valid)
    prompt_tokens: int


def reference_config(tokenizer, decoding: Decoding):
    """transformers' GenerationConfig for the same decoding: `model.generate` with it is the plain reference the
    engine is tested and benchmarked against (the chapter's way of generating, one prompt at a time)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                              repetition_penalty=decoding.repetition_penalty, eos_token_id=stop_token_ids(tokenizer),
                              pad_token_id=tokenizer.eod_id, use_cache=True, min_new_tokens=decoding.min_new_tokens)
    if decoding.do_sample:
        config.top_p, config.temperature, config.top_k = decoding.top_p, decoding.temperature, 0
    else:  # transformers' neutral values: unset, they would be filled from the model's sampling settings
        config.top_p, config.temperature, config.top_k = 1.0, 1.0, 50
    return config

"""ChatML prompt building, response decoding and stop-word handling for Qwen chat models, as Qwen's own chat() does.

`chatml_block` is the one place a `<|im_start|>role\\ncontent<|im_end|>` block is encoded; utils.build_chatml_ids
(training and prediction) and `make_context` (chat) both use it, so their prompts are token-identical.
Content is always encoded with `allowed_special=set()`: special-token text typed by a user stays text.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special=set())


def chatml_block(tokenizer, role: str, content: str) -> list[int]:
    """<|im_start|>{role}\\n{content}<|im_end|> as token ids."""
    return [tokenizer.im_start_id] + text_ids(tokenizer, role) + text_ids(tokenizer, "\n") + \
        text_ids(tokenizer, content) + [tokenizer.im_end_id]


def get_stop_words_ids(chat_format: str, tokenizer) -> list[list[int]]:
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"unknown chat format {chat_format!r}")


def make_context(tokenizer, query: str, history: list[tuple[str, str]] | None = None,
                 system: str = "You are a helpful assistant.", max_window_size: int = 6144,
                 chat_format: str = "chatml") -> tuple[str, list[int]]:
    """(raw_text, context_tokens) of a chat prompt ending in `<|im_start|>assistant\\n`.

    Older turns are kept newest first while the whole stays under max_window_size tokens.
    """
    if chat_format == "raw":
        return query, text_ids(tokenizer, query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat format {chat_format!r}")
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl = text_ids(tokenizer, "\n")
    system_tokens = chatml_block(tokenizer, "system", system)
    turns_tokens: list[int] = []
    turns_text = ""
    for old_query, old_response in reversed(history or []):
        turn = nl + chatml_block(tokenizer, "user", old_query) + nl + chatml_block(tokenizer, "assistant", old_response)
        if len(system_tokens) + len(turn) + len(turns_tokens) >= max_window_size:
            break
        turns_tokens = turn + turns_tokens
        turns_text = (f"\n{im_start}user\n{old_query}{im_end}\n{im_start}assistant\n{old_response}{im_end}"
                      + turns_text)
    context = system_tokens + turns_tokens + nl + chatml_block(tokenizer, "user", query) + nl + \
        [tokenizer.im_start_id] + text_ids(tokenizer, "assistant") + nl
    raw_text = (f"{im_start}system\n{system}{im_end}" + turns_text
                + f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n")
    return raw_text, context


def decode_tokens(tokens, tokenizer, raw_text_len: int, context_length: int, chat_format: str = "chatml",
                  errors: str = "replace") -> str:
    """The response text: the generated tokens after the context, up to the first stop token, stripped.

    `raw_text_len` is kept for signature compatibility; decoding only the generated slice gives the same text.
    """
    if torch.is_tensor(tokens):
        tokens = tokens.tolist()
    generated = tokens[context_length:]
    if chat_format == "chatml":
        stops = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
        end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
        return tokenizer.decode(generated[:end], errors=errors).strip()
    if chat_format == "raw":
        text = tokenizer.decode(generated, errors=errors)
        return text.split("<|endoftext|>")[0].strip()
    raise ValueError(f"unknown chat format {chat_format!r}")


class StopWordsLogitsProcessor(LogitsProcessor):
    """When a row's generated suffix ends with a stop sequence, force eos on the next step (Qwen's own rule)."""

    def __init__(self, stop_words_ids: list[list[int]], eos_token_id: int):
        if not isinstance(stop_words_ids, list) or not stop_words_ids:
            raise ValueError(f"stop_words_ids must be a non-empty list of lists, got {stop_words_ids!r}")
        for ids in stop_words_ids:
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"each stop sequence must be a non-empty list of non-negative ints, got {ids!r}")
        if not isinstance(eos_token_id, int):
            raise ValueError(f"eos_token_id must be one int, got {eos_token_id!r}")
        self.stop_words_ids = [ids for ids in stop_words_ids if ids != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, seq in enumerate(input_ids.tolist()):
            if any(len(ids) <= len(seq) and seq[-len(ids):] == ids for ids in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2**15)
        return scores

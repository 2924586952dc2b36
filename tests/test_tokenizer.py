"""QWenTokenizer: golden ids from Qwen's vocabulary, special tokens, plain-text content, save/load round trip."""
import hashlib
import json
import os
import pickle
import shutil
import unicodedata

import pytest

from qwen1_8.tokenization_qwen import QWEN_TIKTOKEN_SHA256, QWenTokenizer, packaged_vocab_file


def test_packaged_vocab_is_qwens():
    with open(packaged_vocab_file(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == QWEN_TIKTOKEN_SHA256


@pytest.mark.parametrize("text, ids", [
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("\n", [198]),
    ("你好", [108386]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("医生: ", [103998, 25, 220]),
    ("患者: ", [101924, 25, 220]),
    ("```json\n", [73594, 2236, 198]),
    ("\n```", [198, 73594]),
])
def test_golden_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_sizes_and_special_ids(tokenizer):
    assert len(tokenizer) == 151851 == tokenizer.vocab_size
    assert (tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    assert tokenizer.convert_tokens_to_ids("<|extra_0|>") == 151646
    assert tokenizer.convert_tokens_to_ids("<|extra_204|>") == 151850
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None


def test_digits_split_one_by_one(tokenizer):
    ids = tokenizer.encode("2048")
    assert len(ids) == 4 and tokenizer.decode(ids) == "2048"


def test_special_text_is_control_only_when_allowed(tokenizer):
    assert tokenizer.encode("<|im_start|>hi<|endoftext|>") == [151644, 6023, 151643]
    assert tokenizer.encode("<|im_start|>hi", allowed_special=set()) == [27, 91, 318, 4906, 91, 29, 6023]
    with pytest.raises(ValueError):
        tokenizer.encode("<|im_start|>", allowed_special=set(), disallowed_special="all")


def test_nfc_normalisation(tokenizer):
    decomposed = unicodedata.normalize("NFD", "café")
    assert tokenizer.encode(decomposed) == tokenizer.encode("café")


def test_decode_skip_special(tokenizer):
    ids = [151644, 872, 198, 9707, 151645, 151643]
    assert tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|><|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHello"


def test_convert_ids_to_tokens_takes_tensors_and_numpy_ids(tokenizer):
    import numpy as np
    import torch

    expected = ["<|im_start|>", b"user"]
    assert tokenizer.convert_ids_to_tokens([151644, 872]) == expected
    assert tokenizer.convert_ids_to_tokens(torch.tensor([151644, 872])) == expected
    assert tokenizer.convert_ids_to_tokens(np.array([151644, 872])) == expected
    assert tokenizer.convert_ids_to_tokens(np.int64(9707)) == tokenizer.convert_ids_to_tokens(torch.tensor(9707)) == b"Hello"


def test_pad_token_is_settable():
    tok = QWenTokenizer(vocab_file=packaged_vocab_file())
    assert tok.pad_token_id is None
    tok.pad_token_id = tok.eod_id
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 151851


def test_save_load_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path))
    assert {"qwen.tiktoken", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "qwen.tiktoken", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == QWEN_TIKTOKEN_SHA256
    loaded = QWenTokenizer.from_pretrained(str(tmp_path))
    text = "医生: 孩子咳嗽几天了？\n患者: 三天，晚上更厉害<|im_end|>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.pad_token_id == tokenizer.eod_id
    assert pickle.loads(pickle.dumps(loaded)).encode(text) == tokenizer.encode(text)


def test_published_tokenizer_config_loads(tmp_path, reference_dir):
    shutil.copy(os.path.join(reference_dir, "qwen1_8b_chat", "tokenizer_config.json"), tmp_path)
    shutil.copy(packaged_vocab_file(), tmp_path / "qwen.tiktoken")
    tok = QWenTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("你好") == [108386] and len(tok) == 151851
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["model_max_length"] == tok.model_max_length

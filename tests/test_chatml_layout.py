"""The chapter's token layout, reproduced bit for bit, with its truncation off-by-one fixed."""
import json
import os

import pytest
import torch

from qwen1_8.qwen_generation_utils import chatml_block, make_context
from utils import (IGNORE_INDEX, INSTRUCTION, DataCollator, QwenPromptDataSet, build_chatml_ids, format_output)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def sample(dialogue="医生: 哪里不舒服？\n患者: 咳嗽两天了\n", output=None):
    output = output or format_output({"药品名称": ["止咳糖浆"], "药物类别": [], "医疗检查": [], "医疗操作": [],
                                      "现病史": "咳嗽两天", "辅助检查": "", "诊断结果": "咳嗽", "医疗建议": "多喝水"})
    return {"instruction": INSTRUCTION, "input": dialogue, "output": output}


def test_instruction_is_the_chapters(tokenizer):
    import hashlib
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == \
        "1a6bbb3d9b1bbb264cd9a3a31cccfcf0f160fe555b0ba2a07564dacffd2f0cf4"
    assert len(tokenizer.encode(INSTRUCTION, allowed_special=set())) == 174


def test_log_samples_bit_for_bit(tmp_path, tokenizer, reference_dir):
    with open(os.path.join(reference_dir, "log_samples.json"), encoding="utf-8") as f:
        logged = json.load(f)
    path = write_jsonl(tmp_path / "logged.json", [s["sample"] for s in logged])
    dataset = QwenPromptDataSet(path, tokenizer, max_len=2048, max_src_len=1560, is_skip=True)
    assert len(dataset) == 4 and dataset.skipped == 0
    for item, ref in zip(dataset, logged):
        assert item["input_ids"] == ref["input_ids"]
        assert item["labels"] == ref["labels"]


def test_first_log_sample_worked_example(tokenizer, reference_dir):
    with open(os.path.join(reference_dir, "log_samples.json"), encoding="utf-8") as f:
        s = json.load(f)[0]["sample"]
    ids = build_chatml_ids(tokenizer, s["instruction"] + s["input"], s["output"], 2048, 1560)
    assert len(ids.input_ids) == 862
    assert [i for i, t in enumerate(ids.input_ids) if t == 151644] == [0, 11, 717]
    assert [i for i, t in enumerate(ids.input_ids) if t == 151645] == [9, 715, 861]
    trained = [i for i, l in enumerate(ids.labels) if l != IGNORE_INDEX]
    assert trained[0] == 718 and ids.labels[718] == 77091 and len(trained) == 144
    assert all(ids.labels[i] == ids.input_ids[i] for i in trained)
    prompt = build_chatml_ids(tokenizer, s["instruction"] + s["input"], None, 2048, 1560).input_ids
    assert prompt == ids.input_ids[:720] == make_context(tokenizer, s["instruction"] + s["input"])[1]


def test_book_test_token_figures(tmp_path, tokenizer, reference_dir):
    """The chapter's 50 test samples at 2048/1560 — none skipped, 593–1,259 tokens, 85–190 labelled."""
    dataset = QwenPromptDataSet(os.path.join(reference_dir, "book_test.json"), tokenizer, 2048, 1560, is_skip=True)
    assert len(dataset) == 50 and dataset.skipped == 0
    lengths = [len(item["input_ids"]) for item in dataset]
    labelled = [sum(l != IGNORE_INDEX for l in item["labels"]) for item in dataset]
    assert (min(lengths), max(lengths)) == (593, 1259)
    assert round(sum(lengths) / 50, 1) == 872.4
    assert (min(labelled), max(labelled)) == (85, 190) and round(sum(labelled) / 50, 1) == 136.1


def test_prompt_truncation_keeps_head(tokenizer):
    dialogue = "医生: 哪里不舒服？\n" + "患者: 一直咳嗽，晚上更厉害\n" * 40
    full = build_chatml_ids(tokenizer, INSTRUCTION + dialogue, "好", max_len=2048, max_src_len=4000)
    cut = build_chatml_ids(tokenizer, INSTRUCTION + dialogue, "好", max_len=2048, max_src_len=200)
    assert not full.truncated and cut.truncated
    user_start = 11  # system block (10) + "\n"
    assert cut.input_ids[user_start:user_start + 199] == full.input_ids[user_start:user_start + 199]
    assert cut.input_ids[user_start + 199] == tokenizer.im_end_id
    assert all(l == IGNORE_INDEX for l in cut.labels[:user_start + 200 + 2])
    prompt = build_chatml_ids(tokenizer, INSTRUCTION + dialogue, None, max_len=2048, max_src_len=200)
    assert prompt.truncated and prompt.input_ids == cut.input_ids[:len(prompt.input_ids)]


def test_turn_truncation_keeps_the_leading_whole_turns_that_fit(tokenizer, tmp_path):
    """truncation="turns": the user block ends at a line boundary, with as many leading lines as fit; a
    dialogue that fits, and the answer's labels, are as with the chapter's cut."""
    turns = [f"患者: 第{i}天，一直咳嗽，晚上更厉害" if i % 2 else f"医生: 第{i}个问题，还有别的症状吗？" for i in range(60)]
    user_text = INSTRUCTION + "\n".join(turns) + "\n"
    cut = build_chatml_ids(tokenizer, user_text, "好", max_len=2048, max_src_len=400, truncation="turns")
    user_start = 11  # system block (10) + "\n"
    end = cut.input_ids.index(tokenizer.im_end_id, user_start)
    assert cut.truncated and end - user_start + 1 <= 400
    kept = tokenizer.decode(cut.input_ids[user_start + 3:end])  # after <|im_start|>user\n
    lines = user_text.split("\n")
    k = kept.count("\n") + 1
    assert kept == "\n".join(lines[:k]) and INSTRUCTION.rstrip("\n") in kept and 5 < k < len(lines) - 1
    assert len(chatml_block(tokenizer, "user", "\n".join(lines[:k + 1]))) > 400  # one more line would not fit
    # the answer follows the cut block exactly as it follows an uncut one
    whole = build_chatml_ids(tokenizer, "\n".join(lines[:k]), "好", max_len=2048, max_src_len=4000)
    assert (cut.input_ids, cut.labels) == (whole.input_ids, whole.labels) and not whole.truncated
    # a dialogue that fits is left alone, and where not even the first line fits the chapter's cut is taken
    short = INSTRUCTION + "医生: 你好\n"
    assert build_chatml_ids(tokenizer, short, "好", 2048, 1560, truncation="turns") == \
        build_chatml_ids(tokenizer, short, "好", 2048, 1560)
    assert build_chatml_ids(tokenizer, user_text, "好", 2048, 8, truncation="turns") == \
        build_chatml_ids(tokenizer, user_text, "好", 2048, 8)
    with pytest.raises(ValueError, match="truncation must be one of"):
        build_chatml_ids(tokenizer, short, "好", 2048, 1560, truncation="tail")
    # a first turn too long to fit: the cut never keeps the instruction alone (no dialogue), it takes the token cut
    long_first = INSTRUCTION + "患者: " + "一直咳嗽，晚上更厉害，" * 80 + "\n医生: 多久了？\n"
    turns_cut = build_chatml_ids(tokenizer, long_first, "好", 2048, 400, truncation="turns",
                                 instruction_chars=len(INSTRUCTION))
    assert turns_cut == build_chatml_ids(tokenizer, long_first, "好", 2048, 400)
    assert "一直咳嗽" in tokenizer.decode(turns_cut.input_ids)
    path = write_jsonl(tmp_path / "d.json", [sample(dialogue="\n".join(turns)),
                                              sample(dialogue=long_first.removeprefix(INSTRUCTION))])
    dataset = QwenPromptDataSet(path, tokenizer, max_len=2048, max_src_len=400, is_skip=False, truncation="turns")
    assert dataset[0]["input_ids"][:end + 1] == cut.input_ids[:end + 1]
    assert dataset[1]["input_ids"] == build_chatml_ids(tokenizer, long_first, sample()["output"], 2048, 400).input_ids


def test_output_truncation_is_exactly_max_len(tokenizer):
    """The chapter's cut samples were max_len + 1 tokens and crashed its assert."""
    long_output = format_output({"药品名称": [], "药物类别": [], "医疗检查": [], "医疗操作": [],
                                 "现病史": "反复咳嗽" * 200, "辅助检查": "", "诊断结果": "支气管炎", "医疗建议": "复查"})
    ids = build_chatml_ids(tokenizer, INSTRUCTION + "医生: 你好\n", long_output, max_len=400, max_src_len=300)
    assert ids.truncated and len(ids.input_ids) == len(ids.labels) == 400
    assert ids.input_ids[-1] == tokenizer.im_end_id and ids.labels[-1] == tokenizer.im_end_id


def test_dataset_skips_or_keeps_truncated(tmp_path, tokenizer):
    rows = [sample(), sample(dialogue="医生: 你好\n" + "患者: 咳嗽\n" * 300), sample()]
    path = write_jsonl(tmp_path / "d.json", rows)
    kept = QwenPromptDataSet(path, tokenizer, max_len=512, max_src_len=256, is_skip=True)
    assert len(kept) == 2 and kept.skipped == 1
    every = QwenPromptDataSet(path, tokenizer, max_len=512, max_src_len=256, is_skip=False)
    assert len(every) == 3 and all(len(item["input_ids"]) <= 512 for item in every)


def test_dataset_errors_name_file_and_line(tmp_path, tokenizer):
    empty = tmp_path / "empty.json"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        QwenPromptDataSet(str(empty), tokenizer, 512, 256, True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sample(), ensure_ascii=False) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.json:2: not valid JSON"):
        QwenPromptDataSet(str(bad), tokenizer, 512, 256, True)
    for text in ("[\n" + json.dumps(sample()) + "\n]\n", json.dumps([sample()]) + "\n"):  # data/all.json's format
        array = tmp_path / "all.json"
        array.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=r"all.json:1: .*starts a JSON array, like data/all.json; this takes JSON "
                                             r"Lines"):
            QwenPromptDataSet(str(array), tokenizer, 512, 256, True)
    line = json.dumps(sample(), ensure_ascii=False) + "\n"
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes(line.encode("utf-8") + line.encode("gbk"))  # saved from a Chinese-locale editor
    with pytest.raises(ValueError, match=r"gbk.json:2: not UTF-8 text \(byte 18 of the line\)"):
        QwenPromptDataSet(str(gbk), tokenizer, 512, 256, True)
    bom = tmp_path / "bom.json"
    bom.write_bytes(line.encode("utf-8-sig") + line.encode("utf-8"))  # a byte-order mark is no error
    assert len(QwenPromptDataSet(str(bom), tokenizer, 512, 256, True)) == 2
    missing = write_jsonl(tmp_path / "missing.json", [sample(), {"instruction": INSTRUCTION, "input": "x"}])
    with pytest.raises(ValueError, match=r"missing.json:2: field 'output'"):
        QwenPromptDataSet(missing, tokenizer, 512, 256, True)
    with pytest.raises(ValueError, match="max_src_len"):
        QwenPromptDataSet(missing, tokenizer, 256, 256, True)


def test_user_text_with_special_token_text_stays_text(tokenizer):
    ids = build_chatml_ids(tokenizer, "患者: <|im_end|><|im_start|>system\n", None, 2048, 1560).input_ids
    assert ids.count(tokenizer.im_end_id) == 2 and ids.count(tokenizer.im_start_id) == 3


def test_collator_pads_to_multiple_of_8(tokenizer):
    batch = [{"input_ids": [1] * 862, "labels": [2] * 862}, {"input_ids": [3] * 596, "labels": [4] * 596}]
    out = DataCollator(tokenizer)(batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, 864)
    assert out["input_ids"][1, 596:].eq(tokenizer.pad_token_id).all()
    assert out["labels"][1, 596:].eq(IGNORE_INDEX).all() and out["labels"][0, 862:].eq(IGNORE_INDEX).all()
    assert out["attention_mask"].sum(1).tolist() == [862, 596] and out["input_ids"].dtype == torch.long

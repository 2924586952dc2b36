"""The Python API (medextract.Extractor) on the tiny random Qwen: its answers are predict.py's for the same settings
under each constraint, every list item's offsets point into the dialogue as given, a train.py checkpoint left
unmerged answers as its merged model does, and bad settings are typed errors, not exits."""
import json

import pytest
import torch

import merge_params
import predict
from medextract import Extractor, Span
from medextract.errors import ConfigError
from utils import LIST_KEYS, TEXT_KEYS

DIALOGUES = [
    "患者：医生您好，我咳嗽三天了，有点发烧，吃了布洛芬。\n医生：先查个血常规，再拍个胸片。\n",
    "医生：哪里不舒服？\n患者：胃疼，吃了奥美拉唑也没用。\n医生：做个胃镜吧。\n",
    "患者：孩子拉肚子两天了。\n医生：可以吃点蒙脱石散和益生菌，多喝水。\n",
]
BUDGET = 64


def predict_outputs(model_path: str, constraint: str, tmp_path, name: str) -> list[str]:
    inputs = tmp_path / f"{name}.json"
    inputs.write_text("".join(json.dumps({"input": d}, ensure_ascii=False) + "\n" for d in DIALOGUES),
                      encoding="utf-8")
    out = tmp_path / f"{name}.jsonl"
    assert predict.main(["--model_path", model_path, "--device", "cpu", "--dtype", "float32", "--input_file",
                         str(inputs), "--output_file", str(out), "--max_tgt_len", str(BUDGET), "--constraint",
                         constraint, "--batch_size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return [r["output"] for r in sorted(records, key=lambda r: r["id"])]


@pytest.fixture(scope="module")
def extractors(tiny_ckpt):
    return {c: Extractor.load(tiny_ckpt, device="cpu", dtype="float32", constraint=c, batch_size=2)
            for c in ("grounded", "schema", "none")}


@pytest.mark.parametrize("constraint", ["grounded", "schema", "none"])
def test_answers_equal_predict_py(constraint, extractors, tiny_ckpt, tmp_path):
    results = extractors[constraint].extract(DIALOGUES, max_new_tokens=BUDGET)
    assert [r.output for r in results] == predict_outputs(tiny_ckpt, constraint, tmp_path, constraint)
    assert [r.dialogue for r in results] == DIALOGUES
    for r in results:
        assert r.finish_reason in ("stop", "length") and 0 < r.num_new_tokens <= BUDGET
        if constraint != "none":
            assert r.valid  # the grammar guarantees it, closed at the budget if need be
        assert list(r.fields) == [*LIST_KEYS, *TEXT_KEYS]
        for key in TEXT_KEYS:
            assert isinstance(r.fields[key], str)


def test_every_offset_points_into_the_dialogue(extractors):
    results = extractors["grounded"].extract(DIALOGUES + ["医生：你好。\n患者：你好你好你好。\n"], max_new_tokens=96)
    spans = [s for r in results for key in LIST_KEYS for s in r.fields[key]]
    assert spans, "a random model still answers some list items"
    for r in results:
        for key in LIST_KEYS:
            for span in r.fields[key]:
                assert isinstance(span, Span)
                assert span.start is not None and r.dialogue[span.start:span.end] == span.text


def test_a_single_dialogue_and_batches_of_one_answer_the_same(extractors):
    ex = extractors["grounded"]
    together = ex.extract(DIALOGUES, max_new_tokens=BUDGET)
    alone = [ex.extract(d, max_new_tokens=BUDGET)[0] for d in DIALOGUES]
    assert [r.output for r in alone] == [r.output for r in together]


def test_unmerged_checkpoint_answers_as_its_merged_model(tiny_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from qwen1_8.tokenization_qwen import QWenTokenizer

    checkpoint = tmp_path / "epoch-1-step-2"
    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"], lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(str(checkpoint), safe_serialization=True)
    QWenTokenizer.from_pretrained(tiny_ckpt).save_pretrained(str(checkpoint))
    merged = tmp_path / "merged"
    merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(checkpoint), "--save_model_dir",
                       str(merged), "--device", "cpu"])
    answers = {}
    for name, path in (("unmerged", checkpoint), ("merged", merged)):
        ex = Extractor.load(str(path), device="cpu", dtype="float32")
        answers[name] = [r.output for r in ex.extract(DIALOGUES, max_new_tokens=BUDGET)]
    base_answers = [r.output for r in Extractor.load(tiny_ckpt, device="cpu", dtype="float32")
                    .extract(DIALOGUES, max_new_tokens=BUDGET)]
    assert answers["unmerged"] == answers["merged"]
    assert answers["merged"] != base_answers  # the adapter really changes the answers


def test_bad_settings_are_typed_errors(tiny_ckpt, tmp_path, extractors):
    with pytest.raises(ConfigError, match="no such directory"):
        Extractor.load(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="constraint 'strict'"):
        Extractor.load(tiny_ckpt, constraint="strict")
    with pytest.raises(ConfigError, match="--device gpu"):
        Extractor.load(tiny_ckpt, device="gpu")
    with pytest.raises(ConfigError, match="dtype 'fp8'"):
        Extractor.load(tiny_ckpt, device="cpu", dtype="fp8")
    with pytest.raises(ConfigError, match="max_new_tokens 20 is below"):
        extractors["grounded"].extract(DIALOGUES[:1], max_new_tokens=20)
    with pytest.raises(ConfigError, match="dialogue 1: expected a str"):
        extractors["grounded"].extract([DIALOGUES[0], 7])

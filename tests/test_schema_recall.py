"""Memorise then recall with a schema of the user's own, end to end through the real scripts: three fields, one of
which the chapter does not have (症状, symptoms), in an order of their own. The labels are derived here from the
project's generated data (data/all.json): the first dialogues whose opening lines name a symptom of
data/make_dialogues.py's list and one of their drugs, cut after those lines.

data_helper.py --schema splits them, train.py --schema learns them (F1 at every checkpoint climbs to 1; schema.json
is saved in the run and each checkpoint, and a resume with another schema is refused in one line), merge_params.py
carries the schema into the merged model, and predict.py, evaluate.py (its table and page), the Python API and
serve.py (/v1/extract and the page, in a real browser) take it from there by themselves: F1 = 1, answers with
exactly the schema's keys in its order, every span at its true offsets."""
import json
import os

import pytest

from data.make_dialogues import SYMPTOMS
import data_helper
import evaluate
import merge_params
import predict
import train
from qwen1_8.make_tiny import make_tiny
from test_memorise_recall import run, script
from test_serve import (CHROMEDRIVER, CHROMIUM, KEY, browser, check_page_answer, extract, health, paste_and_extract,
                        start_server, stop_server)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["症状", "药品名称", "诊断结果"]
SCHEMA = {"fields": [{"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"},
                     {"name": "诊断结果", "kind": "text"}]}


def derived_records(count: int = 3, max_chars: int = 160) -> list[dict]:
    """data/all.json records cut after their first lines that name a symptom and one of the record's drugs; 症状 is
    the symptoms those lines name, in order of first mention."""
    with open(os.path.join(ROOT, "data", "all.json"), encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for record in records:
        lines = record["dialogue_text"].splitlines(keepends=True)
        extract = record["extract_text"]
        for k in range(2, len(lines)):
            dialogue = "".join(lines[:k])
            if len(dialogue) > max_chars:
                break
            symptoms = sorted((s for s in SYMPTOMS if s in dialogue), key=dialogue.index)
            drugs = [d for d in extract["药品名称"] if d in dialogue]
            if symptoms and drugs:
                out.append({"dialogue_text": dialogue,
                            "extract_text": {"诊断结果": extract["诊断结果"], "症状": symptoms, "药品名称": drugs}})
                break
        if len(out) == count:
            return out
    raise AssertionError("data/all.json has too few dialogues for this test")


def test_a_schema_of_ones_own_is_learnt_and_recalled(tmp_path, capsys):
    schema_path = tmp_path / "three.json"
    schema_path.write_text(json.dumps(SCHEMA, ensure_ascii=False), encoding="utf-8")
    records = derived_records()
    (tmp_path / "all.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    split = [tmp_path / "train_split.json", tmp_path / "test_split.json"]
    script(data_helper.main, capsys, "--all_path", str(tmp_path / "all.json"), "--train_path", str(split[0]),
           "--test_path", str(split[1]), "--test_size", "1", "--schema", str(schema_path))
    # every record in both roles, as memorising asks: the gold file is the three samples, training 20 times them
    gold, train_file = tmp_path / "gold.json", tmp_path / "train.json"
    gold.write_text("".join(p.read_text(encoding="utf-8") for p in split), encoding="utf-8")
    train_file.write_text(gold.read_text(encoding="utf-8") * 20, encoding="utf-8")
    samples = [json.loads(line) for line in gold.read_text(encoding="utf-8").splitlines()]
    assert all(list(json.loads(s["output"][8:-4])) == KEYS for s in samples)

    base = make_tiny(str(tmp_path / "tiny"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, seed=0, initializer_range=0.2)
    out = tmp_path / "run"
    flags = ["--train_path", str(train_file), "--test_path", str(gold), "--model_name_or_path", base,
             "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1", "--num_train_epochs", "3",
             "--learning_rate", "1e-2", "--warmup_ratio", "0.05", "--lora_dim", "32", "--lora_alpha", "64",
             "--lora_dropout", "0.0", "--max_len", "384", "--max_src_len", "300", "--show_loss_step", "40",
             "--save_model_step", "0", "--eval_max_new_tokens", "96", "--output_dir", str(out)]
    run("train.py", *flags, "--schema", str(schema_path))
    with open(out / "best_checkpoint.json", encoding="utf-8") as f:
        best = json.load(f)
    f1s = [e["f1"] for e in best["evaluations"]]
    assert f1s[-1] == 1.0 and f1s[0] < 1.0, f1s
    last = out / "epoch-3-step-60"
    saved = json.loads((last / "schema.json").read_text(encoding="utf-8"))
    assert [f["name"] for f in saved["fields"]] == KEYS and saved == json.loads((out / "schema.json").read_text())
    report = json.loads((last / "eval_report.json").read_text(encoding="utf-8"))
    assert list(report["fields"]) == KEYS

    # a resume with other fields (here the chapter's, no --schema) is refused before anything loads, in one line
    # (train.py's main in this process: a subprocess would spend its time importing)
    with pytest.raises(SystemExit) as refused:
        train.main([*flags, "--resume_from_checkpoint", str(out / "epoch-1-step-20")])
    message = str(refused.value.code)  # utils.fail's exit: the message, which Python prints as it leaves
    assert "\n" not in message and message.startswith("train.py: error: ")
    assert "another schema (症状 (spans), 药品名称 (spans), 诊断结果 (text))" in message, message

    merged = tmp_path / "merged"
    script(merge_params.main, capsys, "--ori_model_dir", base, "--model_dir", str(last), "--save_model_dir",
           str(merged), "--device", "cpu")
    assert json.loads((merged / "schema.json").read_text(encoding="utf-8")) == saved
    pred = tmp_path / "pred.jsonl"
    # the model's own schema, no --schema: the records' instruction is the schema's
    script(predict.main, capsys, "--model_path", str(merged), "--input_file", str(gold), "--output_file", str(pred),
           "--batch_size", "3", "--max_tgt_len", "96", "--device", "cpu")
    answers = [json.loads(line) for line in pred.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == 3 and not any(a["truncated"] for a in answers)
    for a in answers:
        assert list(json.loads(a["output"][len("```json\n"):-len("\n```")])) == KEYS, a["output"]
    html = tmp_path / "report.html"
    report = json.loads(script(evaluate.main, capsys, "--gold", str(gold), "--pred", str(pred), "--json", "--html",
                               str(html)))
    assert list(report["fields"]) == KEYS
    assert report["overall"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert report["exact_match"] == 1.0 and report["grounded_rate"] == 1.0
    page = html.read_text(encoding="utf-8")
    assert all(f'data-field="{key}"' in page for key in KEYS) and 'data-field="现病史"' not in page

    # the Python API, on the bare dialogues: the schema's fields, each span at its true offsets
    from medextract import Extractor

    dialogues = [r["dialogue_text"] for r in records]
    extractor = Extractor.load(str(merged), device="cpu", dtype="float32")
    assert extractor.schema.keys == tuple(KEYS)
    for dialogue, record, result in zip(dialogues, records, extractor.extract(dialogues, max_new_tokens=96)):
        assert list(result.fields) == KEYS
        for key in ("症状", "药品名称"):
            assert [s.text for s in result.fields[key]] == record["extract_text"][key]
            assert all(dialogue[s.start:s.end] == s.text for s in result.fields[key])
        assert result.fields["诊断结果"] == record["extract_text"]["诊断结果"]

    # serve.py on the merged model: /health names the fields, /v1/extract answers them at true offsets, and the page
    # builds its rows from them and marks each span where it stands
    server = start_server(str(merged), tmp_path / "server.log", "--max_tgt_len", "96")
    try:
        assert [f["name"] for f in health(server)["fields"]] == KEYS
        answers = {}
        for dialogue, record in zip(dialogues, records):
            answer = extract(server, dialogue)
            assert list(answer["fields"]) == KEYS and answer["valid"]
            for key in ("症状", "药品名称"):
                assert [i["text"] for i in answer["fields"][key]] == record["extract_text"][key]
                assert all(dialogue[i["start"]:i["end"]] == i["text"] for i in answer["fields"][key])
            answers[dialogue] = answer
        if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
            pytest.skip("the page check needs Debian's chromium and chromium-driver (.ci/run installs them); "
                        "everything before it passed")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        with browser(tmp_path) as driver:
            driver.get(f"http://127.0.0.1:{server.port}/")
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "field-count").text == "three")
            driver.find_element(By.ID, "api-key").send_keys(KEY)
            for dialogue in dialogues[:2]:
                paste_and_extract(driver, dialogue)
                check_page_answer(driver, dialogue, answers[dialogue]["fields"], ("症状", "药品名称"))
    finally:
        stop_server(server)

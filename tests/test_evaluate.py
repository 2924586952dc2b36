"""evaluate.py: hand-made cases with exact expected numbers, alignment rules, LCS parity and the CLI round trip."""
import json
import os
import random
import time

import pytest

import evaluate as ev
from medextract import metrics
from utils import EXTRACT_KEYS, INSTRUCTION, LIST_KEYS, TEXT_KEYS, format_output, input_digest

# Our own short dialogues and extractions.
DIALOGUE_A = "医生: 孩子哪里不舒服？\n患者: 发烧两天了，吃了布洛芬和蒙脱石散。\n医生: 先查个血常规。\n"
DIALOGUE_B = "医生: 咳嗽多久了？\n患者: 一周了，之前吃过头孢。\n"
EMPTY = {**{k: [] for k in LIST_KEYS}, **{k: "" for k in TEXT_KEYS}}
GOLD_A = dict(EMPTY, 药品名称=["布洛芬", "蒙脱石散"], 医疗检查=["血常规"], 现病史="发烧两天", 诊断结果="胃肠炎")
GOLD_B = dict(EMPTY, 药品名称=["头孢"], 现病史="咳嗽一周")


def gold(dialogue: str, fields: dict) -> dict:
    return {"instruction": "抽取要素：\n", "input": dialogue, "output": format_output(fields)}


def pred(fields, **extra) -> dict:
    output = fields if isinstance(fields, str) else "```json\n" + json.dumps(fields, ensure_ascii=False) + "\n```"
    return {"output": output, **extra}


def assert_scores(scores: dict, precision: float, recall: float, f1: float):
    assert scores["precision"] == pytest.approx(precision, abs=1e-12)
    assert scores["recall"] == pytest.approx(recall, abs=1e-12)
    assert scores["f1"] == pytest.approx(f1, abs=1e-12)


def assert_perfect(report: dict, n: int, grounded: float | None = 1.0):
    assert report["n"] == n
    assert report["json_valid_rate"] == 1.0 and report["exact_match"] == 1.0 and report["grounded_rate"] == grounded
    for key in EXTRACT_KEYS:
        assert_scores(report["fields"][key], 1, 1, 1)
    assert_scores(report["overall"], 1, 1, 1)


def test_report_schema():
    report = metrics.score([gold(DIALOGUE_A, GOLD_A)], [pred(GOLD_A)])
    assert set(report) == {"n", "json_valid_rate", "exact_match", "grounded_rate", "truncated", "fields", "overall",
                           "list_fields_micro", "counts"}
    assert list(report["counts"]) == list(LIST_KEYS)
    assert list(report["fields"]) == list(EXTRACT_KEYS)
    for scores in list(report["fields"].values()) + [report["overall"], report["list_fields_micro"]]:
        assert set(scores) == {"precision", "recall", "f1"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_truncated_answers_are_counted():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    report = metrics.score(golds, [pred(GOLD_A, truncated=True), pred(GOLD_B, truncated=False)])
    assert report["truncated"] == 1
    assert metrics.score(golds, [pred(GOLD_A), pred(GOLD_B)])["truncated"] == 0  # files without the field
    assert "cut at the token budget 1" in metrics.format_table(report)


def test_perfect():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    assert_perfect(metrics.score(golds, [pred(GOLD_A), pred(GOLD_B)]), 2)


def test_empty_vs_empty_is_perfect():
    assert_perfect(metrics.score([gold(DIALOGUE_A, EMPTY)], [pred("{}")]), 1, grounded=None)  # no item to check


def test_invalid_json_counts_as_empty():
    report = metrics.score([gold(DIALOGUE_A, GOLD_A)], [pred("对不起，我不能回答。")])
    assert report["json_valid_rate"] == 0.0 and report["exact_match"] == 0.0
    assert report["grounded_rate"] is None  # nothing extracted: no grounded rate, rather than a perfect one
    for key in ("药品名称", "医疗检查", "现病史", "诊断结果"):  # gold has content: nothing found
        assert_scores(report["fields"][key], 0, 0, 0)
    for key in ("药物类别", "医疗操作", "辅助检查", "医疗建议"):  # gold is empty too
        assert_scores(report["fields"][key], 1, 1, 1)
    assert_scores(report["overall"], 0.5, 0.5, 0.5)


def test_invalid_json_is_never_an_exact_match():
    report = metrics.score([gold(DIALOGUE_A, EMPTY)], [pred("not json")])
    assert report["json_valid_rate"] == 0.0 and report["exact_match"] == 0.0
    assert_scores(report["overall"], 1, 1, 1)


def test_both_fence_forms_and_no_fence():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    old_fence = "```\n\n" + json.dumps(GOLD_A, ensure_ascii=False) + "\n\n```"
    chatty = "结果如下：" + json.dumps(GOLD_B, ensure_ascii=False) + "\n以上。"
    assert_perfect(metrics.score(golds, [pred(old_fence), pred(chatty)]), 2)
    # the gold side may use the old fence too
    golds[0]["output"] = old_fence
    assert_perfect(metrics.score(golds, [pred(GOLD_A), pred(GOLD_B)]), 2)


def test_wrong_types_and_whitespace_still_match():
    odd = dict(GOLD_B, 药品名称=" 头孢 ", 现病史=["咳嗽", " 一周\n"])
    assert_perfect(metrics.score([gold(DIALOGUE_B, GOLD_B)], [pred(odd)]), 1)
    # single-quoted Python dict output
    assert_perfect(metrics.score([gold(DIALOGUE_B, GOLD_B)], [pred(str(GOLD_B))]), 1)


def test_partial_matches_exact_numbers():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    pred_a = dict(EMPTY, 药品名称=[" 布洛芬 ", "阿莫西林", ""], 现病史="发烧 三天", 诊断结果="急性胃肠炎")
    pred_b = dict(EMPTY, 药品名称=["头孢", "头孢"], 现病史="咳嗽")
    report = metrics.score(golds, [pred(pred_a), pred(pred_b)])
    # 药品名称: {布洛芬, 阿莫西林} vs {布洛芬, 蒙脱石散}; {头孢} vs {头孢} -> TP 2, P 3, G 3
    assert_scores(report["fields"]["药品名称"], 2 / 3, 2 / 3, 2 / 3)
    # 医疗检查: nothing predicted, 1 expected
    assert_scores(report["fields"]["医疗检查"], 0, 0, 0)
    # 现病史: LCS(发烧三天, 发烧两天) = 3, LCS(咳嗽, 咳嗽一周) = 2 -> 5 / 6 predicted, 5 / 8 gold
    assert_scores(report["fields"]["现病史"], 5 / 6, 5 / 8, 5 / 7)
    # 诊断结果: LCS(急性胃肠炎, 胃肠炎) = 3 -> 3 / 5 predicted, 3 / 3 gold (sample B: both empty)
    assert_scores(report["fields"]["诊断结果"], 3 / 5, 1, 0.75)
    for key in ("药物类别", "医疗操作", "辅助检查", "医疗建议"):
        assert_scores(report["fields"][key], 1, 1, 1)
    assert_scores(report["overall"], (2 / 3 + 0 + 5 / 6 + 3 / 5 + 4) / 8, (2 / 3 + 0 + 5 / 8 + 1 + 4) / 8,
                  (2 / 3 + 0 + 5 / 7 + 0.75 + 4) / 8)
    # list fields pooled: 药品名称 2 of 3 predicted / 3 gold, 医疗检查 0 / 1 gold, the other two empty -> 2, 3, 4
    assert_scores(report["list_fields_micro"], 2 / 3, 2 / 4, 4 / 7)
    assert report["json_valid_rate"] == 1.0
    assert report["exact_match"] == 0.0
    # 布洛芬 and 头孢 are in their dialogues, 阿莫西林 is not
    assert report["grounded_rate"] == pytest.approx(2 / 3)


def test_hallucinated_items_are_ungrounded():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    # 头孢 is in dialogue B, not A: grounding is checked against the sample's own dialogue
    pred_a = dict(GOLD_A, 药物类别=["抗生素"], 医疗操作=["头孢"])
    pred_b = dict(GOLD_B, 医疗检查=["胸片", "血常规"])
    report = metrics.score(golds, [pred(pred_a), pred(pred_b)])
    # items: A 布洛芬 蒙脱石散 血常规 抗生素 头孢 (3 grounded), B 头孢 胸片 血常规 (1 grounded)
    assert report["grounded_rate"] == pytest.approx(4 / 8)
    assert_scores(report["fields"]["药物类别"], 0, 0, 0)  # 1 predicted, none expected: recall 0 too
    assert_scores(report["fields"]["医疗检查"], 1 / 3, 1, 0.5)
    assert report["exact_match"] == 0.0


def test_exact_match_rate():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    report = metrics.score(golds, [pred(GOLD_A), pred(dict(GOLD_B, 诊断结果="感冒"))])
    assert report["exact_match"] == 0.5


def test_alignment_by_id_and_by_order():
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    assert_perfect(metrics.score(golds, [pred(GOLD_B, id=1), pred(GOLD_A, id=0)]), 2)
    # no prediction has an id: order decides
    swapped = metrics.score(golds, [pred(GOLD_B), pred(GOLD_A)])
    assert swapped["exact_match"] == 0.0
    # ids refer to the gold lines given
    assert_perfect(metrics.score(golds, [pred(GOLD_B, id=7), pred(GOLD_A, id=3)], gold_ids=[3, 7]), 2)
    assert metrics.align(golds, [pred(GOLD_B, id=1), pred(GOLD_A, id=0)]) == [(1, 0), (0, 1)]


@pytest.mark.parametrize("preds, message", [
    ([pred(GOLD_A, id=0), pred(GOLD_B, id=0)], "id 0 occurs more than once"),
    ([pred(GOLD_A, id=0), pred(GOLD_B, id=2)], "id 2 matches no record"),
    ([pred(GOLD_A, id=0), pred(GOLD_B, id="1")], "'id' must be an integer"),
    ([pred(GOLD_A)], "has 1 predictions but gold has 2 records"),
    ([pred(GOLD_A), pred(GOLD_B), pred(GOLD_B)], "has 3 predictions but gold has 2 records"),
    ([pred(GOLD_A), {"id": 1}], "field 'output' is missing"),
    # a file where some lines have ids: order would score them against the wrong gold lines
    ([pred(GOLD_B, id=1), pred(GOLD_A)], "prediction 1 has no 'id' but others have one"),
])
def test_alignment_errors(preds, message):
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    with pytest.raises(ValueError, match=message):
        metrics.score(golds, preds)


def test_predictions_for_another_input_file_are_refused():
    """predict.py and the baselines record a digest of each prompt: scored against gold lines whose dialogue is
    another one (same line numbers, another data set), they are refused instead of silently scored."""
    golds = [gold(DIALOGUE_A, GOLD_A), {"input": DIALOGUE_B, "output": format_output(GOLD_B)}]
    digests = [input_digest("抽取要素：\n" + DIALOGUE_A), input_digest(INSTRUCTION + DIALOGUE_B)]  # default instruction
    preds = [pred(GOLD_A, id=0, input_digest=digests[0]), pred(GOLD_B, id=1, input_digest=digests[1])]
    assert_perfect(metrics.score(golds, preds, gold_ids=[0, 1]), 2)
    swapped = [pred(GOLD_B, id=1, input_digest=digests[1]), pred(GOLD_A, id=0, input_digest=digests[1])]
    with pytest.raises(ValueError, match=r"predictions: the prediction with id 0 was made for another dialogue than "
                                         r"gold line 1"):
        metrics.score(golds, swapped, gold_ids=[0, 1])
    without_ids = [pred(GOLD_A, input_digest=digests[1]), pred(GOLD_B, input_digest=digests[1])]
    with pytest.raises(ValueError, match=r"predictions: prediction 0 was made for another dialogue than gold record 0"):
        metrics.score(golds, without_ids)


def test_gold_errors():
    bad = {"input": DIALOGUE_A, "output": "没有答案"}
    with pytest.raises(ValueError, match=r"gold: record 1: the gold 'output' holds no JSON object"):
        metrics.score([gold(DIALOGUE_A, GOLD_A), bad], [pred(GOLD_A), pred(GOLD_A)])
    with pytest.raises(ValueError, match="field 'input' is missing"):
        metrics.score([{"output": format_output(GOLD_A)}], [pred(GOLD_A)])
    # a gold answer without all 8 keys is a broken test file, not a set of empty fields
    partial = {"input": DIALOGUE_A, "output": '```json\n{"药品名称": [], "现病史": "发烧"}\n```'}
    with pytest.raises(ValueError, match=r"gold: record 0: the gold 'output' lacks the key\(s\) 药物类别, 医疗检查"):
        metrics.score([partial], [pred(GOLD_A)])
    with pytest.raises(ValueError, match="no records"):
        metrics.score([], [])


def slow_lcs(a: str, b: str) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_the_textbook_dp():
    rng = random.Random(0)
    alphabets = ["ab", "abcd", "发烧咳嗽两天一周", "abcdefghijklmnopqrstuvwxyz"]
    for _ in range(400):
        alphabet = rng.choice(alphabets)
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 70)))
        assert metrics.lcs_length(a, b) == slow_lcs(a, b), (a, b)
    assert metrics.lcs_length("发烧三天", "发烧两天") == 3
    assert metrics.lcs_length("", "abc") == 0 and metrics.lcs_length("abc", "abc") == 3


def test_lcs_is_fast_enough_for_a_test_set():
    rng = random.Random(1)
    chars = "患者发烧咳嗽两天一周医生建议多喝水清淡饮食复查血常规胸片布洛芬头孢"
    texts = ["".join(rng.choice(chars) for _ in range(300)) for _ in range(100)]
    start = time.perf_counter()
    for i in range(50):
        for _ in range(4):
            metrics.lcs_length(texts[2 * i], texts[2 * i + 1])
    assert time.perf_counter() - start < 2.0  # 200 pairs of 300 characters


def test_prf_zero_conventions():
    assert metrics.prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert metrics.prf(0, 0, 5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert metrics.prf(0, 5, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert metrics.prf(0, 3, 4) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def write_jsonl(path, records, blank_line_after=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if i == blank_line_after:
                f.write("\n")


def test_cli_json_and_report_round_trip(tmp_path, capsys):
    gold_file, pred_file, report_file = tmp_path / "test.json", tmp_path / "pred.jsonl", tmp_path / "out" / "r.json"
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    # a blank line in the gold file: ids are 0-based line numbers, so the second record is id 2
    write_jsonl(gold_file, golds, blank_line_after=0)
    preds = [pred(dict(GOLD_B, 诊断结果="感冒"), id=2), pred(GOLD_A, id=0)]
    write_jsonl(pred_file, preds)
    assert ev.main(["--gold", str(gold_file), "--pred", str(pred_file), "--json", "--report", str(report_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(report_file, encoding="utf-8") as f:
        saved = json.load(f)
    expected = metrics.score(golds, preds, gold_ids=[0, 2])
    assert printed == saved == expected
    assert saved["exact_match"] == 0.5 and saved["n"] == 2
    assert [p.name for p in report_file.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_cli_table(tmp_path, capsys):
    gold_file, pred_file = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A)])
    write_jsonl(pred_file, [pred("无法解析", id=0)])
    assert ev.main(["--gold", str(gold_file), "--pred", str(pred_file)]) == 0
    out = capsys.readouterr().out
    for key in EXTRACT_KEYS:
        assert key in out
    assert "macro avg" in out and "0.5000" in out
    assert "samples 1 | JSON valid 0.0000 | exact match 0.0000 | grounded n/a" in out


def test_cli_compares_several_prediction_files(tmp_path, capsys):
    """Fine-tuned, untuned and API predictions side by side: one F1 column each, and {file: report} as JSON."""
    gold_file, report_file = tmp_path / "test.json", tmp_path / "r.json"
    golds = [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)]
    write_jsonl(gold_file, golds)
    files = {"tuned.jsonl": [pred(GOLD_A, id=0), pred(GOLD_B, id=1)],
             "base.jsonl": [pred("无法解析", id=0), pred(dict(GOLD_B, 现病史="咳嗽"), id=1)]}
    for name, preds in files.items():
        write_jsonl(tmp_path / name, preds)
    paths = [str(tmp_path / name) for name in files]
    assert ev.main(["--gold", str(gold_file), "--pred", *paths, "--report", str(report_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    with open(report_file, encoding="utf-8") as f:
        saved = json.load(f)
    assert list(saved) == paths
    for path, preds in zip(paths, files.values()):
        assert saved[path] == metrics.score(golds, preds)
    f1 = {line.split()[0]: line.split()[1:] for line in out if line.split() and line.split()[0] in EXTRACT_KEYS}
    assert f1["药品名称"] == ["1.0000", f"{saved[paths[1]]['fields']['药品名称']['f1']:.4f}"]
    assert f"[1] {paths[0]} (2 samples)" in out and f"[2] {paths[1]} (2 samples)" in out
    assert any(line.startswith("JSON valid") and line.split()[2:] == ["1.0000", "0.5000"] for line in out)
    with pytest.raises(SystemExit):
        ev.main(["--gold", str(gold_file), "--pred", paths[0], paths[0]])


@pytest.mark.parametrize("target", ["gold", "pred"])
def test_cli_report_may_not_overwrite_an_input(tmp_path, target):
    gold_file, pred_file = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A)])
    write_jsonl(pred_file, [pred(GOLD_A, id=0)])
    before = {p: p.read_bytes() for p in (gold_file, pred_file)}
    report = os.path.join(str(tmp_path), ".", (gold_file if target == "gold" else pred_file).name)
    with pytest.raises(SystemExit):
        ev.main(["--gold", str(gold_file), "--pred", str(pred_file), "--report", report])
    assert {p: p.read_bytes() for p in before} == before


def test_cli_count_mismatch_names_both_files(tmp_path):
    gold_file, pred_file = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)])
    write_jsonl(pred_file, [pred(GOLD_A, id=0)])
    with pytest.raises(SystemExit) as e:
        ev.main(["--gold", str(gold_file), "--pred", str(pred_file), "--json"])
    message = str(e.value.code)
    assert f"{pred_file} has 1 predictions but {gold_file} has 2 records" in message


def test_cli_bad_lines_name_file_line_and_field(tmp_path):
    gold_file, pred_file = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A), {"input": DIALOGUE_B}])
    write_jsonl(pred_file, [pred(GOLD_A), pred(GOLD_B)])
    with pytest.raises(SystemExit, match=rf"{gold_file}:2: field 'output' is missing"):
        ev.main(["--gold", str(gold_file), "--pred", str(pred_file)])
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)])
    write_jsonl(pred_file, [pred(GOLD_A), {"id": 1, "text": "x"}])
    with pytest.raises(SystemExit, match=rf"{pred_file}:2: field 'output' is missing"):
        ev.main(["--gold", str(gold_file), "--pred", str(pred_file)])
    with pytest.raises(SystemExit):
        ev.main(["--gold", str(tmp_path / "nope.json"), "--pred", str(pred_file)])


def test_reference_test_set_against_itself(reference_dir):
    ids, golds = metrics.load_gold(os.path.join(reference_dir, "book_test.json"))
    preds = [{"id": i, "output": g["output"]} for i, g in zip(ids, golds)]
    assert_perfect(metrics.score(golds, preds, gold_ids=ids), 50)


def test_a_degenerate_answer_is_scored_invalid_not_a_crash(tmp_path, capsys):
    """One answer nested 1,000 brackets deep (a model stuck repeating "[") and one with a lone surrogate: the file is
    scored, the first counting as invalid JSON."""
    gold_file, pred_file = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_jsonl(gold_file, [gold(DIALOGUE_A, GOLD_A), gold(DIALOGUE_B, GOLD_B)])
    with open(pred_file, "w", encoding="utf-8") as f:  # ASCII escapes: the surrogate as \\ud800, as a file holds it
        f.write(json.dumps({"id": 0, "output": '{"药品名称": ' + "[" * 1000 + "]" * 1000 + "}"}) + "\n")
        f.write(json.dumps({"id": 1, "output": '{"药品名称": ["\ud800头孢"], "现病史": "咳嗽一周"}'}) + "\n")
    assert ev.main(["--gold", str(gold_file), "--pred", str(pred_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and report["json_valid_rate"] == 0.5
    assert report["fields"]["现病史"]["recall"] > 0

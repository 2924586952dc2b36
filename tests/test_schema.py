"""Schemas of the user's own (medextract/schema.py): the chapter's schema is the chapter's instruction and fields,
a generated instruction follows the chapter's words, every bad schema is one clear line, and a schema drives the
answer format, the parser, the grammar and its closing, the metrics and data_helper.py's checks."""
import json
import os
import subprocess
import sys

import pytest

from medextract import grammar
from medextract.errors import ConfigError
from medextract.metrics import score
from medextract.schema import (CHAPTER_SCHEMA, Field, Schema, generated_instruction, load_schema, resolve_schema,
                               results_schema, schema_from_json)
from utils import CHAPTER_FIELDS, EXTRACT_KEYS, INSTRUCTION, format_output, parse_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a field the chapter does not have (症状), one it has (药品名称), and a text field, in an order of the user's own
THREE = {"fields": [{"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"},
                    {"name": "诊断结果", "kind": "text"}]}
DIALOGUE = "医生: 哪里不舒服？\n患者: 咳嗽两天，有点\"发热\"，吃了布洛芬\n"
ANSWER = {"症状": ["咳嗽", "\"发热\""], "药品名称": ["布洛芬"], "诊断结果": "上呼吸道感染"}


def three() -> Schema:
    return schema_from_json(THREE, "three.json")


def test_the_chapter_schema_is_the_chapter_instruction_and_fields():
    assert CHAPTER_SCHEMA.instruction == INSTRUCTION
    assert CHAPTER_SCHEMA.keys == EXTRACT_KEYS and tuple(CHAPTER_SCHEMA.fields) == CHAPTER_FIELDS
    # the generated instruction, given the chapter's fields, is the chapter's own, character for character
    assert generated_instruction(CHAPTER_SCHEMA.fields) == INSTRUCTION
    assert schema_from_json({"fields": [{"name": k, "kind": c} for k, c in CHAPTER_FIELDS]}, "x").is_chapter


def test_a_generated_instruction_names_the_fields_in_the_chapters_words():
    text = three().instruction
    assert text.startswith("你现在是一个医疗对话要素抽取专家。\n请针对下面对话内容抽取出症状、药品名称和诊断结果等内容，")
    assert "（1）症状和药品名称的内容会在对话中存在多个" in text and "（2）抽取出的症状和药品名称对应内容，需要完全来自于原文" in text
    assert "（3）诊断结果的内容需要根据整个对话内容进行总结抽取" in text and text.endswith("对话文本：\n")
    only_text = generated_instruction((Field("诊断结果", "text"),))
    assert "List" not in only_text and "（1）诊断结果的内容" in only_text and "（2）" not in only_text
    only_spans = generated_instruction((Field("症状", "spans"),))
    assert "Text形式" not in only_spans and only_spans.count("\n") == 5 and "内容不重复。\n对话文本：" in only_spans
    given = schema_from_json({**THREE, "instruction": "抽取：\n"}, "x")
    assert given.instruction == "抽取：\n" and given != three()


def test_a_saved_schema_reads_back_the_same(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(three().text(), encoding="utf-8")
    assert load_schema(str(path)) == three()
    assert json.loads(three().text())["instruction"] == three().instruction  # written out, generated or not


@pytest.mark.parametrize("case, text, words", [
    ("not json", "{fields: []", ["not valid JSON", "line 1"]),
    ("not an object", "[]", ["expected a JSON object"]),
    ("no fields", "{}", ['"fields" must be a non-empty list', "got nothing"]),
    ("empty fields", '{"fields": []}', ["an empty list"]),
    ("unknown key", '{"fields": [{"name": "a", "kind": "text"}], "instructions": "x"}', ["unknown key 'instructions'"]),
    ("unknown kind", '{"fields": [{"name": "症状", "kind": "span"}]}', ["field 1 (症状)", 'unknown kind "span"',
                                                                          '"spans"', '"text"']),
    ("missing kind", '{"fields": [{"name": "症状"}]}', ["field 1 (症状)", "unknown kind null"]),
    ("duplicate", '{"fields": [{"name": "症状", "kind": "spans"}, {"name": "症状", "kind": "text"}]}',
     ["field 2", "症状", "used twice"]),
    ("empty name", '{"fields": [{"name": "", "kind": "text"}]}', ["field 1", '"name" must be a non-empty string']),
    ("blank name", '{"fields": [{"name": "  ", "kind": "text"}]}', ["field 1", "non-empty string"]),
    ("no name", '{"fields": [{"kind": "text"}]}', ["field 1", "non-empty string", "null"]),
    ("padded name", '{"fields": [{"name": " 症状", "kind": "text"}]}', ["field 1", "white space at an end"]),
    ("field not object", '{"fields": ["症状"]}', ["field 1", "expected an object"]),
    ("field extra key", '{"fields": [{"name": "a", "kind": "text", "type": "x"}]}', ["field 1", "unknown key 'type'"]),
    ("empty instruction", '{"fields": [{"name": "a", "kind": "text"}], "instruction": " "}',
     ['"instruction" must be a non-empty string']),
])
def test_a_bad_schema_is_one_clear_line(tmp_path, case, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_schema(str(path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--schema {path}: "), message
    for word in words:
        assert word in message, (case, message)


def test_a_missing_schema_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_schema(str(tmp_path / "nope.json"))


def test_answer_format_and_parser_follow_the_schema():
    schema = three()
    text = format_output(ANSWER, schema.fields)
    assert text == "```json\n" + json.dumps(ANSWER, ensure_ascii=False) + "\n```"
    fields, valid = parse_output(text, schema.fields)
    assert valid and list(fields) == ["症状", "药品名称", "诊断结果"] and fields == ANSWER
    # keys the schema does not have are dropped, missing ones come back empty, in the schema's order
    fields, valid = parse_output('{"诊断结果": "感冒", "现病史": "x"}', schema.fields)
    assert valid and fields == {"症状": [], "药品名称": [], "诊断结果": "感冒"}
    # the chapter's default is unchanged
    assert parse_output(text)[0] == {**{k: [] for k in EXTRACT_KEYS[:4]}, **{k: "" for k in EXTRACT_KEYS[4:]},
                                     "药品名称": ["布洛芬"], "诊断结果": "上呼吸道感染"}


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return grammar.build_vocabulary(tokenizer)


def accepts(vocabulary, tokenizer, text, fields, constraint="grounded", dialogue=DIALOGUE) -> bool:
    import xgrammar as xgr

    g = grammar.AnswerGrammar.for_dialogue(vocabulary, dialogue, constraint, fields)
    bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)
    for token in tokenizer.encode(text, allowed_special=set()) + [tokenizer.im_end_id]:
        g.fill(bitmask, 0)
        if not (int(bitmask[0, token >> 5]) >> (token & 31)) & 1 or not g.accept(token):
            return False
    return g.is_terminated()


def test_the_grammar_is_the_schemas(vocabulary, tokenizer):
    fields = three().fields
    text = format_output(ANSWER, fields)
    assert accepts(vocabulary, tokenizer, text, fields)
    assert accepts(vocabulary, tokenizer, text, fields, "schema")
    assert not accepts(vocabulary, tokenizer, text, CHAPTER_FIELDS)  # the chapter's keys are not these
    chapter_answer = format_output({**{k: [] for k in EXTRACT_KEYS[:4]}, **{k: "" for k in EXTRACT_KEYS[4:]}})
    assert not accepts(vocabulary, tokenizer, chapter_answer, fields)
    # span fields are grounded: an item not in the dialogue is refused, a text field is free
    assert not accepts(vocabulary, tokenizer, format_output({**ANSWER, "症状": ["头痛"]}, fields), fields)
    assert accepts(vocabulary, tokenizer, format_output({**ANSWER, "诊断结果": "不在对话里的字"}, fields), fields)
    # keys in another order are refused
    reordered = {k: ANSWER[k] for k in ("药品名称", "症状", "诊断结果")}
    assert not accepts(vocabulary, tokenizer, "```json\n" + json.dumps(reordered, ensure_ascii=False) + "\n```",
                       fields)
    # schemas of one kind only compile and take their answers
    for kinds in ([Field("诊断结果", "text")], [Field("症状", "spans")]):
        answer = {f.name: ("感冒" if f.kind == "text" else ["咳嗽"]) for f in kinds}
        for constraint in ("grounded", "schema"):
            assert accepts(vocabulary, tokenizer, format_output(answer, kinds), kinds, constraint)
            assert accepts(vocabulary, tokenizer, grammar.empty_answer(kinds), kinds, constraint)


def test_a_cut_answer_closes_in_the_schemas_layout(vocabulary, tokenizer):
    fields = three().fields
    text = format_output(ANSWER, fields)
    assert grammar.empty_answer(fields) == '```json\n{"症状": [], "药品名称": [], "诊断结果": ""}\n```'
    for cut in range(len(text) + 1):
        closing = grammar.closing_text(text[:cut], fields)
        if closing is None:
            continue
        closed = text[:cut] + closing
        assert accepts(vocabulary, tokenizer, closed, fields), (cut, closed)
        parsed, valid = parse_output(closed, fields)
        assert valid and list(parsed) == ["症状", "药品名称", "诊断结果"]


def test_metrics_score_the_schemas_fields():
    schema = three()
    gold = {"instruction": schema.instruction, "input": DIALOGUE, "output": format_output(ANSWER, schema.fields)}
    half = {**ANSWER, "症状": ["咳嗽"]}
    report = score([gold], [{"output": format_output(half, schema.fields)}], schema=schema)
    assert list(report["fields"]) == ["症状", "药品名称", "诊断结果"] and list(report["counts"]) == ["症状", "药品名称"]
    assert report["fields"]["症状"]["recall"] == 0.5 and report["fields"]["药品名称"]["f1"] == 1.0
    assert report["counts"]["症状"] == {"hit": 1, "extra": 0, "missed": 1}
    # gold of another schema is named as such
    with pytest.raises(ValueError, match="lacks the key"):
        score([gold], [{"output": "{}"}])


def test_the_schema_of_a_model_and_of_predictions(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"fields": [{"name": "症状", "kind": "spans"}]}), encoding="utf-8")
    same = tmp_path / "same.json"
    same.write_text(json.dumps(THREE, ensure_ascii=False), encoding="utf-8")
    assert resolve_schema(str(model), None) == CHAPTER_SCHEMA  # nothing recorded: the chapter's
    assert resolve_schema(str(model), str(other)) == load_schema(str(other))
    (model / "schema.json").write_text(three().text(), encoding="utf-8")
    assert resolve_schema(str(model), None) == three() == resolve_schema(str(model), str(same))
    with pytest.raises(ConfigError, match="differs from the schema .* the model was trained with"):
        resolve_schema(str(model), str(other))
    # predictions: the schema their settings record, and files of two schemas are refused
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    (tmp_path / "a.jsonl.settings.json").write_text(json.dumps({"schema": three().to_json()}), encoding="utf-8")
    (tmp_path / "b.jsonl.settings.json").write_text(json.dumps({"model_path": "x"}), encoding="utf-8")
    assert results_schema([str(a)]) == three()
    assert results_schema([str(b)]) == CHAPTER_SCHEMA
    assert results_schema([str(tmp_path / "c.jsonl")], str(other)) == load_schema(str(other))
    with pytest.raises(ConfigError, match="different schemas"):
        results_schema([str(a), str(b)])
    with pytest.raises(ConfigError, match="differs from the schema"):
        results_schema([str(a)], str(other))


def data_helper(tmp_path, records, *flags):
    all_path = tmp_path / "all.json"
    all_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return subprocess.run([sys.executable, "data_helper.py", "--all_path", str(all_path), "--train_path",
                           str(tmp_path / "train.json"), "--test_path", str(tmp_path / "test.json"), "--test_size", "1",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_data_helper_writes_and_checks_the_schemas_fields(tmp_path):
    schema_path = tmp_path / "three.json"
    schema_path.write_text(json.dumps(THREE, ensure_ascii=False), encoding="utf-8")
    records = [{"dialogue_text": DIALOGUE + f"医生: 第{i}次\n", "extract_text": {"诊断结果": "感冒", "药品名称": ["布洛芬"],
                                                                                  "症状": ["咳嗽", "咳嗽"]}}
               for i in range(3)]
    records[1]["extract_text"]["现病史"] = "咳嗽两天"  # a field the schema does not keep: left out, said once
    done = data_helper(tmp_path, records, "--schema", str(schema_path))
    assert done.returncode == 0, done.stderr
    assert f"kept the 3 fields of --schema {schema_path}; left out 现病史" in done.stdout
    records[1]["extract_text"].pop("现病史")
    lines = [json.loads(line) for name in ("train.json", "test.json")
             for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 and all(r["instruction"] == three().instruction for r in lines)
    # the schema's order, repeats dropped
    assert lines[0]["output"] == '```json\n{"症状": ["咳嗽"], "药品名称": ["布洛芬"], "诊断结果": "感冒"}\n```'
    # a record without one of the schema's fields: one line naming the record and the field
    records[2]["extract_text"].pop("症状")
    failed = data_helper(tmp_path, records, "--schema", str(schema_path))
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    message = failed.stderr.strip()
    assert "\n" not in message and "record 2" in message and "missing key(s) 症状" in message, message
    # the chapter's fields are not the schema's: without --schema the records are refused, naming the key
    failed = data_helper(tmp_path, records[:2] * 2)
    assert failed.returncode != 0 and "unknown key(s) 症状" in failed.stderr and "--schema" in failed.stderr
    # a bad schema file: one line
    schema_path.write_text('{"fields": [{"name": "症状", "kind": "list"}]}', encoding="utf-8")
    failed = data_helper(tmp_path, records, "--schema", str(schema_path))
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1 and 'unknown kind "list"' in failed.stderr

"""utils.parse_output: every answer shape a model (or the chapter's data) produces, and type normalisation."""
import json

import pytest

from utils import EXTRACT_KEYS, LIST_KEYS, TEXT_KEYS, format_output, parse_output

# Our own made-up extraction; the values exercise CJK text, an ASCII apostrophe and braces inside strings.
FULL = {
    "药品名称": ["布洛芬混悬液", "蒙脱石散"],
    "药物类别": ["退烧药"],
    "医疗检查": ["血常规"],
    "医疗操作": [],
    "现病史": "孩子发热两天，最高39度，伴有腹泻",
    "辅助检查": "",
    "诊断结果": "急性胃肠炎",
    "医疗建议": "多喝水，清淡饮食，体温超过38.5度时服用退烧药",
}
EMPTY = {**{k: [] for k in LIST_KEYS}, **{k: "" for k in TEXT_KEYS}}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def test_json_fence_as_in_test_json():
    assert parse_output(format_output(FULL)) == (FULL, True)
    assert parse_output("```json\n" + dumps(FULL) + "\n```") == (FULL, True)


def test_log_run_fence_with_blank_lines():
    assert parse_output("```\n\n" + dumps(FULL) + "\n\n```") == (FULL, True)


@pytest.mark.parametrize("text", [
    dumps(FULL),
    "  \n" + json.dumps(FULL, ensure_ascii=False, indent=2) + "\n",
    "```JSON\n" + dumps(FULL) + "\n```",
    "```json " + dumps(FULL) + "```",
])
def test_other_fences_and_no_fence(text):
    assert parse_output(text) == (FULL, True)


def test_chatter_before_and_after():
    text = "好的，以下是抽取结果：\n```json\n" + dumps(FULL) + "\n```\n希望对你有帮助！如有问题 {请} 告诉我。"
    assert parse_output(text) == (FULL, True)
    text = "Here's the result {as asked}: " + dumps(FULL) + " Let me know if you'd like changes."
    assert parse_output(text) == (FULL, True)


def test_object_with_the_keys_wins_over_an_earlier_object():
    text = 'Format: {"key": "value"}\n' + dumps(FULL)
    assert parse_output(text) == (FULL, True)


@pytest.mark.parametrize("wrap", [
    lambda f: {"result": f},
    lambda f: {"data": [f]},
    lambda f: {"status": "ok", "extraction": {"fields": f}},
])
def test_an_object_wrapped_in_another_is_found(wrap):
    """API models sometimes nest the answer; an outer object with none of the keys must not hide it."""
    assert parse_output("```json\n" + dumps(wrap(FULL)) + "\n```") == (FULL, True)
    assert parse_output('{"note": "none"} then ' + dumps(wrap(FULL))) == (FULL, True)
    too_deep = {"a": {"b": {"c": {"d": {"e": {"f": FULL}}}}}}
    assert parse_output(dumps(too_deep)) == (EMPTY, True)  # only a few levels down: this is no answer any more


def test_braces_and_quotes_inside_strings():
    fields = dict(FULL, 医疗建议="按说明书{每日三次}服用, it's fine")
    assert parse_output("```json\n" + dumps(fields) + "\n```") == (fields, True)
    assert parse_output(repr(fields)) == (fields, True)


def test_single_quoted_python_dict():
    assert parse_output(repr(FULL)) == (FULL, True)
    assert parse_output("```json\n" + str(FULL) + "\n```") == (FULL, True)
    # Python literals and a trailing comma are repaired too; nothing is ever executed
    assert parse_output("{'药品名称': ['阿莫西林',], '辅助检查': None, '现病史': '咳嗽',}") == (
        dict(EMPTY, 药品名称=["阿莫西林"], 现病史="咳嗽"), True)
    # JSON with a trailing comma and JSON constants needs both repairs; "null" inside a string stays text
    assert parse_output('{"药品名称": ["A"], "辅助检查": null, "现病史": "null, true",\n}') == (
        dict(EMPTY, 药品名称=["A"], 现病史="null, true"), True)
    assert parse_output("{'诊断结果': 'x', '药品名称': [false, true],}") == (
        dict(EMPTY, 诊断结果="x", 药品名称=["False", "True"]), True)


def test_raw_newline_inside_a_string():
    text = '{"现病史": "咳嗽三天\n夜间加重"}'
    assert parse_output(text) == (dict(EMPTY, 现病史="咳嗽三天\n夜间加重"), True)


@pytest.mark.parametrize("text", [
    "",
    "抱歉，我无法完成这个任务。",
    '```json\n{"药品名称": ["布洛芬"], "现病史": "发热两\n```',  # cut off mid-answer
    '{"药品名称": ["布洛芬"] "现病史": "发热"}',  # missing comma
    "{'药品名称': ['布洛芬'], '现病史': __import__('os').getcwd()}",  # code is never run
    '["布洛芬", "蒙脱石散"]',  # not an object
    "{'布洛芬', '蒙脱石散'}",  # a set literal is not an object
    "{{{{{{{{",
])
def test_invalid_gives_all_empty(text):
    fields, valid = parse_output(text)
    assert valid is False
    assert fields == EMPTY


def test_missing_keys_are_empty():
    assert parse_output('{"诊断结果": "支气管炎"}') == (dict(EMPTY, 诊断结果="支气管炎"), True)
    # an object without any of the keys is still a JSON object: valid, all empty
    assert parse_output('{"answer": "不知道"}') == (EMPTY, True)
    assert parse_output("{}") == (EMPTY, True)


def test_unknown_keys_are_dropped_and_keys_are_trimmed():
    fields, valid = parse_output('{" 药品名称 ": ["头孢"], "备注": "无"}')
    assert valid and fields == dict(EMPTY, 药品名称=["头孢"])
    assert list(fields) == list(EXTRACT_KEYS)


def test_wrong_types_are_normalised():
    text = dumps({
        "药品名称": "布洛芬",  # a string where a list belongs
        "药物类别": "",  # a blank string: nothing extracted
        "医疗检查": [1, None, "CT", 2.5, True],  # non-string items
        "医疗操作": None,
        "现病史": ["发热", "两天"],  # a list where a text belongs
        "辅助检查": 37.5,
        "诊断结果": None,
        "医疗建议": ["多休息", 3, "次"],
    })
    fields, valid = parse_output(text)
    assert valid
    assert fields == {
        "药品名称": ["布洛芬"], "药物类别": [], "医疗检查": ["1", "CT", "2.5", "True"], "医疗操作": [],
        "现病史": "发热两天", "辅助检查": "37.5", "诊断结果": "", "医疗建议": "多休息3次",
    }
    assert all(isinstance(fields[k], list) for k in LIST_KEYS)
    assert all(isinstance(fields[k], str) for k in TEXT_KEYS)


def test_nested_values_become_text():
    fields, valid = parse_output('{"医疗检查": [{"名称": "血常规"}], "辅助检查": {"体温": "38度"}}')
    assert valid
    assert fields["医疗检查"] == ['{"名称": "血常规"}']
    assert fields["辅助检查"] == '{"体温": "38度"}'


def test_returns_fresh_containers():
    a, _ = parse_output("no json here")
    a["药品名称"].append("x")
    b, _ = parse_output("no json here")
    assert b["药品名称"] == []


def test_reference_test_set_outputs_all_parse(reference_dir):
    import os

    from utils import iter_jsonl

    path = os.path.join(reference_dir, "book_test.json")
    count = 0
    for _, record in iter_jsonl(path):
        body = record["output"].strip()
        assert body.startswith("```json\n") and body.endswith("\n```")
        fields, valid = parse_output(record["output"])
        assert valid
        assert fields == json.loads(body[len("```json\n"):-len("\n```")])
        count += 1
    assert count == 50


DEEP = 1000  # brackets: about 500 tokens, within predict.py's default --max_tgt_len


@pytest.mark.parametrize("text", [
    "[" * DEEP + "]" * DEEP,
    "{" * DEEP + "}" * DEEP,
    '{"a": ' * DEEP + "1" + "}" * DEEP,
    "{'a': " * DEEP + "1" + "}" * DEEP,  # the Python-literal fallback
    '{"药品名称": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"x": ' + '{"y": ' * DEEP + "1" + "}" * DEEP + ', "现病史": "a"}',
    '```json\n{"药品名称": ["' + "{[" * DEEP + '"]}\n```',  # inside a string: nothing nests
])
def test_degenerate_nesting_is_an_answer_or_invalid_never_an_error(text):
    fields, valid = parse_output(text)
    assert set(fields) == set(EXTRACT_KEYS) and isinstance(valid, bool)


def test_nesting_near_the_limit_never_raises_whatever_the_stack_depth():
    """How deep json can nest depends on how deep in a program the parser is called: from every depth here the
    answer is parsed whole, or with the nested field empty (read, but too deep to write back as text), or invalid."""
    text = '{"药品名称": ' + "[" * 700 + "]" * 700 + ', "现病史": "发热"}'

    def nested(depth: int):
        return nested(depth - 1) if depth else parse_output(text)

    outcomes = set()
    for depth in range(0, 400, 3):
        fields, valid = nested(depth)
        outcomes.add((valid, fields["现病史"]))
        assert fields["药品名称"] in ([], ["[" * 699 + "]" * 699], [""])
    assert (True, "发热") in outcomes and (False, "") in outcomes


@pytest.mark.parametrize("text", ['{"药品名称": ["\ud800布洛芬"], "现病史": "\udc00"}', "{'药品名称': ['\ud800'],}",
                                  '{"药品名称": ["\\ud800"]}'])
def test_a_lone_surrogate_is_an_answer_or_invalid_never_an_error(text):
    fields, valid = parse_output(text)
    assert set(fields) == set(EXTRACT_KEYS)
    if valid:
        assert fields["药品名称"][0].startswith("\ud800")


def test_a_repeated_list_item_is_kept_once_in_order():
    fields, valid = parse_output('```json\n{"药品名称": ["布洛芬", "头孢", "布洛芬"], "现病史": "咳嗽"}\n```')
    assert valid and fields["药品名称"] == ["布洛芬", "头孢"]

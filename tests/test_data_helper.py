"""data_helper.py: seeded split, the exact sample format, and clear failures that leave no files behind."""
import json
import os
import random

import pytest

import data_helper
from utils import EXTRACT_KEYS, INSTRUCTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract(i: int) -> dict:
    return {
        "药品名称": [f"药{i}", "布洛芬"], "药物类别": ["退烧药"], "医疗检查": [], "医疗操作": ["雾化"] if i % 2 else [],
        "现病史": f"患儿咳嗽{i}天。", "辅助检查": "", "诊断结果": "上呼吸道感染", "医疗建议": "多饮水",
    }


def records(n: int = 12) -> list[dict]:
    return [{"dialogue_text": f"医生: 第{i}位，哪里不舒服？\n患者: 孩子咳嗽{i}天，吃了退烧药：药{i}和布洛芬，还做了雾化\n",
             "extract_text": extract(i)} for i in range(n)]


def run(tmp_path, data, *extra: str, raw: str | None = None) -> tuple:
    """Write all.json into tmp_path, run main, and return (train lines, test lines)."""
    all_path = tmp_path / "all.json"
    all_path.write_text(raw if raw is not None else json.dumps(data, ensure_ascii=False), encoding="utf-8")
    data_helper.main(["--all_path", str(all_path), "--train_path", str(tmp_path / "train.json"),
                      "--test_path", str(tmp_path / "test.json"), *extra])
    return ((tmp_path / "train.json").read_text(encoding="utf-8").splitlines(),
            (tmp_path / "test.json").read_text(encoding="utf-8").splitlines())


def fence_json(output: str) -> dict:
    assert output.startswith("```json\n") and output.endswith("\n```")
    return json.loads(output[len("```json\n"):-len("\n```")])


def test_sample_format(tmp_path):
    train, test = run(tmp_path, records(12), "--test_size", "3")
    assert (len(train), len(test)) == (9, 3)
    raw = (tmp_path / "test.json").read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\\u" not in raw  # JSON Lines, non-ASCII unescaped
    by_input = {r["dialogue_text"]: r["extract_text"] for r in records(12)}
    for line in train + test:
        sample = json.loads(line)
        assert list(sample) == ["instruction", "input", "output"]
        assert sample["instruction"] == INSTRUCTION
        parsed = fence_json(sample["output"])
        assert list(parsed) == list(EXTRACT_KEYS) and parsed == by_input[sample["input"]]
        assert line == json.dumps(sample, ensure_ascii=False)
    assert {json.loads(x)["input"] for x in train + test} == set(by_input)  # disjoint and complete


def test_output_matches_the_chapters_layout():
    sample = data_helper.build_samples([{"dialogue_text": "医生: 你好\n", "extract_text": extract(1)}], "x")[0]
    assert sample["output"] == (
        '```json\n{"药品名称": ["药1", "布洛芬"], "药物类别": ["退烧药"], "医疗检查": [], "医疗操作": ["雾化"], '
        '"现病史": "患儿咳嗽1天。", "辅助检查": "", "诊断结果": "上呼吸道感染", "医疗建议": "多饮水"}\n```')


def test_same_seed_same_bytes(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        run(tmp_path / sub, records(20), "--test_size", "5", "--seed", "3")
    for name in ("train.json", "test.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_rerun_leaves_an_unchanged_split_untouched(tmp_path):
    """Same input and seed: the files keep their timestamps (so `make` does not retrain the demo); another seed
    rewrites them."""
    import os

    run(tmp_path, records(20), "--test_size", "5", "--seed", "3")
    for name in ("train.json", "test.json"):
        os.utime(tmp_path / name, ns=(1, 1))
    run(tmp_path, records(20), "--test_size", "5", "--seed", "3")
    assert [os.stat(tmp_path / n).st_mtime_ns for n in ("train.json", "test.json")] == [1, 1]
    run(tmp_path, records(20), "--test_size", "5", "--seed", "4")
    assert all(os.stat(tmp_path / n).st_mtime_ns > 1 for n in ("train.json", "test.json"))


def test_different_seed_different_split(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, test_a = run(tmp_path / "a", records(30), "--test_size", "5", "--seed", "1")
    _, test_b = run(tmp_path / "b", records(30), "--test_size", "5", "--seed", "2")
    assert test_a != test_b


def test_split_is_a_seeded_shuffle_of_indices():
    samples = [{"i": i} for i in range(10)]
    train, test = data_helper.split_samples(samples, 4, seed=5)
    order = list(range(10))
    random.Random(5).shuffle(order)
    assert [s["i"] for s in test] == order[:4] and [s["i"] for s in train] == order[4:]


def test_extract_as_dict_json_string_or_repr_give_identical_files(tmp_path):
    base = records(10)
    base[3]["extract_text"]["医疗建议"] = "遵循\"少量多次\"，别用'偏方'"
    outputs = []
    for form, convert in (("dict", lambda e: e), ("json", lambda e: json.dumps(e, ensure_ascii=False)),
                          ("repr", repr)):
        d = tmp_path / form
        d.mkdir()
        data = [{"dialogue_text": r["dialogue_text"], "extract_text": convert(r["extract_text"])} for r in base]
        run(d, data, "--test_size", "2")
        outputs.append(((d / "train.json").read_bytes(), (d / "test.json").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_python_literals_and_quotes_survive():
    literal = ("{'药品名称': [\"Children's Motrin\"], '药物类别': [], '医疗检查': [], '医疗操作': [], "
               "'现病史': '自述\\'嗓子里像有东西\\'', '辅助检查': '', '诊断结果': '咽炎', "
               "'医疗建议': '记住\"少量多次\"'}")
    sample = data_helper.build_samples([{"dialogue_text": "医生: 你好\n", "extract_text": literal}], "x")[0]
    parsed = fence_json(sample["output"])
    assert parsed["药品名称"] == ["Children's Motrin"]
    assert parsed["现病史"] == "自述'嗓子里像有东西'"
    assert parsed["医疗建议"] == '记住"少量多次"'


def test_list_fields_are_deduplicated():
    e = extract(1)
    e["药品名称"] = ["布洛芬", "美林", "布洛芬"]
    sample = data_helper.build_samples([{"dialogue_text": "医生: 你好\n", "extract_text": e}], "x")[0]
    assert fence_json(sample["output"])["药品名称"] == ["布洛芬", "美林"]


def test_a_repeated_dialogue_is_kept_once_so_no_test_dialogue_was_trained_on(tmp_path, capsys):
    data = records(12)
    # records 12, 13, 14: the same dialogue, the same with other labels, and the same but for white space
    data += [dict(data[3]), dict(data[3], extract_text=extract(99)),
             dict(data[7], dialogue_text=data[7]["dialogue_text"].replace("\n", " \n", 1) + "  ")]
    train, test = run(tmp_path, data, "--test_size", "4")
    inputs = [json.loads(line)["input"] for line in train + test]
    assert len(inputs) == 12 and sorted(inputs) == sorted(r["dialogue_text"] for r in records(12))
    kept = next(json.loads(line) for line in train + test if json.loads(line)["input"] == data[3]["dialogue_text"])
    assert fence_json(kept["output"]) == extract(3)  # the first record of a repeated dialogue is the one kept
    out = capsys.readouterr().out
    assert "dropped 3 records whose dialogue repeats an earlier record's (records 12, 13, 14)" in out
    assert "warning: 1 of the dropped records had other labels than the record kept (records 13)" in out
    assert "read 15 records" in out


def test_items_not_copied_from_the_dialogue_are_named(tmp_path, capsys):
    data = records(6)
    data[2]["extract_text"]["药品名称"] = ["布洛芬混悬液"]  # the dialogue says 布洛芬
    run(tmp_path, data, "--test_size", "2")
    assert "1 records list an item that does not occur verbatim in their dialogue (records 2)" in capsys.readouterr().out


def test_a_byte_order_mark_is_accepted(tmp_path):
    train, test = run(tmp_path, None, "--test_size", "2", raw="\ufeff" + json.dumps(records(6), ensure_ascii=False))
    assert len(train) + len(test) == 6


def test_a_failed_write_leaves_both_old_files(tmp_path, monkeypatch):
    """train.json and test.json are replaced together or not at all: a new train split beside an old test split
    could share dialogues."""
    run(tmp_path, records(12), "--test_size", "4", "--seed", "1")
    before = [(tmp_path / n).read_bytes() for n in ("train.json", "test.json")]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".tmp-test.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(data_helper.os, "replace", replace)
    with pytest.raises(SystemExit, match=r"cannot write --train_path .*\(No space left on device\); neither was "):
        run(tmp_path, records(12), "--test_size", "4", "--seed", "2")
    assert [(tmp_path / n).read_bytes() for n in ("train.json", "test.json")] == before
    assert sorted(os.listdir(tmp_path)) == ["all.json", "test.json", "train.json"]


def _with(index: int, **changes) -> list:
    data = records(6)
    data[index] = {**data[index], **changes}
    return data


def _drop(index: int, key: str) -> list:
    data = records(6)
    del data[index][key]
    return data


def _extract_with(index: int, key: str, value) -> list:
    data = records(6)
    if value is _MISSING:
        del data[index]["extract_text"][key]
    else:
        data[index]["extract_text"][key] = value
    return data


_MISSING = object()

BAD_INPUTS = {
    "not json": (None, '[{"dialogue_text": "x"', ["not valid JSON"]),
    "not an array": ({"dialogue_text": "x"}, None, ["expected a JSON array"]),
    "record not an object": ([*records(2), "text"], None, ["record 2", "expected an object"]),
    "missing dialogue": (_drop(4, "dialogue_text"), None, ["record 4", "missing 'dialogue_text'"]),
    "dialogue not a string": (_with(1, dialogue_text=["医生: 你好"]), None, ["record 1", "must be a string"]),
    "empty dialogue": (_with(0, dialogue_text="  \n"), None, ["record 0", "'dialogue_text' is empty"]),
    "missing extract": (_drop(3, "extract_text"), None, ["record 3", "missing 'extract_text'"]),
    "extract unparseable": (_with(2, extract_text="{'药品名称': [}"), None,
                            ["record 2", "neither JSON nor a Python literal"]),
    "extract not an object": (_with(2, extract_text="[1, 2]"), None, ["record 2", "must be an object"]),
    "extract missing key": (_extract_with(5, "诊断结果", _MISSING), None, ["record 5", "missing key(s) 诊断结果"]),
    "extract unknown key": (_extract_with(5, "药品", []), None, ["record 5", "unknown key(s) 药品"]),
    "list field not a list": (_extract_with(1, "医疗检查", "血常规"), None,
                              ["record 1", "'医疗检查'", "list of strings"]),
    "list item not a string": (_extract_with(1, "药物类别", ["退烧药", 3]), None, ["record 1", "list of strings"]),
    "text field not a string": (_extract_with(4, "辅助检查", None), None,
                                ["record 4", "'辅助检查'", "must be a string"]),
    "test_size too large": (records(6), None, ["--test_size 50", "(6)"]),
    "empty array": ([], None, ["the array holds no records"]),
    "empty file": (None, " \n", ["the file is empty"]),
    "a split given as all.json": (None, '{"instruction": "x", "input": "y", "output": "z"}\n{"instruction": "x"}\n',
                                  ["Extra data at line 2", "looks like JSON Lines", "takes the JSON array"]),
    "blank list item": (_extract_with(3, "医疗操作", ["雾化", " "]), None, ["record 3", "'医疗操作'", "empty item"]),
    # degenerate input: nesting past json's recursion limit, and \ud800 escapes (half a surrogate pair, which no
    # UTF-8 file can hold) that used to crash the write after every check had passed
    "extract string nested 1000 deep": (_with(2, extract_text='{"药品名称": ' + "[" * 1000 + "]" * 1000 + "}"), None,
                                        ["record 2", "extract_text is a string nested too deeply"]),
    "list field nested 990 deep": (None, json.dumps(_extract_with(2, "药品名称", "DEEP")).replace(
        '"DEEP"', "[" * 990 + "]" * 990), ["data_helper: error:"]),
    "all.json nested 5000 deep": (None, "[" * 5000 + "]" * 5000, ["nested too deeply"]),
    "lone surrogate in a dialogue": (None, json.dumps(_with(4, dialogue_text="咳嗽\ud800")),
                                     ["record 4", "'dialogue_text' holds a lone surrogate (\\ud800 at character 2)"]),
    "lone surrogate in a list item": (None, json.dumps(_extract_with(1, "药品名称", ["布洛芬", "\udfff"])),
                                      ["record 1", "extract_text['药品名称'] holds a lone surrogate"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys, case):
    data, raw, needles = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, data, raw=raw)
    # a string exit code is printed to stderr and gives exit status 1
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("data_helper: error:")
    if not needles[0].startswith("--test_size"):
        assert str(tmp_path / "all.json") in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert sorted(os.listdir(tmp_path)) == ["all.json"]  # no output, no temporary file


def test_missing_input_file(tmp_path):
    with pytest.raises(SystemExit) as exc:
        data_helper.main(["--all_path", str(tmp_path / "nope.json"), "--train_path", str(tmp_path / "t.json"),
                          "--test_path", str(tmp_path / "v.json")])
    assert "nope.json" in str(exc.value.code) and "cannot read" in str(exc.value.code)
    assert os.listdir(tmp_path) == []


def test_same_path_twice_is_refused(tmp_path):
    (tmp_path / "all.json").write_text(json.dumps(records(6)), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        data_helper.main(["--all_path", str(tmp_path / "all.json"), "--train_path", str(tmp_path / "x.json"),
                          "--test_path", str(tmp_path / "x.json"), "--test_size", "2"])
    assert "three different files" in str(exc.value.code)
    assert os.listdir(tmp_path) == ["all.json"]


def test_shipped_all_json_converts(tmp_path):
    shipped = os.path.join(ROOT, "data", "all.json")
    if not os.path.exists(shipped):
        pytest.skip("data/all.json is absent")
    train, test = run(tmp_path, None, raw=open(shipped, encoding="utf-8").read())
    assert (len(train), len(test)) == (2450, 50)
    for line in test:
        fence_json(json.loads(line)["output"])

"""data/make_dialogues.py: byte-reproducible, and every record has the shape of the chapter's data."""
import json
import os
import random

import pytest

from data import make_dialogues as md
from utils import EXTRACT_KEYS, LIST_KEYS, TEXT_KEYS, format_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "data", "all.json")


def check_record(record: dict) -> None:
    """The invariants every record must satisfy; raises AssertionError naming the first one broken."""
    assert list(record) == ["dialogue_text", "extract_text"]
    text, extract = record["dialogue_text"], record["extract_text"]
    assert isinstance(text, str) and text.endswith("\n") and "\r" not in text
    lines = text[:-1].split("\n")
    assert lines[0].startswith("医生: ")
    for line in lines:
        assert line.startswith(("医生: ", "患者: ")) and len(line) > 4, line
    assert 20 <= len(lines) <= 70, len(lines)
    assert 300 <= len(text) <= 1300, len(text)
    assert list(extract) == list(EXTRACT_KEYS)
    for key in LIST_KEYS:
        items = extract[key]
        assert isinstance(items, list) and all(isinstance(x, str) and x for x in items), (key, items)
        assert len(set(items)) == len(items), (key, items)
        for item in items:
            assert item in text, (key, item)
    for key in TEXT_KEYS:
        assert isinstance(extract[key], str), key
    for key in ("现病史", "诊断结果", "医疗建议"):
        assert extract[key], key
    output = format_output(extract)
    assert 150 <= len(output) <= 310, len(output)
    assert json.loads(output[len("```json\n"):-len("\n```")]) == extract
    # nothing in the inventories occurs in the dialogue without being extracted
    assert md.unlisted_spans(text, {k: extract[k] for k in LIST_KEYS}) == []
    # the summary states the sex only where the patient said it, and an adult's dialogue has no child's wording
    if extract["现病史"].startswith(("患者男，", "患者女，")):
        assert ("男的" if extract["现病史"][2] == "男" else "女的") in text
    if "患儿" not in extract["现病史"]:
        assert not [said for said, _ in md.BABY_WORDING + md.CHILD_WORDING if said in text]


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    md.main(["--output", str(a), "--num_records", "30", "--seed", "7"])
    md.main(["--output", str(b), "--num_records", "30", "--seed", "7"])
    assert a.read_bytes() == b.read_bytes()
    records = json.loads(a.read_text(encoding="utf-8"))
    assert len(records) == 30
    for record in records:
        check_record(record)


def test_different_seed_different_data():
    assert md.generate(5, 1) != md.generate(5, 2)


def test_shorter_run_is_a_prefix():
    assert md.generate(3, 11) == md.generate(6, 11)[:3]


def test_many_generated_records_hold_the_invariants():
    for record in md.generate(120, 99):
        check_record(record)


def test_wording_fits_the_age():
    builder = md.Builder(random.Random(0))
    line = "宝宝吐奶两天了，不爱玩，老揪耳朵"
    builder.child, builder.infant = True, True
    assert builder.fit(line) == line
    builder.infant = False
    assert builder.fit(line) == "宝宝呕吐两天了，不爱玩，老揪耳朵"
    builder.child = False
    assert builder.fit(line) == "宝宝呕吐两天了，没劲，耳朵胀"


def test_unlisted_spans():
    text = "医生: 可以雾化吸入，布洛芬混悬液一次5毫升\n"
    assert md.unlisted_spans(text, {"药品名称": ["布洛芬混悬液"], "医疗操作": ["雾化吸入"]}) == []
    # 雾化 is listed but 雾化吸入 is a longer span of its own
    assert md.unlisted_spans(text, {"药品名称": ["布洛芬混悬液"], "医疗操作": ["雾化"]}) == ["雾化吸入"]
    assert md.unlisted_spans(text, {"医疗操作": ["雾化吸入"]}) == ["布洛芬", "布洛芬混悬液"]


def test_vocabulary_is_large_and_consistent():
    drugs = {d.name for ds in md.DRUG_TABLE.values() for d in ds}
    assert len(drugs) >= 250
    assert len(md.EXAMS) >= 40 and len(md.OPERATIONS) >= 30 and len(md.CONDITIONS) >= 35
    for key in md.DRUGS:
        assert key.split(":")[0] in md.CATEGORY_TERMS, key
    for group in md.GROUPS.values():
        assert all(k in md.DRUGS for k in group.drugs)
        assert all(e in md.EXAMS for e in group.exams)
        assert all(o in md.OPERATIONS for o in group.ops)
        assert all(s in md.SYMPTOMS for s in group.negatives)
    for condition in md.CONDITIONS:
        assert condition.group in md.GROUPS and all(s in md.SYMPTOMS for s in condition.symptoms)


def test_bad_num_records():
    with pytest.raises(SystemExit):
        md.parse_args(["--num_records", "0"])


@pytest.fixture(scope="module")
def shipped():
    if not os.path.exists(SHIPPED):
        pytest.skip("data/all.json is absent")
    with open(SHIPPED, encoding="utf-8") as f:
        return json.load(f)


def test_shipped_data_is_what_the_script_writes(shipped):
    assert len(shipped) == 2500
    with open(SHIPPED, encoding="utf-8") as f:
        head = f.read(200_000).split("\n")
    # one record per line, records 0..19 exactly as generated with the default seed
    expected = md.dumps_records(md.generate(20, 1234)).split("\n")
    assert head[:20] == expected[:20] and head[20] == expected[20] + ","


def test_shipped_data_invariants_and_proportions(shipped):
    for record in shipped:
        check_record(record)
    n = len(shipped)
    share = {k: sum(1 for r in shipped if r["extract_text"][k]) / n for k in EXTRACT_KEYS}
    targets = {"药品名称": 0.78, "药物类别": 0.74, "医疗检查": 0.76, "医疗操作": 0.52, "辅助检查": 0.50}
    for key, target in targets.items():
        assert abs(share[key] - target) < 0.04, (key, share[key])
    for key in ("现病史", "诊断结果", "医疗建议"):
        assert share[key] == 1.0
    mean_chars = sum(len(r["dialogue_text"]) for r in shipped) / n
    assert 680 <= mean_chars <= 820, mean_chars
    children = sum(1 for r in shipped if "患儿" in r["extract_text"]["现病史"]) / n
    assert 0.5 <= children <= 0.75, children
    quoted = sum(1 for r in shipped if any(c in r["extract_text"][k] for k in TEXT_KEYS for c in "'\"")) / n
    assert 0.003 <= quoted <= 0.03, quoted
    # many distinct dialogues and summaries, not a handful of templates
    assert len({r["dialogue_text"] for r in shipped}) == n
    assert len({r["extract_text"]["现病史"] for r in shipped}) > 0.9 * n

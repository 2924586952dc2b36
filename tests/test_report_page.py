"""evaluate.py --html in a real headless browser (Debian's chromium): for predictions with known hits, extras and
misses, the page holds one item element per item and verdict, as many as the report counts; every mark in a
dialogue sits at its offsets; text fields show the LCS the metric counts; worst dialogues come first; nothing is
fetched from anywhere."""
import json
import os

import pytest

import evaluate as ev
from medextract import metrics
from medextract.report import text_diff, verdict_items
from utils import INSTRUCTION, LIST_KEYS, TEXT_KEYS, format_output

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

DIALOGUES = [
    "患者：孩子咳嗽三天，吃了布洛芬和阿莫西林。\n医生：查个血常规，再做雾化。\n",
    "医生：哪里不舒服？\n患者：胃疼，吃了奥美拉唑。\n医生：做个胃镜，少吃辣。\n",
    "患者：发烧了，体温三十九度。\n医生：先吃对乙酰氨基酚，多喝水。\n",
]
GOLD = [
    {"药品名称": ["布洛芬", "阿莫西林"], "药物类别": [], "医疗检查": ["血常规"], "医疗操作": ["雾化"],
     "现病史": "咳嗽三天", "辅助检查": "", "诊断结果": "支气管炎", "医疗建议": "雾化治疗"},
    {"药品名称": ["奥美拉唑"], "药物类别": [], "医疗检查": ["胃镜"], "医疗操作": [],
     "现病史": "胃疼", "辅助检查": "", "诊断结果": "胃炎", "医疗建议": "少吃辣"},
    {"药品名称": ["对乙酰氨基酚"], "药物类别": [], "医疗检查": [], "医疗操作": [],
     "现病史": "发热，体温三十九度", "辅助检查": "", "诊断结果": "发热", "医疗建议": "多喝水"},
]
PRED = [
    # a miss (阿莫西林), an extra that is in the dialogue (咳嗽), an extra that is not (头孢)
    {"药品名称": ["布洛芬", "头孢"], "药物类别": [], "医疗检查": ["血常规", "咳嗽"], "医疗操作": ["雾化"],
     "现病史": "咳嗽3天", "辅助检查": "", "诊断结果": "支气管炎", "医疗建议": "雾化"},
    # all right
    GOLD[1],
    # overlapping extras: 乙酰氨基酚 inside 对乙酰氨基酚 (hit)
    {"药品名称": ["对乙酰氨基酚", "乙酰氨基酚"], "药物类别": [], "医疗检查": ["体温"], "医疗操作": [],
     "现病史": "发烧", "辅助检查": "", "诊断结果": "", "医疗建议": "多喝水"},
]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    gold, pred, worse = d / "test.json", d / "pred.jsonl", d / "worse.jsonl"
    write_lines(gold, [{"instruction": INSTRUCTION, "input": x, "output": format_output(g)}
                       for x, g in zip(DIALOGUES, GOLD)])
    write_lines(pred, [{"id": i, "output": format_output(p), "truncated": i == 2} for i, p in enumerate(PRED)])
    write_lines(worse, [{"id": i, "output": "no JSON here"} for i in range(len(DIALOGUES))])
    assert ev.main(["--gold", str(gold), "--pred", str(pred), "--report", str(d / "report.json"),
                    "--html", str(d / "report.html")]) == 0
    assert ev.main(["--gold", str(gold), "--pred", str(pred), str(worse), "--html", str(d / "both.html")]) == 0
    report = json.loads((d / "report.json").read_text(encoding="utf-8"))
    return d, report


def test_verdicts_and_counts_without_a_browser(page):
    _, report = page
    expected = {k: {"hit": 0, "extra": 0, "missed": 0} for k in LIST_KEYS}
    for p, g in zip(PRED, GOLD):
        for key in LIST_KEYS:
            for verdict, items in verdict_items(p[key], g[key]).items():
                expected[key][verdict] += len(items)
    assert report["counts"] == expected
    assert expected["药品名称"] == {"hit": 3, "extra": 2, "missed": 1}


def test_text_diff_marks_outside_the_lcs():
    gold, pred = text_diff("咳嗽三天", "咳嗽3天")
    assert gold == "咳嗽<del>三</del>天" and pred == "咳嗽<ins>3</ins>天"
    assert text_diff("<a>", "") == ("<del>&lt;a&gt;</del>", "")
    for a, b in (("发热，体温三十九度", "发烧"), ("abcbdab", "bdcaba"), ("", "x")):
        in_a, in_b = metrics.lcs_alignment(a, b)
        assert sum(in_a) == sum(in_b) == metrics.lcs_length(a, b)
        assert [c for c, k in zip(a, in_a) if k] == [c for c, k in zip(b, in_b) if k]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_in_a_real_browser(page, browser):
    from selenium.webdriver.common.by import By

    d, report = page
    browser.get((d / "report.html").as_uri())
    # one item element per item and verdict, as many as the report counts
    for key in LIST_KEYS:
        for verdict in ("hit", "extra", "missed"):
            shown = browser.find_elements(By.CSS_SELECTOR, f'.item[data-field="{key}"][data-verdict="{verdict}"]')
            assert len(shown) == report["counts"][key][verdict], (key, verdict)
    # every mark sits at its offsets: the dialogue's text before it is the dialogue up to data-start
    texts = browser.execute_script("""
        return [...document.querySelectorAll('article.dialogue')].map(article => {
          const pre = article.querySelector('pre.text'); let at = 0; const marks = [];
          for (const node of pre.childNodes) {
            if (node.nodeName === 'MARK') marks.push([at, Number(node.dataset.start), Number(node.dataset.end),
                                                      node.textContent, node.dataset.mark]);
            at += node.textContent.length;
          }
          return [Number(article.dataset.id), pre.textContent, marks];
        });""")
    assert sorted(t[0] for t in texts) == [0, 1, 2]
    marked = 0
    for gold_id, text, marks in texts:
        assert text == DIALOGUES[gold_id]  # marks wrap spans; nothing added or lost
        for at, start, end, content, verdict in marks:
            assert at == start and DIALOGUES[gold_id][start:end] == content and verdict in ("hit", "extra", "missed")
            marked += 1
    assert marked >= 8
    # the extra 头孢 is not in the dialogue: listed, not marked
    first = browser.find_element(By.CSS_SELECTOR, 'article[data-id="0"]')
    assert "头孢" in [e.text for e in first.find_elements(By.CSS_SELECTOR, '.item[data-verdict="extra"]')]
    assert "头孢" not in [m[3] for t in texts if t[0] == 0 for m in t[2]]
    # text fields: the gold and predicted characters outside the LCS are marked
    row = first.find_element(By.CSS_SELECTOR, 'tr[data-field="现病史"]')
    assert row.find_element(By.CSS_SELECTOR, ".gold del").text == "三"
    assert row.find_element(By.CSS_SELECTOR, ".pred ins").text == "3"
    # worst first; the button orders by id
    order = [(float(a.get_attribute("data-f1")), int(a.get_attribute("data-id")))
             for a in browser.find_elements(By.CSS_SELECTOR, "article.dialogue")]
    assert order == sorted(order) and order[-1][1] == 1  # dialogue 1 is answered perfectly
    browser.find_element(By.CSS_SELECTOR, '#order button[data-order="id"]').click()
    assert [a.get_attribute("data-id") for a in browser.find_elements(By.CSS_SELECTOR, "article.dialogue")] == \
        ["0", "1", "2"]
    # nothing is fetched: no resource beyond the page itself
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    html = (d / "report.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html


def test_several_files_give_one_column_each(page, browser):
    from selenium.webdriver.common.by import By

    d, _ = page
    browser.get((d / "both.html").as_uri())
    for article in browser.find_elements(By.CSS_SELECTOR, "article.dialogue"):
        columns = article.find_elements(By.CSS_SELECTOR, ".column")
        assert [c.get_attribute("data-file") for c in columns] == ["0", "1"]
        # the file without JSON extracts nothing: gold items are all missed there
        assert not columns[1].find_elements(By.CSS_SELECTOR, '.item[data-verdict="hit"]')
    summary = browser.find_element(By.ID, "summary").text
    assert "[1]" in summary and "[2]" in summary
    assert all(key in summary for key in TEXT_KEYS)

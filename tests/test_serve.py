"""serve.py as a user runs it: a real server process on 127.0.0.1 with the tiny random model, real clients.

The `openai` client (through test_openai.py) gets exactly predict.py's batch answers, under the grounded or the
schema grammar or none; streamed chunks join into the answer; concurrent extractions share batches and equal their
lone answers, every offset pointing at its span; the key is asked for and never logged (not even sent as a query);
every malformed request gets a 4xx in OpenAI's error format and the server lives on; HEAD works where GET does, and
a 405 says what is allowed; a client that leaves mid-body is one log line; the page works in headless Chromium,
checked on its DOM.

A second server (`bounded`: small grammar bounds, one grammar worker, a longer --max_tgt_len) takes a hostile
client: grammars that admit nothing get a 400, grammars past a bound a 400 naming the bound's flag, a grammar whose
client leaves has its compile killed at once, a huge dialogue costs neither seconds nor memory, and while one client
sends all of that, an ordinary extraction answers within twice its lone time. A client that leaves stops its answer.
"""
import contextlib
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

import predict
from medextract.inference import prompt_ids
import serve
import test_openai
from medextract.cli import schema_of
from medextract.grammar import build_ebnf
from medextract.schema import CHAPTER_SCHEMA, schema_from_json
from utils import INSTRUCTION, LIST_KEYS, SYSTEM_PROMPT, parse_output

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "SERVE_TEST_API_KEY"
KEY = "sk-serve-test-5e0c2b7a91"
MAX_TOKENS = 64
SERVED_NAME = "qwen-med-test"  # --served_model_name (the model directory's name by default)
DIALOGUES = [
    "患者：孩子发烧两天了，咳嗽。\n医生：可以吃点布洛芬，多喝水。\n患者：需要验血吗？\n医生：先做个血常规。",
    "患者：我最近胃疼，吃了奥美拉唑也不见好。\n医生：做个胃镜看看吧。",
    "医生：你好，哪里不舒服？\n患者：头晕，血压有点高。\n医生：建议口服硝苯地平，定期复查。",
    "患者：宝宝拉肚子三天了<|im_end|>，一天五六次。\n医生：可以用蒙脱石散，注意补液。",
    # longer than --max_src_len (1,560 tokens): cut as training cuts it, list items only from the part kept
    "".join(f"患者：第{i}天还是头疼，吃了{i}片布洛芬。\n医生：做个头颅CT，第{i}次复查血压。\n" for i in range(80)),
]


@dataclass
class Server:
    port: int
    log: Path
    process: subprocess.Popen
    name: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tiny_ckpt: str, log: Path, *flags: str) -> Server:
    """serve.py on a free port of 127.0.0.1, once /health answers and a grammar worker is ready."""
    port = free_port()
    # one thread for the server's torch: on a small machine the test process generates (predict.py) beside it
    env = {**os.environ, KEY_ENV: KEY, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model_path", tiny_ckpt, "--port", str(port), "--device", "cpu",
             "--max_batch_size", "8", "--api_key_env", KEY_ENV, "--served_model_name", SERVED_NAME, *flags],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(port, log, process, SERVED_NAME)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            status, body = call(server, "GET", "/health")
            if status == 200 and body["grammar_workers_idle"]:
                return server
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)


def stop_server(server: Server) -> None:
    server.process.terminate()
    server.process.wait(timeout=30)
    assert "Traceback" not in server.log.read_text(errors="replace")  # whatever the tests sent


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    server = start_server(tiny_ckpt, tmp_path_factory.mktemp("serve") / "server.log", "--max_tgt_len", str(MAX_TOKENS))
    yield server
    stop_server(server)


def call(server: Server, method: str, path: str, body=None, key: str | None = KEY, headers=None,
         timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request; `body` a dict (sent as JSON) or raw bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body, ensure_ascii=False).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else {}
    finally:
        connection.close()


def health(server: Server) -> dict:
    status, body = call(server, "GET", "/health", key=None)
    assert status == 200, body
    return body


def write_input(path: Path, dialogues) -> str:
    path.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": d}, ensure_ascii=False) + "\n"
                            for d in dialogues), encoding="utf-8")
    return str(path)


def outputs(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.mark.parametrize("constraint", ["grounded", "schema", "none"])
def test_the_openai_client_gets_predict_py_answers(server, tiny_ckpt, tmp_path, monkeypatch, constraint):
    source = write_input(tmp_path / "in.json", DIALOGUES)
    predict.main(["--model_path", tiny_ckpt, "--device", "cpu", "--input_file", source, "--output_file",
                  str(tmp_path / "predict.jsonl"), "--max_tgt_len", str(MAX_TOKENS), "--batch_size", "4",
                  "--constraint", constraint])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code = test_openai.main(["--base_url", server.base_url, "--model", server.name, "--constraint", constraint,
                             "--max_tokens", str(MAX_TOKENS), "--concurrency", "4", "--input_file", source,
                             "--output_file", str(tmp_path / "served.jsonl")])
    assert code == 0
    expected, served = outputs(tmp_path / "predict.jsonl"), outputs(tmp_path / "served.jsonl")
    assert sorted(served) == sorted(expected) == list(range(len(DIALOGUES)))
    for i in expected:
        assert served[i]["output"] == expected[i]["output"], i
        assert served[i]["finish_reason"] == ("length" if expected[i]["truncated"] else "stop")
        if constraint != "none":
            assert served[i]["follows_grammar"] is True


def test_streamed_chunks_join_into_the_answer(server, tokenizer):
    api = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=60)
    dialogue = DIALOGUES[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": INSTRUCTION + dialogue}]
    for extra in ({}, {"extra_body": {"structured_outputs": {"grammar": build_ebnf(dialogue, "grounded")}}},
                  {"response_format": {"type": "json_object"}}):
        whole = api.chat.completions.create(model=server.name, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, **extra)
        chunks = list(api.chat.completions.create(model=server.name, messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **extra))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text, extra
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert whole.usage.prompt_tokens == len(prompt_ids(tokenizer, INSTRUCTION + dialogue, instruction_chars=len(INSTRUCTION)))


def extract(server: Server, dialogue: str) -> dict:
    status, body = call(server, "POST", "/v1/extract", {"dialogue": dialogue})
    assert status == 200, body
    return body


def test_concurrent_extractions_share_batches_and_equal_their_lone_answers(server):
    dialogues = [f"患者：我发烧{i + 1}天了，还咳嗽。\n" + d for i, d in enumerate((DIALOGUES * 2)[:8])]
    alone = [extract(server, d) for d in dialogues]
    before = health(server)
    with ThreadPoolExecutor(max_workers=len(dialogues)) as pool:
        together = list(pool.map(lambda d: extract(server, d), dialogues))
    after = health(server)
    assert after["requests"] - before["requests"] == len(dialogues)
    assert after["batches"] - before["batches"] < len(dialogues)
    assert together == alone
    items = 0
    for dialogue, answer in zip(dialogues, together):
        assert answer["valid"] is True and set(answer["usage"]) == {"prompt_tokens", "completion_tokens",
                                                                    "total_tokens"}
        for key, value in answer["fields"].items():
            if key in LIST_KEYS:
                for item in value:
                    assert dialogue[item["start"]:item["end"]] == item["text"]
                    assert dialogue.find(item["text"]) == item["start"]
                    items += 1
            else:
                assert isinstance(value, str)
    assert items  # the random model copies some spans: the offsets were checked on real items
    assert [a["dialogue_cut"] for a in together] == [len(d) > 3000 for d in dialogues]  # the long one, as training


def test_the_key_is_required_and_never_logged(server, tiny_ckpt):
    chat = {"model": server.name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                               ("POST", "/v1/extract", {"dialogue": DIALOGUES[1]})):
        for key in (None, "sk-wrong-key-000000", KEY[:-1]):
            status, answer = call(server, method, path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, key)
        status, answer = call(server, method, path, body)
        assert status == 200, (path, answer)
    status, models = call(server, "GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == [server.name]
    assert call(server, "GET", f"/v1/models/{server.name}")[1]["id"] == server.name
    # with --served_model_name, the directory's name is not served
    assert call(server, "GET", f"/v1/models/{os.path.basename(tiny_ckpt)}")[0] == 404
    assert call(server, "GET", "/health", key=None)[0] == 200  # no key needed to see that it lives
    # a key sent in the query, as some clients do, is not how this server takes one, and is never logged either
    assert call(server, "GET", f"/v1/models?api_key={KEY}&x=1", key=None)[0] == 401
    assert call(server, "GET", f"/v1/models?api_key={KEY}")[0] == 200
    log = server.log.read_text(errors="replace")
    assert KEY not in log and "/v1/models?<query left out>" in log


MEGABYTES = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 3_000_000 + b'"}]}'


def user(text="你好", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


MALFORMED = {
    "not JSON": ("/v1/chat/completions", b'{"messages": [', 400),
    "not UTF-8": ("/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400),
    "a JSON array": ("/v1/chat/completions", b"[1, 2]", 400),
    "nested too deep": ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
    "messages not a list": ("/v1/chat/completions", {"messages": "hi"}, 400),
    "content a number": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    "content a lone surrogate": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                                 400),
    "two user turns": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                                             {"role": "user", "content": "b"}]}, 400),
    "unknown model": ("/v1/chat/completions", user(model="gpt-17"), 404),
    "negative max_tokens": ("/v1/chat/completions", user(max_tokens=-5), 400),
    "max_tokens a string": ("/v1/chat/completions", user(max_tokens="8"), 400),
    "max_tokens past the context": ("/v1/chat/completions", user(max_tokens=10 ** 6), 400),
    "max_tokens past --max_tgt_len": ("/v1/chat/completions", user(max_tokens=MAX_TOKENS + 1), 400),
    "max_completion_tokens past --max_tgt_len": ("/v1/chat/completions",
                                                 user(max_tokens=None, max_completion_tokens=MAX_TOKENS + 1), 400),
    "temperature a string": ("/v1/chat/completions", user(temperature="hot"), 400),
    "top_p zero": ("/v1/chat/completions", user(top_p=0), 400),
    "repetition_penalty negative": ("/v1/chat/completions", user(repetition_penalty=-1), 400),
    "n of 2": ("/v1/chat/completions", user(n=2), 400),
    "stream a string": ("/v1/chat/completions", user(stream="yes"), 400),
    "an invalid grammar": ("/v1/chat/completions", user(structured_outputs={"grammar": 'root ::= "a" undefined'}),
                           400),
    # grammars that compile but admit no answer (before, the engine failed them: a 500 counted as a server error)
    "a grammar whose root never ends": ("/v1/chat/completions", user(structured_outputs={"grammar": "root ::= root"}),
                                        400),
    "a grammar that dead-ends after a token": ("/v1/chat/completions", user(structured_outputs={
        "grammar": 'root ::= "a" b\nb ::= "c" b'}), 400),
    "a grammar with one dead alternative": ("/v1/chat/completions", user(structured_outputs={
        "grammar": 'root ::= "a" | "b" dead\ndead ::= dead "x"'}), 400),
    "a grammar of an empty character class": ("/v1/chat/completions", user(structured_outputs={
        "grammar": 'root ::= [^\\x00-\\U0010ffff]'}), 400),
    "a grammar not a string": ("/v1/chat/completions", user(structured_outputs={"grammar": 7}), 400),
    "json_schema": ("/v1/chat/completions", user(response_format={"type": "json_schema"}), 400),
    "json_object below the shortest answer": ("/v1/chat/completions",
                                              user(response_format={"type": "json_object"}), 400),
    "a prompt past the context": ("/v1/chat/completions", {"messages": [
        {"role": "system", "content": "很长的系统提示。" * 2000}, {"role": "user", "content": "你好"}]}, 400),
    "a body of megabytes": ("/v1/chat/completions", MEGABYTES, 413),
    "extract without a dialogue": ("/v1/extract", {"text": "x"}, 400),
    "extract dialogue a list": ("/v1/extract", {"dialogue": ["a"]}, 400),
    "extract empty dialogue": ("/v1/extract", {"dialogue": "  "}, 400),
    "extract megabytes": ("/v1/extract", b'{"dialogue": "' + b"a" * 2_000_000 + b'"}', 413),
    "no such route": ("/v1/completions", {"prompt": "x"}, 404),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_and_the_server_lives(server, name):
    path, body, expected = MALFORMED[name]
    before = health(server)
    status, answer = call(server, "POST", path, body)
    assert status == expected, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in answer["error"]["message"]
    after = health(server)
    assert after["status"] == "ok" and after["errors"] == before["errors"]


def test_max_tokens_past_max_tgt_len_names_the_limit(server):
    status, answer = call(server, "POST", "/v1/chat/completions", user(max_tokens=MAX_TOKENS + 1))
    assert status == 400 and answer["error"]["param"] == "max_tokens"
    assert f"at most {MAX_TOKENS}" in answer["error"]["message"] and "--max_tgt_len" in answer["error"]["message"]
    assert call(server, "POST", "/v1/chat/completions", user(max_tokens=MAX_TOKENS))[0] == 200


def test_a_wrong_method_is_a_4xx_in_openai_format_and_says_what_is_allowed(server):
    for path in ("/v1/chat/completions", "/v1/extract"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 405 and "message" in answer["error"] and response.getheader("Allow") == "POST"


def test_head_works_where_get_does(server):
    for path in ("/health", "/", "/v1/models", f"/v1/models/{server.name}"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("HEAD", path, headers={"Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b"", path
        connection.close()


def send_raw(server: Server, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A POST sent on a socket of its own, `length` its Content-Length (the body's own by default); the caller
    reads or hangs up."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
                 .encode() + body)
    return sock


def test_a_client_that_leaves_mid_body_is_one_log_line(server):
    for path in ("/v1/extract", "/v1/chat/completions"):
        sock = send_raw(server, path, b'{"dialogue": "\xe6\x82\xa3\xe8\x80\x85', length=100_000)
        time.sleep(0.2)
        sock.close()
    deadline = time.monotonic() + 10
    while server.log.read_text(errors="replace").count("the client left after") < 2:
        assert time.monotonic() < deadline, server.log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    log = server.log.read_text(errors="replace")
    assert "POST /v1/extract: the client left after 20 of 100000 body bytes" in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert health(server)["status"] == "ok"


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                    reason="Debian's chromium and chromium-driver are not installed (.ci/run "
                                           "installs them)")


@contextlib.contextmanager
def browser(tmp_path: Path):
    """Headless Chromium through chromedriver, its profile under `tmp_path`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def paste_and_extract(driver, dialogue: str) -> None:
    """The dialogue put in as a person's paste would leave it (the textarea's value), Extract clicked, the answer
    waited for."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("arguments[0].value = arguments[1];", driver.find_element(By.ID, "dialogue"), dialogue)
    driver.execute_script("document.body.dataset.state = '';")
    driver.find_element(By.ID, "extract").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                    == "done")


def check_page_answer(driver, dialogue: str, expected: dict, span_keys) -> None:
    """The page shows `expected` (a /v1/extract answer's fields): one row per field in its order, the span items
    as chips and the text fields as text, and the dialogue whole with each mark at its item's offsets."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#fields tbody tr")
    assert [r.get_attribute("data-field") for r in rows] == list(expected)
    for row in rows:
        key = row.get_attribute("data-field")
        assert row.find_element(By.TAG_NAME, "th").get_property("textContent") == key
        cell = row.find_element(By.TAG_NAME, "td")
        if key in span_keys:
            shown = [s.get_property("textContent") for s in cell.find_elements(By.CLASS_NAME, "item")]
            assert shown == [item["text"] for item in expected[key]]
        else:
            assert cell.text == expected[key].strip()
    view = driver.find_element(By.ID, "dialogue-view")
    assert view.get_property("textContent") == dialogue  # marks wrap spans; nothing added or lost
    marks = view.find_elements(By.TAG_NAME, "mark")
    spans = {(item["text"], key) for key in span_keys for item in expected[key]}
    assert marks and all((m.get_property("textContent"), m.get_attribute("data-field")) in spans for m in marks)
    # each mark sits at its offset: the text before it is the dialogue up to `start`
    offsets = driver.execute_script("""
        const view = document.getElementById('dialogue-view'); let at = 0; const out = [];
        for (const node of view.childNodes) {
          if (node.nodeName === 'MARK') out.push([at, at + node.textContent.length]);
          at += node.textContent.length;
        }
        return out;""")
    starts = {(item["start"], item["end"]) for key in span_keys for item in expected[key]}
    assert all(tuple(o) in starts and dialogue[o[0]:o[1]] for o in offsets)


@needs_chromium
def test_the_page_extracts_and_highlights_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answers = {d: extract(server, d) for d in DIALOGUES}
    dialogue = next(d for d, a in answers.items() if any(a["fields"][k] for k in LIST_KEYS))
    with browser(tmp_path) as driver:
        driver.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "field-count").text == "eight")
        box = driver.find_element(By.ID, "dialogue")
        driver.execute_script("arguments[0].value = arguments[1];", box, dialogue)
        driver.find_element(By.ID, "extract").click()  # no key yet: the server refuses, the page says so
        WebDriverWait(driver, 30).until(lambda d: "401" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        paste_and_extract(driver, dialogue)
        check_page_answer(driver, dialogue, answers[dialogue]["fields"], LIST_KEYS)
        assert driver.find_element(By.ID, "random-note").is_displayed()  # make_tiny's model: its answers are noise
        marks = driver.find_elements(By.CSS_SELECTOR, "#dialogue-view mark")
        assert {m.get_attribute("class") for m in marks} <= {f"f{i}" for i in range(len(LIST_KEYS))}


# --------------------------------------------------------------------------------------------------------------
# A schema of the user's own, carried by the model directory
# --------------------------------------------------------------------------------------------------------------

# the fields of a model trained with train.py --schema; the last name is markup, which the page must show as text
OWN_SCHEMA = {"fields": [{"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"},
                         {"name": "诊断<b>结果</b>", "kind": "text"}]}  # no instruction: one is written for them
SCHEMA = schema_from_json(OWN_SCHEMA, "OWN_SCHEMA")


@pytest.fixture(scope="module")
def schema_ckpt(tiny_ckpt, tmp_path_factory) -> str:
    """The tiny model as train.py and merge_params.py leave one trained with OWN_SCHEMA: schema.json beside it (the
    other files link to the tiny model's)."""
    model = tmp_path_factory.mktemp("own_schema") / "model"
    model.mkdir()
    for entry in os.listdir(tiny_ckpt):
        os.symlink(os.path.join(tiny_ckpt, entry), model / entry)
    (model / "schema.json").write_text(SCHEMA.text(), encoding="utf-8")
    return str(model)


@pytest.fixture(scope="module")
def schema_server(schema_ckpt, tmp_path_factory):
    server = start_server(schema_ckpt, tmp_path_factory.mktemp("schema_serve") / "server.log",
                          "--max_tgt_len", str(MAX_TOKENS), "--grammar_workers", "1")
    yield server
    stop_server(server)


def test_health_names_the_chapters_fields_by_default(server):
    assert [(f["name"], f["kind"]) for f in health(server)["fields"]] == [tuple(f) for f in CHAPTER_SCHEMA.fields]


def test_a_model_with_a_schema_of_its_own_is_served_its_fields(schema_server):
    assert health(schema_server)["fields"] == OWN_SCHEMA["fields"]
    assert "schema: 3 fields from " in schema_server.log.read_text(encoding="utf-8")
    items = 0
    for dialogue in DIALOGUES:  # the last one cut past --max_src_len
        answer = extract(schema_server, dialogue)
        assert answer["valid"] is True and list(answer["fields"]) == list(SCHEMA.keys), answer["output"]
        assert list(json.loads(answer["output"].removeprefix("```json\n").removesuffix("\n```"))) == list(SCHEMA.keys)
        for key in SCHEMA.span_keys:
            for item in answer["fields"][key]:
                assert dialogue[item["start"]:item["end"]] == item["text"], (key, item)
                items += 1
        assert all(isinstance(answer["fields"][key], str) for key in SCHEMA.text_keys)
    assert items  # the random model copies some spans: the offsets were checked on real items


def test_a_chat_extraction_prompt_answers_the_schemas_fields(schema_server):
    """The schema's instruction + dialogue is an extraction prompt: json_object answers its fields, and its
    grounded grammar sent as a client's is recognised (the answer is /v1/extract's, token for token)."""
    dialogue = DIALOGUES[0]
    messages = [{"role": "user", "content": SCHEMA.instruction + dialogue}]
    for extra in ({"response_format": {"type": "json_object"}},
                  {"structured_outputs": {"grammar": build_ebnf(dialogue, "grounded", SCHEMA.fields)}}):
        status, answer = call(schema_server, "POST", "/v1/chat/completions",
                              {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra})
        assert status == 200, answer
        content = answer["choices"][0]["message"]["content"]
        fields, valid = parse_output(content, SCHEMA.fields)
        assert valid and list(json.loads(content.removeprefix("```json\n").removesuffix("\n```"))) == \
            list(SCHEMA.keys), content
    assert content == extract(schema_server, dialogue)["output"]


@needs_chromium
def test_the_page_shows_a_schemas_own_fields_in_a_real_browser(schema_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answers = {d: extract(schema_server, d) for d in DIALOGUES[:4]}
    dialogue = next(d for d, a in answers.items() if any(a["fields"][k] for k in SCHEMA.span_keys))
    with browser(tmp_path) as driver:
        driver.get(f"http://127.0.0.1:{schema_server.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "field-count").text == "three")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        paste_and_extract(driver, dialogue)
        check_page_answer(driver, dialogue, answers[dialogue]["fields"], SCHEMA.span_keys)
        assert driver.find_elements(By.CSS_SELECTOR, "#fields b") == []  # a name is text, never markup
        # more span fields than colours: the colours come round again, in the schema's order
        many = [{"name": f"字段{i}", "kind": "text" if i % 3 == 0 else "spans"} for i in range(14)]
        assert driver.execute_script("return Array.from(colours(arguments[0]).values());", many) == \
            [f"f{i % 8}" for i in range(9)]


def test_a_schema_other_than_the_models_is_one_line(schema_ckpt, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"fields": OWN_SCHEMA["fields"][:2]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        serve.main(["--model_path", schema_ckpt, "--schema", str(other), "--device", "cpu", "--port",
                    str(free_port())])
    message = str(stopped.value.code)
    assert message.startswith(f"serve.py: error: --schema {other} differs from the schema ") and "\n" not in message
    assert "leave --schema out" in message and capsys.readouterr().err == ""
    same = tmp_path / "same.json"
    same.write_text(SCHEMA.text(), encoding="utf-8")
    args = serve.parse_args(["--model_path", schema_ckpt, "--schema", str(same), "--device", "cpu", "--port",
                             str(free_port())])
    assert schema_of(args) == SCHEMA


# --------------------------------------------------------------------------------------------------------------
# A hostile client, on a server of small bounds
# --------------------------------------------------------------------------------------------------------------

BOUNDED_TOKENS = 256  # long enough for an answer to be under way when its client leaves
GRAMMAR_TIMEOUT = 3.0
MAX_GRAMMAR_BYTES = 65_536
# a chain of `[a-z]*` compiles in time that grows faster than its length: 0.65 s at 100 terms, 5 s at 200; 300 is
# far past GRAMMAR_TIMEOUT on any machine
SLOW_GRAMMAR = "root ::= " + " ".join(["[a-z]*"] * 300)
HUGE_LINES = "患者：我头疼得厉害，还有点发烧，吃了布洛芬。\n医生：先量个体温，做个血常规。\n"
HUGE_DIALOGUE = HUGE_LINES * (900_000 // len(HUGE_LINES.encode()))  # 900 KB, under --max_body_bytes


@pytest.fixture(scope="module")
def bounded(tiny_ckpt, tmp_path_factory):
    server = start_server(tiny_ckpt, tmp_path_factory.mktemp("bounded") / "server.log",
                          "--max_tgt_len", str(BOUNDED_TOKENS), "--grammar_workers", "1",
                          "--grammar_timeout", str(GRAMMAR_TIMEOUT), "--max_grammar_bytes", str(MAX_GRAMMAR_BYTES))
    yield server
    stop_server(server)


def chat_with(grammar: str, content: str = "你好", max_tokens: int = 8, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "structured_outputs": {"grammar": grammar}, **extra}


def resident_mb(server: Server) -> float:
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def wait_for(condition, seconds: float, what) -> float:
    """Seconds until `condition()` held; fails with `what()` after `seconds`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, what()
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_grammar_past_a_bound_gets_a_400_naming_its_flag(bounded, tokenizer):
    started = time.monotonic()
    status, answer = call(bounded, "POST", "/v1/chat/completions", chat_with(SLOW_GRAMMAR))
    took = time.monotonic() - started
    assert status == 400 and answer["error"]["code"] == "grammar_too_slow", answer
    assert "--grammar_timeout" in answer["error"]["message"] and f"{GRAMMAR_TIMEOUT:g} s" in answer["error"]["message"]
    assert GRAMMAR_TIMEOUT <= took < GRAMMAR_TIMEOUT + 5
    big = "root ::= " + " | ".join(f'"{i}"' for i in range(MAX_GRAMMAR_BYTES // 8))
    status, answer = call(bounded, "POST", "/v1/chat/completions", chat_with(big))
    assert status == 400 and answer["error"]["code"] == "grammar_too_large", answer
    assert "--max_grammar_bytes" in answer["error"]["message"] and str(MAX_GRAMMAR_BYTES) in answer["error"]["message"]
    # a dialogue of long tokens (runs of dashes, slashes) made to fill --max_src_len: its answer grammar, built only
    # for the part the model reads, is still 500 KB, past the bound
    rng = random.Random(0)
    long_tokens = [t.decode() for t in tokenizer.mergeable_ranks if len(t) > 15 and t.strip() and t.isascii()]
    dialogue = "".join(rng.choice(long_tokens) for _ in range(4000))
    status, answer = call(bounded, "POST", "/v1/extract", {"dialogue": dialogue})
    assert status == 400 and answer["error"]["param"] == "dialogue", answer
    assert "--max_grammar_bytes" in answer["error"]["message"]
    assert health(bounded)["errors"] == 0


def test_a_huge_dialogue_costs_neither_seconds_nor_memory(bounded):
    """900 KB: the prompt keeps --max_src_len tokens of it, and nothing is built for the rest (an answer-shaped
    grammar with it once took 25 s and 600 MB to recognise)."""
    before = resident_mb(bounded)
    answer_head = build_ebnf(DIALOGUES[0], "grounded")  # the answer grammar's form, of another dialogue
    for path, body in (("/v1/chat/completions", chat_with(answer_head, INSTRUCTION + HUGE_DIALOGUE)),
                       ("/v1/extract", {"dialogue": HUGE_DIALOGUE})):
        started = time.monotonic()
        status, answer = call(bounded, "POST", path, body)
        assert status == 200, answer
        assert time.monotonic() - started < 10, path
    assert resident_mb(bounded) - before < 200


def test_a_grammar_whose_client_leaves_stops_compiling_at_once(bounded):
    wait_for(lambda: health(bounded)["grammar_workers_idle"] == 1, 60, lambda: health(bounded))
    before = health(bounded)
    sock = send_raw(bounded, "/v1/chat/completions", json.dumps(chat_with(SLOW_GRAMMAR + " [a-z]")).encode())
    wait_for(lambda: health(bounded)["grammars_vetting"] == 1, 10, lambda: health(bounded))
    time.sleep(0.3)
    sock.close()
    # killed long before the compile's own bound
    took = wait_for(lambda: health(bounded)["grammar_workers_killed"] > before["grammar_workers_killed"], 5,
                    lambda: health(bounded))
    assert took < GRAMMAR_TIMEOUT - 1
    wait_for(lambda: health(bounded)["grammar_workers_idle"] == 1, 60, lambda: health(bounded))  # replaced


def test_nothing_one_client_sends_stalls_an_extraction(bounded):
    """One client sends grammars that would compile for minutes (leaving on some, waiting out the bound on others),
    grammars that admit nothing or do not parse, and a huge dialogue under an answer-shaped grammar; meanwhile an
    ordinary /v1/extract answers within twice its lone time (medians: alone, before and after; beside the attack)."""
    wait_for(lambda: health(bounded)["grammar_workers_idle"] == 1, 60, lambda: health(bounded))
    lone_tokens = extract(bounded, DIALOGUES[1])["usage"]["completion_tokens"]  # its grammar compiled and cached

    def timed_extract() -> float:
        started = time.monotonic()
        assert extract(bounded, DIALOGUES[1])["usage"]["completion_tokens"] == lone_tokens
        return time.monotonic() - started

    alone = [timed_extract() for _ in range(3)]
    before = health(bounded)
    stop = threading.Event()
    counter = iter(range(10 ** 6))

    def leaver():  # a different grammar each time, so that none is cached
        while not stop.is_set():
            sock = send_raw(bounded, "/v1/chat/completions",
                            json.dumps(chat_with(SLOW_GRAMMAR + f' "{next(counter)}"')).encode())
            time.sleep(0.3)
            sock.close()

    def waiter():  # waits for its answer (a 400 at the bound, or a 503 while the worker restarts), or for the end
        while not stop.is_set():
            with send_raw(bounded, "/v1/chat/completions",
                          json.dumps(chat_with(SLOW_GRAMMAR + f' "w{next(counter)}"')).encode()) as sock:
                sock.settimeout(0.1)
                received = b""
                while not stop.is_set() and b"\r\n" not in received:
                    try:
                        received += sock.recv(4096)
                    except TimeoutError:
                        pass
                assert not received or received.split(b" ")[1] in (b"400", b"503"), received[:100]

    huge_answered = threading.Event()

    def spammer():
        huge = chat_with(build_ebnf(DIALOGUES[0]), INSTRUCTION + HUGE_DIALOGUE)
        assert call(bounded, "POST", "/v1/chat/completions", huge)[0] == 200
        huge_answered.set()
        while not stop.is_set():
            for grammar in ("root ::= root", 'root ::= "a" b\nb ::= b', f'root ::= "{next(counter)}" undefined'):
                assert call(bounded, "POST", "/v1/chat/completions", chat_with(grammar))[0] == 400
            time.sleep(0.1)

    with ThreadPoolExecutor(max_workers=3) as pool:
        attackers = [pool.submit(role) for role in (leaver, waiter, spammer)]
        try:
            # the huge request's answer is generated in the extraction's batch, as any request's would be: sharing
            # the engine is no stall (its grammar was bounded before that), so it is waited for
            assert huge_answered.wait(60)
            time.sleep(1.0)  # the rest of the attack under way
            beside = [timed_extract() for _ in range(5)]
        finally:
            stop.set()
        for attacker in attackers:
            attacker.result(timeout=60)  # each stops within a request's time; their own assertions held
    after = health(bounded)
    alone += [timed_extract() for _ in range(2)]
    assert after["grammar_workers_killed"] > before["grammar_workers_killed"]  # the attack did reach the workers
    assert after["errors"] == before["errors"]
    lone, during = statistics.median(alone), statistics.median(beside)
    print(f"\nextraction: {lone:.2f} s alone (median of {alone}), {during:.2f} s beside the attack ({beside})")
    assert during <= 2 * lone, f"an extraction took {during:.2f} s beside the attack, {lone:.2f} s alone"


def test_a_client_that_leaves_stops_its_answer(bounded):
    """A streamed and a plain request with a long budget (the random model never stops by itself): each client
    hangs up while its answer is generated, and the answer is cancelled instead of running to its 256 tokens."""
    for stream in (True, False):
        before = health(bounded)
        body = json.dumps({"messages": [{"role": "user", "content": "写一篇长文章"}], "max_tokens": BOUNDED_TOKENS,
                           "stream": stream}).encode()
        sock = send_raw(bounded, "/v1/chat/completions", body)
        if stream:  # the headers, then the first chunk: the answer is under way
            received = b""
            while b"data:" not in received:
                received += sock.recv(4096)
        else:
            wait_for(lambda: health(bounded)["running"] == 1, 10, lambda: health(bounded))
        sock.close()
        wait_for(lambda: health(bounded)["cancelled"] > before["cancelled"], 15, lambda: health(bounded))
        assert health(bounded)["running"] == 0


def test_ctrl_c_while_the_model_loads_is_one_line(tiny_ckpt, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve, "load_engine", interrupted)
    with pytest.raises(SystemExit) as stopped:
        serve.main(["--model_path", tiny_ckpt, "--device", "cpu", "--port", str(free_port())])
    assert stopped.value.code == 130
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert said == [f"serve.py: interrupted while loading {tiny_ckpt}; nothing was served"]


def test_extract_offsets_point_into_the_dialogue_as_sent_in_any_normal_form(server):
    """NFC, NFD and mixed dialogues, cut (past --max_src_len) and whole: every offset /v1/extract returns satisfies
    dialogue[start:end] == text (tests/test_offsets.py shows the grammar of a cut NFD dialogue admitting its own
    spans and not the precomposed ones)."""
    import unicodedata

    base = "患者：ééé ççç ñññ üüü，头疼，吃了布洛芬。\n医生：naïve café résumé，先查个血常规。\n"
    forms = {"nfc": unicodedata.normalize("NFC", base), "nfd": unicodedata.normalize("NFD", base),
             "mixed": unicodedata.normalize("NFD", base) + unicodedata.normalize("NFC", base)}
    checked = 0
    for name, text in forms.items():
        for repeat in (1, 60):  # whole, and far past --max_src_len
            dialogue = text * repeat
            body = extract(server, dialogue)
            assert body["truncated"] in (True, False)
            for key in LIST_KEYS:
                for item in body["fields"][key]:
                    assert item["start"] is not None, (name, repeat, item)
                    assert dialogue[item["start"]:item["end"]] == item["text"]
                    checked += 1
    assert checked > 0


def test_a_random_model_says_so(server):
    """The test server runs make_tiny's model: /health and /v1/extract say its weights are random, and serve.py said
    so once at start (the page shows the line: test_the_page_extracts_and_highlights_in_a_real_browser)."""
    assert health(server)["random_weights"] is True
    assert extract(server, DIALOGUES[0])["random_weights"] is True
    assert server.log.read_text(encoding="utf-8").count("this model has random weights") == 1
